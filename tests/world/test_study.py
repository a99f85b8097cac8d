"""`smpo study --quick`: the protocol (tune on validation, report on held-out over seeds), resumable."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smpo.cli import main
from smpo.evaluation.stats import t_interval, win_rate
from smpo.world.study import QUICK, RUNG_BY_KEY, RUNGS, Job


def test_ladder_rungs_are_the_papers_settings():
    from smpo.objective import ObjectiveConfig

    resolved = {r.key: ObjectiveConfig(method=r.method, **r.objective).resolved() for r in RUNGS}
    assert (resolved["dpo"].noising, resolved["dpo"].labels) == ("forward", "binary")
    assert (resolved["inversion-t"].noising, resolved["inversion-t"].labels) == ("ddim-inversion", "binary")
    assert (resolved["renoise-grid"].noising, resolved["renoise-grid"].land_on_t) == ("renoise", False)
    assert (resolved["smpo-t"].noising, resolved["smpo-t"].labels, resolved["smpo-t"].land_on_t) == \
        ("renoise", "smoothed", True)
    assert resolved["smpo-forward"].noising == "forward" and resolved["smpo-forward"].labels == "smoothed"
    assert {r.method for r in RUNGS} == {"dpo", "smpo", "kto", "mapo", "sft"}
    assert resolved["smpo-inpo"].inversion_noise == 0.1 and not resolved["smpo-inpo"].land_on_t
    assert {r.key for r in RUNGS if r.start == "sft"} == {"smpo-after-sft", "dpo-after-sft", "sft-after-sft"}
    assert all(r.start in (None, "sft") for r in RUNGS)


def test_sft_start_trains_sft_first_then_the_rung_from_its_unet(tmp_path, monkeypatch):
    from dataclasses import replace

    import smpo.train.loop
    from smpo.world.model import base_path
    from smpo.world.pairset import pair_set_path
    from smpo.world.stages import label
    from smpo.world.study import run_job

    configs = []
    real_train = smpo.train.loop.train

    def recording_train(config):
        configs.append(config)
        return real_train(config)

    monkeypatch.setattr(smpo.train.loop, "train", recording_train)
    label(pair_set_path(), tmp_path / "labelled")
    cfg = replace(QUICK, max_prompts=2)
    result = run_job(Job("smpo-after-sft", 1e-5, 0, "validation"), cfg, tmp_path, base_path(), tmp_path / "labelled")
    assert [c.objective.method for c in configs] == ["sft", "smpo"]
    assert configs[0].model.unet is None
    assert configs[1].model.unet == str(Path(configs[0].run.output_dir) / "final" / "unet")
    assert configs[0].run.seed == configs[1].run.seed == 0 and configs[1].optim.learning_rate == 1e-5
    assert len(result["scores"]["2"]) == 2


def test_study_quick_tunes_on_validation_reports_on_held_out_and_resumes(tmp_path, capsys, cli_error):
    out = tmp_path / "study"
    assert main(["study", "--quick", "--output", str(out), "--workers", "2"]) == 0
    data = json.loads((out / "study.json").read_text())
    results = {p.relative_to(out / "results").with_suffix("").as_posix(): json.loads(p.read_text())
               for p in (out / "results").rglob("*.json")}
    # Tuning used validation runs of the tuning seeds only; the choice is the best mean validation lift.
    for rung, chosen in data["chosen"].items():
        means = {float(lr): v["mean"] for lr, v in chosen["validation"].items()}
        assert chosen["learning_rate"] == max(means, key=lambda lr: (means[lr], -lr))
        for lr, v in chosen["validation"].items():
            run = results[Job(rung, float(lr), QUICK.tune_seeds[0], "validation").name]
            base = results[Job("base", 0.0, QUICK.tune_seeds[0], "validation").name]
            final = run["scores"][max(run["scores"], key=int)]
            assert v["lifts"][0] == pytest.approx(np.median(final) - np.median(base["scores"]["0"]))
    assert not any(name.endswith("held_out") and f"seed{s}-" in name
                   for name in results for s in QUICK.tune_seeds)
    # Report rows: every rung at the paper's rate and at its tuned rate, over the report seeds.
    assert [(r["rung"], r["setting"]) for r in data["rows"]] == [(k, s) for k in QUICK.rungs for s in ("paper", "tuned")]
    for row in data["rows"]:
        lifts, wins = [], []
        for seed in QUICK.seeds:
            run = results[Job(row["rung"], row["learning_rate"], seed, "held_out").name]
            base = results[Job("base", 0.0, seed, "held_out").name]["scores"]["0"]
            # The tuned rate's runs are evaluated at every checkpoint (eval_every steps), the others at the end.
            curve = row["learning_rate"] == data["chosen"][row["rung"]]["learning_rate"]
            assert sorted(map(int, run["scores"])) == ([1, 2] if curve else [2])
            final = run["scores"]["2"]
            assert len(final) == len(base) == QUICK.max_prompts * QUICK.images_per_prompt
            lifts.append(np.median(final) - np.median(base))
            wins.append(win_rate(final, base))
            assert len(run["unet_evals"]) == QUICK.train_steps and min(run["unet_evals"]) > 0
        assert row["lift"] == pytest.approx(lifts) and row["win_rate"] == pytest.approx(wins)
        assert row["lift_mean_ci"] == pytest.approx(t_interval(lifts))
    # SmPO's inversion costs UNet evaluations that DPO's forward noising does not.
    evals = {r["rung"]: r["unet_evals_per_step"] for r in data["rows"]}
    assert evals["smpo-t"] > evals["dpo"] > evals["sft"]
    text = (out / "report.md").read_text()
    assert RUNG_BY_KEY["smpo-t"].label in text and "win rate vs base" in text
    assert "network evals spent (sampling incl.)" in text and f"| {RUNG_BY_KEY['dpo'].label} | 1 |" in text
    assert Image.open(out / "study.png").size[0] > 1000
    # What ships: the summary the demo reads, and the README block rewritten between its markers.
    from smpo.world.study.summary import README_BEGIN, README_END, write_summary

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold table\n{README_END}\nrest\n")
    shipped = write_summary(out, tmp_path / "summary.json", readme, command="smpo study --quick", wall_seconds=7200,
                            status="finished")
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(shipped))
    assert shipped["chosen"] == data["chosen"] and shipped["rows"] == json.loads(json.dumps(data["rows"]))
    block = readme.read_text()
    assert block.startswith("intro\n") and block.endswith(f"{README_END}\nrest\n") and "old table" not in block
    tuned = [r for r in data["rows"] if r["setting"] == "tuned"]
    assert "2.0 h" in block and f"{QUICK.max_prompts} held-out prompts x {QUICK.images_per_prompt} images" in block
    assert all(f"| {r['label']} ({r['learning_rate']:g}) | 2 |" in block for r in tuned)
    # Resume: a finished study runs nothing again; a lost result is the only run redone.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*.json")}
    lost = out / "results" / f"{Job('sft', QUICK.paper_lr, 1, 'held_out').name}.json"
    lost.unlink()
    # --report-only runs nothing and reports what has finished: that row now holds one seed.
    assert main(["study", "--quick", "--output", str(out), "--report-only"]) == 0
    assert not lost.exists()
    partial = json.loads((out / "study.json").read_text())
    row = next(r for r in partial["rows"] if r["rung"] == "sft" and r["learning_rate"] == QUICK.paper_lr)
    assert row["seeds"] == [0] and np.isnan(row["lift_mean_ci"][1])
    capsys.readouterr()
    assert main(["study", "--quick", "--output", str(out), "--workers", "1"]) == 0
    assert "1 runs to do" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != lost) and lost.is_file()
    again = json.loads((out / "study.json").read_text())
    for old, new in zip(data["rows"], again["rows"]):
        assert new["lift"] == pytest.approx(old["lift"], abs=1e-6), new["rung"]  # redone the same
    assert "--rungs: unknown ['bogus']" in cli_error(["study", "--quick", "--output", str(out), "--rungs", "dpo,bogus"])


def test_cached_inversion_rung_trains_from_the_study_cache(tmp_path):
    from dataclasses import replace

    import pyarrow.parquet as pq

    from smpo.data.latent_cache import LatentCache
    from smpo.world.pairset import pair_set_path
    from smpo.world.stages import label
    from smpo.world.study import inversion_cache_dir, run_study

    label(pair_set_path(), tmp_path / "labelled")
    small = tmp_path / "small"
    small.mkdir()
    first = sorted((tmp_path / "labelled").glob("*.parquet"))[0]
    pq.write_table(pq.read_table(first).slice(0, 12), small / "shard-00000.parquet")
    cfg = replace(QUICK, rungs=("smpo-cached",), curve_rungs=(), max_prompts=2)
    data = run_study(tmp_path / "study", cfg, dataset=small, workers=1, progress=lambda _: None)
    cache = LatentCache(inversion_cache_dir(tmp_path / "study"))
    assert len(cache) == 12 and cache.inversion is not None and not cache.inversion.land_on_t
    assert [r["setting"] for r in data["rows"]] == ["paper", "tuned"]
    for result in (tmp_path / "study" / "results" / "smpo-cached").glob("*.json"):
        run = json.loads(result.read_text())
        assert run["objective"]["inverting_network"] == "reference"
        # the stored levels answer the authors' grid: only the loss's 4 calls per pair remain (2 x 2 pairs),
        # except for images whose prompt was dropped (inverted live)
        assert min(run["unet_evals"]) == 8


def test_a_grid_whose_best_rate_lies_at_an_edge_is_extended_past_it_until_the_best_is_inside():
    from dataclasses import replace

    from smpo.world.study.analysis import choose_learning_rates, extend_grids, next_rate, tuning_markdown

    assert [next_rate(lr, -1) for lr in (1e-4, 3e-5, 1e-5, 3e-6)] == [3e-5, 1e-5, 3e-6, 1e-6]
    assert [next_rate(lr, +1) for lr in (1e-5, 3e-5, 1e-4)] == [3e-5, 1e-4, 3e-4]
    cfg = replace(QUICK, rungs=("dpo", "sft"), lr_grid=(1e-5, 3e-5, 1e-4), lr_bounds=(1e-6, 3e-4))
    best = {"dpo": 3e-6, "sft": 3e-5}  # the validation lift peaks there: dpo's best lies below the grid

    def results_for(grids):
        out = {Job("base", 0.0, s, "validation").name: {"scores": {"0": [0.0, 0.0]}} for s in cfg.tune_seeds}
        for rung, rates in grids.items():
            for lr in rates:
                lift = 0.1 - abs(np.log10(lr) - np.log10(best[rung]))
                for s in cfg.tune_seeds:
                    out[Job(rung, lr, s, "validation").name] = {"scores": {"40": [lift, lift]}}
        return out

    grids = {r: list(cfg.lr_grid) for r in cfg.rungs}
    rounds = []
    while True:
        chosen = choose_learning_rates(cfg, results_for(grids), grids)
        extended = extend_grids(cfg, chosen, grids)
        rounds.append(extended)
        if not extended:
            break
    assert rounds == [["dpo"], ["dpo"], []]  # 3e-6 is tried, then 1e-6 shows 3e-6 is the peak
    assert grids == {"dpo": [1e-6, 3e-6, 1e-5, 3e-5, 1e-4], "sft": [1e-5, 3e-5, 1e-4]}
    assert {r: (c["learning_rate"], c["edge"]) for r, c in chosen.items()} == {"dpo": (3e-6, None), "sft": (3e-5, None)}
    table = tuning_markdown(cfg, chosen)
    assert "lr 1e-06 | lr 3e-06 | lr 1e-05" in table and "| SFT (winners) |  |  | " in table
    # At a bound the grid stops, and the table says the best is still at an edge.
    cfg = replace(cfg, lr_bounds=(1e-5, 1e-4))
    grids = {r: list(cfg.lr_grid) for r in cfg.rungs}
    chosen = choose_learning_rates(cfg, results_for(grids), grids)
    assert extend_grids(cfg, chosen, grids) == [] and chosen["dpo"]["edge"] == "low"
    assert "1e-05 (at the low bound)" in tuning_markdown(cfg, chosen)


def test_an_online_rung_trains_with_smpo_online_and_counts_its_sampling(tmp_path):
    from dataclasses import replace

    from smpo.world.model import base_path
    from smpo.world.study import run_job
    from smpo.world.study.analysis import summarise

    cfg = replace(QUICK, rungs=("online-dpo-round",), max_prompts=2)
    job = Job("online-dpo-round", 1e-5, 0, "held_out", curve=True)
    result = run_job(job, cfg, tmp_path, base_path(), tmp_path / "unused-pair-set")
    rounds = result["online_rounds"]
    # 2 rounds of 1 step, each sampling 2 prompts (1 step x 2 pairs) x 2 images with its own policy
    assert [r["steps"] for r in rounds] == [1, 2] and sorted(result["scores"]) == ["1", "2"]
    assert [r["samples"]["images"] for r in rounds] == [4, 4] and all(r["pairs"] <= 2 for r in rounds)
    assert result["sampling_network_evals"] == 2 * 4 * QUICK.sample_steps * 2  # CFG: two evaluations a step
    assert rounds[1]["network_evals"] == result["sampling_network_evals"] + sum(result["unet_evals"])
    assert len(result["unet_evals"]) == 2 and result["objective"]["method"] == "dpo"
    base = run_job(Job("base", 0.0, 0, "held_out"), cfg, tmp_path, base_path(), tmp_path / "unused-pair-set")
    [row] = [r for r in summarise(cfg, {job.name: result, "base/seed0-held_out": base},
                                  {"online-dpo-round": {"learning_rate": 1e-5}}) if r["setting"] == "tuned"]
    assert row["sampling_evals_per_step"] == result["sampling_network_evals"] / 2
    assert row["unet_evals_per_step"] == pytest.approx(sum(result["unet_evals"]) / 2 + row["sampling_evals_per_step"])
    # At each round's end the compute column is exactly what was spent by then, sampling included.
    from smpo.world.study.analysis import compute_markdown, compute_points

    points = compute_points(row)
    assert [(s, e) for s, e, _ in points] == [(r["steps"], pytest.approx(r["network_evals"])) for r in rounds]
    assert f"| {row['label']} | 2 | {rounds[1]['network_evals']:,.0f} |" in compute_markdown([row])


def test_a_job_another_process_is_running_waits_for_it_and_takes_its_result(tmp_path):
    import fcntl
    import threading
    from dataclasses import replace

    from smpo.world.model import base_path
    from smpo.world.study import run_job

    cfg = replace(QUICK, max_prompts=1)
    job = Job("base", 0.0, 7, "validation")
    (tmp_path / "work" / "base").mkdir(parents=True)
    done: list[dict] = []
    with open(tmp_path / "work" / "base" / ".seed7-validation.lock", "w") as held:  # a worker of a killed study
        fcntl.flock(held, fcntl.LOCK_EX)
        thread = threading.Thread(target=lambda: done.append(run_job(job, cfg, tmp_path, base_path(), tmp_path)))
        thread.start()
        thread.join(timeout=3)
        assert thread.is_alive() and not done  # waiting, not running the same job beside it
        (tmp_path / "results" / "base").mkdir(parents=True)
        (tmp_path / "results" / "base" / "seed7-validation.json").write_text(json.dumps({"scores": {"0": [0.5]}}))
    thread.join(timeout=60)
    assert done == [{"scores": {"0": [0.5]}}]  # the other process's result, not a second run
