"""The processes of a launch (``accelerate launch``, ``torchrun``, or none): which one this is, and
how many there are, for the jobs that split their work by process (label, generate).

``accelerate.PartialState()`` reads the launcher's environment, but on a machine without CUDA it
reports ONE process unless asked for the CPU explicitly: under ``torchrun --nproc_per_node 2``
each process would then take every shard. :func:`process_state` asks for the CPU (a gloo process
group) exactly when a multi-process launch has no CUDA device.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from accelerate import PartialState


def launched_processes() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 outside a launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_state() -> PartialState:
    """accelerate's state of this process, seeing every process of the launch, with or without CUDA."""
    import torch

    if launched_processes() > 1 and not torch.cuda.is_available():
        return PartialState(cpu=True)
    return PartialState()


def wait_until(done: Callable[[], bool], what: str, job: str, poll_seconds: float = 5.0) -> None:
    """Poll the file system until ``done()``, saying every ten minutes what ``job`` waits for.

    Processes of a long job may finish hours apart (a resumed run), longer than a process group's
    timeout, so they meet on disk rather than at a collective barrier; the launcher ends every
    process if one of them fails.
    """
    waited = 0.0
    while not done():
        if waited and waited % 600 < poll_seconds:
            print(f"{job}: still waiting for {what} after {waited / 60:.0f} min", file=sys.stderr)
        time.sleep(poll_seconds)
        waited += poll_seconds
