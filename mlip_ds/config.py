"""The run configuration: one dataclass tree, turned into command-line flags.

Every field is a flag (``--train-shards``, ``--batch-size`` ...); DeepSpeed's JSON config keeps its
own keys, and the ones set to "auto" there are filled from these values (see ``ds_config.py``).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from mlip_ds.losses.objective import TERMS, ObjectiveConfig


@dataclass
class DataConfig:
    train_shards: str = field(default="", metadata={"help": "shard dir, brace pattern or glob (required)"})
    samples_per_epoch: int = field(default=0, metadata={"min": 0, "help": "samples per epoch over all ranks (0: the manifest's count)"})
    batch_size: int = field(default=32, metadata={"min": 1, "help": "micro-batch per rank"})
    workers: int = field(default=2, metadata={"min": 0, "help": "data-loader worker processes per rank"})
    loader_timeout: float = field(default=600.0, metadata={"min": 0, "help":
        "seconds a loader worker may take for one batch; past it the epoch's loader is rebuilt at the same "
        "position (a worker hung at its start: CPython < 3.11.8, gh-112275). 0: wait for ever"})
    shuffle_buffer: int = field(default=1000, metadata={"min": 0, "help": "samples in the shuffle buffer"})
    data_mode: str = field(default="resampled", metadata={
        "help": "'resampled': each rank/worker draws shards with replacement; 'split': disjoint shards per rank and worker"})
    intensity_jitter: float = field(default=0.0, metadata={"min": 0, "help":
        "brightness and contrast jitter of the training images (0: none, the default: gray levels are "
        "signal in a radiograph; 0.2 measured worse, docs/ablation.md)"})
    text_word_dropout: float = field(default=0.1, metadata={"min": 0, "max": 1,
        "help": "divergence view of a report: word dropout probability (negations and hedges are kept)"})
    text_sentence_shuffle: bool = field(default=True, metadata={
        "help": "divergence view of a report: shuffle the sentences within each section"})


@dataclass
class ModelConfig:
    model: str = field(default="tiny", metadata={"help": "model config name (mlip_ds/model/configs) or a JSON path"})
    text_model: str = field(default="", metadata={"help": "local Hugging Face text-model folder (overrides the config)"})
    tokenizer: str = field(default="", metadata={"help": "local tokenizer folder (default: the text model's)"})
    pretrained_text: bool = field(default=False, metadata={"help": "load the text model's weights (else random init)"})
    pretrained_image: str = field(default="", metadata={"help": "local vision-tower weights (safetensors or torch file)"})
    init_temperature: float = field(default=0.07, metadata={"gt": 0, "help": "initial softmax temperature"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing in both towers"})
    init_from: str = field(default="", metadata={
        "help": "warm start both towers and the temperature from a local open_clip folder (open_clip_config.json "
                "+ open_clip_model.safetensors or open_clip_pytorch_model.bin; its model_cfg replaces --model; an "
                "mlip-ds export is one) or an open_clip checkpoint file (architecture: --model). Strict: "
                "mismatched keys are named. Nothing is downloaded (docs/warm_start.md)"})
    freeze_image: bool = field(default=False, metadata={"help": "freeze the whole image tower (projection included)"})
    freeze_text: bool = field(default=False, metadata={"help": "freeze the whole text tower (projection included)"})
    freeze_towers_except_proj: bool = field(default=False, metadata={
        "help": "freeze both towers except their output projections (temperature and MLIP heads still train)"})
    lora_rank: int = field(default=0, metadata={"min": 0, "help": "LoRA (peft) adapters of this rank on the towers "
                                                                  "not frozen whole; their base weights freeze, "
                                                                  "projections train (0: off)"})
    lora_alpha: float = field(default=0.0, metadata={"min": 0, "help": "LoRA alpha (scale alpha/rank; 0: = rank)"})
    lora_dropout: float = field(default=0.0, metadata={"min": 0, "lt": 1, "help": "dropout on the LoRA input"})
    lora_targets: str = field(default="auto", metadata={
        "help": "comma-separated module or parameter names to adapt; auto: ViT in_proj_weight,c_fc,c_proj and "
                "BERT query,value"})


@dataclass
class OptimConfig:
    lr: float = field(default=5e-4, metadata={"gt": 0, "help": "peak learning rate (AdamW) of everything trained from scratch"})
    lr_pretrained: float = field(default=2e-5, metadata={"gt": 0,
        "help": "peak learning rate of a tower loaded with pretrained weights (--pretrained-text, "
                "--pretrained-image); the method's 2e-5 (new heads keep --lr)"})
    weight_decay: float = field(default=0.05, metadata={"min": 0, "help": "AdamW weight decay (not on norms, biases, temperature)"})
    beta1: float = field(default=0.9, metadata={"min": 0, "lt": 1})
    beta2: float = field(default=0.98, metadata={"min": 0, "lt": 1})
    eps: float = field(default=1e-6, metadata={"gt": 0})
    warmup_steps: int = field(default=10, metadata={
        "min": 1, "help": "linear warm-up steps before the cosine decay (DeepSpeed's WarmupCosineLR needs at least 1)"})
    grad_clip: float = field(default=1.0, metadata={"min": 0, "help": "gradient-norm clipping (0: off)"})
    grad_accum: int = field(default=1, metadata={"min": 1, "help": "gradient accumulation steps"})
    adam_impl: str = field(default="auto", metadata={
        "help": "AdamW kernel when the DeepSpeed config names AdamW: auto (CUDA: torch's fused; CPU: torch's "
                "foreach), torch-fused, torch, deepspeed (DeepSpeed's FusedAdam, JIT-compiled on first use)",
        "choices": ["auto", "torch-fused", "torch", "deepspeed"]})


@dataclass
class RunConfig:
    out_dir: str = field(default="runs/mlip", metadata={"help": "run folder: checkpoints/, tb/, export/"})
    epochs: int = field(default=1, metadata={"min": 1})
    save_every: int = field(default=0, metadata={"min": 0, "help": "checkpoint every N optimizer steps (0: only at the end)"})
    keep_last: int = field(default=3, metadata={"min": 0, "help": "checkpoints kept"})
    log_every: int = field(default=10, metadata={"min": 1, "help": "TensorBoard scalars every N steps"})
    resume: str = field(default="", metadata={"help": "'latest' or a checkpoint tag to resume from"})
    seed: int = 0
    max_steps: int = field(default=0, metadata={"min": 0, "help": "stop after this many optimizer steps (0: epochs decide)"})
    max_nan_steps: int = field(default=5, metadata={"min": 1, "help": "stop (with a checkpoint) after this many non-finite losses in a row"})
    deterministic: bool = field(default=False, metadata={"help": "deterministic algorithms (exact replay on CPU)"})
    nan_check: str = field(default="auto", metadata={
        "help": "how a non-finite loss is skipped: sync (the loss is checked on the host every micro-step, "
                "one all-reduce), deepspeed (DeepSpeed's own gradient-overflow check skips the optimizer "
                "step; it scans every gradient; needs fp16, or bf16 with check_grad_overflow not false), "
                "auto (deepspeed where that check runs, else sync: sync with the shipped configs)",
        "choices": ["auto", "sync", "deepspeed"]})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (DeepSpeed engine.compile)"})
    compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend for --compile"})
    sync_debug: bool = field(default=False, metadata={
        "help": "on CUDA, count the host-device syncs per optimizer step and where they happen "
                "(summary.json 'sync_audit'; logging and checkpoints left out)"})


@dataclass
class KnowledgeConfig:
    kb: str = field(default="", metadata={
        "help": "concept vocabulary: a KB JSON Lines file; '' = the packaged chest-radiograph KB; "
                "'shards' = the concepts in the training shards' entities"})
    concept_context_length: int = field(default=32, metadata={"min": 1, "help": "tokens of a concept's 'name: definition'"})
    max_mentions: int = field(default=0, metadata={"min": 0, "help": "concept mentions kept per report (0: all)"})


# --objective: which terms are on unless a --use-<term> / --false-negatives flag says otherwise.
OBJECTIVE_PRESETS = {
    "clip": {**{f"use_{t}": t == "global" for t in TERMS}, "false_negatives": "off"},
    "mlip": {**{f"use_{t}": True for t in TERMS}, "false_negatives": "drop"},
}
DEFAULT_OBJECTIVE = "clip"
PRESET_FIELDS = tuple(OBJECTIVE_PRESETS["clip"])


def objective_preset(name: str = DEFAULT_OBJECTIVE, **overrides) -> ObjectiveConfig:
    """The ObjectiveConfig of a preset ('clip': the global InfoNCE baseline; 'mlip': all six terms)."""
    if name not in OBJECTIVE_PRESETS:
        raise ValueError(f"unknown objective '{name}': choose one of {sorted(OBJECTIVE_PRESETS)}")
    return ObjectiveConfig(**{**OBJECTIVE_PRESETS[name], **overrides})


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    objective: ObjectiveConfig = field(default_factory=objective_preset)
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)


def add_dataclass_args(parser: argparse.ArgumentParser, cls, group_name: str, defaults=None,
                       preset_fields: tuple[str, ...] = ()) -> None:
    """One flag per field; ``defaults`` (an instance) gives the default values, else the class's.
    Fields in ``preset_fields`` default to None ("from the preset"), filled in ``config_from_args``."""
    group = parser.add_argument_group(group_name)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name) if defaults is not None else f.default
        if f.name in preset_fields:
            help_text = f.metadata.get("help", "") + " (default: from --objective)"
            default = None
        else:
            help_text = f.metadata.get("help", "") + f" (default: {default!r})"
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f"{group_name}.{f.name}", action=argparse.BooleanOptionalAction,
                               default=default, help=help_text)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            group.add_argument(flag, dest=f"{group_name}.{f.name}", type=typ, default=default, help=help_text,
                               choices=f.metadata.get("choices"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="MLIP pretraining with DeepSpeed: deepspeed mlip_ds/train.py --deepspeed_config "
                    "ds_configs/zero2.json --train-shards DIR ...")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "objective":
            parser.add_argument("--objective", dest="objective_preset", choices=sorted(OBJECTIVE_PRESETS),
                                default=DEFAULT_OBJECTIVE,
                                help="'clip': the global image-report InfoNCE baseline; 'mlip': all six MLIP "
                                     "terms (global, divergence, local, category, itm, swap) with the "
                                     "knowledge-category false-negative fix; --use-<term>/--no-use-<term> "
                                     f"switch single terms (default: {DEFAULT_OBJECTIVE})")
            add_dataclass_args(parser, ObjectiveConfig, "objective", ObjectiveConfig(), PRESET_FIELDS)
        else:
            add_dataclass_args(parser, f.default_factory, f.name, f.default_factory())
    return parser


RANGE_WORDS = {"min": (">=", lambda v, b: v >= b), "max": ("<=", lambda v, b: v <= b),
               "gt": (">", lambda v, b: v > b), "lt": ("<", lambda v, b: v < b)}


def range_errors(cfg: TrainConfig) -> list[str]:
    """Every numeric field outside the range in its metadata ("min"/"max" inclusive, "gt"/"lt"
    exclusive), as "--flag VALUE: must be >= 1" lines; [] when all are in range."""
    errors = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            bad = [f"{word} {f.metadata[key]}" for key, (word, ok) in RANGE_WORDS.items()
                   if key in f.metadata and not ok(value, f.metadata[key])]
            if value != value:  # NaN: in no range
                bad = bad or ["a number"]
            if bad:
                errors.append(f"--{f.name.replace('_', '-')} {value}: must be " + " and ".join(bad))
    return errors


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig()
    cfg.objective = objective_preset(getattr(args, "objective_preset", DEFAULT_OBJECTIVE))
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            if section == "objective" and name in PRESET_FIELDS and value is None:
                continue  # not given: the preset's value
            setattr(getattr(cfg, section), name, value)
    return cfg
