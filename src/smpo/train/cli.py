"""``smpo train``: train SmPO, Diffusion-DPO, Diffusion-KTO, MaPO or SFT (see docs/training.md).

Every option is a field of :class:`smpo.train.config.TrainConfig`; ``--config`` reads a YAML recipe
(``configs/<family>/<method>.yaml``) and the options given on the command line override it.
"""

from __future__ import annotations

import argparse
import sys

from smpo.train.config import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Example: smpo train --config configs/sd15/smpo.yaml --pretrained stable-diffusion-v1-5/stable-diffusion-v1-5 "
                     "--dataset labelled/ --output-dir runs/smpo. Several GPUs: accelerate launch -m smpo.cli train ...")
    add_config_arguments(parser)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit without training")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the memory per process that the run's weights, gradients, optimizer state and "
                             "reference need at 1, 8 and 64 processes (parameters counted from the config files, "
                             "no weights loaded) and exit without training")


def run(args: argparse.Namespace) -> int:
    from smpo.train.config import dump_config

    # Config and input mistakes raise ValueError / OSError: one line and exit 2 (smpo.cli.main).
    config = config_from_args(args)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    if args.dry_run:
        from smpo.train.memory import dry_run_report

        if not config.model.pretrained:
            raise ValueError("--dry-run needs --pretrained (a pipeline folder or hub id)")
        config.objective = config.objective.resolved()
        print(dry_run_report(config))
        return 0
    config.validate()
    config.objective.resolved()
    from smpo.train.loop import NonFiniteLossError, train

    try:
        result = train(config)
    except NonFiniteLossError as err:  # not the input's fault: the run diverged
        print(f"smpo train: error: {err}", file=sys.stderr)
        return 1
    last = result.metrics[-1] if result.metrics else {}
    print(f"trained {result.step} steps; loss {last.get('loss', float('nan')):.4g}; "
          f"weights: {result.export}; run folder: {result.run_dir}")
    return 0
