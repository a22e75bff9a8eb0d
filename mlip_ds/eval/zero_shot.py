"""Zero-shot classification of chest radiographs from knowledge-base class prompts.

Protocol (what the numbers mean):

* Class names come from the knowledge base (``mlip_ds.knowledge.kb``): for a label, every concept
  mapped to it (``kb.concepts_for_label``) gives its canonical name and its aliases (the concept
  whose name is the label itself first, then the other concepts' names, then the aliases;
  duplicates after lower-casing dropped; ``max_names`` keeps the first N). A label that is not a
  KB label is looked up as a name/alias (``"PNEUMONIA"`` -> the pneumonia concept -> label
  ``pneumonia``); a name the KB does not know is used as it is (with a note). The normal class
  (``no_finding``, ``normal``, ``negative``, ``healthy``) takes the KB's "no finding" concept:
  "no acute cardiopulmonary process", "clear lungs", "normal chest radiograph", ...
* Prompts: each name in each positive template (``DEFAULT_TEMPLATES``, e.g. "findings consistent
  with {}."); the normal class uses ``NORMAL_TEMPLATES``. Negation prompts: each name of a finding
  in each negation template (``DEFAULT_NEGATION_TEMPLATES``, e.g. "no evidence of {}."). A prompt
  set's embedding is the mean of its L2-normalised text embeddings, normalised again (CLIP's prompt
  ensembling). Images are embedded by the export's image tower + projection (L2-normalised).
* Scores, with s = the model's logit scale (1 / temperature) and x the image embedding:
  - ``negation`` (with negation templates): per class c, z_c = x·p_c - x·n_c with p_c the positive
    and n_c the negation prompt embedding; score = softmax over the pair (s·x·p_c, s·x·n_c)[0]
    = sigmoid(s·z_c). The normal class has no "no <finding>" prompt: its n_c is the mean of the
    other classes' positive embeddings ("normal" vs "any finding"; fixed "abnormal chest
    radiograph"-style prompts when it is the only class).
  - ``softmax`` (without negation templates): softmax over the classes of s·x·p_c (CLIP's
    zero-shot classifier, one prompt set per class).
  Both give scores in [0, 1].
* Multi-label data (shards, CSV): ROC AUC per label from each score and their mean; uncertain and
  missing labels follow ``--uncertain`` / ``--missing`` as in the linear probe (masked labels are
  left out of that label's AUC); a label whose test labels hold one class is "n/a" (noted).
* Class-per-folder data (single-label): the predicted class is the argmax over classes, of
  softmax(s·z_c) with ``negation`` (z_c as above; for NORMAL vs PNEUMONIA the pneumonia logit is
  s·(2·x·p_pneumonia - x·p_"no pneumonia" - x·p_normal)) and of the ``softmax`` scores without. Accuracy (the
  headline), plus ROC AUC of the positive class for two classes and the majority-class accuracy
  for reference.

CLI: ``python -m mlip_ds.eval.zero_shot --model NAME=EXPORT_DIR --data PATH [...]`` (``--help``);
writes ``zero_shot.json``, ``zero_shot.md``, ``scores_<model>.npz`` (``scores_<mode>`` in [0, 1],
``logits_<mode>`` (the same ranking, unsaturated; metrics use these), ``labels`` or ``targets``,
``label_names``) and ``roc_<model>.png`` into ``--out`` and prints the Markdown table. Missing
inputs exit with code 2 and the path named.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from mlip_ds.eval.common import EvalError, parse_encoder_spec  # noqa: F401  (EvalError: re-exported)

DEFAULT_TEMPLATES = ("{}.", "findings consistent with {}.", "impression: {}.", "there is {}.")
DEFAULT_NEGATION_TEMPLATES = ("no {}.", "no evidence of {}.", "there is no {}.", "negative for {}.")
NORMAL_TEMPLATES = ("{}.", "impression: {}.", "findings: {}.")
NORMAL_LABEL = "no_finding"
NORMAL_CLASS_NAMES = ("no_finding", "normal", "negative", "healthy", "no finding")
ABNORMAL_PROMPTS = ("abnormal chest radiograph.", "acute cardiopulmonary process.", "findings of acute disease.")
MODES = ("negation", "softmax")
MAX_LOGIT_SCALE = 100.0


# ---------------------------------------------------------------------------------------------
# prompts from the knowledge base


def _norm(text: str) -> str:
    return " ".join(str(text).casefold().replace("_", " ").split())


def is_normal_class(name: str) -> bool:
    return _norm(name) in {_norm(n) for n in NORMAL_CLASS_NAMES}


def label_names_from_kb(label: str, kb=None, max_names: int | None = None,
                        include_aliases: bool = True) -> tuple[list[str], list[str], str, str | None]:
    """Surface forms for a label: ``(names, concept ids, kb label used, note)``.

    Order: the concept named like the label first, the other concepts' names, then the aliases
    (primary concept's first). Duplicates (case-insensitive) are dropped; ``max_names`` truncates.
    """
    from mlip_ds.knowledge.kb import default_kb

    kb = kb if kb is not None else default_kb()
    key = _norm(label)
    snake = key.replace(" ", "_")
    kb_label = NORMAL_LABEL if is_normal_class(label) else None
    concepts = []
    if kb_label is None and snake in kb.labels:
        kb_label = snake
    if kb_label is None:
        hit = kb.by_alias(key)
        if hit is not None and hit.label is not None:
            kb_label = hit.label
        elif hit is not None:
            concepts = [hit]
    if kb_label is not None:
        concepts = kb.concepts_for_label(kb_label)
    note = None
    if not concepts:
        return [key], [], None, f"'{label}' is not in the knowledge base; prompts use the name itself"
    target = _norm(kb_label.replace("_", " ")) if kb_label else key

    def rank(c):
        forms = {_norm(f) for f in c.surface_forms()}
        return (0 if _norm(c.name) in (key, target) else 1 if (key in forms or target in forms) else 2, c.id)

    concepts = sorted(concepts, key=rank)
    names, seen = [], set()

    def add(form):
        k = _norm(form)
        if k and k not in seen:
            seen.add(k)
            names.append(form)

    for c in concepts:
        add(c.name)
    if include_aliases:
        for c in concepts:
            for a in c.aliases:
                add(a)
    if max_names:
        names = names[:max_names]
    return names, [c.id for c in concepts], kb_label, note


@dataclass
class ClassPrompts:
    """The prompts of one class/label (JSON-serialisable with ``dataclasses.asdict``)."""

    label: str
    names: list[str]
    positive: list[str]
    negative: list[str] = field(default_factory=list)  # negation prompts ("no <finding>"); empty for normal
    concept_ids: list[str] = field(default_factory=list)
    kb_label: str | None = None
    is_normal: bool = False
    note: str | None = None


def build_class_prompts(label: str, kb=None, templates: Sequence[str] = DEFAULT_TEMPLATES,
                        negation_templates: Sequence[str] = DEFAULT_NEGATION_TEMPLATES,
                        normal_templates: Sequence[str] = NORMAL_TEMPLATES, max_names: int | None = None,
                        include_aliases: bool = True) -> ClassPrompts:
    """Positive and negation prompts of one label from the KB (see the module docstring)."""
    for t in list(templates) + list(negation_templates) + list(normal_templates):
        if "{}" not in t:
            raise ValueError(f"prompt template {t!r} has no '{{}}' placeholder")
    names, ids, kb_label, note = label_names_from_kb(label, kb, max_names=max_names, include_aliases=include_aliases)
    normal = is_normal_class(label) or kb_label == NORMAL_LABEL
    tpl = normal_templates if normal else templates

    def fill(templates_, names_):
        out = []
        for n in names_:
            for t in templates_:
                p = t.format(n)
                if p not in out:
                    out.append(p)
        return out

    positive = fill(tpl, names)
    negative = [] if normal else fill(negation_templates, names)
    return ClassPrompts(label=label, names=names, positive=positive, negative=negative, concept_ids=ids,
                        kb_label=kb_label, is_normal=normal, note=note)


# ---------------------------------------------------------------------------------------------
# models and embeddings (shared with retrieval.py)


class ImageEmbedder(torch.nn.Module):
    """images -> L2-normalised joint-space embeddings (the image tower + its projection)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        out = self.model.encode_image(images)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return torch.nn.functional.normalize(out.float(), dim=-1)


@dataclass
class LoadedModel:
    name: str
    export_dir: str
    random_init: bool
    model: torch.nn.Module
    tokenizer: object
    preprocess: dict
    logit_scale: float


def load_export(spec: str, random_init_seed: int = 0) -> LoadedModel:
    """``NAME=EXPORT_DIR`` / ``NAME=random:EXPORT_DIR`` / ``EXPORT_DIR`` -> the two-tower model."""
    from mlip_ds.export import load_model
    from mlip_ds.model.towers import build_tokenizer

    name, path, random_init = parse_encoder_spec(spec)
    if not os.path.isdir(path):
        raise EvalError(f"export dir of model '{name}' not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise EvalError(f"'{path}' (model '{name}') is not an mlip-ds export (no config.json); "
                        "train.py writes one to <out-dir>/export")
    try:
        model, meta = load_model(path, random_init=random_init, seed=random_init_seed)
    except (FileNotFoundError, OSError) as exn:
        raise EvalError(f"cannot load model '{name}' from {path}: {exn}") from exn
    tokenizer = build_tokenizer(meta["model_config"])
    pre = dict(meta.get("preprocess") or {})
    if pre.get("image_size") is None:
        pre["image_size"] = meta["model_config"]["vision_cfg"]["image_size"]
    scale = float(model.logit_scale.detach().exp().reshape(-1)[0].clamp(max=MAX_LOGIT_SCALE))
    return LoadedModel(name, path, random_init, model.eval(), tokenizer, pre, scale)


def eval_transform_for(preprocess: dict):
    from mlip_ds.data.transforms import CLIP_MEAN, CLIP_STD, eval_transform

    return eval_transform(int(preprocess["image_size"]), tuple(preprocess.get("mean") or CLIP_MEAN),
                          tuple(preprocess.get("std") or CLIP_STD))


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 128,
                 device: str | torch.device = "cpu") -> np.ndarray:
    """L2-normalised text embeddings (N, E) float32. Identical texts are encoded once (so they get
    bit-identical embeddings, which matters for ties in retrieval)."""
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to encode")
    uniq = list(dict.fromkeys(texts))
    where = {t: i for i, t in enumerate(uniq)}
    model.eval().to(device)
    out = []
    for i in range(0, len(uniq), batch_size):
        tok = tokenizer(uniq[i:i + batch_size]).to(device)
        f = model.encode_text(tok)
        if isinstance(f, (tuple, list)):
            f = f[0]
        out.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy())
    emb = np.concatenate(out, 0)
    return emb[[where[t] for t in texts]].astype(np.float32)


def prompt_set_embedding(text_emb: np.ndarray) -> np.ndarray:
    """Mean of L2-normalised prompt embeddings, normalised again (CLIP's prompt ensembling)."""
    v = np.asarray(text_emb, dtype=np.float64).mean(0)
    n = np.linalg.norm(v)
    return (v / n if n > 0 else v).astype(np.float32)


def class_embeddings(model, tokenizer, prompts: Sequence[ClassPrompts], batch_size: int = 128,
                     device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """(positive (C, E), negative (C, E)) prompt-set embeddings. The normal class's negative row is
    the mean of the other classes' positive embeddings (fixed abnormal prompts when it is alone)."""
    all_texts = [t for p in prompts for t in p.positive + p.negative] + list(ABNORMAL_PROMPTS)
    emb = dict(zip(all_texts, encode_texts(model, tokenizer, all_texts, batch_size, device)))
    pos = np.stack([prompt_set_embedding(np.stack([emb[t] for t in p.positive])) for p in prompts])
    neg = np.zeros_like(pos)
    for i, p in enumerate(prompts):
        if p.negative:
            neg[i] = prompt_set_embedding(np.stack([emb[t] for t in p.negative]))
        else:
            others = [j for j, q in enumerate(prompts) if j != i and not q.is_normal]
            neg[i] = prompt_set_embedding(pos[others] if others else np.stack([emb[t] for t in ABNORMAL_PROMPTS]))
    return pos, neg


# ---------------------------------------------------------------------------------------------
# scoring


def _log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def zero_shot_logits(image_emb: np.ndarray, pos: np.ndarray, neg: np.ndarray | None, mode: str = "negation",
                     logit_scale: float = 1 / 0.07, single_label: bool = False) -> np.ndarray:
    """(N, C) unsaturated per-class logits, monotone in ``zero_shot_scores`` (AUCs and argmaxes are
    computed from these: a probability that rounds to exactly 1.0 would make false ties).

    ``negation``: s·(x·p_c - x·n_c) (the pair softmax's logit), or with ``single_label`` the log
    softmax of it over the classes. ``softmax``: log softmax over the classes of s·x·p_c.
    """
    x = np.asarray(image_emb, dtype=np.float64)
    pos = np.asarray(pos, dtype=np.float64)
    if mode == "negation":
        if neg is None:
            raise ValueError("mode 'negation' needs the negation embeddings")
        z = logit_scale * (x @ pos.T - x @ np.asarray(neg, dtype=np.float64).T)
        return _log_softmax(z, axis=1) if single_label else z
    if mode == "softmax":
        return _log_softmax(logit_scale * (x @ pos.T), axis=1)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def scores_from_logits(logits: np.ndarray, mode: str, single_label: bool = False) -> np.ndarray:
    """Probabilities in [0, 1] from ``zero_shot_logits``."""
    from scipy.special import expit

    if mode == "negation" and not single_label:
        return expit(logits)
    return np.exp(logits)


def zero_shot_scores(image_emb: np.ndarray, pos: np.ndarray, neg: np.ndarray | None, mode: str = "negation",
                     logit_scale: float = 1 / 0.07, single_label: bool = False) -> np.ndarray:
    """(N, C) scores in [0, 1] from L2-normalised image embeddings and class prompt embeddings.

    ``negation``: softmax over (s·x·p_c, s·x·n_c), the positive entry (= sigmoid(s·z_c)), or with
    ``single_label`` a softmax over the classes of s·z_c. ``softmax``: softmax over the classes of
    s·x·p_c (``neg`` unused).
    """
    return scores_from_logits(zero_shot_logits(image_emb, pos, neg, mode, logit_scale, single_label), mode,
                              single_label)


def auc_per_label(scores: np.ndarray, labels: np.ndarray, label_names: Sequence[str]) -> tuple[dict, list[str]]:
    """{label: ROC AUC or None}, notes. NaN labels are masked; one-class labels give None."""
    from sklearn.metrics import roc_auc_score

    out, notes = {}, []
    for j, name in enumerate(label_names):
        y = np.asarray(labels)[:, j]
        ok = ~np.isnan(y)
        if len(np.unique(y[ok])) < 2:
            out[name] = None
            notes.append(f"{name}: test labels hold one class ({int(ok.sum())} samples), AUC n/a")
            continue
        out[name] = float(roc_auc_score(y[ok], np.asarray(scores)[ok, j]))
    return out, notes


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def evaluate_scores(scores: np.ndarray, labels: np.ndarray, label_names: Sequence[str], task: str,
                    class_names: Sequence[str] | None = None, positive_index: int | None = None) -> dict:
    """Metrics of one score matrix. Multi-label: per-label AUC + mean. Single-label (``task``
    "multiclass" or a folder "binary"): accuracy of the argmax (+ AUC of the positive class)."""
    if task == "multilabel":
        per_label, notes = auc_per_label(scores, labels, label_names)
        return {"metric": "auc", "per_label": per_label, "mean": _mean(per_label.values()), "notes": notes}
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    pred = np.asarray(scores).argmax(1)
    out = {"metric": "accuracy", "accuracy": float((pred == y).mean()),
           "majority_accuracy": float(np.bincount(y, minlength=len(class_names)).max() / len(y)),
           "per_class_recall": {c: (float((pred[y == i] == i).mean()) if (y == i).any() else None)
                                for i, c in enumerate(class_names)}, "notes": []}
    if positive_index is not None and len(np.unique(y)) == 2:
        from sklearn.metrics import roc_auc_score
        out["auc"] = float(roc_auc_score(y == positive_index, np.asarray(scores)[:, positive_index]))
    return out


# ---------------------------------------------------------------------------------------------
# one model on one dataset


def run_zero_shot(loaded: LoadedModel, data: str, labels: Sequence[str] | None = None, kb=None,
                  templates=DEFAULT_TEMPLATES, negation_templates=DEFAULT_NEGATION_TEMPLATES,
                  normal_templates=NORMAL_TEMPLATES, max_names: int | None = None, include_aliases: bool = True,
                  uncertain: str = "ones", missing: str = "zeros", split: str | None = None,
                  batch_size: int = 64, workers: int = 0, device="cpu", progress: bool = False,
                  max_samples: int | None = None) -> tuple[dict, dict]:
    """Zero-shot on one labelled dataset. Returns (result dict, arrays {scores_<mode>, labels})."""
    from mlip_ds.eval.datasets import DataPathError, open_labelled_dataset
    from mlip_ds.eval.features import extract_features

    t0 = time.time()
    if "{" not in str(data) and not os.path.exists(str(data)):
        raise EvalError(f"--data not found: {data}")
    transform = eval_transform_for(loaded.preprocess)
    try:
        ds = open_labelled_dataset(data, transform=transform, label_names=labels, uncertain=uncertain,
                                   missing=missing, split=split)
    except (DataPathError, ValueError) as exn:
        raise EvalError(str(exn)) from exn
    if max_samples:
        ds, workers = _Limited(ds, max_samples), 0  # the limit counts in one process
    folder = ds.class_names is not None
    class_names = list(ds.class_names) if folder else list(ds.label_names)
    task = "multilabel" if not folder else "single_label"
    prompts = [build_class_prompts(c, kb, templates, negation_templates, normal_templates, max_names,
                                   include_aliases) for c in class_names]
    pos, neg = class_embeddings(loaded.model, loaded.tokenizer, prompts, device=device)
    img, y, info = extract_features(ImageEmbedder(loaded.model), ds, batch_size=batch_size, num_workers=workers,
                                    device=device, desc=f"{loaded.name} images", progress=progress,
                                    return_info=True)
    notes = [p.note for p in prompts if p.note]
    arrays = {}
    results = {}
    positive_index = None
    if folder:
        targets = y[:, 0] if getattr(ds, "task", "binary") == "multiclass" else None
        if targets is None:  # binary folder: label 1.0 = the positive class
            positive_index = class_names.index(ds.positive_class)
            other = 1 - positive_index
            targets = np.where(y[:, 0] == 1.0, positive_index, other)
        y_eval = targets.astype(np.int64)
        arrays["targets"] = y_eval
    else:
        y_eval = y
        arrays["labels"] = y
    for mode in MODES:
        logits = zero_shot_logits(img, pos, neg, mode=mode, logit_scale=loaded.logit_scale, single_label=folder)
        arrays[f"logits_{mode}"] = logits
        arrays[f"scores_{mode}"] = scores_from_logits(logits, mode, single_label=folder)
        results[mode] = evaluate_scores(logits, y_eval, class_names, "multilabel" if not folder else "single",
                                        class_names=class_names, positive_index=positive_index)
        notes += [n for n in results[mode].pop("notes") if n not in notes]
    if info["num_skipped"]:
        notes.append(f"skipped {info['num_skipped']} corrupt sample(s)")
    res = {
        "model": {"name": loaded.name, "export_dir": loaded.export_dir, "random_init": loaded.random_init,
                  "logit_scale": loaded.logit_scale},
        "data": str(data), "task": task, "metric": "auc" if not folder else "accuracy",
        "label_names": class_names, "class_names": class_names if folder else None,
        "positive_class": class_names[positive_index] if positive_index is not None else None,
        "n_samples": int(len(img)), "num_skipped": int(info["num_skipped"]),
        "skipped_examples": [s._asdict() for s in info["skipped"][:20]],
        "positives": ({n: int(np.nansum(y[:, j] == 1)) for j, n in enumerate(class_names)} if not folder
                      else {c: int((y_eval == i).sum()) for i, c in enumerate(class_names)}),
        "results": results,
        "prompts": {p.label: asdict(p) for p in prompts},
        "templates": {"positive": list(templates), "negation": list(negation_templates),
                      "normal": list(normal_templates)},
        "notes": notes, "seconds": round(time.time() - t0, 2),
    }
    arrays["label_names"] = np.array(class_names)
    return res, arrays


class _Limited(torch.utils.data.IterableDataset):
    """The first ``n`` items of a labelled dataset (skipped markers count towards ``n``)."""

    def __init__(self, ds, n: int):
        self.ds, self.n = ds, int(n)
        for k in ("label_names", "class_names", "task", "positive_class", "spec", "csv_path", "root"):
            if hasattr(ds, k):
                setattr(self, k, getattr(ds, k))
        self.num_samples_hint = min(self.n, getattr(ds, "num_samples_hint", None) or self.n)
        self.skipped = []

    def __iter__(self):
        if isinstance(self.ds, torch.utils.data.IterableDataset):
            for i, item in enumerate(self.ds):
                if i >= self.n:
                    return
                yield item
        else:
            order = np.linspace(0, len(self.ds) - 1, min(self.n, len(self.ds))).round().astype(int)
            for i in order:  # evenly spread over the (class-sorted) files, so every class is kept
                yield self.ds[int(i)]


# ---------------------------------------------------------------------------------------------
# reports


def _f(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


def format_markdown(results: dict, digits: int = 3) -> str:
    """``results``: {model name: run_zero_shot result}. One table: rows = labels (+ mean), columns
    = model x mode."""
    names = list(results)
    first = results[names[0]]
    lines = []
    if first["task"] == "multilabel":
        lines.append(f"**Zero-shot classification**: ROC AUC per label on {first['data']} "
                     f"({first['n_samples']} images); \"with negation\" = softmax over the pair "
                     f"(\"<finding>\" vs \"no <finding>\" prompts), \"without\" = softmax over the labels' prompts.")
        lines.append("")
        header = ["label", "positives"] + [f"{m} {'with' if mode == 'negation' else 'without'} negation"
                                           for m in names for mode in MODES]
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for label in first["label_names"]:
            cells = [label, str(first["positives"].get(label, ""))]
            cells += [_f(results[m]["results"][mode]["per_label"].get(label), digits) for m in names for mode in MODES]
            lines.append("| " + " | ".join(cells) + " |")
        cells = ["**mean**", ""] + [_f(results[m]["results"][mode]["mean"], digits) for m in names for mode in MODES]
        lines.append("| " + " | ".join(cells) + " |")
    else:
        lines.append(f"**Zero-shot classification**: accuracy on {first['data']} ({first['n_samples']} images; "
                     + ", ".join(f"{c} {n}" for c, n in first["positives"].items())
                     + f"; majority class {_f(first['results']['softmax']['majority_accuracy'], digits)}). "
                     "Predicted class = argmax of the class scores.")
        lines.append("")
        header = ["model", "scoring", "accuracy"] + [f"recall {c}" for c in first["class_names"]]
        binary = any("auc" in r["results"][mode] for r in results.values() for mode in MODES)
        if binary:
            header.append(f"AUC ({first['positive_class']})")
        lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
        for m in names:
            for mode in MODES:
                r = results[m]["results"][mode]
                cells = [m, "with negation" if mode == "negation" else "without negation", _f(r["accuracy"], digits)]
                cells += [_f(r["per_class_recall"].get(c), digits) for c in first["class_names"]]
                if binary:
                    cells.append(_f(r.get("auc"), digits))
                lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Prompts per class (first names; positive / negation prompt counts): "
                 + "; ".join(f"{p['label']}: {', '.join(p['names'][:4])}{' ...' if len(p['names']) > 4 else ''} "
                             f"({len(p['positive'])}/{len(p['negative'])})" for p in first["prompts"].values()))
    notes = [(m, n) for m in names for n in results[m]["notes"]]
    if notes:
        lines += ["", "Notes:"] + [f"- {m}: {n}" for m, n in notes]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, arrays: dict, out_dir: str, extra: dict | None = None, digits: int = 3,
                  plots: bool = True) -> tuple[str, str, str]:
    """zero_shot.json, zero_shot.md, scores_<model>.npz and roc_<model>.png (multi-label / binary)."""
    md = format_markdown(results, digits)
    payload = dict(extra or {})
    payload["models"] = results
    from mlip_ds.eval.common import write_json_and_markdown
    json_path, md_path = write_json_and_markdown(out_dir, "zero_shot", payload, md)
    for name, arr in arrays.items():
        safe = safe_name(name)
        np.savez_compressed(os.path.join(out_dir, f"scores_{safe}.npz"), **arr)
        if plots:
            from mlip_ds.eval.plots import plot_roc_curves

            r = results[name]
            if r["task"] == "multilabel":
                plot_roc_curves(arr["logits_negation"], arr["labels"], r["label_names"],
                                os.path.join(out_dir, f"roc_{safe}.png"),
                                title=f"Zero-shot ROC ({name}, with negation)")
            elif r["positive_class"] is not None:
                pi = r["label_names"].index(r["positive_class"])
                plot_roc_curves(arr["logits_negation"][:, [pi]], (arr["targets"] == pi).astype(np.float32)[:, None],
                                [r["positive_class"]], os.path.join(out_dir, f"roc_{safe}.png"),
                                title=f"Zero-shot ROC ({name}, with negation)")
    return json_path, md_path, md


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlip_ds.eval.zero_shot",
        description="Zero-shot classification with knowledge-base class prompts (with and without "
                    "negation prompts): AUC per label for shards/CSV, accuracy for class folders.")
    p.add_argument("--encoder", "--model", dest="model", action="append", required=True,
                   metavar="NAME=[random:]EXPORT_DIR",
                   help="an export to evaluate (repeatable); 'random:' = same architecture, random init")
    p.add_argument("--data", required=True, help="shard dir / brace pattern / .csv / class-folder tree")
    p.add_argument("--split", default=None, help="CSV only: keep rows whose 'split' column equals this")
    p.add_argument("--labels", default=None, help="comma-separated labels (default: manifest / CSV label columns)")
    p.add_argument("--kb", default=None, help="knowledge base JSONL (default: the packaged KB)")
    p.add_argument("--template", action="append", default=None,
                   help=f"positive prompt template with '{{}}' (repeatable; default {list(DEFAULT_TEMPLATES)})")
    p.add_argument("--negation-template", action="append", default=None,
                   help=f"negation template (repeatable; default {list(DEFAULT_NEGATION_TEMPLATES)})")
    p.add_argument("--normal-template", action="append", default=None,
                   help=f"template for the normal class (repeatable; default {list(NORMAL_TEMPLATES)})")
    p.add_argument("--max-names", type=int, default=0, help="names/aliases per class (0 = all, default)")
    p.add_argument("--no-aliases", action="store_true", help="canonical concept names only")
    p.add_argument("--uncertain", default="ones", choices=["ones", "zeros", "ignore"])
    p.add_argument("--missing", default="zeros", choices=["zeros", "ignore"])
    p.add_argument("--max-samples", type=int, default=0, help="evaluate the first N samples only (0 = all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--random-init-seed", type=int, default=0)
    p.add_argument("--out", default="runs/zero_shot")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--digits", type=int, default=3)
    p.add_argument("--no-progress", action="store_true")
    return p


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def load_kb_arg(path: str | None):
    if path is None:
        return None
    from mlip_ds.knowledge.kb import load_kb

    if not os.path.isfile(path):
        raise EvalError(f"--kb not found: {path}")
    return load_kb(path)


def run_cli(args) -> tuple[dict, str, str, str]:
    if "{" not in args.data and not os.path.exists(args.data):
        raise EvalError(f"--data not found: {args.data}")
    kb = load_kb_arg(args.kb)
    labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else None
    device = resolve_device(args.device)
    results, arrays = {}, {}
    for spec in args.model:
        loaded = load_export(spec, args.random_init_seed)
        if loaded.name in results:
            raise EvalError(f"duplicate model name {loaded.name!r}")
        print(f"[zero_shot] model '{loaded.name}': {loaded.export_dir}", file=sys.stderr)
        try:
            res, arr = run_zero_shot(
                loaded, args.data, labels=labels, kb=kb, templates=tuple(args.template or DEFAULT_TEMPLATES),
                negation_templates=tuple(args.negation_template or DEFAULT_NEGATION_TEMPLATES),
                normal_templates=tuple(args.normal_template or NORMAL_TEMPLATES),
                max_names=args.max_names or None, include_aliases=not args.no_aliases, uncertain=args.uncertain,
                missing=args.missing, split=args.split, batch_size=args.batch_size, workers=args.workers,
                device=device, progress=not args.no_progress, max_samples=args.max_samples or None)
        except ValueError as exn:
            raise EvalError(str(exn)) from exn
        results[loaded.name], arrays[loaded.name] = res, arr
    extra = {"data": args.data, "device": device, "kb": args.kb or "packaged"}
    json_path, md_path, md = write_outputs(results, arrays, args.out, extra, args.digits, plots=not args.no_plots)
    return results, json_path, md_path, md


def main(argv: Sequence[str] | None = None) -> int:
    from mlip_ds.eval.common import eval_main
    return eval_main("zero_shot", build_parser, run_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
