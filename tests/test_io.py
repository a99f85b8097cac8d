import pytest
import torch

from smpo.io import OutputExistsError, atomic_path, prepare_output_dir, read_json, resolve_dtype, write_json


def test_atomic_file_appears_only_on_success(tmp_path):
    target = tmp_path / "piece.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    assert read_json(target) == {"a": 1}


def test_atomic_folder_replaces_the_old_one(tmp_path):
    target = tmp_path / "ckpt"
    for value in ("one", "two"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "w.txt").write_text(value)
    assert (target / "w.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_prepare_output_dir_refuses_resumes_or_overwrites(tmp_path):
    out = tmp_path / "out"
    prepare_output_dir(out, resume=False)
    (out / "x").write_text("keep")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare_output_dir(out, resume=False)
    prepare_output_dir(out, resume=True)
    assert (out / "x").exists()
    prepare_output_dir(out, overwrite=True)
    assert list(out.iterdir()) == []


def test_resolve_dtype():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype(None, torch.device("cpu")) is torch.float32
    with pytest.raises(ValueError, match="fp16"):
        resolve_dtype("int4")
