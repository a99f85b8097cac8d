"""``smpo online``: rounds of on-policy preference training, and how a killed run resumes.

Round ``r`` (folder ``D/round-RRR/``) runs four jobs, each idempotent, on every process of a launch:

1. ``pairs/``: ``smpo pairs``' job (:func:`smpo.data.make_pairs.make_pairs`) with one generator,
   the round's policy (the base pipeline with the previous round's weights), K images per prompt
   from seeds of this round, scored, paired, labelled with ``p_win`` over the run's fixed score
   range (below). It resumes shard by shard itself.
2. ``train/``: ``smpo train``'s loop (:func:`smpo.train.train`) for S steps on the round's pairs
   (or, with replay, on those of earlier rounds too: ``data/`` links their shards), starting from
   the round's policy, against the base or the round's starting policy as the reference; always
   called with ``resume``, so a killed round continues its latest checkpoint exactly.
3. With LoRA and ``--reference round``, ``policy/``: the previous policy with the round's adapters
   merged in, the next round's base network.
4. ``eval.json`` (with ``--eval-prompts``): the trained policy's rewards on the evaluation prompts.

Then the main process writes ``round.json`` (atomically; its presence marks the round done) and
rewrites ``D/metrics.jsonl`` from every finished round's record. The policy of round ``r + 1`` is
read from round ``r``'s files only, and every job is a pure function of its inputs and seeds, so a
run killed anywhere and rerun with the same command ends with the weights of an uninterrupted run.

Score range (Eq. 11). ``p_win = sigmoid((s_w - s_l) / (max S - min S))`` depends on the range's
width. If each round normalised over its own scores, a round whose policy samples more alike
images would get a narrower range and larger ``p_win`` for the same reward gap. So one range holds
for the whole run: round 0's (the base model's paired images, as ``smpo pairs`` computes it), or
``--score-min/--score-max``. Later rounds' scores may fall outside it (``s~`` outside [0, 1]):
``p_win`` still means the same reward gap in every round, and replayed pairs keep their labels.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from smpo.io import OutputExistsError, atomic_path, read_json, refuse_changed_settings, write_json
from smpo.online.config import OnlineConfig, base_train_config, pairs_config, round_train_config
from smpo.online.measure import distribution, evaluate_policy, sampling_calls_per_image, training_compute

SETTINGS_FILE = "online-settings.json"
ROUND_FILE = "round.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "online.json"


def round_dir(out: Path, r: int) -> Path:
    return out / f"round-{r:03d}"


def run_online(config: OnlineConfig, *, train: Any = None) -> dict[str, Any]:
    """Run (or resume) ``smpo online``; return the summary (also ``D/online.json``), the same on
    every process of a launch. ``train``: the training recipe (a ``smpo.train.TrainConfig``)
    instead of ``config.train_config``."""
    from smpo.data.generators import MixedScorer, parse_scorer, parse_scorer_paths
    from smpo.io import resolve_dtype
    from smpo.processes import process_state
    from smpo.prompts import load_prompts

    config = dataclasses.replace(config.validate(), output=str(Path(config.output).resolve()))
    recipe = base_train_config(config, train)
    prompts = load_prompts(config.prompts, limit=config.limit)
    eval_prompts = load_prompts(config.eval_prompts, limit=config.eval_limit) if config.eval_prompts else None
    out = Path(config.output)
    state = process_state()
    if state.is_main_process:
        _prepare(out, {**config.settings(), "train": recipe.to_dict()}, overwrite=config.overwrite)
    state.wait_for_everyone()
    base_network = recipe.model.unet
    scorer = None
    if eval_prompts is not None:
        weights = parse_scorer(config.scorer)
        scorer = MixedScorer(weights, parse_scorer_paths(config.scorer_path or [], weights), device=state.device,
                             dtype=resolve_dtype(config.dtype, state.device), batch_size=config.score_batch_size)
        _evaluate(out / "eval-base.json", config, base_network, eval_prompts, scorer)
    records: list[dict[str, Any]] = []
    for r in range(config.rounds):
        state.wait_for_everyone()  # every process sees the same finished files before deciding what to run
        folder = round_dir(out, r)
        if (folder / ROUND_FILE).exists():
            records.append(read_json(folder / ROUND_FILE))
            continue
        records.append(_run_round(config, recipe, r, records, prompts, eval_prompts, scorer, base_network, state))
    final = _final(out, records[-1], state)
    summary = {"output": str(out), "rounds": records, "final": str(final), "reference": config.reference,
               "finetune": recipe.model.finetune, "method": recipe.objective.method,
               "score_range": records[0]["score_range"],
               "compute": {k: sum(rec["compute"][k] for rec in records) for k in records[0]["compute"]}}
    if state.is_main_process:
        write_json(out / SUMMARY_FILE, summary)
    return summary


def _prepare(out: Path, settings: dict[str, Any], *, overwrite: bool) -> None:
    """A new run folder, or a resumed one with the same settings; anything else is refused."""
    saved = out / SETTINGS_FILE
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        if not saved.exists():
            raise OutputExistsError(f"{out} exists, is not empty and is not an `smpo online` run; choose another "
                                    "output or pass --overwrite to replace it")
        refuse_changed_settings(out, read_json(saved), json.loads(json.dumps(settings)), what="an `smpo online` run")
        return
    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(saved, settings)


def _policy_after(record: dict[str, Any]) -> str:
    return record["policy_out"]


def _run_round(config: OnlineConfig, recipe: Any, r: int, records: list[dict[str, Any]], prompts: list,
               eval_prompts: list | None, scorer: Any, base_network: str | None, state: Any) -> dict[str, Any]:
    from smpo.data.make_pairs import IMAGE_SCORES_FILE, PAIRS_FILE, make_pairs, read_pairs_metadata
    from smpo.processes import wait_until
    from smpo.train import train

    out = Path(config.output)
    folder = round_dir(out, r)
    policy = _policy_after(records[-1]) if records else None
    sample_weights = policy if policy is not None else base_network
    fixed = (config.score_min, config.score_max) if config.score_min is not None else (
        tuple(records[0]["score_range"]) if records else None)
    seconds: dict[str, float] = _read_timing(folder)

    # (a)-(c) sample, score, pair: smpo pairs' job with the round's policy as its one generator.
    started = time.perf_counter()
    if not (folder / "pairs" / PAIRS_FILE).exists():
        make_pairs(pairs_config(config, r, len(prompts), folder / "pairs", sample_weights, fixed))
        seconds = _record_timing(folder, state, sampling=time.perf_counter() - started)
    meta = read_pairs_metadata(folder / "pairs")
    _release()

    # (d) train S steps through smpo train's loop.
    window = range(0 if config.replay_rounds is None else max(0, r - config.replay_rounds), r + 1)
    dataset = folder / "pairs" if len(window) == 1 else _replay_data(out, folder, window, state)
    train_config = round_train_config(recipe, config, r, dataset=dataset, run_dir=folder / "train",
                                      policy=policy, base_network=base_network)
    started = time.perf_counter()
    result = train(train_config, end_process_group=False)  # the next round uses the launch's group
    seconds = _record_timing(folder, state, training=time.perf_counter() - started)
    export = result.export
    _release()

    next_policy = str(export)
    if recipe.model.finetune == "lora" and config.reference == "round":
        next_policy = _merged(config.model, policy or base_network, export, folder / "policy", state)

    evaluation = None
    if eval_prompts is not None:
        started = time.perf_counter()
        if not (folder / "eval.json").exists():
            _evaluate(folder / "eval.json", config, next_policy, eval_prompts, scorer)
            seconds = _record_timing(folder, state, evaluation=time.perf_counter() - started)
        evaluation = read_json(folder / "eval.json")

    image_scores = read_json(folder / "pairs" / IMAGE_SCORES_FILE)
    generator = meta["settings"]["generators"][0]
    calls = sampling_calls_per_image(config.model, generator["steps"], generator["guidance_scale"])
    trained = training_compute(folder / "train", state.num_processes)
    compute = {"sampling_network_evals": calls * len(image_scores["score"]),
               "training_network_evals": trained["network_evals"],
               "eval_network_evals": evaluation["network_evals"] if evaluation else 0,
               "sampling_seconds": seconds.get("sampling", 0.0), "training_seconds": seconds.get("training", 0.0),
               "training_step_seconds": trained["step_seconds"], "eval_seconds": seconds.get("evaluation", 0.0)}
    record = {"round": r, "policy_in": sample_weights, "policy_out": next_policy, "pairs": str(folder / "pairs"),
              "train_data": str(dataset), "train_run": str(folder / "train"), "export": str(export),
              "num_pairs": meta["summary"]["pairs"], "score_range": [meta["score_min"], meta["score_max"]],
              "seed": meta["settings"]["seed"], "samples": distribution(image_scores["score"]),
              "p_win_quantiles": meta["summary"]["p_win_quantiles"],
              "train": {k: v for k, v in (result.metrics[-1] if result.metrics else {}).items()},
              "eval": {k: v for k, v in evaluation.items() if k != "scores"} if evaluation else None,
              "compute": compute}
    if state.is_main_process:
        write_json(folder / ROUND_FILE, record)
        _write_metrics(out)
    else:
        wait_until((folder / ROUND_FILE).exists, str(folder / ROUND_FILE), "smpo online")
        record = read_json(folder / ROUND_FILE)
    return record


def _replay_data(out: Path, folder: Path, window: range, state: Any) -> Path:
    """``folder/data``: links to the pair shards of the rounds in ``window`` (their pair ids differ by round)."""
    from smpo.processes import wait_until

    data = folder / "data"
    if state.is_main_process and not data.exists():
        with atomic_path(data) as tmp:
            tmp.mkdir()
            for k in window:
                for shard in sorted((round_dir(out, k) / "pairs").glob("train-*.parquet")):
                    os.symlink(os.path.relpath(shard, data), tmp / f"round-{k:03d}-{shard.name}")
    wait_until(data.exists, str(data), "smpo online")
    return data


def _merged(model: str, network: str | None, lora: Path, target: Path, state: Any) -> str:
    """``network`` (or the base's own) with the LoRA ``lora`` merged in, saved as a full network in
    ``target`` (the next policy of LoRA with --reference round)."""
    from smpo.evaluation.pipelines import load_pipeline
    from smpo.models import FAMILIES
    from smpo.processes import wait_until

    if state.is_main_process and not target.exists():
        pipe, family = load_pipeline(model, unet=network, device="cpu")
        pipe.load_lora_weights(str(lora), adapter_name="round")
        pipe.fuse_lora(lora_scale=1.0, adapter_names=["round"])
        pipe.unload_lora_weights()
        name = FAMILIES[family].network_folder
        with atomic_path(target) as tmp:
            getattr(pipe, name).save_pretrained(tmp / name, safe_serialization=True)
        del pipe
    wait_until(target.exists, str(target), "smpo online")
    return str(target)


def _evaluate(out: Path, config: OnlineConfig, unet: str | None, prompts: list, scorer: Any) -> dict[str, Any]:
    return evaluate_policy(out, model=config.model, unet=unet, prompts=prompts, scorer=scorer,
                           images_per_prompt=config.eval_images_per_prompt, seed=config.eval_seed,
                           steps=config.sample_steps, guidance_scale=config.guidance_scale, height=config.height,
                           width=config.width, batch_size=config.sample_batch_size, shard_size=config.shard_size,
                           dtype=config.dtype)


def _read_timing(folder: Path) -> dict[str, float]:
    path = folder / "seconds.json"
    return read_json(path) if path.exists() else {}


def _record_timing(folder: Path, state: Any, **phases: float) -> dict[str, float]:
    """Seconds of the phases just finished (those of the attempt that finished each phase)."""
    seconds = {**_read_timing(folder), **phases}
    if state.is_main_process:
        write_json(folder / "seconds.json", seconds)
    return seconds


def _write_metrics(out: Path) -> None:
    """``metrics.jsonl``: one line per finished round, rewritten from the rounds' records."""
    lines = []
    for path in sorted(out.glob(f"round-*/{ROUND_FILE}")):
        record = read_json(path)
        lines.append(json.dumps({k: record[k] for k in ("round", "num_pairs", "score_range", "samples",
                                                        "p_win_quantiles", "train", "eval", "compute")}))
    with atomic_path(out / METRICS_FILE) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))


def _final(out: Path, last: dict[str, Any], state: Any) -> Path:
    """``D/final/``: the last policy as ``smpo train`` exports it (``unet``/``transformer`` or ``lora``)."""
    from smpo.processes import wait_until

    source = Path(last["policy_out"])
    final = out / "final"
    if state.is_main_process and not final.exists():
        with atomic_path(final) as tmp:
            tmp.mkdir()
            for item in source.iterdir() if source.name == "policy" else [source]:
                shutil.copytree(item, tmp / item.name)
    wait_until(final.exists, str(final), "smpo online")
    return final


def _release() -> None:
    """Free the last job's networks before the next job loads its own."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
