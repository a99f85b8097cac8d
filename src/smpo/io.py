"""Safe file output shared by every command: atomic writes, resumable shards, no silent overwrite.

Long jobs (labelling, caching, generation, evaluation, training) write their results in pieces.
A piece becomes visible under its final name only once it is complete (written to a temporary
name in the same folder, then renamed), so a killed job never leaves a half-written piece that a
resumed job would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch


class OutputExistsError(FileExistsError):
    """An output already exists and the caller did not ask to overwrite or resume it."""


class SettingsChangedError(OutputExistsError, ValueError):
    """An unfinished output was made with other settings than the run asked to resume it with."""


def refuse_changed_settings(folder: str | os.PathLike, saved: Mapping[str, Any], current: Mapping[str, Any], *,
                            what: str = "a run", ignore: Collection[str] = ()) -> None:
    """Raise :class:`SettingsChangedError` when ``saved`` and ``current`` differ in a key not in
    ``ignore``, naming each difference as ``key: saved -> current``.

    Every resumable job keeps its settings beside its output and calls this before resuming.
    """
    keys = sorted(k for k in set(saved) | set(current) if k not in ignore and saved.get(k) != current.get(k))
    if keys:
        detail = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys)
        raise SettingsChangedError(f"{folder} holds {what} made with other settings ({detail}); "
                                   "use another output folder or --overwrite")


def prepare_output_dir(path: str | os.PathLike, *, overwrite: bool = False, resume: bool = True) -> Path:
    """Create ``path`` for a job's output.

    An existing non-empty folder is resumed when ``resume`` is true (the job skips pieces that
    are already finished), cleared when ``overwrite`` is true, and refused otherwise.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise OutputExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def prepare_job_output(out: Path, settings: Mapping[str, Any], *, job: str, finished: str, kind: str,
                       work_dir: str = ".work", overwrite: bool = False) -> None:
    """The output folder of a resumable job (``smpo label``, ``smpo pairs``): new, resumed, or refused.

    ``finished``: the file whose presence marks a finished output, a ``kind`` (e.g. "labelled
    dataset"), refused without ``overwrite``;
    ``work_dir/run.json`` holds an unfinished run's settings, which a resume must repeat
    (:func:`refuse_changed_settings`); any other non-empty folder is refused. Call it on the main
    process before any other writes (a resume removes the killed run's temporaries).
    """
    run_file = out / work_dir / "run.json"
    if _killed_writing_its_settings(out, work_dir):
        shutil.rmtree(out / work_dir)  # a new start: nothing was done
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        if (out / finished).exists():
            shutil.rmtree(out / work_dir, ignore_errors=True)  # leftover of a kill after the last write
            raise OutputExistsError(f"{out} already holds a finished {kind}; pass --overwrite to replace it")
        if not run_file.exists():
            raise OutputExistsError(f"{out} exists, is not empty and is not an unfinished `{job}` run; "
                                    "choose another output or pass --overwrite to replace it")
        refuse_changed_settings(out, read_json(run_file), settings, what=f"an unfinished `{job}` run")
        remove_temporaries(out)  # a final piece a kill left half-written (those of work_dir go with it)
        return  # resume
    prepare_output_dir(out, overwrite=overwrite, resume=False)
    write_json(run_file, settings)


def _killed_writing_its_settings(out: Path, work_dir: str) -> bool:
    """``out`` holds only ``work_dir`` with only temporaries in it: a job killed writing its ``run.json``."""
    entries = list(out.iterdir()) if out.is_dir() else []
    return (bool(entries) and all(p.name == work_dir and p.is_dir() for p in entries)
            and all(_is_temporary(q) for q in (out / work_dir).iterdir()))


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def looks_local(value: str | os.PathLike) -> bool:
    """Whether a model name is meant as a local path (hub ids read ``namespace/name``)."""
    text = str(value)
    return text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") >= 2 or Path(text).exists()


def check_model_source(value: str | os.PathLike, option: str) -> str:
    """``value`` as a string; a local-looking path that does not exist raises ``FileNotFoundError``
    naming ``option`` (so it is never handed to the hub client as a repo id)."""
    text = str(value)
    if looks_local(text) and not Path(text).expanduser().exists():
        raise FileNotFoundError(f"{option} {text}: no such folder (a local path; hub ids read 'namespace/name')")
    return text


def model_identity(value: str | os.PathLike) -> str:
    """A model reference in one spelling: a local path made absolute, a hub id as written."""
    text = str(value)
    return str(Path(text).expanduser().resolve()) if looks_local(text) else text


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Works for a file or a folder written at the temporary path.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if final.is_dir() and not final.is_symlink():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(target, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporaries (``.NAME.*.tmp``) that killed :func:`atomic_path` writes left in ``folder``.

    A resumed job calls this before any of its processes writes there again, so that its output
    ends as an uninterrupted run's does.
    """
    for path in Path(folder).glob(".*.tmp"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Save ``tensors`` as a safetensors file, atomically, with bytes that do not depend on the process.

    safetensors writes ``metadata`` in the order of a hash map seeded at random in each process;
    the header is written again with the metadata sorted (the tensors' order is safetensors' own).
    """
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        raw = tmp.with_name(f"{tmp.name}.raw")
        save_file(dict(tensors), str(raw), metadata=None if metadata is None else dict(metadata))
        with open(raw, "rb") as source, open(tmp, "wb") as target:
            header = json.loads(source.read(int.from_bytes(source.read(8), "little")))
            if "__metadata__" in header:
                header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
            text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
            text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
            target.write(len(text).to_bytes(8, "little") + text)
            shutil.copyfileobj(source, target, 1 << 24)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` means the best available device: CUDA, then Apple MPS, then the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """Parse ``fp32``/``fp16``/``bf16``; ``None`` means fp16 on CUDA and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float16 if device is not None and device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(sorted(_DTYPES))}") from None
