"""studies/world/sampled_latents.py end to end at a tiny size: one pair set with latents, both
training variants per method, the base and every checkpoint scored, the report; a rerun redoes nothing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_the_probe_trains_both_variants_on_one_pair_set_and_reports(tmp_path):
    spec = importlib.util.spec_from_file_location("sampled_latents", ROOT / "studies" / "world" / "sampled_latents.py")
    probe = importlib.util.module_from_spec(spec)
    sys.modules["sampled_latents"] = probe
    spec.loader.exec_module(probe)
    out = tmp_path / "probe"
    argv = ["--output", str(out), "--seeds", "0", "--methods", "dpo", "--pair-prompts", "4", "--images-per-prompt",
            "2", "--train-steps", "2", "--batch-size", "2", "--eval-every", "1", "--eval-prompts", "2",
            "--eval-images-per-prompt", "1"]
    assert probe.main(argv) == 0
    results = out / "results"
    assert sorted(p.name for p in results.iterdir()) == [
        "base-seed0.json", "dpo-images-seed0.json", "dpo-latents-seed0.json", "latent-stats.json", "round-trip.json"]
    images, latents = (json.loads((results / f"dpo-{v}-seed0.json").read_text()) for v in ("images", "latents"))
    assert set(images["median"]) == set(latents["median"]) == {"1", "2"}
    configs = [yaml.safe_load((out / "runs" / f"dpo-{v}-seed0" / "config.yaml").read_text())
               for v in ("images", "latents")]
    assert [c["data"]["stored_latents"] for c in configs] == [False, True]
    assert [c["data"]["dataset"] for c in configs] == [str(out / "pairs")] * 2
    trip = json.loads((results / "round-trip.json").read_text())
    assert trip["images"] == 8 and 0 < trip["stored_mean"] < 1 and 0 < trip["round_trip_mean"] < 1
    report = (out / "results.md").read_text()
    assert "| dpo | images (VAE) |" in report and "| dpo | stored latents |" in report
    stamps = {p: p.stat().st_mtime_ns for p in results.iterdir()}
    assert probe.main(argv) == 0  # resumed: every result kept as it was
    assert {p: p.stat().st_mtime_ns for p in results.iterdir()} == stamps
