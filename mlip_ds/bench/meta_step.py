"""The training step (forward, every loss term, backward, EMA update) on the meta device.

Meta tensors carry shapes and no values: the step costs almost nothing at ViT-B/16 + BERT-base
size on a CPU, and any read of a value on the host (``.item()``, ``bool(t)``, ``nonzero``) raises.
Used by tests (no device syncs in the step; the MFU FLOP count against torch's counter) and by
``benchmarks/bench_host.py`` (ops, FLOPs and saved activations per step at GPU sizes, on CPU).
"""
from __future__ import annotations

import random
from unittest import mock


class _NoGenerator:
    """Meta tensors draw no random numbers (ITM's hard-negative sampling seeds a generator)."""

    def __init__(self, device=None):
        pass

    def manual_seed(self, seed):
        return None


def synthetic_batch(model_cfg: dict, batch: int, tokenizer) -> dict:
    """A loader batch of ``batch`` synthetic reports (the images are zeros: only shapes matter)."""
    import torch
    from mlip_ds.data.text_augment import augment_report
    from mlip_ds.sources.synthetic import generate_sample
    size = model_cfg["preprocess"]["image_size"]
    samples = [generate_sample(i, seed=1, size=32) for i in range(batch)]
    return {"image": torch.zeros(batch, 3, size, size), "image2": torch.zeros(batch, 3, size, size),
            "text": tokenizer([s.report for s in samples]),
            "text2": tokenizer([augment_report(s.report, random.Random(i)) for i, s in enumerate(samples)]),
            "report": [s.report for s in samples], "entities": [s.entities for s in samples],
            "labels": [s.labels for s in samples]}


def model_and_inputs(model_cfg: dict, objective, batch: int, device: str = "meta", dtype=None):
    """(model, its forward inputs) for ``objective`` at ``batch`` samples, on ``device`` (meta by
    default); ``dtype`` (e.g. bfloat16) casts weights and images as DeepSpeed's bf16 mode does."""
    import torch
    from mlip_ds.model.concepts import load_concepts
    from mlip_ds.model.mlip import MLIPModel
    from mlip_ds.model.towers import build_model, build_tokenizer
    from mlip_ds.objective.batch import BatchPreparer
    tokenizer, vocab = build_tokenizer(model_cfg), load_concepts("", [])
    with torch.device(device):
        model = MLIPModel(build_model(model_cfg), objective, len(vocab), len(vocab.categories),
                          tokenizer.tokenizer.all_special_ids).train()
    inputs = BatchPreparer(objective, tokenizer, vocab).prepare(synthetic_batch(model_cfg, batch, tokenizer), device)
    return to_dtype(model, inputs, dtype) if dtype is not None else (model, inputs)


def to_dtype(model, inputs: dict, dtype):
    """Weights and floating inputs (the images) in ``dtype``, as DeepSpeed's bf16 mode has them."""
    import torch
    model.to(dtype=dtype)
    return model, {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


def to_meta(model, inputs: dict):
    """``model`` and the tensors of ``inputs`` moved to the meta device."""
    import torch
    return model.to("meta"), {k: v.to("meta") if torch.is_tensor(v) else v for k, v in inputs.items()}


def training_step(model, objective, inputs: dict, ema: bool = True):
    """Forward, all loss terms (past every warm-up), backward and the EMA update; returns (loss, terms).
    Any device; on meta, ITM's generator is stood in for (its draws do not matter there)."""
    import torch
    from mlip_ds.losses.objective import total_loss
    from mlip_ds.objective.terms import compute_terms
    with mock.patch.object(torch, "Generator", _NoGenerator):
        out = model(**inputs)
        loss, named = total_loss(compute_terms(out, inputs, objective, getattr(model, "prior", None)), objective,
                                 step=10**6)
        loss.backward()
        if ema:
            model.ema_step(5, 100)
            if hasattr(model, "prototypes"):
                model.prototypes.normalize_()
    return loss, named


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` by torch's FlopCounterMode. SDPA on the math backend: the counter has no
    formula for the fused CPU attention kernel, and it counts the math backend's matmuls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()
