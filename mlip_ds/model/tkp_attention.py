"""Token-knowledge-patch (TKP) attention (MLIP sec. 2).

Step 1: each report token attends (multi-head cross-attention, tokens as queries) to its own sample's
knowledge embeddings, giving knowledge-enriched tokens. Step 2: each enriched token attends over the
image's patch tokens; the attention output is the token's visual context and the head-averaged
attention map is the grounding map a user plots. For the symmetric patch -> token term of the local
loss, each patch also attends over the valid enriched tokens (its textual context).

Queries never attend to each other, and padded tokens are masked as keys, so a padded token changes
no other position's output; outputs at masked token positions are zeroed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TKPOutput:
    tokens: torch.Tensor          # (B, T, D) knowledge-enriched tokens
    contexts: torch.Tensor        # (B, T, D) visual context of each token
    attn: torch.Tensor | None     # (B, T, P) token -> patch attention, averaged over heads (None: not asked)
    patches: torch.Tensor         # (B, P, D) patch tokens in the shared width
    patch_contexts: torch.Tensor  # (B, P, D) textual context of each patch
    patch_attn: torch.Tensor | None  # (B, P, T) patch -> token attention, averaged over heads


def _proj(d_in: int | None, d: int) -> nn.Module:
    return nn.Identity() if d_in is None or d_in == d else nn.Linear(d_in, d)


class TKPAttention(nn.Module):
    """Cross-attention tokens->knowledge, then tokens->patches (and patches->tokens).

    ``dim`` is the shared width (the local embedding space); ``token_dim``/``knowledge_dim``/
    ``patch_dim`` are the input widths (linear maps when they differ). A learned "null" knowledge
    slot is always present, so a token can take nothing from knowledge and samples without concepts
    need no special case (no all-masked softmax). ``use_knowledge=False`` skips step 1 (ablation).
    """

    def __init__(self, dim: int, heads: int = 4, token_dim: int | None = None, knowledge_dim: int | None = None,
                 patch_dim: int | None = None, dropout: float = 0.0, use_knowledge: bool = True):
        super().__init__()
        self.use_knowledge = use_knowledge
        self.token_proj = _proj(token_dim, dim)
        self.knowledge_proj = _proj(knowledge_dim, dim)
        self.patch_proj = _proj(patch_dim, dim)
        self.null_knowledge = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.tok2know = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.tok2patch = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.patch2tok = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor, patches: torch.Tensor,
                knowledge: torch.Tensor | None = None, knowledge_mask: torch.Tensor | None = None,
                need_weights: bool = True) -> TKPOutput:
        """``tokens`` (B, T, token_dim), ``token_mask`` (B, T) bool True for real (non-pad, non-special)
        tokens; ``patches`` (B, P, patch_dim); ``knowledge`` (B, M, knowledge_dim) with ``knowledge_mask``
        (B, M) bool True for present mentions. ``need_weights=False`` leaves ``attn``/``patch_attn``
        out (None): the loss does not use them, and without them the cross-attentions run on the fused
        attention kernel (the training step)."""
        token_mask = token_mask.bool()
        keep = token_mask.unsqueeze(-1).to(tokens.dtype)
        x = self.token_proj(tokens) * keep  # padded values never reach any computation below
        p = self.patch_proj(patches)
        b = x.shape[0]
        if self.use_knowledge and knowledge is not None:
            k = self.knowledge_proj(knowledge)
            k = torch.cat([self.null_knowledge.expand(b, 1, -1).to(k.dtype), k], dim=1)
            kmask = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
            if knowledge_mask is not None:
                kmask[:, 1:] = knowledge_mask.bool()
            enriched, _ = self.tok2know(x, k, k, key_padding_mask=~kmask, need_weights=False)
            x = self.norm(x + enriched) * keep
        contexts, attn = self.tok2patch(x, p, p, need_weights=need_weights, average_attn_weights=True)
        # Patch -> token: padded tokens are masked keys. A sample with no valid token gets one
        # unmasked slot (holding zeros) so the softmax stays finite; the local loss ignores it.
        key_mask = token_mask.clone()
        empty = ~key_mask.any(dim=1)
        key_mask[empty, 0] = True
        patch_contexts, patch_attn = self.patch2tok(p, x, x, key_padding_mask=~key_mask,
                                                    need_weights=need_weights, average_attn_weights=True)
        return TKPOutput(tokens=x, contexts=contexts * keep, attn=None if attn is None else attn * keep, patches=p,
                         patch_contexts=patch_contexts,
                         patch_attn=None if patch_attn is None else patch_attn * token_mask.unsqueeze(1))
