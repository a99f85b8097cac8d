"""`smpo cache`: what is read back equals encoding the images and prompts directly."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from smpo.cli import main
from smpo.data.latent_cache import LatentCache, pair_batch
from smpo.models import load_family, prepare_image
from smpo.models.presets import save_pipeline

SIZES = [(24, 16), (16, 20), (16, 16), (40, 24), (18, 30)]  # (width, height)


def _png(size, seed) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _shards(out):
    from safetensors import safe_open

    shards = {}
    for path in sorted((out / "shards").iterdir()):
        with safe_open(str(path), framework="pt") as f:
            shards[path.name] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return shards


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("labelled")
    rows = []
    for i, size in enumerate(SIZES):
        rows.append(dict(pair_id=f"p{i}", caption=["a cat", "a dog", "a cat", "", "two birds"][i],
                         jpg_0=_png(size, 2 * i), jpg_1=_png(SIZES[-1 - i], 2 * i + 1),
                         label_0=[1.0, 0.0, 0.5, 1.0, 0.0][i], score_0=0.2 + i / 100, score_1=0.25,
                         winner=[0, 1, 1, 0, 1][i], p_win=0.5 + i / 20))
    rows.append(dict(rows[0], pair_id="broken", jpg_1=b"not an image"))
    pq.write_table(pa.Table.from_pylist(rows[:3]), folder / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), folder / "train-00001.parquet")
    return folder, rows[:-1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: save_pipeline(root / family, family, "tiny") for family in ("sd15", "sdxl")}


@pytest.mark.parametrize("family_name", ["sd15", "sdxl"])
def test_cache_read_back_equals_direct_encoding(family_name, labelled, models, tmp_path, capsys):
    data, rows = labelled
    out = tmp_path / "cache"
    assert main(["cache", str(data), "--model", str(models[family_name]), "--out", str(out), "--shard-size", "2",
                 "--batch-size", "3", "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "disk estimate" in printed and "skipped 1" in printed and "broken" in printed
    cache = LatentCache(out)
    assert len(cache) == 5 and cache.pair_ids == [f"p{i}" for i in range(5)] and cache.family == family_name
    family = load_family(models[family_name], with_network=False)
    for row in rows:
        pair = cache.get(row["pair_id"])
        assert pair.caption == row["caption"]
        assert pair.labels == {k: row[k] for k in ("winner", "p_win", "label_0", "score_0", "score_1")}
        assert pair.winner == row["winner"]
        text = family.encode_prompts([row["caption"]])
        for k in (0, 1):
            prepared = prepare_image(Image.open(io.BytesIO(row[f"jpg_{k}"])), family.resolution)
            latents = family.encode_images(prepared.pixels[None])[0]
            assert pair.latents[k].dtype == torch.float16
            torch.testing.assert_close(pair.latents[k].float(), latents, atol=2e-3, rtol=2e-3)
            direct = family.image_conditioning(text, original_sizes=[prepared.original_size],
                                               crops_coords=[prepared.crop_top_left])
            cached = pair.conditioning(k)
            torch.testing.assert_close(cached.hidden_states.float(), direct.hidden_states, atol=2e-3, rtol=2e-3)
            assert (cached.added is None) == (direct.added is None)
            for key, value in (direct.added or {}).items():
                torch.testing.assert_close(cached.added[key].float(), value, atol=2e-3, rtol=2e-3)
    if family_name == "sdxl":  # image 0 of p3 is 40 x 24 (w x h): resized to 27 x 16, crop left (27-16)//2 = 5
        assert cache.get("p3").conditioning(0).added["time_ids"].tolist() == [[24, 40, 0, 5, 16, 16]]
    batch = pair_batch([cache.get("p1"), cache.get("p3")], seeds=[5, 6])
    assert batch.p_win.tolist() == pytest.approx([0.55, 0.65])
    p1 = cache.get("p1")  # winner 1: image 1 comes first
    assert torch.equal(batch.latents_w[0], p1.latents[1].float()) and torch.equal(batch.latents_l[0], p1.latents[0].float())
    if family_name == "sdxl":
        assert torch.equal(batch.cond.added["time_ids"][0], p1.conditioning(1).added["time_ids"][0])
        assert torch.equal(batch.cond_l.added["time_ids"][0], p1.conditioning(0).added["time_ids"][0])
    human = pair_batch([p1], seeds=[5], human_labels=True)  # label_0 = 0: the human chose image 1 as well
    assert human.p_win.tolist() == [1.0] and torch.equal(human.latents_w[0], p1.latents[1].float())
    with pytest.raises(ValueError, match="tie"):
        pair_batch([cache.get("p2")], seeds=[1], human_labels=True)
    empty = cache.empty_conditioning()
    torch.testing.assert_close(empty.hidden_states.float(), family.encode_prompts([""]).hidden_states,
                               atol=2e-3, rtol=2e-3)


def test_cache_resumes_after_a_kill_and_refuses_other_settings(labelled, models, tmp_path, cli_error):
    data, _ = labelled
    out = tmp_path / "cache"
    args = ["cache", str(data), "--model", str(models["sd15"]), "--out", str(out), "--shard-size", "2", "--no-progress"]
    assert main(args) == 0
    first = _shards(out)
    reference = LatentCache(out).get("p4").latents[1].clone()
    # a kill after shard 0: the later shards and the manifest are missing
    for name in ("shard-00001.safetensors", "shard-00002.safetensors"):
        (out / "shards" / name).unlink()
    (out / "manifest.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="not a finished smpo cache"):
        LatentCache(out)
    assert main(args) == 0
    again = _shards(out)
    assert again.keys() == first.keys()
    for name, (tensors, meta) in first.items():  # same tensors and metadata (header bytes may be ordered differently)
        assert again[name][1] == meta and again[name][0].keys() == tensors.keys()
        assert all(torch.equal(again[name][0][k], v) for k, v in tensors.items())
    assert torch.equal(LatentCache(out).get("p4").latents[1], reference)
    assert "shard_size" in cli_error([*args[:-3], "--shard-size", "3", "--no-progress"])
    assert main([*args[:-3], "--shard-size", "3", "--no-progress", "--overwrite"]) == 0
    assert len(LatentCache(out)) == 5


@pytest.mark.parametrize("store_inversion", [False, True])
def test_two_torchrun_processes_encode_half_the_shards_each_and_match_one_process(store_inversion, labelled, models,
                                                                                  tmp_path):
    import os
    import subprocess
    import sys

    data, _ = labelled
    args = [str(data), "--model", str(models["sd15"]), "--shard-size", "2", "--no-progress",
            *(["--store-inversion", "--inversion-steps", "2"] if store_inversion else [])]
    assert main(["cache", *args, "--out", str(tmp_path / "one")]) == 0
    script = tmp_path / "cache_logged.py"  # each process logs the first pair of each shard it encodes
    script.write_text("import sys, smpo.data.cache as c; real = c.encode_shard\n"
                      "def logged(family, pairs, **kw):\n"
                      "    print('encodes', pairs[0].pair_id, flush=True); return real(family, pairs, **kw)\n"
                      "c.encode_shard = logged\n"
                      "from smpo.cli import main; sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29519", "--tee", "3", str(script), "cache", *args, "--out", str(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written: dict[str, set[str]] = {}
    for line in result.stdout.splitlines():
        if "encodes" in line:
            rank, _, rest = line.partition("]:")
            written.setdefault(rank.strip("[ "), set()).add(rest.split()[-1])
    assert sorted(map(sorted, written.values())) == [["p0", "p4"], ["p2"]], result.stdout  # shard k on process k % 2
    one, two = tmp_path / "one", tmp_path / "two"
    names = sorted(p.name for p in (one / "shards").iterdir())
    assert names == sorted(p.name for p in (two / "shards").iterdir()) and len(names) == 3
    for name in [*(f"shards/{n}" for n in names), "empty.safetensors", "manifest.parquet", "cache.json"]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert not (tmp_path / "two" / ".work").exists()


@pytest.mark.parametrize("store_inversion", [False, True])
def test_killed_by_sigkill_mid_write_then_rerun_writes_the_bytes_of_an_uninterrupted_run(store_inversion, labelled,
                                                                                         models, tmp_path):
    from kill_helpers import assert_no_partial_file, kill_point, leftovers, run_killed, visible_files

    data, _ = labelled
    args = [str(data), "--model", str(models["sd15"]), "--shard-size", "2", "--device", "cpu", "--no-progress",
            *(["--store-inversion", "--inversion-steps", "2"] if store_inversion else [])]
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert main(["cache", *args, "--out", str(reference)]) == 0
    # the atomic writes: cache.json, empty.safetensors, shards 0-2, .work/done-00000.json, manifest.parquet
    at = kill_point(7, seed=(9, 5)[store_inversion])  # shard 1, shard 2
    run_killed(["cache", *args, "--out", str(out)], at=at)
    assert_no_partial_file(out, reference)
    assert not (out / "manifest.parquet").exists()
    assert main(["cache", *args, "--out", str(out)]) == 0
    assert visible_files(out) == visible_files(reference), at
    assert leftovers(out) == [], at
