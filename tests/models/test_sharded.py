"""``smpo.models.sharded.gathered``: a sharded network, or a LoRA view of one, computes with whole weights."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from smpo.models.lora import AdaptersOffView, MergedAdaptersView
from smpo.models.sharded import gathered


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _sharded(mesh) -> torch.nn.Module:
    network = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    fully_shard(network[0], mesh=mesh)
    fully_shard(network, mesh=mesh)
    return network


def _sharded_now(network: torch.nn.Module) -> list[bool]:
    return [isinstance(p, DTensor) for p in network.parameters()]


@pytest.mark.parametrize("wrap", [lambda n: n, AdaptersOffView, MergedAdaptersView], ids=["network", "adapters-off",
                                                                                          "merged"])
def test_gathered_holds_whole_weights_inside_and_shards_after(one_process_group, wrap):
    network = _sharded(one_process_group)
    assert all(_sharded_now(network))
    with gathered(wrap(network)):
        assert not any(_sharded_now(network))  # whole weights for every call in the block
    assert all(_sharded_now(network))


def test_gathered_leaves_an_unsharded_network_alone():
    network = torch.nn.Linear(4, 4)
    with gathered(AdaptersOffView(network)):
        assert not isinstance(network.weight, DTensor)
