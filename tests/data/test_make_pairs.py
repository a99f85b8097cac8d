"""`smpo pairs` end to end on two tiny pipelines of different families (SD1.5, SDXL) and a tiny
PickScore: the set it writes, that label/cache/train read it, kill-and-resume and two processes
give the same bytes, the pairing rules, the spellings, and the errors."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from smpo.cli import main
from smpo.data.generators import GeneratorSpec, parse_generators, parse_scorer
from smpo.data.pairing import form_pairs
from smpo.evaluation.generate import image_seed
from smpo.models.presets import save_pipeline

PROMPTS = ["a red cube", "a blue ball on grass", "two cats", "a green tree", "a small house"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pair_pipelines")
    return {family: save_pipeline(root / family, family, "tiny") for family in ("sd15", "sdxl")}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pair_prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _options(pipelines, prompt_file, tiny_pickscore) -> list[str]:
    return ["--prompts", str(prompt_file), "--model", f"base={pipelines['sd15']}", "--model",
            f"xl={pipelines['sdxl']}", "--generator-options", "xl:steps=3,guidance=4", "--scorer-path",
            str(tiny_pickscore), "--steps", "2", "--images-per-prompt", "2", "--shard-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def reference(pipelines, prompt_file, tiny_pickscore, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pairs") / "reference"
    assert main(["pairs", *_options(pipelines, prompt_file, tiny_pickscore), "--output", str(out)]) == 0
    return out


def _table(folder: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("train-*.parquet")))


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".parquet"}


def _decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_the_set_names_both_generators_and_its_scores_are_independent_scores_of_its_images(reference,
                                                                                          tiny_pickscore):
    from smpo.preference import win_probability
    from smpo.rewards import load_scorer

    assert sorted(p.name for p in reference.iterdir()) == [
        "pairs.json", "train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    rows = _table(reference).to_pylist()
    assert len(rows) == len(PROMPTS)  # best-worst, one pair per prompt
    assert {r["model_0"] for r in rows} | {r["model_1"] for r in rows} == {"base", "xl"}
    scorer = load_scorer("pickscore", tiny_pickscore, device="cpu")
    images = [_decoded(r[f"jpg_{k}"]) for r in rows for k in (0, 1)]
    independent = scorer(images, [r["caption"] for r in rows for _ in (0, 1)]).tolist()
    stored = [r[f"score_{k}"] for r in rows for k in (0, 1)]
    assert stored == pytest.approx(independent, rel=1e-5, abs=1e-5)  # float32 rounding of another batch only
    meta = __import__("json").loads((reference / "pairs.json").read_text())
    for r in rows:
        p = int(r["pair_id"].split("-")[0])
        assert r["caption"] == PROMPTS[p] == PROMPTS[r["prompt_index"]]
        for k in (0, 1):
            name, image = r[f"image_{k}_uid"].split("/")
            assert name == r[f"model_{k}"] and image.startswith(f"{p:05d}_")
            assert r[f"seed_{k}"] == image_seed(0, p, int(image.split("_")[1]), per_prompt=True)
            assert r[f"jpg_{k}"].startswith(b"\x89PNG")  # PNG by default
        assert r["winner"] == int(r["score_1"] > r["score_0"]) and r["label_0"] == float(r["winner"] == 0)
        assert r["label_1"] == 1 - r["label_0"] and r["best_image_uid"] == r[f"image_{r['winner']}_uid"]
        expected = win_probability(max(r["score_0"], r["score_1"]), min(r["score_0"], r["score_1"]),
                                   score_min=meta["score_min"], score_max=meta["score_max"])
        assert r["p_win"] == pytest.approx(float(expected), abs=1e-12)
    assert meta["summary"]["images"] == 20 and meta["summary"]["pairs"] == 5
    assert set(meta["summary"]["generators"]) == {"base", "xl"}
    assert [g["steps"] for g in meta["settings"]["generators"]] == [2, 3]
    assert [g["guidance_scale"] for g in meta["settings"]["generators"]] == [7.5, 4.0]


def test_smpo_generate_remakes_the_stored_images(reference, pipelines, prompt_file, tmp_path):
    rows = [r for r in _table(reference).to_pylist() if r["model_0"] == "base"]
    out = tmp_path / "remade"
    assert main(["generate", "--model", str(pipelines["sd15"]), "--prompts", str(prompt_file), "--steps", "2",
                 "--images-per-prompt", "2", "--seed-per-prompt", "--output", str(out)]) == 0
    for r in rows:
        image = r["image_0_uid"].split("/")[1]
        assert (out / "images" / f"{image}.png").read_bytes() == r["jpg_0"]


def test_label_cache_and_train_read_the_set_unchanged(reference, pipelines, tiny_pickscore, tmp_path):
    labelled = tmp_path / "labelled"
    assert main(["label", str(reference), str(labelled), "--scorer-path", str(tiny_pickscore), "--no-progress"]) == 0
    ours, theirs = _table(reference), _table(labelled)
    assert theirs.column("pair_id").to_pylist() == ours.column("pair_id").to_pylist()
    assert theirs.column("winner").to_pylist() == ours.column("winner").to_pylist()
    for name in ("score_0", "score_1", "p_win"):
        assert theirs.column(name).to_pylist() == pytest.approx(ours.column(name).to_pylist(), rel=1e-5)
    assert theirs.column("model_0").to_pylist() == ours.column("model_0").to_pylist()  # carried unchanged
    cache = tmp_path / "cache"
    assert main(["cache", str(reference), "--model", str(pipelines["sd15"]), "--out", str(cache),
                 "--device", "cpu", "--no-progress"]) == 0
    for k, data in enumerate((["--dataset", str(reference)], ["--cache", str(cache)])):
        run = tmp_path / f"run{k}"
        assert main(["train", "--pretrained", str(pipelines["sd15"]), *data, "--output-dir", str(run),
                     "--method", "smpo", "--max-steps", "2", "--batch-size", "2", "--gradient-accumulation-steps",
                     "1", "--warmup-steps", "0", "--finetune", "lora", "--lora-rank", "4", "--no-progress"]) == 0
        assert (run / "final" / "lora").is_dir()


def _metadata(folder: Path) -> dict:
    import json

    meta = json.loads((folder / "pairs.json").read_text())
    meta["summary"].pop("output"), meta["summary"].pop("seconds")
    return meta


@pytest.mark.parametrize("seed", [21, 2], ids=["a-shard", "its-settings"])  # the kill points they draw
def test_killed_by_sigkill_then_rerun_writes_the_bytes_of_an_uninterrupted_run(seed, reference, pipelines,
                                                                              prompt_file, tiny_pickscore, tmp_path):
    from kill_helpers import assert_no_partial_file, kill_point, leftovers, run_killed, visible_files

    out = tmp_path / "killed"
    options = ["pairs", *_options(pipelines, prompt_file, tiny_pickscore), "--output", str(out)]
    # the atomic writes: .work/run.json, 3 image files of each generator, the 3 final shards, pairs.json
    at = kill_point(11, seed=seed)
    run_killed(options, at=at)
    assert_no_partial_file(out, reference, skip=("pairs.json",))  # it names its folder and time
    assert not (out / "pairs.json").exists()

    assert main(options) == 0
    assert visible_files(out, skip=("pairs.json",)) == visible_files(reference, skip=("pairs.json",)), at
    assert _metadata(out) == _metadata(reference)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert leftovers(out) == [], at


def test_two_torchrun_processes_write_the_bytes_of_one_process(reference, pipelines, prompt_file, tiny_pickscore,
                                                               tmp_path):
    out = tmp_path / "two"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = tmp_path / "pairs_logged.py"  # each process logs the work files it writes
    script.write_text("import sys, smpo.data.make_pairs as job; real = job.write_work_file\n"
                      "def logged(path, table):\n"
                      "    print('wrote', path.parent.name, path.name, flush=True); real(path, table)\n"
                      "job.write_work_file = logged\n"
                      "from smpo.cli import main; sys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29531", "--tee", "3", str(script), "pairs",
                             *_options(pipelines, prompt_file, tiny_pickscore), "--output", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wrote = [line.split("]:")[0].strip("[ ").removeprefix("default") + " " + line.split("wrote")[-1].strip()
             for line in result.stdout.splitlines() if "wrote gen-" in line]
    assert sorted(wrote) == sorted(f"{rank} gen-{j:02d} shard-{k:05d}.parquet"
                                   for j in (0, 1) for rank, ks in ((0, (0, 2)), (1, (1,))) for k in ks), wrote
    assert _shard_bytes(out) == _shard_bytes(reference)
    assert _metadata(out) == _metadata(reference)


# ---------------------------------------------------------------------------------------------------
# The pairing rules, hand-checked.

SCORES = [0.5, 0.9, 0.1, 0.45, 0.7]  # ranked: 1 (0.9), 4 (0.7), 0 (0.5), 3 (0.45), 2 (0.1)


def test_best_worst_pairs_the_ends_of_the_ranking_inwards():
    assert form_pairs(SCORES, rule="best-worst") == [(1, 2)]
    assert form_pairs(SCORES, rule="best-worst", pairs_per_prompt=None) == [(1, 2), (4, 3)]
    assert form_pairs(SCORES, rule="best-worst", pairs_per_prompt=None, min_gap=0.3) == [(1, 2)]  # 0.7-0.45 < 0.3
    # Across generators (0, 0, 1, 1, 1): (1, 2) crosses; (4, 3) does not.
    assert form_pairs(SCORES, rule="best-worst", pairs_per_prompt=None, groups=[0, 0, 1, 1, 1]) == [(1, 2)]
    assert form_pairs([0.2, 0.2], rule="best-worst") == []  # equal scores: no winner


def test_gap_takes_every_pair_above_the_gap_largest_first():
    assert form_pairs(SCORES, rule="gap", min_gap=0.42, pairs_per_prompt=None) == [(1, 2), (4, 2), (1, 3)]
    assert form_pairs(SCORES, rule="gap", min_gap=0.42, pairs_per_prompt=2) == [(1, 2), (4, 2)]
    assert len(form_pairs(SCORES, rule="gap", pairs_per_prompt=None)) == 10  # all 5 choose 2 (no equal scores)
    assert form_pairs(SCORES, rule="gap", min_gap=0.42, pairs_per_prompt=None, groups=[0, 1, 1, 0, 0]) == [
        (4, 2), (1, 3)]


def test_random_draws_seeded_distinct_pairs_among_the_candidates():
    drawn = form_pairs(SCORES, rule="random", pairs_per_prompt=3, min_gap=0.3, seed=7, prompt_index=4)
    assert drawn == form_pairs(SCORES, rule="random", pairs_per_prompt=3, min_gap=0.3, seed=7, prompt_index=4)
    candidates = {(1, 2), (1, 0), (1, 3), (4, 2), (0, 2), (3, 2)}  # gap >= 0.3, as (winner, loser)
    assert len(set(drawn)) == 3 and set(drawn) <= candidates
    everything = form_pairs(SCORES, rule="random", pairs_per_prompt=None, min_gap=0.3, seed=7, prompt_index=4)
    assert set(everything) == candidates
    others = {tuple(form_pairs(SCORES, rule="random", pairs_per_prompt=3, min_gap=0.3, seed=7, prompt_index=p))
              for p in range(6)}
    assert len(others) > 1  # the prompt index changes the draw


# ---------------------------------------------------------------------------------------------------
# Spellings and errors.


def test_generator_and_scorer_spellings(tmp_path):
    specs = parse_generators(["a=/m/one", "/m/two/"], ["two:steps=20,cfg=5.5,unet=/runs/x/final,lora_scale=0.5"])
    assert specs == [GeneratorSpec(name="a", model="/m/one"),
                     GeneratorSpec(name="two", model="/m/two/", unet="/runs/x/final", lora_scale=0.5, steps=20,
                                   guidance_scale=5.5)]
    yaml_file = tmp_path / "generators.yaml"
    yaml_file.write_text("- {name: b, model: /m/three, steps: 30, guidance: 4}\n")
    assert parse_generators(["a=/m/one"], yaml_file=str(yaml_file))[1] == GeneratorSpec(
        name="b", model="/m/three", steps=30, guidance_scale=4.0)
    assert parse_scorer("PickScore") == {"pickscore": 1.0}
    assert parse_scorer("pickscore=0.7,hpsv2.1=0.3") == {"pickscore": 0.7, "hpsv2.1": 0.3}


@pytest.mark.parametrize(("extra", "message"), [
    (["--scorer", "pickscor"], "unknown scorer 'pickscor'"),
    (["--scorer", "pickscore=0.5,clip"], "give every scorer of a mix a weight"),
    (["--generator-options", "nobody:steps=3"], "expected NAME:key=value,... with NAME one of base, xl"),
    (["--generator-options", "xl:stepz=3"], "unknown key 'stepz' in --generator-options xl"),
    (["--generator-options", "xl:steps=many"], "'many' is not a valid int"),
    (["--model", "base=/nowhere/model"], "given twice"),
    (["--model", "c=/nowhere/model"], "--model c /nowhere/model: no such folder"),
    (["--pairing", "best-worst", "--images-per-prompt", "0"], "--images-per-prompt must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(extra, message, pipelines, prompt_file, tiny_pickscore, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["pairs", *_options(pipelines, prompt_file, tiny_pickscore), *extra, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smpo pairs: error: ") and message in err and "\n" not in err, err
    assert not out.exists()


def test_an_existing_output_is_refused(reference, pipelines, prompt_file, tiny_pickscore, tmp_path, capsys):
    options = _options(pipelines, prompt_file, tiny_pickscore)
    assert main(["pairs", *options, "--output", str(reference)]) == 2
    assert "already holds a finished pair set; pass --overwrite" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["pairs", *options, "--output", str(foreign)]) == 2
    assert "is not an unfinished `smpo pairs` run" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"


def test_mixed_scores_are_the_weighted_sum_of_the_raw_scores(tiny_pickscore, tmp_path):
    from smpo.data.generators import MixedScorer
    from smpo.rewards import load_scorer
    from smpo.rewards.testing import save_tiny_scorer

    clip = save_tiny_scorer("clip", tmp_path / "clip")
    mix = MixedScorer({"pickscore": 0.7, "clip": 0.3}, {"pickscore": str(tiny_pickscore), "clip": str(clip)},
                      device=torch.device("cpu"), dtype=torch.float32, batch_size=4)
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "white")]
    prompts = ["a red square", "a blue square", "snow"]
    expected = (0.7 * load_scorer("pickscore", tiny_pickscore, device="cpu")(images, prompts).double()
                + 0.3 * load_scorer("clip", clip, device="cpu")(images, prompts).double())
    assert mix(images, prompts).tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    assert mix.name == "pickscore=0.7,clip=0.3" and set(mix.last_parts) == {"pickscore", "clip"}


def test_an_empty_prompt_source_is_an_error(pipelines, tiny_pickscore, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    out = tmp_path / "out"
    assert main(["pairs", "--prompts", str(empty), "--model", f"base={pipelines['sd15']}", "--scorer-path",
                 str(tiny_pickscore), "--output", str(out)]) == 2
    assert "holds no prompts" in capsys.readouterr().err and not out.exists()
