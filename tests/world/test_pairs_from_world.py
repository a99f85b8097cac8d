"""`smpo pairs` on the world's generators: the renderer (a `python:` generator) and the base model,
scored by the world reward; and the errors of a `python:` generator."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from smpo.cli import main
from smpo.world.grammar import split
from smpo.world.model import base_path
from smpo.world.pairset import defective_render

RENDER = "python:smpo.world.pairset:RenderPipeline:render"


def test_the_renderer_and_the_base_make_a_reward_labelled_world_set(tmp_path):
    from smpo.world.reward import load_world_scorer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(split("pairs")[:6]) + "\n")
    out = tmp_path / "pairs"
    assert main(["pairs", "--prompts", str(prompts), "--model", f"render={RENDER}", "--model",
                 f"base={base_path()}", "--scorer", "world", "--steps", "3", "--guidance-scale", "3",
                 "--images-per-prompt", "2", "--across-generators", "--shard-size", "4", "--no-progress",
                 "--output", str(out)]) == 0
    rows = pa.concat_tables(pq.read_table(p) for p in sorted(out.glob("train-*.parquet"))).to_pylist()
    assert len(rows) == 6
    scorer = load_world_scorer()
    for row in rows:
        assert {row["model_0"], row["model_1"]} == {"render", "base"}  # --across-generators
        images = [Image.open(io.BytesIO(row[f"jpg_{k}"])).convert("RGB") for k in (0, 1)]
        stored = [row["score_0"], row["score_1"]]
        assert stored == pytest.approx(scorer(images, [row["caption"]] * 2).tolist(), abs=1e-5)
        side = 0 if row["model_0"] == "render" else 1
        expected = defective_render(row["caption"], "render", np.random.default_rng(row[f"seed_{side}"]))
        assert np.array_equal(np.asarray(images[side]), np.asarray(expected))
    # The true renders win most pairs against the base's samples (reward 0.96 against 0.45 typically).
    assert sum(row[f"model_{row['winner']}"] == "render" for row in rows) >= 4


@pytest.mark.parametrize(("model", "message"), [
    ("python:smpo.world.nothing:X", "cannot import smpo.world.nothing"),
    ("python:smpo.world.pairset:Nothing", "has no callable Nothing"),
    ("python:smpo.world.pairset", "expected python:MODULE:FACTORY[:ARG]"),
])
def test_a_bad_python_generator_is_one_line_and_exit_2(model, message, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert main(["pairs", "--prompts", str(prompts), "--model", f"g={model}", "--scorer", "world",
                 "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
