"""Loader batch -> the forward's keyword tensors: knowledge mentions, concepts, categories, text swapping.

``BatchPreparer`` is the objective's batch half (``mlip_ds.objective.Objective.prepare_batch``): what
the enabled terms need on top of (image, text), seeded per micro-batch so a resumed run replays it.
"""
from __future__ import annotations

import random

import torch

from mlip_ds.losses.objective import ObjectiveConfig
from mlip_ds.losses.swap import swap_texts
from mlip_ds.model.concepts import ConceptVocab, unique_rows
from mlip_ds.model.mlip import needs

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
