"""Tucker fusion of image, text and knowledge vectors (MLIP sec. 4, MUTAN-style).

z = core ×1 (Wv v) ×2 (Wt t) ×3 (Wk k): each modality is projected to a small rank, and a learned
core tensor (rv, rt, rk, out) models all three-way interactions at a cost far below a full trilinear
map. The fused vector feeds the ITM and text-swap heads.
"""
from __future__ import annotations

import torch
from torch import nn


class TuckerFusion(nn.Module):
    """``forward(v, t, k) -> (B, out_dim)``; ranks default 32/32/16 and output 256 (our defaults).

    ``activation`` (tanh, as in MUTAN) is applied to the projected factors; ``None`` keeps them linear.
    """

    def __init__(self, v_dim: int, t_dim: int, k_dim: int, ranks: tuple[int, int, int] = (32, 32, 16),
                 out_dim: int = 256, dropout: float = 0.0, activation: str | None = "tanh"):
        super().__init__()
        rv, rt, rk = ranks
        self.wv, self.wt, self.wk = nn.Linear(v_dim, rv), nn.Linear(t_dim, rt), nn.Linear(k_dim, rk)
        self.core = nn.Parameter(torch.randn(rv, rt, rk, out_dim) / (rv * rt * rk) ** 0.5)
        self.act = nn.Tanh() if activation == "tanh" else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def factors(self, v: torch.Tensor, t: torch.Tensor, k: torch.Tensor):
        """The projected factors (Wv v, Wt t, Wk k) after the activation and dropout."""
        return tuple(self.dropout(self.act(w(x))) for w, x in ((self.wv, v), (self.wt, t), (self.wk, k)))

    def forward(self, v: torch.Tensor, t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        a, b, c = self.factors(v, t, k)
        return torch.einsum("bi,bj,bk,ijko->bo", a, b, c, self.core)
