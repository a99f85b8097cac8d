"""Micro-batches made ahead in DataLoader worker processes equal those read in the step."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from smpo.models import load_family
from smpo.train import prefetch
from smpo.train.data import ImagePairs, LabelledPairs, Layout
from smpo.train.prefetch import StepBatches, default_workers

SEED = 11


@pytest.fixture(scope="module")
def sdxl(tiny_pipelines):
    return load_family(tiny_pipelines["sdxl"])


def _assert_same(a, b) -> None:
    assert a.seeds == b.seeds
    for name in ("latents_w", "latents_l", "p_win"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    for cond_a, cond_b in ((a.cond, b.cond), (a.cond_l, b.cond_l)):
        torch.testing.assert_close(cond_a.hidden_states, cond_b.hidden_states, rtol=0, atol=0)
        for key in cond_a.added:
            torch.testing.assert_close(cond_a.added[key], cond_b.added[key], rtol=0, atol=0)


@pytest.mark.parametrize("by_value", [True, False], ids=["through-the-pipe", "shared-memory"])
@pytest.mark.parametrize("options", [dict(), dict(flip_per_image=True, vae_sample=True)], ids=["mean", "sampled"])
def test_workers_make_the_batches_of_the_step(sdxl, tmp_path, options, by_value, write_labelled, monkeypatch):
    if not by_value:  # the workers are forked after this: they see it
        monkeypatch.setattr(prefetch, "BY_VALUE_BYTES", 0)
    data = write_labelled(tmp_path / "data", 12, seed=4)
    pairs = ImagePairs(LabelledPairs(data), sdxl, resolution=16, seed=SEED, empty_prompt_rate=0.5,
                       random_flip=True, labels="smoothed", **options)
    layout = Layout(len(pairs), batch_size=2, num_processes=2, accumulation=2)  # 1 step an epoch: epochs roll
    plain = StepBatches(pairs, layout, seed=SEED, rank=1, workers=0)
    ahead = StepBatches(pairs, layout, seed=SEED, rank=1, workers=2)
    assert ahead.workers == 2
    # In order over three epochs, the last micro-batch asked again, then a jump back (a restart).
    keys = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 1), (2, 0), (0, 1), (1, 0)]
    for step, micro in keys:
        expected = pairs.batch(layout.indices(SEED, step, 1, micro), layout.epoch_of(step))
        _assert_same(ahead(step, micro), expected)
        assert isinstance(ahead._last[1].pixels, torch.Tensor) is not by_value  # as it came from the worker
        _assert_same(plain(step, micro), expected)
    ahead.close()
    assert ahead._iterator is None


def test_a_bad_image_read_ahead_is_raised_by_its_step_in_one_line(sdxl, tmp_path, write_labelled):
    data = write_labelled(tmp_path / "data", 4, seed=1)
    shard = sorted(data.glob("*.parquet"))[1]
    table = pq.read_table(shard).to_pylist()
    table[0]["jpg_1"] = b"not a jpeg"
    pq.write_table(pa.Table.from_pylist(table), shard)
    pairs = ImagePairs(LabelledPairs(data), sdxl, resolution=16, seed=SEED, empty_prompt_rate=0.0,
                       random_flip=False, labels="smoothed")
    layout = Layout(len(pairs), batch_size=4, num_processes=1, accumulation=1)
    batches = StepBatches(pairs, layout, seed=SEED, rank=0, workers=1)
    with pytest.raises(ValueError) as err:
        batches(0, 0)
    message = str(err.value)  # as the step itself raises it: one line naming the set, pair and image
    assert message.startswith(f"{data}: pair {table[0]['pair_id']!r}: jpg_1 cannot be decoded (cannot identify")
    assert "\n" not in message and "worker" not in message.lower()
    batches.close()


def test_sources_without_images_and_the_cpu_read_in_the_step(sdxl, labelled, tmp_path):
    from smpo.data.cache import build_cache
    from smpo.train.data import CachedPairs

    build_cache(labelled, tmp_path / "cache", sdxl, progress=False)
    cached = CachedPairs(tmp_path / "cache", sdxl, max_pairs=None, seed=SEED, empty_prompt_rate=0.2,
                         random_flip=True, labels="smoothed")
    layout = Layout(len(cached), batch_size=2, num_processes=1, accumulation=1)
    batches = StepBatches(cached, layout, seed=SEED, rank=0, workers=2)
    assert batches.workers == 0  # memory-mapped views: nothing to make ahead
    _assert_same(batches(3, 0), cached.batch(layout.indices(SEED, 3, 0, 0), 0))
    assert default_workers(torch.device("cpu")) == 0 and default_workers(torch.device("cuda")) == 2


def test_a_run_with_workers_trains_as_one_without(tiny_pipelines, labelled, tmp_path):
    from smpo.train import TrainConfig, train

    def run(workers: int, name: str):
        config = TrainConfig()
        config.model.pretrained, config.model.finetune, config.model.lora_rank = str(tiny_pipelines["sd15"]), "lora", 4
        config.data.dataset, config.data.num_workers = str(labelled), workers
        config.optim = dataclasses.replace(config.optim, batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                                           warmup_steps=0, learning_rate=1e-4)
        config.objective.method = "dpo"
        config.run.output_dir, config.run.progress = str(tmp_path / name), False
        return [{k: r[k] for k in ("loss", "grad_norm")} for r in train(config).metrics]

    assert run(2, "ahead") == run(0, "plain")
