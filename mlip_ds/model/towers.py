"""Build the open_clip two-tower model (vision tower + HF BERT-style text tower) from a named config.

Model configs are small JSON files in ``mlip_ds/model/configs/`` (open_clip's registry idea): adding
a model size is adding a JSON. ``builtin:NAME`` in a text config points at a folder in
``mlip_ds/model/text_models/`` (configs and a WordPiece vocabulary shipped with the package), so
nothing is ever downloaded.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import open_clip
import torch
from open_clip.hf_model import ClsPooler, HFTextEncoder
from open_clip.tokenizer import HFTokenizer

CONFIG_DIR = Path(__file__).parent / "configs"
TEXT_MODEL_DIR = Path(__file__).parent / "text_models"


def available_models() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_path(name: str) -> str:
    """``builtin:tiny_bert`` -> the packaged folder; anything else must be an existing local folder."""
    if name.startswith("builtin:"):
        path = TEXT_MODEL_DIR / name[len("builtin:"):]
    else:
        path = Path(name).expanduser()
    if not path.is_dir() or not (path / "config.json").exists():
        raise FileNotFoundError(
            f"text model '{name}' is not a local folder with a config.json ({path}); pass "
            "--text-model DIR pointing at a Hugging Face model folder (nothing is downloaded)")
    return str(path.resolve())


def load_model_config(name: str, text_model: str | None = None, tokenizer: str | None = None) -> dict:
    """Read a named config (or a path to a JSON) and resolve its text model paths to absolute folders."""
    path = Path(name) if name.endswith(".json") else CONFIG_DIR / f"{name}.json"
    if not path.exists():
        raise ValueError(f"unknown model '{name}': choose one of {available_models()} or pass a path to a JSON config")
    cfg = json.loads(path.read_text())
    cfg.pop("description", None)
    text_cfg = cfg["text_cfg"]
    if text_model:
        text_cfg["hf_model_name"] = text_model
        text_cfg["hf_tokenizer_name"] = tokenizer or text_model
    elif tokenizer:
        text_cfg["hf_tokenizer_name"] = tokenizer
    text_cfg["hf_model_name"] = resolve_path(text_cfg["hf_model_name"])
    text_cfg["hf_tokenizer_name"] = resolve_path(text_cfg["hf_tokenizer_name"])
    cfg.setdefault("preprocess", {}).setdefault("image_size", cfg["vision_cfg"]["image_size"])
    return cfg


def build_model(model_cfg: dict, pretrained_text: bool = False, pretrained_image: str | None = None,
                init_temperature: float = 0.07, init_from: str | None = None,
                zero3_config: dict | None = None) -> open_clip.CustomTextCLIP:
    """Instantiate the two-tower model. ``init_from`` (an open_clip folder or checkpoint file, see
    ``warm_start``) then loads both towers and the temperature, strictly.

    ``nonscalar_logit_scale`` gives logit_scale the shape [1]: DeepSpeed 0.19.8 rejects 0-dim
    parameters in ``initialize`` (stack notes), and the losses broadcast a [1] scale fine.

    ``zero3_config`` (a resolved ZeRO stage-3 DeepSpeed config; torch.distributed initialised): build
    under ``deepspeed.zero.Init``, so each rank only ever holds its partition of each parameter
    (see ``build_partitioned``).
    """
    if zero3_config is not None:
        return build_partitioned(model_cfg, zero3_config, pretrained_text, pretrained_image, init_temperature,
                                 init_from)
    model = _construct(model_cfg, pretrained_text, init_temperature)
    if pretrained_image:
        load_image_weights(model, pretrained_image)
    if init_from:
        from mlip_ds.model.warm_start import load_init_weights
        load_init_weights(model, init_from)
    return model


def _construct(model_cfg: dict, pretrained_text: bool, init_temperature: float) -> open_clip.CustomTextCLIP:
    cfg = copy.deepcopy(model_cfg)
    cfg.pop("preprocess", None)
    for key in ("custom_text", "nonscalar_logit_scale", "init_logit_scale"):  # ours, or not CustomTextCLIP's
        cfg.pop(key, None)
    text_cfg = dict(cfg.pop("text_cfg"))
    text_cfg["hf_model_pretrained"] = pretrained_text
    import math
    model = open_clip.CustomTextCLIP(
        embed_dim=cfg.pop("embed_dim"), vision_cfg=cfg.pop("vision_cfg"), text_cfg=text_cfg,
        init_logit_scale=math.log(1.0 / init_temperature), nonscalar_logit_scale=True, **cfg)
    if type(model.text) is HFTextEncoder:
        # Same parameters and names (checkpoints and exports unchanged), another forward.
        model.text.__class__ = SyncFreeHFTextEncoder
    return model


def build_partitioned(model_cfg: dict, ds_config: dict, pretrained_text: bool = False,
                      pretrained_image: str | None = None, init_temperature: float = 0.07,
                      init_from: str | None = None) -> open_clip.CustomTextCLIP:
    """ZeRO-3: build under ``deepspeed.zero.Init``: each parameter is split over the ranks as soon as
    the module that owns it is built, so no rank ever holds the whole model (at most one module's
    parameters at a time). The weights are the same, to the bit, as ``build_model`` without
    ``zero3_config`` on the same seed, and every rank's generator ends in the same state
    (tests/test_zero_init.py).

    ``zero.Init`` partitions a module's parameters when that module's ``__init__`` returns, so an init
    that a parent runs on its children's parameters would see empty tensors. Three such inits are on
    this path; each runs with those parameters gathered (``GatheredParameters(modifier_rank=0)``), on
    every rank, so all generators draw the same numbers:

    - Hugging Face's weight init (``post_init`` -> ``initialize_weights``: transformers 5's
      ``BertPreTrainedModel._init_weights`` indexes ``word_embeddings.weight[padding_idx]`` and fails
      on a partitioned embedding). Walked in transformers' own order (its ``smart_apply``), one
      module's parameters gathered at a time. transformers' ``initialize_weights_zero3`` (used by its
      ``HfDeepSpeedConfig`` route) draws on rank 0 only and runs under ``no_init_weights`` (no torch
      default init): the weights would differ from a plain build and the ranks' generators (dropout)
      would diverge, so it is not used.
    - ``nn.MultiheadAttention._reset_parameters`` (zeroes ``out_proj.bias``; the ViT blocks).
    - open_clip's ``ModifiedResNet.init_parameters`` (the ResNet tower: attention-pool weights, bn3).

    On glibc the construction also mmaps large allocations (``_large_allocations_unmapped``): else
    the freed whole tensors stay in the process and the peak exceeds one full copy.

    ``mem_efficient_linear=False``: DeepSpeed's default swaps ``F.linear`` for its own function for the
    rest of the process; the forward stays the one stages 0-2 run. Weights loaded afterwards
    (``pretrained_image``, ``init_from``) are loaded with the tower gathered (a full copy of it on each
    rank while loading; the file is read whole anyway). ``pretrained_text``: transformers' own ZeRO-3 route
    (``HfDeepSpeedConfig`` held while building: ``from_pretrained`` builds under ``zero.Init`` and loads
    the folder's weights into the partitions; without it, it would load into the empty tensors).
    """
    import deepspeed

    hf_zero3 = None
    if pretrained_text:  # transformers' ZeRO-3 loading: built empty, the folder's weights copied into the partitions
        from transformers.integrations import HfDeepSpeedConfig
        hf_zero3 = HfDeepSpeedConfig(ds_config)  # is_deepspeed_zero3_enabled() while it lives
    try:
        with _large_allocations_unmapped(), \
                deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False), \
                _gathered_inits(hf=not pretrained_text):
            model = _construct(model_cfg, pretrained_text, init_temperature)
    finally:
        del hf_zero3
    if pretrained_image:
        with deepspeed.zero.GatheredParameters(list(model.visual.parameters()), modifier_rank=0):
            load_image_weights(model, pretrained_image)
    if init_from:
        from mlip_ds.model.warm_start import load_init_weights
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            load_init_weights(model, init_from)
    return model


@contextlib.contextmanager
def _large_allocations_unmapped(threshold: int = 1 << 20, after: int = 32 << 20):
    """glibc: while building, allocations of ``threshold`` bytes or more are mmapped, so the whole
    tensor that each parameter starts as goes back to the OS when ``zero.Init`` keeps only its
    partition. With glibc's default (the mmap threshold rises to the largest block freed, up to
    32 MiB) those frees stay in the heap, and on 2 ranks the construction peak was above one full fp32
    copy of the model (benchmarks/bench_zero_memory.py: 458 MiB for a 336 MiB model; 197 MiB with
    this). Afterwards the mmap threshold is left at 32 MiB and the trim threshold at 64 MiB, where
    glibc's own adjustment would settle (setting them turns the adjustment off). Elsewhere than glibc:
    nothing."""
    import ctypes
    import ctypes.util
    mallopt = None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        pass
    m_trim_threshold, m_mmap_threshold = -1, -3
    if mallopt is not None:
        mallopt(m_mmap_threshold, threshold)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(m_mmap_threshold, after)
            mallopt(m_trim_threshold, 2 * after)


@contextlib.contextmanager
def _gathered_inits(hf: bool = True):
    """While building under ``zero.Init``: the parent-on-child inits run on gathered parameters (the
    Hugging Face one too unless ``hf`` is false: transformers then builds and loads under its own route)."""
    import deepspeed
    from open_clip.modified_resnet import ModifiedResNet
    from transformers import PreTrainedModel

    def gathered(method):
        def run(self, *args, **kwargs):
            with deepspeed.zero.GatheredParameters(list(self.parameters()), modifier_rank=0):
                return method(self, *args, **kwargs)
        return run

    @torch.no_grad()
    def hf_initialize_weights(self):
        # transformers' smart_apply: children first, each sub-model with its own _initialize_weights.
        def visit(module, fn):
            for child in module.children():
                visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else fn)
            params = list(module.parameters(recurse=False))  # _init_weights may touch a child's too
            params += [p for c in module.children() if not isinstance(c, PreTrainedModel)
                       for p in c.parameters(recurse=False)]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                fn(module)
        visit(self, self._initialize_weights)

    patches = [(torch.nn.MultiheadAttention, "_reset_parameters",
                gathered(torch.nn.MultiheadAttention._reset_parameters)),
               (ModifiedResNet, "init_parameters", gathered(ModifiedResNet.init_parameters)),
               (PreTrainedModel, "initialize_weights", hf_initialize_weights)][:3 if hf else 2]
    saved = [(cls, name, cls.__dict__[name]) for cls, name, _ in patches]
    try:
        for cls, name, fn in patches:
            setattr(cls, name, fn)
        yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


class SyncFreeHFTextEncoder(HFTextEncoder):
    """open_clip's Hugging Face text tower with a forward that never makes the host wait for the GPU.

    Written by hand because neither library offers it: open_clip's forward passes a 2-D padding mask,
    and transformers 5 then calls ``mask.all()`` to see whether SDPA may skip the mask (a device ->
    host read); its token output indexes the GPU tensor with a CPU boolean mask (a blocking
    host -> device copy). Each is a full device sync, several times per MLIP step (report, concepts,
    swapped reports, EMA tower). Here the mask goes in 4-D, as SDPA takes it (transformers passes
    a 4-D mask through untouched), and the CLS token is cut out by slicing. The outputs are the
    same (tests/test_towers.py).
    """

    def forward(self, x: torch.Tensor):
        keep = x != self.config.pad_token_id
        mask = keep.long()
        sdpa = getattr(self.transformer.config, "_attn_implementation", None) == "sdpa"
        out = self.transformer(input_ids=x, attention_mask=keep[:, None, None, :] if sdpa else mask)
        projected = self.proj(self.pooler(out, mask))
        if not self.output_tokens:
            return projected
        hidden = out.last_hidden_state
        if type(self.pooler) is ClsPooler:  # word tokens only: the CLS token is the pooled output
            p = self.pooler.cls_token_position
            hidden = torch.cat([hidden[:, :p], hidden[:, p + 1:]], dim=1)
        return projected, hidden


def load_image_weights(model: torch.nn.Module, path: str) -> None:
    """Load vision-tower weights from a local file: an open_clip checkpoint (``visual.*`` keys) or a
    bare tower state dict, as safetensors or a weights-only torch file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--pretrained-image {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    missing, unexpected = model.visual.load_state_dict(state, strict=False)
    if unexpected or len(missing) == len(list(model.visual.state_dict())):
        raise ValueError(f"{path} does not match the vision tower: missing {missing[:5]}, unexpected {unexpected[:5]}")


def build_tokenizer(model_cfg: dict) -> HFTokenizer:
    """open_clip's HF tokenizer wrapper (pads/truncates to the context length; returns input ids)."""
    text_cfg = model_cfg["text_cfg"]
    return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 77))
