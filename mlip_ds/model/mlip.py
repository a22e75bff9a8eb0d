"""The MLIP model: the open_clip two-tower model plus the parts of the MLIP objective that are on.

``MLIPModel`` owns the towers (registered under the same names as in open_clip's ``CustomTextCLIP``:
``visual``, ``text``, ``logit_scale``, so the CLIP part of its state dict is exactly the open_clip
model's) and builds only what the enabled terms of ``ObjectiveConfig`` need:

  term        built                                                    extra forward work
  global      -                                                        -
  divergence  ``ema_visual``, ``ema_text`` (EMA copies, no gradient)   EMA towers on the second view
  local       ``tkp`` (TKPAttention); tower tokens + CLS attentions    token-knowledge-patch attention
  category    ``prototypes`` (+ ``prior``, the co-occurrence table,     prototype scores
              + ``proto_queue``, SwAV's queue, when asked)
  itm         ``fusion`` (Tucker), ``itm_head``                         3B fused pairs
  swap        ``fusion``, ``swap_head``                                 the swapped reports' text tower pass
  knowledge   ``knowledge`` (KnowledgeEncoder), when local/itm/swap     text tower on the batch's concepts

With only the global term the forward is the plain open_clip forward (same outputs, same cost).
``forward`` returns a dict of outputs. The objective (``mlip_ds/objective/``) prepares the
forward's inputs, turns the outputs into the weighed loss terms and updates the model after each
optimizer step (``ema_step``, the prototypes); this module holds only the model.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from mlip_ds.losses.itm import itm_batch
from mlip_ds.losses.local_alignment import token_mask
from mlip_ds.losses.objective import TERMS, ObjectiveConfig
from mlip_ds.model.divergence import ema_update, make_ema_copy, momentum_schedule
from mlip_ds.model.heads import ITMHead, SwapHead
from mlip_ds.model.knowledge_encoder import KnowledgeEncoder
from mlip_ds.model.prototypes import CooccurrencePrior, FeatureQueue, Prototypes
from mlip_ds.model.tkp_attention import TKPAttention
from mlip_ds.model.tucker import TuckerFusion

DEFAULT_PROTOTYPES = 128  # K when nothing sets it (recipe.py derives it from the global batch)


def needs(objective: ObjectiveConfig) -> dict[str, bool]:
    """What the enabled terms need from the data and the model."""
    o = objective
    knowledge = o.use_itm or o.use_swap or (o.use_local and o.local_knowledge)
    categories = (o.use_global and o.false_negatives != "off") or o.use_category or o.use_itm
    return {"second_view": o.use_divergence, "knowledge": knowledge, "categories": categories,
            "raw": knowledge or categories, "tokens": o.use_local, "fusion": o.use_itm or o.use_swap}


def head_sizes(objective: ObjectiveConfig, embed_dim: int, vision_width: int | None = None) -> ObjectiveConfig:
    """``objective`` with its auto (0) head sizes filled in from the towers' widths.

    For towers at least as wide as the method's heads (ViT-B/16 here: E = 128, width 768) these are
    the method's defaults: local width 128, Tucker ranks 32/32/16 and output 256. Narrower towers
    (the tiny CPU model: E = 64) get heads scaled to them (local width = the image tower's width,
    ranks E/4, E/4, E/8, output E): a 4.2 M-parameter Tucker core on a 0.3 M-parameter model would make
    the fusion, not the towers, the step's cost. Explicit (non-zero) values are kept.
    """
    o = objective
    rank = min(32, max(4, embed_dim // 4))
    auto = {"local_dim": min(128, vision_width or 128), "tucker_rank_v": rank, "tucker_rank_t": rank,
            "tucker_rank_k": max(2, rank // 2), "tucker_out": 256 if embed_dim >= 128 else max(16, embed_dim),
            # The trainer sets K from the global batch (recipe.py); a model built without it gets this.
            "num_prototypes": DEFAULT_PROTOTYPES}
    return replace(o, **{k: v for k, v in auto.items() if getattr(o, k) <= 0})


class MLIPModel(nn.Module):
    """See the module doc. ``clip`` is an open_clip ``CustomTextCLIP`` (ViT or ResNet image tower,
    Hugging Face text tower); its towers are taken over (shared, not copied). ``num_concepts`` and
    ``num_categories`` size the knowledge tables (``ConceptVocab``); ``special_ids`` are the token
    ids that are not words (pad, CLS, SEP, ...), masked in the local term.
    """

    def __init__(self, clip: nn.Module, objective: ObjectiveConfig, num_concepts: int = 0,
                 num_categories: int = 0, special_ids: tuple[int, ...] = (0,)):
        super().__init__()
        embed_dim = int(clip.visual.output_dim)
        width = getattr(getattr(clip.visual, "transformer", None), "width", None)
        self.objective = o = head_sizes(objective, embed_dim, int(width) if width else None)
        self.needs = needs(o)
        self.special_ids = tuple(int(i) for i in special_ids)
        self._capture, self._captured = False, {}  # CLS-attention hooks (local term)
        self.visual, self.text, self.logit_scale = clip.visual, clip.text, clip.logit_scale
        object.__setattr__(self, "_clip", clip)  # for export: the same towers, not a registered child
        if o.use_divergence:  # copies of the towers as they are now; they give pooled features only
            self.ema_visual = make_ema_copy(self.visual).eval()
            self.ema_text = make_ema_copy(self.text).eval()
            for ema in (self.ema_visual, self.ema_text):
                if hasattr(ema, "output_tokens"):
                    ema.output_tokens = False
        if o.use_divergence and o.divergence_image and o.image_head > 0:
            self._setup_image_head(embed_dim, o.image_head)
        if self.needs["knowledge"]:
            if num_concepts <= 0:
                raise ValueError("the enabled terms need knowledge: pass num_concepts (the concept vocabulary size)")
            self.knowledge = KnowledgeEncoder(num_concepts, embed_dim, embed_dim)
        if o.use_local:
            self._setup_tokens()
            self.tkp = TKPAttention(o.local_dim, heads=o.local_heads, token_dim=self._text_width,
                                    knowledge_dim=embed_dim, patch_dim=self._vision_width,
                                    use_knowledge=o.local_knowledge)
        if o.use_category:
            self.prototypes = Prototypes(embed_dim, o.num_prototypes)
            if o.proto_queue > 0:
                self.proto_queue = FeatureQueue(o.proto_queue, embed_dim)
            if o.prior_mix > 0:
                if num_categories <= 0:
                    raise ValueError("--prior-mix > 0 needs the knowledge categories: pass num_categories")
                self.prior = CooccurrencePrior(num_categories, o.num_prototypes)
        if self.needs["fusion"]:
            self.fusion = TuckerFusion(embed_dim, embed_dim, embed_dim,
                                       ranks=(o.tucker_rank_v, o.tucker_rank_t, o.tucker_rank_k),
                                       out_dim=o.tucker_out)
        if o.use_itm:
            self.itm_head = ITMHead(o.tucker_out)
        if o.use_swap:
            self.swap_head = SwapHead(o.tucker_out)

    # ------------------------------------------------------------------ towers
    def _setup_image_head(self, embed_dim: int, hidden: int) -> None:
        """SLIP's separate image-image head on the pooled features before the tower's projection.

        The false-negative rule pulls same-finding images together in the shared image-report
        embedding; an image-image term in that same space fights it there and loses what no report
        names. Its own head lets the projection drop what the reports cannot tell apart while the
        trunk keeps it. open_clip's ViT applies its projection inside ``forward`` with no module
        boundary, so the pre-projection features are taken from the transformer's output (a
        forward hook) and pooled with the tower's own ``_pool``.
        """
        towers = {"online": self.visual, "ema": self.ema_visual}
        if not all(hasattr(t, "_pool") and hasattr(t, "transformer") for t in towers.values()):
            raise ValueError("--image-head needs an open_clip ViT image tower (pre-projection pooled features); "
                             f"got {type(self.visual).__name__}")
        width = int(self.visual.transformer.width)
        self.image_head = nn.Sequential(nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                        nn.Linear(hidden, embed_dim))
        self.ema_image_head = make_ema_copy(self.image_head)
        self._trunk_out: dict[str, torch.Tensor] = {}
        for name, tower in towers.items():
            def keep(module, args, output, name=name):
                self._trunk_out[name] = output
            tower.transformer.register_forward_hook(keep)

    def _image_head_features(self, name: str) -> torch.Tensor:
        """The image-image embedding of the last forward of tower ``name`` (online or ema), L2-normalised."""
        tower, head = (self.visual, self.image_head) if name == "online" else (self.ema_visual, self.ema_image_head)
        pooled = tower._pool(self._trunk_out.pop(name))[0]
        return F.normalize(head(pooled.to(next(head.parameters()).dtype)), dim=-1)

    def _setup_tokens(self) -> None:
        """Tokens from both towers, and hooks that record the last layer's CLS attention (the
        importance weights of the local term) when ``self._capture`` is set."""
        visual, text = self.visual, self.text
        if not hasattr(visual, "transformer") or not hasattr(visual, "output_tokens"):
            raise ValueError("the local term needs a ViT image tower (patch tokens); this model's image tower is "
                             f"{type(visual).__name__}: use a ViT model or --no-use-local")
        if not hasattr(text, "transformer") or not hasattr(text, "output_tokens"):
            raise ValueError("the local term needs the Hugging Face text tower (word tokens); use --no-use-local")
        visual.output_tokens = True
        text.output_tokens = True
        self._vision_width = int(visual.transformer.width)
        self._text_width = int(text.transformer.config.hidden_size)
        # Image: the last block's attention input is recorded and its CLS row recomputed from the
        # in-projection (``_image_cls_attention``); asking nn.MultiheadAttention for its weights
        # instead would move the whole block off the fused attention kernel.
        blocks = getattr(visual.transformer, "resblocks", None)
        attn = getattr(blocks[-1], "attn", None) if blocks is not None else None
        if hasattr(attn, "get_base_layer"):  # a LoRA (peft) wrapper (model/adapters.py): importance from the base W
            attn = attn.get_base_layer()
        if isinstance(attn, nn.MultiheadAttention):
            object.__setattr__(self, "_image_attn", attn)  # not a second registered child

            def keep_input(module, args, kwargs):
                if self._capture:
                    query = args[0] if args else kwargs["query"]
                    self._captured["image_x"] = query.detach()

            attn.register_forward_pre_hook(keep_input, with_kwargs=True)
        # Text: BERT-style self-attention of the last layer; its query/key projections are recorded
        # (sdpa attention does not return weights) and the CLS row is recomputed from them.
        try:
            last = text.transformer.encoder.layer[-1].attention.self
            query, key = last.query, last.key
            heads = int(text.transformer.config.num_attention_heads)
        except AttributeError:
            return  # another architecture: uniform token weights
        self._text_heads = heads

        def keep(name):
            def hook(module, args, output):
                if self._capture:
                    self._captured[name] = output.detach()
            return hook

        query.register_forward_hook(keep("q"))
        key.register_forward_hook(keep("k"))

    def _image_cls_attention(self, captured: dict) -> torch.Tensor | None:
        """(B, P) last-block attention of the CLS token over the patches, head-averaged: what
        ``nn.MultiheadAttention(need_weights=True)`` returns for row 0, from the block's input."""
        x = captured.get("image_x")
        if x is None:
            return None
        attn = self._image_attn
        if not attn.batch_first:
            x = x.transpose(0, 1)
        b, n, d = x.shape
        h = attn.num_heads
        w = attn.in_proj_weight.detach().float()
        bias = None if attn.in_proj_bias is None else attn.in_proj_bias.detach().float()
        q = F.linear(x[:, :1].float(), w[:d], None if bias is None else bias[:d])
        k = F.linear(x.float(), w[d:2 * d], None if bias is None else bias[d:2 * d])
        q = q.reshape(b, 1, h, d // h).transpose(1, 2)
        k = k.reshape(b, n, h, d // h).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(d // h)  # (B, H, N)
        return scores.softmax(dim=-1).mean(dim=1)[:, 1:]

    def _text_cls_attention(self, captured: dict, input_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, L-1) last-layer attention of the CLS token over the other positions, head-averaged."""
        q, k = captured.get("q"), captured.get("k")
        if q is None or k is None:
            return None
        b, n, d = k.shape
        h = self._text_heads
        q = q[:, :1].reshape(b, 1, h, d // h).transpose(1, 2).float()
        k = k.reshape(b, n, h, d // h).transpose(1, 2).float()
        scores = (q @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(d // h)  # (B, H, L)
        pad = (input_ids == self.text.config.pad_token_id).unsqueeze(1)
        return scores.masked_fill(pad, float("-inf")).softmax(dim=-1).mean(dim=1)[:, 1:]

    def _encode(self, tower: nn.Module, x: torch.Tensor, capture: bool = False):
        """(pooled features, tokens or None) of one tower; ``capture`` records the CLS attention."""
        self._capture = capture
        try:
            out = tower(x)
        finally:
            self._capture = False
        return out if isinstance(out, tuple) else (out, None)

    def clip_model(self) -> nn.Module:
        """The open_clip two-tower model sharing this model's towers: what export writes (its state
        dict). With the local term on its towers also return tokens; call this model's forward."""
        return self._clip

    def train(self, mode: bool = True):
        super().train(mode)
        for name in ("ema_visual", "ema_text"):  # EMA towers: no dropout (stable targets)
            if hasattr(self, name):
                getattr(self, name).eval()
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, image: torch.Tensor, text: torch.Tensor, image2: torch.Tensor | None = None,
                text2: torch.Tensor | None = None, concept_tokens: torch.Tensor | None = None,
                concept_adj: torch.Tensor | None = None,
                mention_ids: torch.Tensor | None = None, mention_neg: torch.Tensor | None = None,
                mention_mask: torch.Tensor | None = None, mention_rows: torch.Tensor | None = None,
                cats: torch.Tensor | None = None, itm_seed: int = 0,
                swap_tokens: torch.Tensor | None = None, swap_rows: torch.Tensor | None = None,
                swap_labels: torch.Tensor | None = None, swap_mention_ids: torch.Tensor | None = None,
                swap_mention_neg: torch.Tensor | None = None, swap_mention_mask: torch.Tensor | None = None,
                swap_mention_rows: torch.Tensor | None = None, return_attention: bool | None = None,
                active: frozenset[str] | None = None) -> dict:
        """Outputs (a dict) for the enabled terms; the inputs are ``objective.batch.BatchPreparer``'s keys.

        ``active``: the terms to compute outputs for (``losses.objective.active_terms``: the ones whose
        weight at this step is not 0); None: every enabled term. A delayed term costs nothing.

        Always: ``image_features``, ``text_features`` (L2-normalised, (B, E)), ``logit_scale``.
        divergence: ``image_features_ema``, ``text_features_ema`` (no gradient).
        local: ``patch_tokens`` (B, P, Wv), ``text_tokens`` (B, L-1, Wt), ``token_mask``,
        ``token_weights``/``patch_weights`` (CLS attentions or None), ``tkp`` (TKPOutput) and
        ``token_patch_attn`` (B, L-1, P): the grounding maps (row t: where token t looks in the image),
        computed when ``return_attention`` (default: in eval mode; the loss does not need them, and
        the training step is faster without them), else None.
        knowledge: ``knowledge`` (KnowledgeOutput). category: ``proto_image``/``proto_text`` (B, K).
        itm: ``itm_logits`` (3B, 2), ``itm_labels``. swap: ``swap_logits`` (B, 2), ``swap_labels``.
        """
        o = self.objective
        on = {t: o.enabled(t) and (active is None or t in active) for t in TERMS}
        want_tokens = on["local"]
        self._captured = {}
        pooled_i, patch_tokens = self._encode(self.visual, image, capture=want_tokens)
        # The swapped reports ride in the reports' text forward (same length): one pass of the tower
        # instead of two, a quarter fewer kernel launches per MLIP step and larger matmuls.
        b = text.shape[0]
        merge_swap = on["swap"] and swap_tokens is not None and swap_tokens.shape[1] == text.shape[1]
        pooled_t, text_tokens = self._encode(self.text, torch.cat([text, swap_tokens]) if merge_swap else text,
                                             capture=want_tokens)
        captured, self._captured = self._captured, {}
        pooled_swapped = None
        if merge_swap:
            pooled_t, pooled_swapped = pooled_t[:b], pooled_t[b:]
            text_tokens = text_tokens[:b] if text_tokens is not None else None
            captured = {k: v[:b] if k in ("q", "k") else v for k, v in captured.items()}
        out = {"image_features": F.normalize(pooled_i, dim=-1), "text_features": F.normalize(pooled_t, dim=-1),
               "logit_scale": self.logit_scale.exp()}
        img, txt = out["image_features"], out["text_features"]
        if on["divergence"]:
            # fp32 EMA weights with bf16 inputs (the trainer keeps the EMA in fp32): autocast.
            cast = next(self.ema_visual.parameters()).dtype != image2.dtype
            autocast = torch.autocast(image2.device.type, dtype=image2.dtype) if cast else contextlib.nullcontext()
            with torch.no_grad(), autocast:
                out["image_features_ema"] = F.normalize(self.ema_visual(image2), dim=-1).to(img.dtype)
                out["text_features_ema"] = F.normalize(self.ema_text(text2), dim=-1).to(txt.dtype)
                if hasattr(self, "image_head"):
                    out["image_ssl_ema"] = self._image_head_features("ema").to(img.dtype)
            if hasattr(self, "image_head"):
                out["image_ssl"] = self._image_head_features("online")
        know = concept_emb = None
        if self.needs["knowledge"] and (on["itm"] or on["swap"] or (on["local"] and o.local_knowledge)):
            concept_emb = F.normalize(self._encode(self.text, concept_tokens)[0], dim=-1)
            if concept_adj is not None:  # relation-aware: mean of the concept and of its KB neighbours' mean
                concept_emb = relation_aware(concept_emb, concept_adj)
            know = self.knowledge(concept_emb, mention_ids, mention_neg, mention_mask, text_rows=mention_rows)
            out["knowledge"] = know
        if on["local"]:
            tmask = token_mask(text[:, 1:], self.special_ids)
            token_w = self._text_cls_attention(captured, text)
            want_attn = (not self.training) if return_attention is None else return_attention
            tkp = self.tkp(text_tokens, tmask, patch_tokens, know.tokens if know is not None else None,
                           know.mask if know is not None else None, need_weights=want_attn)
            out.update(patch_tokens=patch_tokens, text_tokens=text_tokens, token_mask=tmask,
                       token_weights=token_w, patch_weights=self._image_cls_attention(captured), tkp=tkp,
                       token_patch_attn=tkp.attn)
        if on["category"]:
            out["proto_image"], out["proto_text"] = self.prototypes(img), self.prototypes(txt)
            if hasattr(self, "proto_queue"):
                q_img, q_txt = self.proto_queue.rows()
                with torch.no_grad():
                    out["proto_image_queue"], out["proto_text_queue"] = self.prototypes(q_img), self.prototypes(q_txt)
                if self.training:
                    self.proto_queue.push(img, txt)
        if on["itm"]:
            logits = (out["logit_scale"] * img @ txt.T).detach()  # ALBEF: softmax of the scaled similarities
            gen = torch.Generator(device=img.device).manual_seed(int(itm_seed))
            v3, t3, k3, labels = itm_batch(img, txt, know.pooled, logits, cats, generator=gen,
                                           match=o.false_negative_match)
            out["itm_logits"], out["itm_labels"] = self.itm_head(self.fusion(v3, t3, k3)), labels
        if on["swap"]:
            # Every rank encodes at least one row, so all ranks run the same modules (ZeRO-3 gathers).
            if pooled_swapped is None:
                pooled_swapped = self._encode(self.text, swap_tokens)[0]
            swapped = F.normalize(pooled_swapped, dim=-1)
            t_sw = txt.index_put((swap_rows,), swapped[:swap_rows.shape[0]]) if swap_rows.numel() else txt
            k_sw = self.knowledge(concept_emb, swap_mention_ids, swap_mention_neg, swap_mention_mask,
                                  text_rows=swap_mention_rows).pooled
            out["swap_logits"], out["swap_labels"] = self.swap_head(self.fusion(img, t_sw, k_sw)), swap_labels
        if hasattr(self, "_trunk_out"):
            self._trunk_out.clear()  # a delayed divergence term leaves the online tower's output here
        return out

    def _ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(EMA copy, online module) of each divergence encoder this model has."""
        names = (("ema_visual", "visual"), ("ema_text", "text"), ("ema_image_head", "image_head"))
        return [(getattr(self, e), getattr(self, o)) for e, o in names if hasattr(self, e)]

    def ema_to_fp32(self) -> None:
        """Under bf16 weights, keep the divergence encoders in fp32: with m = 0.999 a bf16 copy could
        not move (its step is below bf16's resolution); their forward runs under autocast."""
        for ema, _ in self._ema_pairs():
            ema.float()

    # ------------------------------------------------------------------ after each optimizer step
    @torch.no_grad()
    def ema_step(self, step: int, total_steps: int) -> float:
        """Move the divergence encoders towards the online towers; returns the momentum used."""
        if not self.objective.use_divergence:
            return float("nan")
        m = momentum_schedule(step, total_steps, self.objective.ema_m0, self.objective.ema_m1)
        for ema, online in self._ema_pairs():
            ema_update(ema, online, m)
        return m


def relation_aware(concept_emb: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
    """Relation-aware concept embeddings (docs/method.md): e'_c = normalize((e_c + mean_{n in N(c)} e_n) / 2)
    for a concept with KB neighbours, e_c otherwise. ``adj`` (R, R) row-normalised adjacency."""
    has = adj.sum(dim=1, keepdim=True) > 0
    mixed = F.normalize(0.5 * (concept_emb + adj.to(concept_emb.dtype) @ concept_emb), dim=-1)
    return torch.where(has, mixed, concept_emb)


def mlip_state(model: MLIPModel) -> dict[str, torch.Tensor]:
    """The MLIP-only tensors (everything but the two towers and the temperature), for export."""
    clip_keys = set(model.clip_model().state_dict())
    return {k: v for k, v in model.state_dict().items() if k not in clip_keys}
