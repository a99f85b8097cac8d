"""No-grad calls of a sharded network with its whole weights.

A network sharded by FSDP2 (``smpo.train.sharding``) gathers each block's weights from every
process as a call reaches the block, so all processes must make the same calls in the same order.
The inversion makes a number of calls that depends on each pair's level ``t`` (the grid steps
below it; the live inversion of flipped or prompt-dropped images beside a cache), which differs
between processes. Inside :func:`gathered` the network's weights are gathered once, whole, and
stay so until the block ends: its calls then need no other process, however many each makes.
The price is one whole copy of the inverting network's weights (in the compute dtype) while
the block runs.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from smpo.models.lora import AdaptersOffView


@contextlib.contextmanager
def gathered(network: Any) -> Iterator[None]:
    """Within the block, ``network`` (a module, or a LoRA view of one) computes with whole
    weights if it is sharded; afterwards each process again holds only its shards. Every process
    must enter and leave the block together (the gathering is collective). Unsharded: no-op."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded
    module = network.network if isinstance(network, AdaptersOffView) else network  # a LoRA view: its network
    if fsdp is None or not isinstance(module, fsdp.FSDPModule):
        yield
        return
    units = [m for m in module.modules() if isinstance(m, fsdp.FSDPModule)]  # the same order everywhere
    module.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        module.set_reshard_after_forward(True)
