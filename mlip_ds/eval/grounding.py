"""Token-to-patch grounding heatmaps of a trained MLIP model, drawn over the radiograph.

``python -m mlip_ds.eval.grounding --encoder EXPORT_DIR --data SHARDS --num 4 --out DIR``

MLIP's local term makes every report token attend over the image patches (``token_patch_attn``,
see ``model/tkp_attention.py``); this command shows where the words of a report's findings look.
It needs a full MLIP export (``mlip_state.safetensors`` + ``mlip.json``, written by ``train.py``
when the local term was on): the two-tower export alone has no token-patch attention. Per sample
it writes ``<key>.png`` (the image, the mean map of the shown words, then one panel per word);
the words are the positive (non-negated) knowledge mentions of the report, else its first words.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from mlip_ds.data.transforms import eval_transform
from mlip_ds.eval.plots import plot_grounding, tokens_for_attention
from mlip_ds.export import load_model
from mlip_ds.losses.objective import ObjectiveConfig
from mlip_ds.model.concepts import ConceptVocab
from mlip_ds.model.mlip import MLIPModel
from mlip_ds.objective.batch import BatchPreparer
from mlip_ds.model.towers import build_tokenizer


# Function words inside a mention span ("heart size is borderline") that have no place to look at.
STOPWORDS = {"the", "and", "are", "with", "from", "for", "has", "was", "were", "been", "its", "this", "that"}
STOPWORDS |= {"is", "of", "in", "on", "at", "to", "no", "or", "an", "a"}


class GroundingError(RuntimeError):
    """Inputs that cannot give grounding maps; the message says what to fix."""


def load_mlip(export_dir: str) -> tuple[MLIPModel, dict, ConceptVocab | None]:
    """The trained MLIPModel of an export (towers + MLIP parts), in eval mode."""
    path = Path(export_dir)
    info_path, state_path = path / "mlip.json", path / "mlip_state.safetensors"
    if not info_path.is_file() or not state_path.is_file():
        raise GroundingError(f"{export_dir}: no mlip.json / mlip_state.safetensors; grounding maps need an "
                             "export of a run with the local term on (train.py --objective mlip)")
    from safetensors.torch import load_file
    info = json.loads(info_path.read_text())
    known = {f.name for f in fields(ObjectiveConfig)}
    objective = ObjectiveConfig(**{k: v for k, v in info["objective"].items() if k in known})
    if not objective.use_local:
        raise GroundingError(f"{export_dir}: trained without the local term (use_local=false): no token-patch "
                             "attention to draw")
    concepts = info.get("concepts")
    vocab = ConceptVocab(concepts["ids"], concepts["texts"], concepts["labels"], source=concepts.get("source", ""))\
        if concepts else None
    clip, meta = load_model(export_dir)
    tokenizer = build_tokenizer(meta["model_config"])
    model = MLIPModel(clip, objective, num_concepts=len(vocab) if vocab else 0,
                      num_categories=len(vocab.categories) if vocab else 0,
                      special_ids=tuple(tokenizer.tokenizer.all_special_ids))
    missing, unexpected = model.load_state_dict(load_file(str(state_path)), strict=False)
    clip_keys = set(model.clip_model().state_dict())
    missing = [k for k in missing if k not in clip_keys]
    if missing or unexpected:
        raise GroundingError(f"{state_path}: does not match the model in mlip.json (missing {missing[:3]}, "
                             f"unexpected {list(unexpected)[:3]})")
    return model.eval(), meta, vocab


def local_only(objective: ObjectiveConfig) -> ObjectiveConfig:
    """The objective of a grounding forward: the local term (and the knowledge it reads) alone."""
    return replace(objective, use_divergence=False, use_category=False, use_itm=False, use_swap=False)


def read_samples(data: str, num: int, keys: Sequence[str] = ()) -> list[dict]:
    """The first ``num`` samples of a shard folder / pattern / tar (or those with ``keys``):
    ``{"key", "image" (PIL), "report", "entities"}``."""
    import webdataset as wds

    from mlip_ds.eval.datasets import resolve_shards
    urls, _ = resolve_shards(data)
    out = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        if keys and key not in keys:
            continue
        img = sample.get("png") or sample.get("jpg")
        if img is None or "txt" not in sample or "json" not in sample:
            print(f"[grounding] skipped {key}: needs .png/.jpg, .txt and .json members", file=sys.stderr)
            continue
        meta = json.loads(sample["json"])
        out.append({"key": key, "image": Image.open(io.BytesIO(img)).convert("L"),
                    "report": sample["txt"].decode("utf-8"), "entities": meta.get("entities", [])})
        if len(out) >= num:
            break
    if not out:
        raise GroundingError(f"{data}: no usable samples" + (f" with keys {list(keys)}" if keys else ""))
    return out


def finding_words(report: str, entities: list[dict]) -> list[str]:
    """The words to draw: those of each positive knowledge mention's text, function words left out."""
    words = []
    for e in entities:
        if e.get("negated"):
            continue
        span = report[int(e.get("start", 0)):int(e.get("end", 0))] or str(e.get("name", ""))
        words += [w for w in re.split(r"[_\s\-]+", span) if len(w) > 2 and w.casefold() not in STOPWORDS]
    return list(dict.fromkeys(words))


@torch.no_grad()
def grounding_maps(model: MLIPModel, meta: dict, vocab: ConceptVocab | None, samples: list[dict],
                   context_length_concepts: int = 32) -> list[tuple[torch.Tensor, list[str]]]:
    """(attention (L-1, P), token strings) per sample, from one forward of the local branch."""
    tokenizer = build_tokenizer(meta["model_config"])
    model.objective = local_only(model.objective)
    preparer = BatchPreparer(model.objective, tokenizer, vocab, context_length_concepts)
    size = int(meta["preprocess"]["image_size"])
    tf = eval_transform(size, meta["preprocess"]["mean"], meta["preprocess"]["std"])
    batch = {"image": torch.stack([tf(s["image"].convert("RGB")) for s in samples]),
             "text": tokenizer([s["report"] for s in samples]),
             "entities": [s["entities"] for s in samples]}
    out = model(**preparer.prepare(batch, "cpu"))
    attn = out["token_patch_attn"]
    return [(attn[i], tokens_for_attention(tokenizer, s["report"])) for i, s in enumerate(samples)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlip_ds.eval.grounding", description=__doc__.split("\n")[0])
    p.add_argument("--encoder", "--model", dest="encoder", required=True,
                   help="an MLIP export dir (<out-dir>/export of a run with the local term)")
    p.add_argument("--data", required=True, help="shard dir / brace pattern / single .tar")
    p.add_argument("--num", type=int, default=4, help="how many samples (default 4)")
    p.add_argument("--keys", default="", help="comma-separated sample keys to draw instead of the first --num")
    p.add_argument("--words", default="", help="comma-separated words to draw (default: the report's positive "
                                               "knowledge mentions)")
    p.add_argument("--normalize", default="each", choices=["each", "shared"])
    p.add_argument("--out", default="grounding", help="output folder for <key>.png")
    args = p.parse_args(argv)
    try:
        if not os.path.exists(args.encoder):
            raise GroundingError(f"--encoder {args.encoder}: no such folder")
        model, meta, vocab = load_mlip(args.encoder)
        keys = [k for k in args.keys.split(",") if k]
        samples = read_samples(args.data, len(keys) or args.num, keys)
        maps = grounding_maps(model, meta, vocab, samples)
    except (GroundingError, FileNotFoundError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    for s, (attn, tokens) in zip(samples, maps):
        words = [w for w in args.words.split(",") if w] or finding_words(s["report"], s["entities"]) or None
        path = os.path.join(args.out, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', s['key'])}.png")
        try:
            plot_grounding(s["image"], attn, tokens, path, words=words, normalize=args.normalize,
                           title=s["report"][:90])
        except ValueError:  # none of the words within the context length: draw the first words
            plot_grounding(s["image"], attn, tokens, path, normalize=args.normalize, title=s["report"][:90])
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
