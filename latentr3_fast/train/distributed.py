"""torch.distributed for the trainers: process-group start-up and the collectives both
trainers use (one gradient all-reduce, one set of barrier / sum / gather helpers).

Neither trainer wraps the model in DDP (they call ``encode_prompt`` / ``suffix_forward``,
not ``forward``), so gradients are summed explicitly after the backward: every rank divides
its loss by the GLOBAL normaliser, hence the summed gradient equals the one-process gradient
of the same global batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import TrainingError

__all__ = [
    "Collectives",
    "UsesCollectives",
    "barrier",
    "init_distributed",
    "staging_device",
]


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed under torchrun (gloo on CPU, NCCL on GPU); (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(seconds=int(os.environ.get("LATENTR3_DIST_TIMEOUT", "600")))
        dist.init_process_group(backend=backend, timeout=timeout)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def staging_device(backend: str) -> torch.device | None:
    """Where host tensors must go for a collective of ``backend`` (``dist.get_backend``): the
    current CUDA device for a pure NCCL group, which rejects CPU tensors; None otherwise (gloo,
    mpi, ucc and mixed ``"cpu:gloo,cuda:nccl"`` groups reduce CPU tensors themselves)."""
    return torch.device("cuda") if backend.lower() == "nccl" else None


class Collectives:
    """One trainer's view of its process group; every method is a no-op in one process.

    Args:
        group: the process group (default: the world when ``torch.distributed`` is
            initialised).
        stage: names the trainer in error messages (``"SFT"``, ``"GRPO"``).
        next_step: returns the 1-based number of the step in progress (for error messages).

    A failed collective (a rank died or the process-group timeout passed) raises one
    TrainingError naming this rank and the step. Host (CPU) tensors are staged on the GPU
    when the group's backend cannot reduce them (NCCL), so callers never care which it is.
    """

    def __init__(
        self, group: Any = None, stage: str = "training", next_step: Callable[[], int] = int
    ) -> None:
        self.group = group
        self.stage = stage
        self.next_step = next_step
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(group) if self.distributed else 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.staging = staging_device(dist.get_backend(group)) if self.distributed else None

    @property
    def active(self) -> bool:
        """True when there are other ranks to talk to."""
        return self.distributed and self.world > 1

    def run(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a collective; a dead peer or a timeout becomes one clear TrainingError. In one
        process there is no peer, so ``fn``'s own errors pass through unchanged."""
        if not self.active:
            return fn()
        try:
            return fn()
        except (RuntimeError, dist.DistError) as exc:  # DistBackendError, gloo/NCCL errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainingError(
                f"{self.stage} rank {self.rank}/{self.world}: {what} failed at step "
                f"{self.next_step()} -- another rank probably died or the process-group "
                f"timeout passed ({first[:300]}). Checkpoints written so far are intact "
                "(--resume continues)."
            ) from exc

    def barrier(self, what: str) -> None:
        """Wait for every rank (``what``: the work the barrier follows, for errors)."""
        if self.active:
            self.run(f"barrier after {what}", lambda: dist.barrier(group=self.group))

    def all_reduce_(self, t: Tensor, what: str) -> Tensor:
        """In-place sum of ``t`` (any shape, any device) over ranks; returns ``t``."""
        if self.active:
            on_comm = self._staged(t)
            self.run(what, lambda: dist.all_reduce(on_comm, group=self.group))
            if on_comm is not t:
                t.copy_(on_comm)
        return t

    def any_rank(self, flag: bool, what: str) -> bool:
        """True when ``flag`` is True on at least one rank (every rank gets the same answer,
        so every rank takes the same branch, e.g. all checkpoint on an interrupt)."""
        if not self.active:
            return flag
        return self.sum_scalar(1.0 if flag else 0.0, what) > 0

    def sum_scalar(self, x: float, what: str) -> float:
        """Sum of a host float over ranks, in fp64."""
        if not self.active:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        self.all_reduce_(t, what)
        return float(t)

    def gather(self, t: Tensor, what: str) -> Tensor:
        """``[world * n, ...]``: every rank's ``t`` (``[n, ...]``, same shape on every rank)
        concatenated in rank order."""
        if not self.active:
            return t
        on_comm = self._staged(t.contiguous())
        parts = [torch.empty_like(on_comm) for _ in range(self.world)]
        self.run(what, lambda: dist.all_gather(parts, on_comm, group=self.group))
        return torch.cat(parts).to(t.device)

    def _staged(self, t: Tensor) -> Tensor:
        """``t`` itself, or a copy on the device the backend needs (a host tensor under NCCL)."""
        if self.staging is None or t.device.type == self.staging.type:
            return t
        return t.to(self.staging)

    def all_reduce_gradients(
        self,
        params: Sequence[torch.nn.Parameter],
        extra: Tensor | None = None,
        bucket_numel: int | None = None,
        fill_missing: bool = False,
    ) -> Tensor | None:
        """Sum the gradients of ``params`` over ranks in coalesced fp32 buckets.

        Args:
            params: the trained parameters (the same list, in the same order, on every rank).
            extra: optional small vector (e.g. the loss share) summed in the first bucket.
            bucket_numel: elements per bucket (None: one bucket, one collective).
            fill_missing: every parameter without a gradient gets zeros before the sum. When
                False, one whose gradient is None on every rank keeps ``grad=None`` (as in one
                process, so AdamW skips it identically); one with a gradient on some rank
                gets it (zeros where a rank had none).
        Returns:
            the summed ``extra`` (same shape), or ``extra`` itself in one process.
        """
        if not self.active:
            return extra
        device = params[0].device
        if fill_missing:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        head_parts = [] if extra is None else [extra.float().reshape(-1).to(device)]
        n_extra = head_parts[0].numel() if head_parts else 0
        if not fill_missing:  # which parameters have a gradient on this rank
            has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
            head_parts.append(has.to(device))
        head = torch.cat(head_parts) if head_parts else None
        for i, bucket in enumerate(_buckets(params, bucket_numel)):
            summed = self._reduce_bucket(bucket, head if i == 0 else None)
            if i == 0:
                head = summed
        if not fill_missing:
            used = head[n_extra:].cpu() > 0
            for p, u in zip(params, used.tolist()):
                if not u:
                    p.grad = None
        return None if extra is None else head[:n_extra].view_as(extra)

    def _reduce_bucket(
        self, bucket: list[torch.nn.Parameter], head: Tensor | None
    ) -> Tensor | None:
        """Sum one bucket (``head`` first, then the flattened gradients, zeros for a missing
        one) and write the sums back into ``.grad``; returns the summed ``head``."""
        parts = [] if head is None else [head]
        parts += [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
            for p in bucket
        ]
        flat = torch.cat(parts)
        self.all_reduce_(flat, "gradient all-reduce")
        off = 0
        if head is not None:
            head = flat[: head.numel()].clone()
            off = head.numel()
        for p in bucket:
            n = p.numel()
            g = flat[off : off + n].view_as(p)
            if p.grad is None:
                p.grad = g.to(p.dtype).clone()
            else:
                p.grad.copy_(g)
            off += n
        return head


def _buckets(
    params: Sequence[torch.nn.Parameter], bucket_numel: int | None
) -> list[list[torch.nn.Parameter]]:
    """Consecutive groups of ``params`` of at most ``bucket_numel`` elements (a larger
    parameter gets a bucket of its own; None: all in one)."""
    cap = bucket_numel if bucket_numel is not None else float("inf")
    buckets: list[list[torch.nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if buckets[-1] and size + p.numel() > cap:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    return buckets


class UsesCollectives:
    """A trainer's ``group`` / ``distributed`` / ``world`` / ``rank`` / ``is_main``, read from
    its :class:`Collectives` ``self.comm``."""

    comm: Collectives
    group = property(lambda self: self.comm.group)
    distributed = property(lambda self: self.comm.distributed)
    world = property(lambda self: self.comm.world)
    rank = property(lambda self: self.comm.rank)
    is_main = property(lambda self: self.comm.rank == 0)
