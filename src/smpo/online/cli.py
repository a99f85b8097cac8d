"""``smpo online``: the command line of :func:`smpo.online.run_online` (docs/online.md)."""

from __future__ import annotations

import argparse
import dataclasses

from smpo.options import add_dataclass_arguments, dataclass_from_args, field_docs

_CHOICES = {"image_format": ["jpeg", "png", "webp"]}
_REPEATED = ("scorer_path", "train_option")  # each use adds values; values may hold commas

EPILOG = """example (three rounds of SmPO on PickScore, 50 steps each, the base as the reference):
  smpo online --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompts parti --scorer pickscore \\
    --rounds 3 --images-per-prompt 4 --train-steps 50 --train-config configs/sd15/smpo.yaml \\
    --train-option optim.gradient_accumulation_steps=16 --eval-prompts hpdv2 --eval-limit 200 --output runs/online
See docs/online.md."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from smpo.methods import METHODS

    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    docs = field_docs(_config_class())
    for name in _REPEATED:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, action="extend", nargs="+",
                            metavar=name.upper(), default=argparse.SUPPRESS, help=docs[name].replace("%", "%%"))
    add_dataclass_arguments(parser, _config_class(), aliases={"output": ("--out",), "guidance_scale": ("--cfg",)},
                            choices={**_CHOICES, "method": list(METHODS)}, exclude=_REPEATED)


def _config_class() -> type:
    from smpo.online.config import OnlineConfig

    return OnlineConfig


def run(args: argparse.Namespace) -> int:
    from smpo.online.rounds import run_online
    from smpo.processes import process_state

    given = vars(args)
    repeated = {name: given.pop(name) for name in _REPEATED if name in given}
    config = dataclasses.replace(dataclass_from_args(_config_class(), args, choices=_CHOICES), **repeated)
    summary = run_online(config)
    state = process_state()
    if state.is_main_process:
        print(format_summary(summary))
    state.destroy_process_group()
    return 0


def format_summary(summary: dict) -> str:
    """One line per round: pairs, the samples' rewards, the evaluation, the compute."""
    lines = [f"smpo online: {len(summary['rounds'])} rounds of {summary['method']} ({summary['finetune']}, reference "
             f"{summary['reference']}) -> {summary['final']}; score range [{summary['score_range'][0]:.6g}, "
             f"{summary['score_range'][1]:.6g}]"]
    for rec in summary["rounds"]:
        s, c = rec["samples"], rec["compute"]
        line = (f"  round {rec['round']}: {rec['num_pairs']} pairs; samples' reward mean {s['mean']:.5g} median "
                f"{s['quantiles']['0.5']:.5g}")
        if rec["eval"]:
            line += f"; eval mean {rec['eval']['mean']:.5g} median {rec['eval']['quantiles']['0.5']:.5g}"
        line += (f"; network evals: sampling {c['sampling_network_evals']:.0f}, training "
                 f"{c['training_network_evals']:.0f}; {c['sampling_seconds']:.1f} s + {c['training_seconds']:.1f} s")
        lines.append(line)
    return "\n".join(lines)
