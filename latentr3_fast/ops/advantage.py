"""GRPO advantages (paper Sec. 3.2.2, Eq. 7): "batch" (the paper's), "group" and "none" modes."""

from __future__ import annotations

import torch

from ..errors import ConfigError

BATCH_EPS = 1e-6
GROUP_EPS = 1e-4
_MODES = ("batch", "group", "none")


def _world(group) -> int:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _gather_all(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the 1-D ``x`` of every rank in rank order (ranks may hold different sizes).

    Gathering the few hundred rewards (instead of all-reducing partial sums) makes the
    statistics bitwise equal to one process holding the whole batch, for any world size.
    """
    dist = torch.distributed
    world = dist.get_world_size(group)
    size = torch.tensor([x.numel()], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = torch.zeros(longest, dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:c] for part, c in zip(parts, counts)])


def grpo_advantage(
    rewards: torch.Tensor,
    num_generations: int,
    mode: str = "batch",
    group=None,
) -> torch.Tensor:
    """Advantages of ``rewards`` laid out as P groups of G rows (row ``p*G`` is the clean one).

    Args:
        rewards: ``[P*G]`` rewards of this rank.
        num_generations: G.
        mode: "batch": ``m`` = mean of the clean rewards over all prompts of all ranks,
            ``A = (s - m) / (||S - m||_2 + 1e-6)`` with the norm over ALL rows of all ranks;
            "group": ``A = (s - mean_g) / (std_g + 1e-4)`` per group (unbiased std, like TRL);
            "none": ``A = s - m``.
        group: ``torch.distributed`` process group for "batch"/"none" (default: the world when
            torch.distributed is initialized; a single process otherwise).

    Returns:
        ``[P*G]`` advantages in ``rewards.dtype`` (statistics computed in float64).
    """
    if mode not in _MODES:
        raise ConfigError(f"grpo_advantage: mode must be one of {_MODES}, got {mode!r}")
    g = int(num_generations)
    if g < 1:
        raise ConfigError(f"grpo_advantage: num_generations must be >= 1, got {num_generations}")
    if rewards.dim() != 1 or rewards.numel() % g != 0:
        raise ConfigError(
            f"grpo_advantage: rewards must be [P*G] with G={g}, got {tuple(rewards.shape)}"
        )
    s = rewards.detach().to(torch.float64)
    if mode == "group":
        if g < 2:
            raise ConfigError("grpo_advantage: mode='group' needs num_generations >= 2")
        grid = s.view(-1, g)
        a = (grid - grid.mean(dim=1, keepdim=True)) / (grid.std(dim=1, keepdim=True) + GROUP_EPS)
        return a.reshape(-1).to(rewards.dtype)
    everything = _gather_all(s, group) if _world(group) > 1 else s
    if everything.numel() == 0:
        return rewards.detach().clone()
    m = everything.view(-1, g)[:, 0].mean()
    if mode == "none":
        return (s - m).to(rewards.dtype)
    norm = torch.linalg.vector_norm(everything - m)
    return ((s - m) / (norm + BATCH_EPS)).to(rewards.dtype)
