"""Sharded training (FSDP2) on two gloo CPU processes, launched as users launch it: with the shipped
``configs/accelerate/fsdp.yaml`` (``accelerate launch``) or ``torchrun ... --sharding fsdp``; and the
shipped ``configs/accelerate/ddp.yaml`` (whole copies), so that no launch config ships untested.

- 2 sharded processes x accumulation 1 == 1 whole process x accumulation 2 (the same pairs, the
  same mean gradient, only the summation order differs), full and LoRA, SD1.5 and FLUX;
- each process holds about half of the policy's and the reference's parameters;
- a sharded run killed with SIGKILL, then resumed from its sharded checkpoint == an uninterrupted one;
- the export is a whole diffusers model or LoRA file.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smpo.cli import main
from smpo.models.presets import save_pipeline

ROOT = Path(__file__).resolve().parents[2]
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
DDP_CONFIG = ROOT / "configs" / "accelerate" / "ddp.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def pipelines(tiny_pipelines, tmp_path_factory) -> dict[str, Path]:
    return {"sd15": tiny_pipelines["sd15"], "flux": save_pipeline(tmp_path_factory.mktemp("flux") / "flux", "flux")}


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(launcher: str, argv: list[str], *, script: Path | None = None,
            config: Path = FSDP_CONFIG) -> subprocess.CompletedProcess:
    """``argv`` (``train ...``) on two processes, through a shipped accelerate ``config`` or torchrun."""
    program = [str(script)] if script is not None else ["-m", "smpo.cli"]
    if launcher == "accelerate":
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", "2", "--main_process_port", _free_port(), *program, *argv]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", _free_port(), *program, *argv, "--sharding", "fsdp"]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


def _args(pipeline: Path, data: Path, finetune: str) -> list[str]:
    # SmPO with ReNoise inversion by the policy, smoothed labels, empty prompts and flips.
    return ["train", "--pretrained", str(pipeline), "--dataset", str(data), "--method", "smpo", "--max-steps", "3",
            "--batch-size", "1", "--warmup-steps", "1", "--learning-rate", "1e-4", "--checkpoint-every", "0",
            "--inversion-steps", "2", "--no-progress", "--finetune", finetune, "--lora-rank", "4"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    final = run / "final"
    if (final / "lora").is_dir():
        return load_file(final / "lora" / "pytorch_lora_weights.safetensors")
    network = "unet" if (final / "unet").is_dir() else "transformer"
    return load_file(final / network / "diffusion_pytorch_model.safetensors")


def _assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb) and wa
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def _held_shares(output: str) -> list[float]:
    """Each ``process R of 2 holds H of the policy's T parameters [and H' of the reference's T']`` as H / T."""
    shares = []
    for line in re.findall(r"process \d of 2 holds .*", output):
        numbers = [int(n.replace(",", "")) for n in re.findall(r"[\d,]{2,}", line)]
        shares += [held / total for held, total in zip(numbers[::2], numbers[1::2])]
    return shares


CASES = [("sd15", "full", "torchrun"), ("sd15", "lora", "accelerate"), ("flux", "full", "accelerate"),
         ("flux", "lora", "torchrun")]


@pytest.mark.parametrize(("family", "finetune", "launcher"), CASES)
def test_two_sharded_processes_equal_one_process_with_accumulation(family, finetune, launcher, pipelines, labelled,
                                                                   tmp_path):
    args = _args(pipelines[family], labelled, finetune)
    done = _launch(launcher, [*args, "--gradient-accumulation-steps", "1", "--output-dir", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    shares = _held_shares(done.stdout)
    assert len(shares) == (4 if finetune == "full" else 2)  # policy (+ reference) on each of 2 processes
    assert all(0.4 < share < 0.6 for share in shares), shares
    assert main([*args, "--gradient-accumulation-steps", "2", "--output-dir", str(tmp_path / "one")]) == 0
    _assert_same_weights(tmp_path / "two", tmp_path / "one")
    if finetune == "full":  # the gathered export is a whole diffusers model that did train
        import diffusers

        from smpo.models import FAMILIES

        folder = tmp_path / "two" / "final" / FAMILIES[family].network_folder
        network = getattr(diffusers, FAMILIES[family].network_class).from_pretrained(folder)
        initial = getattr(diffusers, FAMILIES[family].network_class).from_pretrained(
            pipelines[family], subfolder=FAMILIES[family].network_folder)
        assert max((a - b).abs().max().item() for a, b in zip(network.parameters(), initial.parameters())) > 1e-4


KILLER = '''
import os, signal, sys
from smpo.train import loop

real_step = loop.train_step

def die_in_step_3(setup, step):
    if step == 2:  # 0-based: after step 2's checkpoint, in the middle of step 3; no cleanup code runs
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(setup, step)

loop.train_step = die_in_step_3
from smpo.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_a_killed_sharded_run_resumes_to_the_uninterrupted_weights(pipelines, labelled, tmp_path):
    args = _args(pipelines["sd15"], labelled, "full") + ["--gradient-accumulation-steps", "2"]
    args[args.index("--max-steps") + 1] = "4"
    args[args.index("--warmup-steps") + 1] = "3"  # the resumed run must also restore the lr schedule
    args[args.index("--checkpoint-every") + 1] = "2"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _launch("accelerate", [*args, "--output-dir", str(straight)])
    assert done.returncode == 0, done.stderr[-3000:]

    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    done = _launch("accelerate", [*args, "--output-dir", str(killed)], script=script)
    assert done.returncode != 0
    checkpoint = killed / "checkpoints" / "step-000002"
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-000002"]
    # The sharded state: one file of shards per process, and each process's schedule and RNG.
    assert len(list((checkpoint / "sharded").glob("*.distcp"))) == 2
    assert (checkpoint / "process-0.pt").is_file() and (checkpoint / "process-1.pt").is_file()

    done = _launch("accelerate", [*args, "--output-dir", str(killed), "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    records = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (straight, killed)]
    assert [r["step"] for r in records[1]] == [1, 2, 3, 4]
    for a, b in zip(*records):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9)
    _assert_same_weights(straight, killed, atol=1e-7)


def test_sharding_errors_are_one_line(cli_error, tiny_pipelines, labelled, tmp_path):
    args = _args(tiny_pipelines["sd15"], labelled, "full") + ["--output-dir", str(tmp_path / "x")]
    assert "needs several processes" in cli_error([*args, "--sharding", "fsdp"])
    assert "use bf16" in cli_error([*args, "--sharding", "fsdp", "--mixed-precision", "fp16"])


def test_the_shipped_ddp_config_trains_whole_copies(tiny_pipelines, labelled, tmp_path):
    args = _args(tiny_pipelines["sd15"], labelled, "full")
    args[args.index("--max-steps") + 1] = "2"
    done = _launch("accelerate", [*args, "--gradient-accumulation-steps", "1", "--output-dir", str(tmp_path / "two")],
                   config=DDP_CONFIG)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "holds" not in done.stdout  # not sharded
    assert main([*args, "--gradient-accumulation-steps", "2", "--output-dir", str(tmp_path / "one")]) == 0
    _assert_same_weights(tmp_path / "two", tmp_path / "one")
