"""The micro-batches of a run's steps, made ahead in worker processes where a source decodes images.

A step from a labelled dataset reads each pair's JPEG bytes, decodes, crops, flips and converts
them before the VAE and text encoders run. That CPU work depends only on the step's indices and
epoch, which the layout knows in advance, so with ``data.num_workers`` > 0 a
``torch.utils.data.DataLoader`` makes it (``ImagePairs.prepare``) in that many forked processes,
two micro-batches ahead per worker, while the training process runs the networks: as diffusers'
training scripts decode in their DataLoader's workers. The encoders stay in the training process
(``ImagePairs.encode``), on the model's device. The batches are the same with or without workers.

A source without a ``prepare`` (a ``smpo cache`` folder: its pairs are memory-mapped views; KTO's
images) is read in the step, as with ``num_workers`` 0.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
from collections.abc import Iterator
from typing import Any

import torch

from smpo.batch import PairBatch
from smpo.train.data import Layout

BY_VALUE_BYTES = 256 * 1024
"""Pixels up to this size travel from a worker through its pipe, larger ones in shared memory:
torch shares a tensor's memory by passing a file descriptor over a socket, a fixed cost of about
0.5 ms of the training process's time, more than copying a small batch (measured on the CPU:
8 images of 16 px 0.4 against 0.7 ms; of 64 px, 393 KiB, 0.9 against 1.0 ms; of 512 px 41 against 6 ms)."""


def default_workers(device: torch.device) -> int:
    """``data.num_workers`` when unset: 2 beside a GPU; 0 on the CPU, where the step's own threads
    use the cores the workers would take."""
    return 2 if device.type != "cpu" else 0


class _Prepared(torch.utils.data.Dataset):
    """Micro-batch ``key = step x accumulation + micro`` of one process, prepared (in a worker)."""

    def __init__(self, pairs: Any, layout: Layout, seed: int, rank: int):
        self.pairs, self.layout, self.seed, self.rank = pairs, layout, seed, rank

    def __getitem__(self, key: int) -> Any:
        step, micro = divmod(key, self.layout.accumulation)
        try:
            prepared = self.pairs.prepare(self.layout.indices(self.seed, step, self.rank, micro),
                                          self.layout.epoch_of(step))
        except ValueError as err:  # bad input: raised as itself by the training process, one line
            return err
        pixels = prepared.pixels
        if pixels.numel() * pixels.element_size() <= BY_VALUE_BYTES:
            return dataclasses.replace(prepared, pixels=pixels.numpy())  # a numpy array pickles by value
        return prepared


def _as_is(item: Any) -> Any:
    return item


class StepBatches:
    """``batches(step, micro)``: the `PairBatch` of micro-batch ``micro`` of optimizer step ``step``
    of process ``rank``; read in the step, or prepared ahead by ``workers`` processes (see the
    module docstring).

    Asked for the micro-batch it served last, it serves it again (the training-step benchmark
    replays a step); asked for any other than the next one (a resumed or restarted run), it starts
    its workers again from there.
    """

    def __init__(self, pairs: Any, layout: Layout, *, seed: int, rank: int, workers: int):
        self.pairs, self.layout, self.seed, self.rank = pairs, layout, seed, rank
        forked = "fork" in multiprocessing.get_all_start_methods()  # workers share the source, unpickled
        self.workers = workers if workers > 0 and forked and hasattr(pairs, "prepare") else 0
        self._iterator: Iterator[Any] | None = None
        self._next = -1
        self._last: tuple[int, Any] | None = None

    def __call__(self, step: int, micro: int) -> PairBatch:
        if not self.workers:
            return self.pairs.batch(self.layout.indices(self.seed, step, self.rank, micro), self.layout.epoch_of(step))
        key = step * self.layout.accumulation + micro
        if self._last is None or self._last[0] != key:
            if self._iterator is None or key != self._next:
                self._start(key)
            assert self._iterator is not None
            self._last, self._next = (key, next(self._iterator)), key + 1
        prepared = self._last[1]
        if isinstance(prepared, ValueError):
            raise prepared
        if not isinstance(prepared.pixels, torch.Tensor):
            prepared = dataclasses.replace(prepared, pixels=torch.from_numpy(prepared.pixels))
        return self.pairs.encode(prepared)

    def _start(self, key: int) -> None:
        self.close()
        loader = torch.utils.data.DataLoader(
            _Prepared(self.pairs, self.layout, self.seed, self.rank), batch_size=None,
            sampler=itertools.count(key), num_workers=self.workers, collate_fn=_as_is,
            multiprocessing_context="fork")
        self._iterator = iter(loader)

    def close(self) -> None:
        """Stop the workers (a run's end): the DataLoader's iterator shuts them down when it is let go."""
        self._iterator, self._next, self._last = None, -1, None
