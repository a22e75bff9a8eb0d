"""Export trained weights as safetensors + a config, loadable without DeepSpeed.

``export/`` holds ``model.safetensors`` (both towers), ``image_encoder.safetensors`` (the vision
tower alone, for transfer), ``config.json`` (model config + preprocessing), and ``text_model/``
(the text model's config and tokenizer files, so the folder is self-contained).

It is also an open_clip folder (the layout of open_clip's ``save_for_hf``):
``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``), ``open_clip_model.safetensors`` (a
hard link to ``model.safetensors``: the same bytes; open_clip reshapes our [1] ``logit_scale``) and
the tokenizer files at the top, so ``open_clip.create_model_and_transforms("local-dir:DIR")`` and
``open_clip.get_tokenizer("local-dir:DIR")`` load it offline, and ``--init-from DIR`` warm-starts
from it. open_clip builds the text tower from ``text_cfg.hf_model_name``, written as the absolute path
of ``DIR/text_model``: after moving the folder, run ``python -m mlip_ds.export --repoint DIR``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
from safetensors.torch import load_file, save_file

from mlip_ds.checkpoint import replace_dir
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
    write_open_clip_layout(tmp, cfg, preprocess, final_dir=out)
    replace_dir(tmp, out)
    return out


def write_open_clip_layout(folder: Path, cfg: dict, preprocess: dict, final_dir: Path | None = None) -> None:
    """open_clip's files next to ours in ``folder`` (which will live at ``final_dir``): config,
    weights (hard link, else a copy), tokenizer files at the top."""
    folder = Path(folder)
    text_dir = str((Path(final_dir or folder).resolve()) / "text_model")
    model_cfg = json.loads(json.dumps(cfg))
    model_cfg.pop("preprocess", None)
    model_cfg["text_cfg"]["hf_model_name"] = model_cfg["text_cfg"]["hf_tokenizer_name"] = text_dir
    preprocess_cfg = {"size": preprocess["image_size"], "mean": preprocess["mean"], "std": preprocess["std"],
                      # eval_transform: resize the short side (bilinear), centre crop
                      "interpolation": "bilinear", "resize_mode": "shortest"}
    (folder / HF_CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg},
                                                    indent=2))
    weights = folder / HF_SAFE_WEIGHTS_NAME
    if not weights.exists():
        try:
            os.link(folder / "model.safetensors", weights)
        except OSError:
            shutil.copy2(folder / "model.safetensors", weights)
    for name in TEXT_FILES:
        if name != "config.json" and (folder / "text_model" / name).exists():
            shutil.copy2(folder / "text_model" / name, folder / name)


def repoint(export_dir: str) -> Path:
    """Rewrite ``open_clip_config.json``'s text-model path after the export folder was moved."""
    folder = Path(export_dir)
    meta = read_export_config(str(folder))
    cfg = json.loads((folder / "config.json").read_text())["model_config"]
    write_open_clip_layout(folder, cfg, meta["preprocess"])
    return folder / HF_CONFIG_NAME


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


def main(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(description="mlip-ds export folders")
    parser.add_argument("--repoint", metavar="DIR", required=True,
                        help="rewrite DIR/open_clip_config.json for the folder's current location (after a move)")
    args = parser.parse_args(argv)
    print(repoint(args.repoint))


if __name__ == "__main__":
    main()
