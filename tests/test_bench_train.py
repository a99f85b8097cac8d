"""benchmarks/bench_train.py runs `smpo train` steps, measures each SmPO row's floor and every SD1.5 row's
bare DPO step (a smoke test of the script)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_measures_the_floor_of_smpo_rows(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--families", "sd15", "--modes", "lora",
                       "--methods", "smpo,smpo-land-on-t-cached,dpo", "--sources", "cache", "--steps", "2", "--warmup", "1",
                       "--pairs-per-step", "2", "--no-isolate", "--threads", "1", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"smpo", "smpo-land-on-t-cached", "dpo"}
    for method in ("smpo", "smpo-land-on-t-cached"):
        row = rows[method]
        assert math.isfinite(row["floor_seconds_per_pair"]) and row["floor_seconds_per_pair"] > 0
        assert 0.2 < row["floor_ratio"] < 5 and 0.2 < row["dpo_ratio"] < 20
        # the replayed calls are the row's no-grad calls: the inversion's and the reference's loss call
        assert sum(row["nograd_calls"].values()) > 0 and set(row["frozen_call_seconds"]) <= set(row["nograd_calls"])
    # landing on t from the cache leaves one renoised step per image: 2 calls of 4 latents, and the loss's
    assert rows["smpo-land-on-t-cached"]["unet_evals_per_pair"] == 8.0
    assert rows["smpo-land-on-t-cached"]["nograd_calls"] == {"4": 3 * 2}
    assert math.isnan(rows["dpo"]["floor_seconds_per_pair"])
    for row in rows.values():  # every SD1.5 row against the bare DPO step run between its steps
        assert row["source"] == "cache" and 0.2 < row["bare_ratio"] < 20 and row["bare_seconds_per_pair"] > 0
        low, high = row["bare_ratio_quartiles"]
        assert low <= row["bare_ratio"] <= high
    table = out.with_suffix(".md").read_text()
    assert "x floor" in table and "x DPO (same process)" in table and "x bare" in table
