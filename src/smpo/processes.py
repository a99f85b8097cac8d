"""The processes of a launch (``accelerate launch``, ``torchrun``, or none): which one this is, and
how many there are, for the jobs that split their work by process (label, generate).

``accelerate.PartialState()`` reads the launcher's environment, but on a machine without CUDA it
reports ONE process unless asked for the CPU explicitly: under ``torchrun --nproc_per_node 2``
each process would then take every shard. :func:`process_state` asks for the CPU (a gloo process
group) exactly when a multi-process launch has no CUDA device.
"""

from __future__ import annotations

import os

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
