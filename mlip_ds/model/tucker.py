"""Tucker fusion of image, text and knowledge vectors (MLIP sec. 4, MUTAN-style).

z = core ×1 (Wv v) ×2 (Wt t) ×3 (Wk k): each modality is projected to a small rank, and a learned
core tensor (rv, rt, rk, out) models all three-way interactions at a cost far below a full trilinear
map. The fused vector feeds the ITM and text-swap heads.

Scale at initialisation (why the init is not PyTorch's default): z is a product of three factors, so
its variance is the product of theirs. With unit-norm inputs (the L2-normalised embeddings) and
default ``nn.Linear`` init each factor has a variance of about 1/(3d), and z's was about 1e-7: below
the heads' LayerNorm eps, so the heads saw noise and every gradient was a product of two tiny
factors (ITM and swap stayed at chance). Here each input is standardised (LayerNorm without
affine), the projections keep unit variance and the core is scaled by the activation's second
moment, so z starts with unit variance whatever the widths and ranks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# E[tanh(x)^2] for x ~ N(0, 1): the second moment of a factor after the activation.
_TANH_SECOND_MOMENT = 0.3943


class TuckerFusion(nn.Module):
    """``forward(v, t, k) -> (B, out_dim)``; ranks default 32/32/16 and output 256 (our defaults).

    ``activation`` (tanh, as in MUTAN) is applied to the projected factors; ``None`` keeps them linear.
    ``input_norm`` standardises each input vector first (see the module doc).
    """

    def __init__(self, v_dim: int, t_dim: int, k_dim: int, ranks: tuple[int, int, int] = (32, 32, 16),
                 out_dim: int = 256, dropout: float = 0.0, activation: str | None = "tanh",
                 input_norm: bool = True):
        super().__init__()
        rv, rt, rk = ranks
        self.input_norm = input_norm
        self.wv, self.wt, self.wk = nn.Linear(v_dim, rv), nn.Linear(t_dim, rt), nn.Linear(k_dim, rk)
        for w in (self.wv, self.wt, self.wk):  # unit-variance factors from standardised inputs
            nn.init.normal_(w.weight, std=1.0 / math.sqrt(w.in_features))
            nn.init.zeros_(w.bias)
        g = _TANH_SECOND_MOMENT if activation == "tanh" else 1.0
        self.core = nn.Parameter(torch.randn(rv, rt, rk, out_dim) / math.sqrt(rv * rt * rk * g ** 3))
        self.act = nn.Tanh() if activation == "tanh" else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:]) if self.input_norm else x

    def factors(self, v: torch.Tensor, t: torch.Tensor, k: torch.Tensor):
        """The projected factors (Wv v, Wt t, Wk k) after the activation and dropout."""
        return tuple(self.dropout(self.act(w(self._prepare(x))))
                     for w, x in ((self.wv, v), (self.wt, t), (self.wk, k)))

    def forward(self, v: torch.Tensor, t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        a, b, c = self.factors(v, t, k)
        return torch.einsum("bi,bj,bk,ijko->bo", a, b, c, self.core)
