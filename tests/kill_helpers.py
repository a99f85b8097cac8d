"""Kill a command with SIGKILL in the middle of writing one of its outputs, for the tests that a
killed and rerun job writes what an uninterrupted one does (issue 21).

:func:`run_killed` runs ``smpo ARGV`` in a subprocess through a wrapper that counts the job's
writes of targets whose name contains ``match``. At write number ``at`` (0-based) it lets the
write go half way and sends the process SIGKILL, so no cleanup code runs and a half-written file
is left behind:

- by default the writes are the job's atomic writes (``smpo.io.atomic_path``, wherever it is
  imported): the block writes its file or folder at the temporary path, every file there is cut
  to half its size, then the kill (before the rename);
- ``call="module.function"`` (e.g. the checkpoint's ``write_json``) counts that function's calls
  instead: its first argument's folder, being written, has every file cut to half, then the kill
  (before the function runs).

:func:`kill_point` draws ``at`` among a job's natural units (shards, image batches, steps) with a
seeded RNG; ``SMPO_KILL_SEED=N pytest ...`` tries other points.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

WRAPPER = '''
import contextlib, importlib, json, os, signal, sys
from pathlib import Path

import smpo.cli
import smpo.io

spec = json.loads(sys.argv[1])
seen = []


def due(target):
    if spec["match"] not in Path(target).name:
        return False
    seen.append(target)
    return len(seen) == spec["at"] + 1


def half_write_and_die(path):
    path = Path(path)
    for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        os.truncate(f, f.stat().st_size // 2)
    print("killed writing", path, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


real_atomic_path = smpo.io.atomic_path


@contextlib.contextmanager
def killing_atomic_path(path):
    with real_atomic_path(path) as tmp:
        yield tmp
        if due(path):
            half_write_and_die(tmp)


if spec["call"] is None:
    importlib.import_module(smpo.cli.COMMANDS[sys.argv[2]][0])
    for module in list(sys.modules.values()):  # every module that imported it by name
        if getattr(module, "__dict__", {}).get("atomic_path") is real_atomic_path:
            module.atomic_path = killing_atomic_path
else:
    module_name, _, name = spec["call"].rpartition(".")
    module = importlib.import_module(module_name)
    real = getattr(module, name)

    def killing_call(*args, **kwargs):
        if due(args[0]):
            half_write_and_die(Path(args[0]).parent)
        return real(*args, **kwargs)

    setattr(module, name, killing_call)
code = smpo.cli.main(sys.argv[2:])
print("writes", len(seen), flush=True)  # not killed: how many writes there are to choose from
sys.exit(code)
'''


def kill_point(units: int, seed: int) -> int:
    """A unit in ``range(units)`` drawn by ``random.Random(seed)`` (``SMPO_KILL_SEED`` overrides ``seed``)."""
    return random.Random(int(os.environ.get("SMPO_KILL_SEED", seed))).randrange(units)


def run_killed(argv: list[str], *, at: int, match: str = "", call: str | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``smpo ARGV`` in a subprocess and check that it died of SIGKILL inside its write number
    ``at`` (0-based) of a target whose name contains ``match`` (see the module docstring)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    spec = json.dumps({"call": call, "at": at, "match": match})
    result = subprocess.run([sys.executable, "-c", WRAPPER, spec, *argv], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == -9 and "killed writing" in result.stdout, (
        f"expected a SIGKILL in write {at} ({call or 'atomic_path'}, {match!r}); exit {result.returncode}\n"
        + result.stdout[-2000:] + result.stderr[-3000:])
    return result


def _temporary(relative: Path) -> bool:
    """Under a temporary name: ``smpo.io.atomic_path``'s ``.NAME.XXXX.tmp``, a checkpoint's ``.step-N.tmp``."""
    return any(part.startswith(".") and part.endswith(".tmp") for part in relative.parts)


def visible_files(folder: Path, *, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """``{relative path: bytes}`` of the files under ``folder`` that are not under a temporary name
    and whose name is not in ``skip``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not _temporary(p.relative_to(folder)) and p.name not in skip}


def leftovers(folder: Path) -> list[str]:
    """The temporaries under ``folder``: what a kill left half-written."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp"))


def assert_no_partial_file(out: Path, reference: Path, *, skip: tuple[str, ...] = ()) -> None:
    """What a killed run left: its files under final names are the uninterrupted run's, byte for byte
    (but for a job's work folder, ``.work``, which a finished run has removed, and the files of
    ``skip``, which hold an unfinished run's state), and a half-written temporary."""
    killed, done = visible_files(out, skip=skip), visible_files(reference, skip=skip)
    assert [name for name in killed if name not in done and not name.startswith(".")] == []
    assert [name for name in killed if name in done and killed[name] != done[name]] == []
    assert leftovers(out), "the kill left no half-written temporary"
