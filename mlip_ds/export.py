"""Export trained weights as safetensors + a config, loadable without DeepSpeed.

``export/`` holds ``model.safetensors`` (both towers), ``image_encoder.safetensors`` (the vision
tower alone, for transfer), ``config.json`` (model config + preprocessing), and ``text_model/``
(the text model's config and tokenizer files, so the folder is self-contained).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mlip_ds.data.transforms import CLIP_MEAN, CLIP_STD
from mlip_ds.model.towers import build_model

TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _contiguous(state: dict) -> dict:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def export_model(model: torch.nn.Module, model_cfg: dict, out_dir: str, info: dict | None = None) -> Path:
    """Write the export folder atomically (a temp folder renamed into place)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    cfg = json.loads(json.dumps(model_cfg))
    text_dir = tmp / "text_model"
    text_dir.mkdir()
    for key in ("hf_model_name", "hf_tokenizer_name"):
        src = Path(cfg["text_cfg"][key])
        for name in TEXT_FILES:
            if (src / name).exists() and not (text_dir / name).exists():
                shutil.copy2(src / name, text_dir / name)
        cfg["text_cfg"][key] = "text_model"
    state = _contiguous(model.state_dict())
    save_file(state, str(tmp / "model.safetensors"))
    save_file({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")},
              str(tmp / "image_encoder.safetensors"))
    preprocess = {"image_size": cfg.get("preprocess", {}).get("image_size"),
                  "mean": list(cfg.get("preprocess", {}).get("mean", CLIP_MEAN)),
                  "std": list(cfg.get("preprocess", {}).get("std", CLIP_STD))}
    (tmp / "config.json").write_text(json.dumps(
        {"format": "mlip-ds-export", "version": 1, "model_config": cfg, "preprocess": preprocess,
         "info": info or {}}, indent=2))
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def read_export_config(export_dir: str) -> dict:
    path = Path(export_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"'{export_dir}' is not an mlip-ds export (no config.json); "
                                "train.py writes one to <out-dir>/export")
    meta = json.loads(path.read_text())
    cfg = meta["model_config"]
    for key in ("hf_model_name", "hf_tokenizer_name"):
        cfg["text_cfg"][key] = str((Path(export_dir) / cfg["text_cfg"][key]).resolve())
    return meta


def load_model(export_dir: str, random_init: bool = False, seed: int = 0):
    """Return (model, export meta). ``random_init`` builds the same architecture untrained."""
    meta = read_export_config(export_dir)
    torch.manual_seed(seed)
    model = build_model(meta["model_config"])
    if not random_init:
        model.load_state_dict(load_file(str(Path(export_dir) / "model.safetensors")))
    return model.eval(), meta


class ImageEncoder(torch.nn.Module):
    """The vision tower as a feature extractor. For ViTs it returns the pooled features before the
    contrastive projection (MGCA's linear-probe protocol); ``embedding=True`` applies it."""

    def __init__(self, visual: torch.nn.Module, embedding: bool = False):
        super().__init__()
        self.visual = visual
        self.proj = None
        if not embedding and isinstance(getattr(visual, "proj", None), torch.nn.Parameter):
            self.proj = visual.proj
            del visual.proj
            visual.proj = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


def load_image_encoder(export_dir: str, random_init: bool = False, seed: int = 0, embedding: bool = False):
    """Return (encoder, preprocess) with preprocess = {image_size, mean, std}."""
    model, meta = load_model(export_dir, random_init=random_init, seed=seed)
    return ImageEncoder(model.visual, embedding=embedding).eval(), meta["preprocess"]
