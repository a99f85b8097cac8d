"""What ``smpo online`` measures each round: the evaluation prompts' rewards under a policy, and
the compute spent (network evaluations of sampling and of training, seconds).

The evaluation samples and scores with ``smpo pairs``' code (:func:`smpo.data.pair_images.sample_and_score`,
the same pipeline loading, seeds and scorer); its prompts are cut into shards of ``shard_size``,
process ``i`` of ``n`` takes shards ``i, i + n, ...`` and writes each shard's scores atomically
(no images are kept), and the main process writes the summary once all are there. So it resumes
shard by shard and runs on every process of a launch, like ``smpo pairs``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from smpo.io import atomic_path, read_json, write_json

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def distribution(scores: Any) -> dict[str, Any]:
    """Count, mean, standard deviation and quantiles of a list of rewards."""
    values = np.asarray(scores, dtype=np.float64)
    return {"images": int(values.size), "mean": float(values.mean()), "std": float(values.std()),
            "quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))}}


def sampling_calls_per_image(model: str, steps: int, guidance_scale: float) -> int:
    """Network evaluations a pipeline spends on one image: one per timestep its scheduler visits
    with ``steps`` (PNDM's PLMS visits one more than asked), twice with classifier-free guidance
    (``guidance_scale > 1``; a guidance-distilled FLUX transformer evaluates once and is counted
    twice here)."""
    import diffusers

    try:
        scheduler_config = diffusers.DDPMScheduler.load_config(model, subfolder="scheduler")
        scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
        scheduler.set_timesteps(steps)
        visits = len(scheduler.timesteps)
    except Exception:  # noqa: BLE001 - a scheduler that needs more to set its timesteps (FLUX's shift): steps
        visits = steps
    return visits * (2 if guidance_scale > 1 else 1)


def training_compute(run_dir: Path, processes: int) -> dict[str, float]:
    """Network evaluations (every process's) and seconds of a training run, from its metrics."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"steps": len(records), "network_evals": float(sum(r["unet_evals"] for r in records)) * processes,
            "step_seconds": float(sum(r["seconds"] for r in records))}


def evaluate_policy(out: Path, *, model: str, unet: str | None, prompts: list, scorer: Any, images_per_prompt: int,
                    seed: int, steps: int, guidance_scale: float | None, height: int | None, width: int | None,
                    batch_size: int, shard_size: int, dtype: str | None) -> dict[str, Any]:
    """Sample ``images_per_prompt`` images of each prompt with the base ``model`` and ``unet`` (a
    trained network or LoRA, or None), score them; return (and write to ``out``) the reward
    distribution. Every process of a launch calls it; the main process writes ``out``."""
    from smpo.data.generators import GeneratorSpec
    from smpo.data.pair_images import sample_and_score
    from smpo.evaluation.pipelines import FAMILY_GUIDANCE_SCALE, detect_family, load_pipeline
    from smpo.io import resolve_dtype
    from smpo.processes import process_state, wait_until

    if out.exists():
        return read_json(out)
    state = process_state()
    work = out.with_name(f".{out.stem}.work")
    family = detect_family(model)
    spec = GeneratorSpec(name="eval", model=model, unet=unet, steps=steps, height=height, width=width,
                         guidance_scale=FAMILY_GUIDANCE_SCALE[family] if guidance_scale is None else guidance_scale)
    num_shards = math.ceil(len(prompts) / shard_size)
    mine = [k for k in range(num_shards) if k % state.num_processes == state.process_index
            and not (work / f"shard-{k:05d}.parquet").exists()]
    if mine:
        device = state.device
        pipe, _ = load_pipeline(model, family=family, unet=unet, dtype=resolve_dtype(dtype, device), device=device)
        for k in mine:
            table = sample_and_score(pipe, spec, prompts[k * shard_size:(k + 1) * shard_size], scorer,
                                     images_per_prompt=images_per_prompt, seed=seed, seed_per_prompt=True,
                                     batch_size=batch_size, image_format="png")
            with atomic_path(work / f"shard-{k:05d}.parquet") as tmp:
                pq.write_table(table.drop_columns(["image"]), tmp)
        del pipe
    if not state.is_main_process:
        wait_until(out.exists, str(out), "smpo online")
        return read_json(out)
    wait_until(lambda: all((work / f"shard-{k:05d}.parquet").exists() for k in range(num_shards)),
               "the other processes' evaluation scores", "smpo online")
    table = pa.concat_tables(pq.read_table(work / f"shard-{k:05d}.parquet") for k in range(num_shards))
    calls = sampling_calls_per_image(model, spec.steps, spec.guidance_scale)
    summary = {**distribution(table.column("score").to_numpy()), "unet": unet, "seed": seed,
               "network_evals": calls * table.num_rows, "scores": table.column("score").to_pylist()}
    write_json(out, summary)
    shutil.rmtree(work, ignore_errors=True)
    return summary
