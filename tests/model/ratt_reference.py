"""Hand-written LatentRATT reference shared by the model tests."""

from __future__ import annotations

import math

import torch

from latentr3_fast.model import LatentRATT


def _rotate(t: torch.Tensor, pos: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotary as a complex rotation of the pairs (t_j, t_{j+hd/2}) by angle pos * theta_j."""
    half = t.shape[-1] // 2
    z = torch.complex(t[..., :half], t[..., half:])
    ang = pos.double()[..., None, None] * theta  # [..., 1, half]
    z = z * torch.polar(torch.ones_like(ang), ang)
    return torch.cat([z.real, z.imag], dim=-1)


@torch.no_grad()
def reference_ratt(ratt: LatentRATT, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row by row, only real tokens, rotary written as a complex rotation of (x_j, x_{j+d/2})."""
    d, nh = ratt.hidden_size, ratt.num_heads
    hd = d // nh
    out = []
    for b in range(hidden.shape[0]):
        x = hidden[b][mask[b].bool()].double()  # [n, d] real tokens in order
        n = x.shape[0]
        wq, bq = ratt.q_proj.weight.double(), ratt.q_proj.bias.double()
        wk, bk = ratt.k_proj.weight.double(), ratt.k_proj.bias.double()
        wv, bv = ratt.v_proj.weight.double(), ratt.v_proj.bias.double()
        q = (x[-1] @ wq.T + bq).view(nh, hd)
        k = (x @ wk.T + bk).view(n, nh, hd)
        v = (x @ wv.T + bv).view(n, nh, hd)
        half = hd // 2
        j = torch.arange(half, dtype=torch.float64)
        theta = ratt.rope_base ** (-2.0 * j / hd)  # [half]

        qr = _rotate(q, torch.tensor(n - 1), theta)
        kr = _rotate(k, torch.arange(n), theta)
        heads = []
        for h in range(nh):
            s = torch.tensor([float(qr[h] @ kr[i, h]) for i in range(n)]) / math.sqrt(hd)
            p = torch.softmax(s.double(), 0)
            heads.append((p[:, None] * v[:, h]).sum(0))
        out.append(torch.cat(heads))
    return torch.stack(out).float()
