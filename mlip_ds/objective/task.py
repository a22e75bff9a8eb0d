"""``Objective``: the one object the training loop asks about the objective.

The loop (``mlip_ds/train.py``) knows nothing of the terms; per micro-step it calls

    objective.before_step(step)                      # prototypes frozen during their window
    inputs = objective.prepare_batch(batch, device, dtype)
    out = engine(**inputs, active=objective.active(step))
    loss, named = objective.loss(out, inputs, step)  # the weighed sum and the logged terms
    objective.discard() / discard_if_non_finite(loss)  # a skipped micro-step leaves no trace
    ...backward, optimizer step...
    objective.after_step(step, total_steps)          # EMA towers, prototypes back onto the sphere

and at the end ``objective.export(export_dir)``. The CLIP baseline is the same object with the MLIP
terms off (``config.OBJECTIVE_PRESETS``): each method then does what the plain CLIP step does
(nothing, or the global term alone).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mlip_ds import checkpoint
from mlip_ds.config import KnowledgeConfig
from mlip_ds.losses.objective import TERMS, ObjectiveConfig, active_terms, total_loss
from mlip_ds.model.concepts import ConceptVocab
from mlip_ds.model.mlip import MLIPModel, mlip_state, needs
from mlip_ds.objective.batch import BatchPreparer
from mlip_ds.objective.terms import compute_terms


def mlip_parts_on(objective: ObjectiveConfig) -> bool:
    """True when anything beyond the plain CLIP baseline is on."""
    return any(objective.enabled(t) for t in TERMS if t != "global") or (
        objective.use_global and objective.false_negatives != "off")


class Objective:
    """The objective of one run over ``module`` (the engine's ``MLIPModel``, built for ``cfg``).

    ``tokenizer``, ``vocab`` (the concept vocabulary, when a term needs it) and ``knowledge``
    (``--concept-context-length``, ``--max-mentions``) prepare the batches; ``dtype`` is the
    engine's: under bf16 the EMA towers are kept in fp32 (with m = 0.999 a bf16 copy could not
    move: its step is below bf16's resolution; their forward runs under autocast). ``ds_stage``:
    the ZeRO stage, for the prototypes' renormalisation. Build it before loading a checkpoint.
    """

    def __init__(self, cfg: ObjectiveConfig, module: MLIPModel, tokenizer, vocab: ConceptVocab | None = None,
                 knowledge: KnowledgeConfig | None = None, dtype: torch.dtype = torch.float32, ds_stage: int = 0):
        knowledge = knowledge or KnowledgeConfig()
        self.cfg, self.module, self.vocab, self.knowledge, self.ds_stage = cfg, module, vocab, knowledge, ds_stage
        self.needs = needs(cfg)
        self.preparer = BatchPreparer(cfg, tokenizer, vocab, knowledge.concept_context_length,
                                      knowledge.max_mentions)
        if dtype != torch.float32:
            module.ema_to_fp32()
        self.prior = getattr(module, "prior", None)  # the co-occurrence table (category term)
        self._prior_before = None

    # ------------------------------------------------------------------ the batch
    def loader_options(self) -> dict:
        """``LoaderSpec`` fields: what the terms need on top of (image, text), and the CPU half of
        the preparation, run in the loader's workers (None for the CLIP baseline: plain batches)."""
        return {"second_view": self.needs["second_view"], "raw": self.needs["raw"],
                "batch_fn": self.preparer if self.preparer.active else None}

    def prepare_batch(self, batch: dict, device, dtype: torch.dtype = torch.float32, seed: int | None = None) -> dict:
        """The forward's keyword inputs on ``device`` (images in ``dtype``). ``seed``: also run the
        CPU half here (knowledge, categories, swaps; no loader: tests, benchmarks); None: the
        loader's workers ran it (``loader_options``)."""
        if seed is not None:
            batch = self.preparer(dict(batch), seed)
        return self.preparer.to_device(batch, device, dtype)

    # ------------------------------------------------------------------ the step
    def active(self, step: int) -> frozenset[str]:
        """The terms computed at optimizer step ``step`` (a delayed or switched-off one is not)."""
        return active_terms(self.cfg, step)

    def before_step(self, step: int) -> None:
        """Before each micro-step: the prototypes stay frozen for the first
        ``freeze_prototypes_steps`` optimizer steps (MGCA)."""
        protos = getattr(self.module, "prototypes", None)
        if protos is not None:
            frozen = step < self.cfg.freeze_prototypes_steps
            if protos.frozen != frozen:
                protos.freeze(frozen)

    def loss(self, out: dict, inputs: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the weighed loss, the detached terms to log: ``loss/<term>``, ``loss/total``) of the
        forward's outputs at optimizer step ``step``. Collective: every rank calls it once per
        micro-step. The co-occurrence prior it updates can be taken back (``discard``)."""
        prior = self.prior
        self._prior_before = prior.counts.clone() if prior is not None else None
        terms = compute_terms(out, inputs, self.cfg, prior, active=self.active(step))
        return total_loss(terms, self.cfg, step=step)

    def discard(self) -> None:
        """The micro-step of the last ``loss`` is skipped: it leaves no trace in the prior."""
        if self.prior is not None:
            self.prior.counts.copy_(self._prior_before)

    def discard_if_non_finite(self, loss: torch.Tensor) -> None:
        """The same, decided on the device (no host sync): the prior's update is kept where
        ``loss`` is finite (when DeepSpeed's overflow check, not the host, skips the step)."""
        if self.prior is not None:
            self.prior.counts.copy_(torch.where(torch.isfinite(loss), self.prior.counts, self._prior_before))

    def after_step(self, step: int, total_steps: int) -> None:
        """After each optimizer step: the EMA update of the divergence encoders; the prototypes
        back onto the unit sphere (SwAV), in the module and in the optimizer's fp32 master copy
        (else the next step would undo it)."""
        module = self.module
        module.ema_step(step, total_steps)
        protos = getattr(module, "prototypes", None)
        if protos is None or protos.frozen:
            return
        import deepspeed  # here, not at import: the trainer picks DeepSpeed's accelerator first
        weight = protos.weight
        with torch.no_grad():
            master = deepspeed.utils.safe_get_full_fp32_param(weight)
            if master is not None:
                deepspeed.utils.safe_set_full_fp32_param(weight, torch.nn.functional.normalize(master, dim=-1))
            with deepspeed.zero.GatheredParameters([weight], modifier_rank=0, enabled=self.ds_stage == 3):
                protos.normalize_()

    # ------------------------------------------------------------------ the end
    def export(self, export_dir: Path) -> None:
        """Next to the two-tower export, when an MLIP part is on: ``mlip_state.safetensors`` (EMA
        towers, knowledge encoder, TKP attention, prototypes, fusion and heads) and ``mlip.json``
        (objective, concept vocabulary). Rank 0, with the parameters gathered (ZeRO-3)."""
        if not mlip_parts_on(self.cfg):
            return
        from safetensors.torch import save_file
        export_dir = Path(export_dir)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in mlip_state(self.module).items()}
        tmp = export_dir / ".mlip_state.safetensors.tmp"
        save_file(state, str(tmp))
        os.replace(tmp, export_dir / "mlip_state.safetensors")
        info = {"objective": self.module.objective.__dict__, "knowledge": self.knowledge.__dict__,  # head sizes resolved
                "concepts": self.vocab.to_json() if self.vocab else None}
        checkpoint.atomic_write_text(export_dir / "mlip.json", json.dumps(info, indent=1))
