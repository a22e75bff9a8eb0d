"""Knowledge encoder: one embedding per concept mention and one pooled knowledge vector per sample.

Our choice (docs/method.md, "Encoders"): a concept's embedding is the text tower's embedding of
"canonical name: definition" (computed by the caller with the current text tower, so the knowledge
space moves with the text space) plus a learned per-concept residual (what the definition misses);
a negated mention gets a learned "absent" embedding added, so "no effusion" and "effusion" differ.
Samples with no linked concept get a learned "no knowledge" vector instead of a zero pool.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class KnowledgeOutput:
    tokens: torch.Tensor  # (B, M, D) mention embeddings (zeros at masked slots)
    mask: torch.Tensor    # (B, M) bool, True where a mention is present
    pooled: torch.Tensor  # (B, D) masked mean of the mentions, or the "no knowledge" vector


class KnowledgeEncoder(nn.Module):
    """Concept mentions -> knowledge embeddings.

    ``num_concepts``: size of the concept vocabulary (our KB ids 0..N-1); ``dim``: output width;
    ``text_dim``: width of the text-tower embeddings passed in (a linear map when it differs from
    ``dim``). The residual table starts at zero so training starts from the definitions' embeddings.
    """

    def __init__(self, num_concepts: int, dim: int, text_dim: int | None = None,
                 use_residual: bool = True, use_absent: bool = True):
        super().__init__()
        text_dim = dim if text_dim is None else text_dim
        self.proj = nn.Identity() if text_dim == dim else nn.Linear(text_dim, dim)
        self.use_residual, self.use_absent = use_residual, use_absent
        self.residual = nn.Embedding(num_concepts, dim)
        nn.init.zeros_(self.residual.weight)
        self.absent = nn.Parameter(torch.randn(dim) * 0.02)
        self.no_knowledge = nn.Parameter(torch.randn(dim) * 0.02)

    def forward(self, text_emb: torch.Tensor, concept_ids: torch.Tensor, negated: torch.Tensor,
                mask: torch.Tensor, text_rows: torch.Tensor | None = None) -> KnowledgeOutput:
        """Embed the (B, M) padded mention lists.

        ``text_emb`` (R, text_dim): text-tower embeddings of the concepts' "name: definition" strings;
        row ``text_rows[b, m]`` belongs to mention (b, m) (default: ``concept_ids``, i.e. one row per
        vocabulary concept; pass ``text_rows`` when only the batch's unique concepts were encoded).
        ``negated`` and ``mask`` are (B, M) bool; masked slots may hold any id.
        """
        mask = mask.bool()
        ids = concept_ids.masked_fill(~mask, 0)
        rows = ids if text_rows is None else text_rows.masked_fill(~mask, 0)
        emb = self.proj(text_emb)[rows]
        if self.use_residual:
            emb = emb + self.residual(ids)
        if self.use_absent:
            emb = emb + negated.bool().unsqueeze(-1).to(emb.dtype) * self.absent
        emb = emb * mask.unsqueeze(-1).to(emb.dtype)
        count = mask.sum(dim=1, keepdim=True)
        pooled = emb.sum(dim=1) / count.clamp(min=1).to(emb.dtype)
        pooled = torch.where(count > 0, pooled, self.no_knowledge.to(emb.dtype).expand_as(pooled))
        return KnowledgeOutput(tokens=emb, mask=mask, pooled=pooled)


def pad_mentions(entities_batch: list[list[dict]], concept_index: dict[str, int], key: str = "cui",
                 max_mentions: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shard entities (schema: {"cui", "name", "negated", ...}) -> padded (ids, negated, mask), (B, M).

    Mentions whose ``key`` is not in ``concept_index`` are skipped; a concept mentioned twice with the
    same polarity is kept once (the report repeats findings in FINDINGS and IMPRESSION).
    """
    rows = []
    for ents in entities_batch:
        seen, row = set(), []
        for e in ents:
            c = concept_index.get(e.get(key))
            if c is None or (c, bool(e.get("negated"))) in seen:
                continue
            seen.add((c, bool(e.get("negated"))))
            row.append((c, bool(e.get("negated"))))
        rows.append(row[:max_mentions] if max_mentions else row)
    m = max([len(r) for r in rows] + [1])
    ids = torch.zeros(len(rows), m, dtype=torch.long)
    neg = torch.zeros(len(rows), m, dtype=torch.bool)
    mask = torch.zeros(len(rows), m, dtype=torch.bool)
    for b, row in enumerate(rows):
        for j, (c, g) in enumerate(row):
            ids[b, j], neg[b, j], mask[b, j] = c, g, True
    return ids, neg, mask
