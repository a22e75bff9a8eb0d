"""Local token-level alignment (MLIP sec. 2, MGCA's token-level InfoNCE).

Within each sample, token i is contrasted with its own visual context against the contexts of the
sample's other tokens (and each context against the tokens, MGCA's second direction), temperature
0.1, each token weighted by its importance (the text tower's CLS attention, clipped to its 10-90%
quantiles as MGCA does). The symmetric patch -> token term does the same for patches and their
textual contexts, weighted by the image CLS attention. Padding and special tokens are masked both as
queries and as candidates: they contribute nothing to the value or the gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_mask(input_ids: torch.Tensor, special_ids: list[int] | tuple[int, ...]) -> torch.Tensor:
    """True where ``input_ids`` is a real word piece (not pad/CLS/SEP/...)."""
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    for i in special_ids:  # one comparison each (a handful): no id tensor copied from the host, a sync on CUDA
        mask &= input_ids != i
    return mask


def importance_weights(weights: torch.Tensor | None, mask: torch.Tensor,
                       clip_quantiles: tuple[float, float] | None = (0.1, 0.9)) -> torch.Tensor:
    """Per-sample importance weights over valid positions, summing to 1 (0 at masked positions).

    ``weights`` (B, N) (e.g. CLS attention) or None for uniform; detached (they select, not learn).
    """
    mask = mask.bool()
    w = torch.ones(mask.shape, device=mask.device) if weights is None else weights.detach().float()
    if clip_quantiles is not None and weights is not None:
        masked = w.masked_fill(~mask, float("nan"))
        lo = torch.nanquantile(masked, clip_quantiles[0], dim=1, keepdim=True)
        hi = torch.nanquantile(masked, clip_quantiles[1], dim=1, keepdim=True)
        w = torch.where(torch.isnan(lo), w, torch.maximum(torch.minimum(w, hi), lo))
    w = w * mask
    return w / w.sum(dim=1, keepdim=True).clamp(min=1e-12)


def _weighted_local_nce(queries: torch.Tensor, contexts: torch.Tensor, mask: torch.Tensor,
                        weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over samples of the weighted, two-directional token-level InfoNCE (masked positions inert)."""
    q, c = F.normalize(queries.float(), dim=-1), F.normalize(contexts.float(), dim=-1)
    logits = torch.bmm(q, c.transpose(1, 2)) / temperature  # (B, N, N): query i vs context j
    valid_pair = mask.unsqueeze(2) & mask.unsqueeze(1)
    logits = logits.masked_fill(~valid_pair, float("-inf"))
    # Rows of masked queries (resp. contexts) would be all -inf: make them finite; their weight is 0.
    rows = logits.masked_fill(~mask.unsqueeze(2), 0.0)
    cols = logits.transpose(1, 2).masked_fill(~mask.unsqueeze(2), 0.0)
    b, n, _ = logits.shape
    target = torch.arange(n, device=logits.device).repeat(b)
    ce_q = F.cross_entropy(rows.reshape(b * n, n), target, reduction="none")
    ce_c = F.cross_entropy(cols.reshape(b * n, n), target, reduction="none")
    w = weights.reshape(-1)
    return 0.5 * ((ce_q * w).sum() + (ce_c * w).sum())


def local_alignment_loss(tokens: torch.Tensor, contexts: torch.Tensor, token_mask: torch.Tensor,
                         token_weights: torch.Tensor | None = None,
                         patches: torch.Tensor | None = None, patch_contexts: torch.Tensor | None = None,
                         patch_weights: torch.Tensor | None = None, patch_mask: torch.Tensor | None = None,
                         temperature: float = 0.1,
                         clip_quantiles: tuple[float, float] | None = (0.1, 0.9)) -> torch.Tensor:
    """Token term (+ patch term when ``patches``/``patch_contexts`` are given), summed as in MGCA.

    ``tokens``/``contexts`` (B, T, D) from ``TKPAttention`` (enriched tokens and their visual contexts),
    ``token_mask`` (B, T) True for real tokens; ``patches``/``patch_contexts`` (B, P, D). Each term is
    the mean over samples that have at least one real token.
    """
    token_mask = token_mask.bool()
    has_tokens = token_mask.any(dim=1)
    n = has_tokens.sum().clamp(min=1)
    w = importance_weights(token_weights, token_mask, clip_quantiles)
    loss = _weighted_local_nce(tokens, contexts, token_mask, w, temperature) / n
    if patches is not None and patch_contexts is not None:
        pmask = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device) if patch_mask is None \
            else patch_mask.bool()
        pmask = pmask & has_tokens.unsqueeze(1)  # a patch's context needs at least one real token
        pw = importance_weights(patch_weights, pmask, clip_quantiles)
        loss = loss + _weighted_local_nce(patches, patch_contexts, pmask, pw, temperature) / n
    return loss
