"""Peak resident memory per process of one SD1.5-size SmPO step: 2 CPU processes sharded (FSDP2)
against 1 process with a whole copy.

A script, not a test. It saves an SD1.5-architecture pipeline with random weights
(``smpo.models.presets``, preset ``sd15``: the real UNet config, 860 M parameters, with the real VAE
and CLIP-L text encoder; no download) and a few random 256 px pairs, then runs ``smpo train``'s
own code (``smpo.train.train`` on the config the command line gives) for one optimizer step of
SmPO fully fine-tuned (policy, frozen reference, AdamW; one pair per process, bf16 mixed precision
as on a GPU, the reference in bf16; forward noising, so that two sharded processes fit a 24 GB
machine: sharded, the live inversion adds the inverting network's whole bf16 weights, 1.7 GB per
process, which docs/benchmarks.md's table counts), once as 1 process and once as ``torchrun --nproc_per_node 2 ...
--sharding fsdp``. Each process records its peak resident set (``ru_maxrss``) right after the
step, before the checkpoint and the export (which gathers the whole weights onto the main process),
and stops there. The UNet dominates: the VAE and text encoder are 0.2 B parameters, kept whole on
every process.

Before each run it checks that the machine's available memory covers the run's weights,
gradients, optimizer state and reference (``smpo.train.memory.estimate``) plus 1.5 GB, and stops
if not. Example (several minutes, about 17 GB)::

    nice python benchmarks/bench_memory.py --work /tmp/bench-memory --out benchmarks/results/memory-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing smpo
    sys.path.insert(0, str(ROOT / "src"))


class _Stop(Exception):
    """Raised after the measured step: no checkpoint, no export."""


def worker(argv: list[str], out: Path) -> int:
    """One process of a run: train one step with ``argv`` and write its peak resident memory."""
    from smpo.train import train
    from smpo.train.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    config = config_from_args(parser.parse_args(argv))
    rank = int(os.environ.get("RANK", "0"))

    def record(step: int, metrics: dict) -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        (out / f"rank-{rank}.json").write_text(json.dumps({"peak_rss_bytes": peak, "seconds": metrics["seconds"],
                                                           "loss": metrics["loss"]}))
        raise _Stop

    try:
        train(config, on_step=record)
    except _Stop:
        return 0
    return 1


def _available() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024
    return float("inf")


def _needed(pipeline: Path, processes: int) -> float:
    """What all the processes of a run hold together (states only), in bytes."""
    from smpo.train.memory import count_parameters, estimate

    counts = count_parameters(str(pipeline), "sd15", lora_rank=1)
    each = estimate(counts, finetune="full", optimizer="adamw", processes=processes, sharded=processes > 1,
                    reference_bytes=2, compute_bytes=2, needs_reference=True, gathers_inverter=False, from_cache=False)
    return processes * each.total


def _train_args(pipeline: Path, data: Path, run: Path) -> list[str]:
    return ["--pretrained", str(pipeline), "--dataset", str(data), "--output-dir", str(run), "--overwrite",
            "--method", "smpo", "--finetune", "full", "--optimizer", "adamw", "--resolution", "256",
            "--batch-size", "1", "--gradient-accumulation-steps", "1", "--max-steps", "1", "--warmup-steps", "0",
            "--mixed-precision", "bf16", "--reference-dtype", "bf16", "--noising", "forward", "--checkpoint-every", "0",
            "--no-progress"]


def run(processes: int, pipeline: Path, data: Path, work: Path) -> list[dict]:
    """One measured run; its processes' records."""
    needed, available = _needed(pipeline, processes), _available()
    if available < needed + 1.5e9:
        raise SystemExit(f"bench_memory: {processes} process(es) need about {needed / 1e9:.1f} GB + 1.5 GB, "
                         f"only {available / 1e9:.1f} GB are available; stopped")
    out = work / f"records-{processes}"
    out.mkdir(parents=True, exist_ok=True)
    args = ["--worker", str(out), "--", *_train_args(pipeline, data, work / f"run-{processes}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if processes > 1 else "2", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    if processes == 1:
        command = [sys.executable, __file__, *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", port, __file__, *args, "--sharding", "fsdp"]
    subprocess.run(command, env=env, check=True)
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(processes)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/smpo-bench-memory"), help="pipeline, data, runs")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker is not None:
        return worker([a for a in rest if a != "--"], args.worker)

    from smpo.models.presets import save_pipeline

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_train import write_dataset

    pipeline, data = args.work / "pipeline-sd15", args.work / "pairs-256"
    if not (pipeline / "model_index.json").is_file():
        save_pipeline(pipeline, "sd15", "sd15")
    if not data.is_dir():
        write_dataset(data, 4, 256, seed=0)
    results = {str(n): run(n, pipeline, data, args.work) for n in (1, 2)}
    for n, records in results.items():
        peaks = ", ".join(f"{r['peak_rss_bytes'] / 2**30:.2f} GiB" for r in records)
        print(f"{n} process(es): peak resident memory per process {peaks}; step {records[0]['seconds']:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
