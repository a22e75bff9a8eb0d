"""Warm start both towers from a local checkpoint; nothing is downloaded.

``--init-from PATH`` takes
  * an open_clip folder, the layout open_clip's ``push_to_hf_hub.save_for_hf`` writes and
    ``create_model("local-dir:PATH")`` reads: ``open_clip_config.json`` (``model_cfg`` +
    ``preprocess_cfg``) and ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``.
    The architecture comes from its ``model_cfg`` (``--model`` is not used); mlip-ds exports are
    such folders too;
  * an open_clip checkpoint file (``.pt``/``.bin``/``.safetensors``; a training checkpoint's
    ``state_dict`` with or without the ``module.`` prefix) with the architecture named by ``--model``.

The text tower is a Hugging Face model: its config comes from a local folder (``--text-model DIR``,
else the ``hf_model_name`` of the config when that is a local folder, relative to the checkpoint
folder or absolute). Hub ids (``microsoft/...``) are not fetched: pass ``--text-model``.
Loading is strict: a checkpoint that does not fit the model raises ``WarmStartError`` naming the
missing, unexpected and differently shaped keys.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.factory import load_state_dict as open_clip_load_state_dict

from mlip_ds.data.transforms import CLIP_MEAN, CLIP_STD

WEIGHT_NAMES = (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)  # open_clip_model.safetensors, open_clip_pytorch_model.bin
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# open_clip config keys that our build passes itself or that are not CustomTextCLIP arguments.
DROPPED_KEYS = ("custom_text", "nonscalar_logit_scale", "init_logit_scale")


class WarmStartError(ValueError):
    """A checkpoint that cannot initialise this model; the message says which keys and what to do."""


def is_open_clip_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / HF_CONFIG_NAME).is_file()


def model_config(model: str, text_model: str | None = None, tokenizer: str | None = None,
                 init_from: str | None = None) -> dict:
    """The run's model config: from ``init_from``'s ``open_clip_config.json`` when it is an open_clip
    folder, else the named ``model`` config (``towers.load_model_config``)."""
    from mlip_ds.model.towers import load_model_config
    if init_from:
        if is_open_clip_folder(init_from):
            return folder_model_config(init_from, text_model, tokenizer)
        if Path(init_from).is_dir():
            raise FileNotFoundError(f"--init-from {init_from}: a folder without {HF_CONFIG_NAME} (open_clip's layout: "
                                    f"{HF_CONFIG_NAME} + {' or '.join(WEIGHT_NAMES)}); for a checkpoint file pass "
                                    "the file and name its architecture with --model")
        if not Path(init_from).is_file():
            raise FileNotFoundError(f"--init-from {init_from} does not exist")
    return load_model_config(model, text_model, tokenizer)


def _text_folder(folder: Path, name: str, what: str, need: tuple[str, ...]) -> str:
    """A local folder for ``name`` from the config: absolute, relative to the checkpoint folder, or
    (an export that was moved) the folder's own ``text_model/``."""
    candidates = [Path(name).expanduser()] if Path(name).expanduser().is_absolute() else [folder / name]
    candidates.append(folder / "text_model")
    for c in candidates:
        if c.is_dir() and any((c / f).exists() for f in need):
            return str(c.resolve())
    raise WarmStartError(
        f"the text {what} '{name}' named in {folder / HF_CONFIG_NAME} is not a local folder (a Hugging Face hub "
        f"id?); nothing is downloaded: pass --text-model DIR (a folder with the model's config.json"
        + (", and its weights are not needed: --init-from holds them)" if what == "model" else
           ") and --tokenizer DIR (tokenizer files)"))


def folder_model_config(folder: str | os.PathLike, text_model: str | None = None,
                        tokenizer: str | None = None) -> dict:
    """Our model config (``towers.load_model_config``'s form) from an open_clip folder."""
    folder = Path(folder).resolve()
    meta = json.loads((folder / HF_CONFIG_NAME).read_text())
    if "model_cfg" not in meta:
        raise WarmStartError(f"{folder / HF_CONFIG_NAME} has no 'model_cfg' (open_clip's layout)")
    cfg = copy.deepcopy(meta["model_cfg"])
    for key in DROPPED_KEYS:
        cfg.pop(key, None)
    text_cfg = cfg.get("text_cfg", {})
    if "hf_model_name" not in text_cfg:
        raise WarmStartError(f"{folder}: its text tower is open_clip's own transformer (no text_cfg.hf_model_name); "
                             "mlip-ds trains a Hugging Face text tower (BERT-style)")
    from mlip_ds.model.towers import resolve_path
    text_cfg["hf_model_name"] = (resolve_path(text_model) if text_model
                                 else _text_folder(folder, text_cfg["hf_model_name"], "model", ("config.json",)))
    if tokenizer:
        text_cfg["hf_tokenizer_name"] = str(Path(tokenizer).resolve())
    elif text_model:
        text_cfg["hf_tokenizer_name"] = text_cfg["hf_model_name"]
    elif any((folder / f).exists() for f in TOKENIZER_FILES):
        text_cfg["hf_tokenizer_name"] = str(folder)  # where open_clip's get_tokenizer("local-dir:") looks
    else:
        text_cfg["hf_tokenizer_name"] = _text_folder(folder, text_cfg.get("hf_tokenizer_name", ""), "tokenizer",
                                                     TOKENIZER_FILES)
    pp = meta.get("preprocess_cfg", {})
    size = pp.get("size", cfg["vision_cfg"].get("image_size"))
    cfg["preprocess"] = {"image_size": size[0] if isinstance(size, (list, tuple)) else size,
                         "mean": list(pp.get("mean", CLIP_MEAN)), "std": list(pp.get("std", CLIP_STD))}
    return cfg


def weights_file(path: str | os.PathLike) -> Path:
    """The weights of ``--init-from``: the file itself, or open_clip's file in a folder."""
    path = Path(path)
    if path.is_file():
        return path
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return path / name
    have = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise WarmStartError(f"--init-from {path}: no weights ({' or '.join(WEIGHT_NAMES)}); the folder holds {have}")


def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint (open_clip's reader: safetensors or a weights-only torch file,
    ``state_dict`` key and ``module.`` prefix handled)."""
    return open_clip_load_state_dict(str(weights_file(path)), device="cpu", weights_only=True)


def load_init_weights(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every tensor of ``model`` (both towers and the temperature) from ``path``; strict.

    The 0-dim / [1] temperature (open_clip vs. our DeepSpeed-safe shape) is reshaped, and the text
    ``position_ids`` buffer that older transformers saved is ignored. Returns the state loaded."""
    file = weights_file(path)
    state = dict(read_state(file))
    expected = model.state_dict()
    for key in ("logit_scale", "logit_bias"):
        if key in state and key in expected and state[key].numel() == expected[key].numel():
            state[key] = state[key].reshape(expected[key].shape)
    for key in [k for k in state if k.endswith("embeddings.position_ids") and k not in expected]:
        del state[key]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} (checkpoint {list(state[k].shape)}, model {list(expected[k].shape)})"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing from the checkpoint: {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (not in the model): {unexpected[:8]}"
                         + (" ..." if len(unexpected) > 8 else ""))
        if shapes:
            parts.append(f"{len(shapes)} with another shape: " + "; ".join(shapes[:8]) + (" ..." if len(shapes) > 8 else ""))
        hint = ""
        if state and all(k.startswith("visual.") for k in state):
            hint = " It holds the vision tower only: use --pretrained-image FILE for that."
        elif shapes or missing:
            hint = (" Name the checkpoint's architecture with --model (a file) or check its open_clip_config.json "
                    "(a folder), and --text-model for the text tower's config.")
        raise WarmStartError(f"--init-from {file} does not match the model: " + "; ".join(parts) + "." + hint)
    model.load_state_dict(state, strict=True)
    return state
