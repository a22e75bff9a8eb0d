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
``forward`` returns a dict of outputs; ``compute_terms`` turns it into the loss terms
(``losses/*``), which ``losses.objective.total_loss`` weighs. ``BatchPreparer`` turns a loader
batch into the forward's keyword tensors (knowledge linking, categories, text swapping): it runs
in the training process, seeded per micro-batch so a resumed run replays it.
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from mlip_ds.losses.category import category_loss, masked_info_nce
from mlip_ds.losses.divergence import divergence_loss
from mlip_ds.losses.global_contrast import global_contrastive_loss
from mlip_ds.losses.itm import itm_batch, itm_loss
from mlip_ds.losses.local_alignment import local_alignment_loss, token_mask
from mlip_ds.losses.objective import TERMS, ObjectiveConfig
from mlip_ds.losses.swap import swap_loss, swap_texts
from mlip_ds.model.concepts import ConceptVocab, unique_rows
from mlip_ds.model.divergence import ema_update, make_ema_copy, momentum_schedule
from mlip_ds.model.heads import ITMHead, SwapHead
from mlip_ds.model.knowledge_encoder import KnowledgeEncoder
from mlip_ds.model.prototypes import CooccurrencePrior, FeatureQueue, Prototypes
from mlip_ds.model.tkp_attention import TKPAttention
from mlip_ds.model.tucker import TuckerFusion

MAX_LOGIT_SCALE = 100.0  # temperature floor 0.01, as in CLIP
DEFAULT_PROTOTYPES = 128  # K when nothing sets it (recipe.py derives it from the global batch)


def needs(objective: ObjectiveConfig) -> dict[str, bool]:
    """What the enabled terms need from the data and the model."""
    o = objective
    knowledge = o.use_itm or o.use_swap or (o.use_local and o.local_knowledge)
    categories = (o.use_global and o.false_negatives != "off") or o.use_category or o.use_itm
    return {"second_view": o.use_divergence, "knowledge": knowledge, "categories": categories,
            "raw": knowledge or categories, "tokens": o.use_local, "fusion": o.use_itm or o.use_swap}


def mlip_parts_on(objective: ObjectiveConfig) -> bool:
    """True when anything beyond the plain CLIP baseline is on."""
    return any(objective.enabled(t) for t in TERMS if t != "global") or (
        objective.use_global and objective.false_negatives != "off")


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
        """Outputs (a dict) for the enabled terms; the inputs are ``BatchPreparer``'s keys.

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
        return out

    # ------------------------------------------------------------------ after each optimizer step
    @torch.no_grad()
    def ema_step(self, step: int, total_steps: int) -> float:
        """Move the divergence encoders towards the online towers; returns the momentum used."""
        if not self.objective.use_divergence:
            return float("nan")
        m = momentum_schedule(step, total_steps, self.objective.ema_m0, self.objective.ema_m1)
        ema_update(self.ema_visual, self.visual, m)
        ema_update(self.ema_text, self.text, m)
        return m


def compute_terms(out: dict, inputs: dict, objective: ObjectiveConfig, prior: CooccurrencePrior | None = None,
                  update_prior: bool = True, active: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
    """The unweighted loss terms of the enabled parts (``losses/*``), gathered across ranks where the
    term needs it; with ``active``, only those terms (the forward's ``active``). Collective: every rank
    calls it once per micro-step with the same ``active``."""
    o = objective
    on = {t: o.enabled(t) and (active is None or t in active) for t in TERMS}
    scale = out["logit_scale"].float().clamp(max=MAX_LOGIT_SCALE)
    img, txt = out["image_features"].float(), out["text_features"].float()
    cats = inputs.get("cats")
    terms = {}
    if on["global"]:
        if o.false_negatives == "off":
            terms["global"] = global_contrastive_loss(img, txt, scale)
        else:
            terms["global"] = masked_info_nce(img, txt, scale, cats, mode=o.false_negatives,
                                              soft_weight=o.soft_weight, match=o.false_negative_match,
                                              neg_weight=o.false_negative_weight)
    if on["divergence"]:
        terms["divergence"] = divergence_loss(
            img, txt, out["image_features_ema"].float(), out["text_features_ema"].float(), scale, cats=cats,
            mode=o.false_negatives if o.false_negatives_divergence else "off", soft_weight=o.soft_weight,
            match=o.false_negative_match, neg_weight=o.false_negative_weight,
            image_image_scale=1.0 / o.image_temperature if o.divergence_image else None,
            image_image_weight=o.image_weight)
    if on["local"]:
        tkp = out["tkp"]
        terms["local"] = local_alignment_loss(tkp.tokens, tkp.contexts, out["token_mask"], out["token_weights"],
                                              tkp.patches, tkp.patch_contexts, out["patch_weights"],
                                              temperature=o.local_temperature)
    if on["category"]:
        terms["category"] = category_loss(out["proto_image"].float(), out["proto_text"].float(),
                                          temperature=o.proto_temperature, eps=o.sinkhorn_eps,
                                          iters=o.sinkhorn_iters, cats=cats, prior=prior,
                                          prior_mix=o.prior_mix, update_prior=update_prior,
                                          image_queue_scores=out.get("proto_image_queue"),
                                          text_queue_scores=out.get("proto_text_queue"))
    if on["itm"]:
        terms["itm"] = itm_loss(out["itm_logits"], out["itm_labels"])
    if on["swap"]:
        terms["swap"] = swap_loss(out["swap_logits"], out["swap_labels"])
    return terms


MODEL_INPUTS = ("image", "text", "image2", "text2", "concept_tokens", "concept_adj", "mention_ids", "mention_neg",
                "mention_mask", "mention_rows", "cats", "itm_seed", "swap_tokens", "swap_rows", "swap_labels",
                "swap_mention_ids", "swap_mention_neg", "swap_mention_mask", "swap_mention_rows")


class BatchPreparer:
    """Loader batch -> the forward's keyword tensors. Two halves:

    ``__call__(batch, seed)``, the CPU half, runs in the data-loader worker right after batching
    (``LoaderSpec.batch_fn``), so the training process only moves tensors: the batch's mentions
    (``ConceptVocab.mentions``), the distinct concepts among them and among the swapped reports'
    (their "name: definition" token ids, trimmed to the longest), the knowledge categories, and
    text swapping (``losses/swap.py``) on the part of each report that fits the context length (so
    a swap always changes what the model reads; the swap head's knowledge comes from the mentions
    in that part, swapped or not). Its random draws (swap, ITM hard negatives) come from ``seed``,
    which the pipeline derives from the batch's stream position: a resumed run replays them.
    ``to_device(batch, device, dtype)``: the model's inputs, on the device.
    """

    def __init__(self, objective: ObjectiveConfig, tokenizer, vocab: ConceptVocab | None = None,
                 concept_context_length: int = 32, max_mentions: int = 0):
        self.objective, self.tokenizer, self.vocab = objective, tokenizer, vocab
        self.needs = needs(objective)
        self.max_mentions = max_mentions
        self.pad_id = int(tokenizer.tokenizer.pad_token_id or 0)
        self.concept_tokens = None
        if (self.needs["knowledge"] or self.needs["categories"]) and vocab is None:
            raise ValueError("the enabled terms need a concept vocabulary (ConceptVocab)")
        if self.needs["knowledge"]:
            self.concept_tokens = vocab.tokens(tokenizer, concept_context_length)

    @property
    def active(self) -> bool:
        """False when the batch needs nothing beyond image and text (the CLIP baseline)."""
        return self.needs["raw"]

    def __call__(self, batch: dict, seed: int = 0) -> dict:
        n = self.needs
        if not n["raw"]:
            return batch
        entities = batch["entities"]
        if n["categories"]:
            batch["cats"] = self.vocab.categories_of(entities)
        if not n["knowledge"]:
            return batch
        ids, neg, mask = self.vocab.mentions(entities, self.max_mentions)
        tables = [(ids, mask)]
        if self.objective.use_swap:
            swap = self._swap(batch, seed)
            s_ids, s_neg, s_mask = self.vocab.mentions(swap["entities"], self.max_mentions)
            tables.append((s_ids, s_mask))
        concepts, *rows = unique_rows(*tables)
        if self.objective.knowledge_relations:  # their KB neighbours are encoded too (appended rows)
            concepts, batch["concept_adj"] = self.vocab.neighbour_table(concepts)
        tok = self.concept_tokens[concepts]
        tok = tok[:, :max(2, int((tok != self.pad_id).sum(dim=1).max()))]
        batch.update(concept_tokens=tok, mention_ids=ids, mention_neg=neg, mention_mask=mask,
                     mention_rows=rows[0], itm_seed=(seed * 31 + 1) & 0x7FFFFFFF)
        if self.objective.use_swap:
            batch.update(swap_tokens=swap["tokens"], swap_rows=swap["rows"], swap_labels=swap["labels"],
                         swap_mention_ids=s_ids, swap_mention_neg=s_neg, swap_mention_mask=s_mask,
                         swap_mention_rows=rows[1])
        return batch

    def to_device(self, batch: dict, device, dtype=torch.float32) -> dict:
        """The forward's keyword inputs: images in ``dtype``, everything else as it is, on ``device``."""
        inputs = {}
        for key in MODEL_INPUTS:
            if key not in batch or (key in ("image2", "text2") and not self.needs["second_view"]):
                continue
            value = batch[key]
            if isinstance(value, torch.Tensor):
                # Copied as loaded (pinned, asynchronous), then cast on the device: a cast inside the
                # copy would convert on the host into unpinned memory, every step.
                value = value.to(device, non_blocking=True)
                if key in ("image", "image2"):
                    value = value.to(dtype)
            inputs[key] = value
        return inputs

    def prepare(self, batch: dict, device, dtype=torch.float32, seed: int = 0) -> dict:
        """Both halves at once (tests, benchmarks)."""
        return self.to_device(self(dict(batch), seed), device, dtype)

    def _visible(self, reports: list[str], entities: list[list[dict]]):
        """The part of each report that fits the context length, and the entities inside it: the
        swap edits only what the model reads."""
        hf = self.tokenizer.tokenizer
        length = self.tokenizer.context_length
        enc = hf(reports, return_offsets_mapping=True, truncation=True, max_length=length)
        texts, ents = [], []
        for text, e, offsets in zip(reports, entities, enc["offset_mapping"]):
            cut = max((end for start, end in offsets if end > start), default=len(text))
            cut = len(text) if len(offsets) < length else cut
            texts.append(text[:cut])
            ents.append([x for x in e if x.get("end", 0) <= cut])
        return texts, ents

    def _swap(self, batch: dict, seed: int) -> dict:
        o = self.objective
        rng = random.Random(seed)
        texts, ents = self._visible(list(batch["report"]), [list(e) for e in batch["entities"]])
        res = swap_texts(texts, ents, p=o.swap_prob, mode=o.swap_mode, rng=rng)
        labels, entities = res.labels.clone(), [list(e) for e in res.entities]
        changed = [i for i in range(len(labels)) if labels[i] == 1]
        rows, tokens = [], None
        if changed:
            tokens = self.tokenizer([res.texts[i] for i in changed])
            same = (tokens == batch["text"][changed]).all(dim=1)
            for j, i in enumerate(changed):
                if same[j]:  # nothing the model reads changed (e.g. only spacing): not a swap
                    labels[i], entities[i] = 0, ents[i]
            keep = ~same
            tokens, rows = tokens[keep], [i for j, i in enumerate(changed) if keep[j]]
        if not rows:
            tokens = batch["text"][:1]  # one row anyway: every rank runs the text tower the same number of times
        return {"tokens": tokens, "rows": torch.tensor(rows, dtype=torch.long), "labels": labels,
                "entities": entities}


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
