"""Running the study's jobs: one job trains (unless the base), evaluates, and writes its result.

Every run (one rung, learning rate, seed and split) is a job whose result is written atomically
to ``results/<job>.json``; a rerun skips the jobs that have a result, and a killed training
continues from its last checkpoint, so a study resumes where it stopped. Jobs run in ``workers``
separate processes of one thread each (faster than one process with two threads on 2 cores).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from smpo.io import read_json, write_json
from smpo.world.study.rungs import RUNG_BY_KEY, Job, StudyConfig, split_prompts


def run_job(job: Job, cfg: StudyConfig, root: Path, base: Path, dataset: Path) -> dict[str, Any]:
    """Train (unless the base), evaluate, write ``results/<job>.json``; return the result.

    Images of prompt ``p``, image ``i`` use the same diffusion seed for every model of one seed
    (so win rates against the base are paired). Training and images are deleted afterwards; the
    result keeps every image's score.
    """
    result_path = root / "results" / f"{job.name}.json"
    if result_path.is_file():
        return read_json(result_path)
    work = root / "work" / job.name
    with _job_lock(work):  # a worker of an earlier, killed study may still be running this job
        if result_path.is_file():
            return read_json(result_path)
        return _run_job(job, cfg, root, base, dataset, result_path, work)


@contextlib.contextmanager
def _job_lock(work: Path) -> Iterator[None]:
    """Hold ``work``'s lock file (an OS lock, released when its process dies): one process a job."""
    import fcntl

    work.parent.mkdir(parents=True, exist_ok=True)
    with open(work.parent / f".{work.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _run_job(job: Job, cfg: StudyConfig, root: Path, base: Path, dataset: Path, result_path: Path,
             work: Path) -> dict[str, Any]:
    import torch

    from smpo.train.checkpoint import list_checkpoints
    from smpo.train.loop import train
    from smpo.world.reward import load_world_scorer
    from smpo.world.stages import DemoConfig, checkpoint_unet, score_images, train_config

    torch.set_num_threads(1)
    prompts = split_prompts(cfg, job.split)
    per_prompt = cfg.images_per_prompt if job.split == "held_out" else cfg.validation_images_per_prompt
    scorer = load_world_scorer()
    demo_cfg = replace(DemoConfig(), train_steps=cfg.train_steps, batch_size=cfg.batch_size, learning_rate=job.lr,
                       sample_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, seed=job.seed,
                       eval_every=cfg.eval_every if job.split == "held_out" else 0)

    def score(unet: Path | None, tag: str) -> list[float]:
        return score_images(base, unet, prompts, work / "eval" / tag, demo_cfg, scorer, tag,
                            images_per_prompt=per_prompt)

    result: dict[str, Any] = {"job": asdict(job), "prompts": len(prompts), "images_per_prompt": per_prompt}
    if job.rung == "base":
        result["scores"] = {"0": score(None, "base")}
    elif RUNG_BY_KEY[job.rung].online is not None:
        result.update(_online_run(job, cfg, base, dataset, work, demo_cfg))
        rounds = result["online_rounds"] if job.curve else result["online_rounds"][-1:]
        result["scores"] = {str(r["steps"]): score(Path(r["policy"]), f"round-{r['round']}") for r in rounds}
    else:
        rung = RUNG_BY_KEY[job.rung]
        run_dir = work / "run"
        started = time.perf_counter()
        start_unet = None
        if rung.start is not None:  # a first stage of another method, from which the rung starts
            start_dir = work / f"start-{rung.start}"
            if not (start_dir / "final").is_dir():
                train(train_config(rung.start, base, dataset, start_dir, replace(demo_cfg, eval_every=0), resume=True))
            start_unet = start_dir / "final" / "unet"
        config = train_config(rung.method, base, dataset, run_dir, demo_cfg, rung.objective, resume=True,
                              unet=start_unet)
        if rung.cached_inversion:
            config = replace(config, data=replace(config.data, dataset="", cache=str(inversion_cache_dir(root)),
                                                  cached_inversion=True))
        if not (run_dir / "final").is_dir():  # the export is written last, atomically
            train(config)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        result.update(
            train_seconds_this_call=time.perf_counter() - started,
            step_seconds=[r["seconds"] for r in records], unet_evals=[r["unet_evals"] for r in records],
            final_metrics={k: v for k, v in records[-1].items() if isinstance(v, float)},
            objective=asdict(config.objective.resolved()),
        )
        checkpoints = list_checkpoints(run_dir)
        if not job.curve:
            checkpoints = checkpoints[-1:]
        result["scores"] = {}
        for checkpoint in checkpoints:
            step = int(checkpoint.name.split("-")[-1])
            unet = checkpoint_unet(checkpoint, base, work / "unets" / checkpoint.name)
            result["scores"][str(step)] = score(unet, checkpoint.name)
    write_json(result_path, result)
    shutil.rmtree(work, ignore_errors=True)
    return result


def _online_run(job: Job, cfg: StudyConfig, base: Path, dataset: Path, work: Path, demo_cfg: Any) -> dict[str, Any]:
    """Train an online rung with ``smpo online`` (world reward, the study's sampling settings): the
    training record of every step, and each round's policy with its cumulative steps and compute."""
    import numpy as np

    from smpo.online import OnlineConfig, run_online
    from smpo.world.grammar import split
    from smpo.world.stages import train_config

    rung = RUNG_BY_KEY[job.rung]
    rounds = min(cfg.online_rounds, cfg.train_steps)
    steps = cfg.train_steps // rounds
    prompts = split("pairs")
    chosen = sorted(np.random.default_rng(job.seed).choice(len(prompts), size=steps * cfg.batch_size, replace=False))
    prompt_file = work / "prompts.txt"
    work.mkdir(parents=True, exist_ok=True)
    prompt_file.write_text("".join(prompts[i] + "\n" for i in chosen))
    recipe = train_config(rung.method, base, dataset, work / "unused", replace(demo_cfg, train_steps=steps, eval_every=0),
                          rung.objective, resume=True)
    online = OnlineConfig(model=str(base), prompts=str(prompt_file), output=str(work / "online"), scorer="world",
                          rounds=rounds, images_per_prompt=cfg.online_images_per_prompt, sample_steps=cfg.sample_steps,
                          guidance_scale=cfg.guidance_scale, seed=job.seed, reference=rung.online,  # type: ignore[arg-type]
                          train_steps=steps, pairs_per_prompt=1, progress=False)
    summary = run_online(online, train=recipe)
    records = []
    for r in summary["rounds"]:
        lines = Path(r["train_run"], "metrics.jsonl").read_text().splitlines()
        records += [json.loads(line) for line in lines if line]
    done, spent = 0, 0.0
    rounds = []
    for r in summary["rounds"]:
        done += steps
        spent += r["compute"]["sampling_network_evals"] + r["compute"]["training_network_evals"]
        rounds.append({"round": r["round"], "steps": done, "policy": r["policy_out"], "network_evals": spent,
                       "sampling_network_evals": r["compute"]["sampling_network_evals"],
                       "pairs": r["num_pairs"], "samples": r["samples"]})
    return {"step_seconds": [r["seconds"] for r in records], "unet_evals": [r["unet_evals"] for r in records],
            "final_metrics": {k: v for k, v in records[-1].items() if isinstance(v, float)},
            "objective": asdict(recipe.objective.resolved()), "online_rounds": rounds,
            "sampling_network_evals": sum(r["sampling_network_evals"] for r in rounds),
            "sampling_seconds": sum(r["compute"]["sampling_seconds"] for r in summary["rounds"])}


def inversion_cache_dir(root: Path) -> Path:
    """Where a study keeps its ``smpo cache --store-inversion`` of the pair set."""
    return root / "inversion-cache"


def build_inversion_cache(cfg: StudyConfig, root: Path, base: Path, dataset: Path, *, threads: int,
                          progress: Callable[[str], None]) -> None:
    """``smpo cache --store-inversion`` of the pair set with the base as the reference, for the
    rungs with ``cached_inversion`` (their objectives must agree on the inversion settings); nothing
    when no rung needs it or the cache is finished."""
    import torch

    from smpo.data.cache import InversionSpec, build_cache
    from smpo.models import load_family
    from smpo.objective import ObjectiveConfig

    specs = set()
    for key in cfg.rungs:
        rung = RUNG_BY_KEY[key]
        if rung.cached_inversion:
            o = ObjectiveConfig(method=rung.method, **rung.objective).resolved()
            specs.add(InversionSpec(unet=str(base), steps=o.inversion_steps, renoise_iters=o.effective_renoise_iters,
                                    land_on_t=o.land_on_t, guidance=o.inversion_guidance))
    if not specs or (inversion_cache_dir(root) / "manifest.parquet").is_file():
        return
    if len(specs) > 1:
        raise ValueError(f"the cached-inversion rungs disagree on the inversion settings: {specs}")
    progress("smpo study: caching the base's inversion of the pair set (smpo cache --store-inversion)")
    torch.set_num_threads(threads)
    family = load_family(base, with_network=True)
    build_cache(dataset, inversion_cache_dir(root), family, model=str(base), shard_size=512, batch_size=64,
                inversion=specs.pop(), progress=False)


def _run_job_args(args: tuple[Job, StudyConfig, Path, Path, Path]) -> tuple[str, dict[str, Any]]:
    """:func:`run_job` in a worker process: one thread, dependencies quiet."""
    from smpo.cli import quiet_dependencies

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quiet_dependencies()
    job = args[0]
    return job.name, run_job(*args)


def finished_results(jobs: list[Job], root: Path) -> dict[str, dict[str, Any]]:
    """The results already written of ``jobs``, by job name."""
    return {j.name: read_json(root / "results" / f"{j.name}.json") for j in jobs
            if (root / "results" / f"{j.name}.json").is_file()}


def run_jobs(jobs: list[Job], cfg: StudyConfig, root: Path, base: Path, dataset: Path, *, workers: int,
             progress: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run the jobs that have no result yet (in ``workers`` processes); return every job's result."""
    done = finished_results(jobs, root)
    todo = [j for j in jobs if j.name not in done]
    if todo:
        progress(f"{len(todo)} runs to do ({len(done)} already done)")
    started = time.time()
    args = [(j, cfg, root, base, dataset) for j in todo]
    if workers <= 1 or len(todo) <= 1:
        results = map(_run_job_args, args)
        pool = None
    else:
        import multiprocessing

        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(_run_job_args, args)
    try:
        for k, (name, result) in enumerate(results, 1):
            done[name] = result
            elapsed = time.time() - started
            progress(f"  [{k}/{len(todo)}] {name} ({elapsed:.0f} s elapsed, "
                     f"about {elapsed / k * (len(todo) - k):.0f} s left)")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return done
