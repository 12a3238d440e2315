"""Collectives under NCCL: host (CPU) tensors are staged on the GPU, since NCCL rejects them
(GRPO reduces its loss and gathers rewards as host tensors). The routing rule runs everywhere;
the collectives themselves need a GPU (a one-rank NCCL group)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from latentr3_fast.train.distributed import Collectives, staging_device


def test_only_a_pure_nccl_group_stages_host_tensors():
    assert staging_device("nccl") == torch.device("cuda")
    assert staging_device("NCCL") == torch.device("cuda")
    for backend in ("gloo", "mpi", "ucc", "cpu:gloo,cuda:nccl"):
        assert staging_device(backend) is None, backend


def test_one_process_needs_no_group():
    comm = Collectives()
    assert not comm.active and comm.staging is None
    t = torch.tensor([1.0, 2.0])
    assert comm.all_reduce_(t, "x") is t and comm.gather(t, "x") is t
    assert comm.any_rank(True, "x") and not comm.any_rank(False, "x")
    assert comm.sum_scalar(2.5, "x") == 2.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_host_tensors_reduce_under_nccl(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        comm = Collectives()
        assert comm.staging == torch.device("cuda")
        with pytest.raises((RuntimeError, dist.DistError)):  # what the staging avoids
            dist.all_reduce(torch.ones(3))
            torch.cuda.synchronize()
        comm.world = 2  # take the collective path (a one-rank group: the sum is the input)
        host = torch.tensor([1.0, -2.0, 3.5], dtype=torch.float64)
        assert comm.all_reduce_(host, "test") is host and host.device.type == "cpu"
        torch.testing.assert_close(host, torch.tensor([1.0, -2.0, 3.5], dtype=torch.float64))
        assert comm.sum_scalar(0.25, "test") == 0.25
        assert comm.any_rank(True, "test") and not comm.any_rank(False, "test")
        on_gpu = torch.arange(4.0, device="cuda")
        assert comm.all_reduce_(on_gpu, "test") is on_gpu  # already on the right device
    finally:
        dist.destroy_process_group()
