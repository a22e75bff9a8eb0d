"""DeepSpeed entry point: shards -> batches -> MLIP model -> objective -> optimizer step.

    deepspeed --num_gpus 2 mlip_ds/train.py --deepspeed_config ds_configs/zero2.json \
        --train-shards data/shards --out-dir runs/demo

Reads top to bottom: setup (validate inputs before DeepSpeed starts), build, resume, loop,
checkpoint, export. The objective (``--objective clip|mlip``, ``--use-<term>``) decides which parts
of ``MLIPModel`` exist; the loop asks ``mlip_ds.objective.Objective`` for everything about it (the
batch, the loss, what to do after a step), so with the CLIP preset the model and the loop are the
plain two-tower CLIP.
"""
from __future__ import annotations

import os

import torch

# DeepSpeed picks its accelerator when imported; without CUDA use its CPU accelerator (gloo).
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mlip_ds import checkpoint, recipe  # noqa: E402
from mlip_ds.config import TrainConfig, build_parser, config_from_args, range_errors  # noqa: E402
from mlip_ds.data.pipeline import (LoaderSpec, ShardPathError, StallGuard, expand_shards,  # noqa: E402
                                   fork_hang_warning, make_train_loader)
from mlip_ds.data.transforms import CLIP_MEAN, CLIP_STD  # noqa: E402
from mlip_ds.distributed import LaunchError, init_distributed, launch_world_size  # noqa: E402
from mlip_ds.ds_config import (DSConfigError, check_batch, load_ds_config, one_device_route,  # noqa: E402
                              resolve_ds_config, take_gradient_clipping)
from mlip_ds.export import export_model  # noqa: E402
from mlip_ds.model import adapters, warm_start  # noqa: E402
from mlip_ds.model.concepts import ConceptVocab  # noqa: E402
from mlip_ds.model.mlip import MLIPModel  # noqa: E402
from mlip_ds.model.towers import build_model, build_tokenizer  # noqa: E402
from mlip_ds.objective import Objective  # noqa: E402
from mlip_ds.objective.checks import ObjectiveSetupError, check_objective  # noqa: E402
from mlip_ds.sync_audit import SyncAudit  # noqa: E402

log = logging.getLogger("mlip_ds.train")
MAX_STALLS_AT_ONE_STEP = 3  # loader rebuilds in a row at one step before the run stops
# open_clip's gather uses torch.distributed.nn.all_gather, which torch 2.14 marks deprecated.
warnings.filterwarnings("ignore", message=r".*all_gather.*deprecated", category=FutureWarning)
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal with a checkpoint saved; rerun with --resume latest


class SetupError(RuntimeError):
    """A user input is wrong; raised before DeepSpeed starts, with what to fix."""


def parse_args(argv=None):
    parser = build_parser()
    parser.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if not args.deepspeed_config:
        parser.error("--deepspeed_config is required (e.g. ds_configs/zero2.json)")
    return args, config_from_args(args)


def check_inputs(cfg: TrainConfig, ds_config_path: str | None = None) -> tuple[dict, int, ConceptVocab | None]:
    """Everything a user can get wrong, checked before DeepSpeed starts."""
    bad = range_errors(cfg)  # from the "min"/"max"/"gt"/"lt" metadata of the config fields
    if bad:
        raise SetupError("out of range: " + "; ".join(bad))
    if ds_config_path:
        check_batch(load_ds_config(ds_config_path), cfg, launch_world_size())
    if not cfg.data.train_shards:
        raise SetupError("--train-shards is required: a shard folder from `python tools/make_shards.py`")
    urls = expand_shards(cfg.data.train_shards)
    try:
        # --init-from an open_clip folder: its open_clip_config.json is the architecture.
        model_cfg = warm_start.model_config(cfg.model.model, cfg.model.text_model or None, cfg.model.tokenizer or None,
                                            cfg.model.init_from or None)
    except (ValueError, FileNotFoundError) as e:
        raise SetupError(str(e)) from e
    if cfg.model.lora_rank and ds_config_path and _zero_stage(load_ds_config(ds_config_path)) >= 3:
        raise SetupError("--lora-rank with ZeRO stage 3: not supported (the adapters are merged into partitioned "
                         "weights at export); use ds_configs/zero2.json or zero2_offload.json")
    samples = cfg.data.samples_per_epoch
    if samples <= 0:
        manifest = Path(urls[0]).parent / "manifest.json"
        if not manifest.exists():
            raise SetupError("--samples-per-epoch is required when the shards have no manifest.json")
        samples = json.loads(manifest.read_text())["num_samples"]
    stage = _zero_stage(load_ds_config(ds_config_path)) if ds_config_path else 0
    try:
        return model_cfg, samples, check_objective(cfg, model_cfg, urls, stage)
    except ObjectiveSetupError as e:
        raise SetupError(str(e)) from e


def _zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def set_threads() -> None:
    """The deepspeed launcher leaves OMP_NUM_THREADS unset: N ranks x all cores oversubscribe the CPU."""
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def one_device_step(engine, grad_clip: float):
    """The one-device route (``ds_config.one_device_route``) on an initialised ``engine``: DeepSpeed's
    gradient all-reduce off (one rank: nothing to reduce), and the clip the trainer calls before
    ``engine.step()`` at an accumulation boundary: torch's ``clip_grad_norm_`` in one foreach pass,
    the same norm and scale as DeepSpeed's per-tensor loop."""
    engine.enable_backward_allreduce = False
    params = [p for p in engine.module.parameters() if p.requires_grad]

    def clip() -> None:
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    return clip


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                 pretrained: tuple[str, ...] = (), lr_pretrained: float | None = None) -> list[dict]:
    """No weight decay on gains, biases, norms and the temperature (open_clip's rule); parameters
    under the ``pretrained`` name prefixes (towers loaded with weights) get ``lr_pretrained``, the
    rest ``lr`` (None: the optimizer's). The cosine schedule scales each group's own peak. Frozen
    parameters (prototypes during their freeze) stay in their group: the set never changes."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and not name.startswith("prototypes."):
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # built under zero.Init: the full shape is ds_shape
        skip = (ndim < 2 or "bias" in name or "ln" in name or "norm" in name or "logit_scale" in name
                or name.startswith("prototypes."))
        # LoRA adapters are new weights on a pretrained tower: they take ``lr``.
        pre = bool(pretrained) and name.startswith(pretrained) and not adapters.is_adapter(name)
        groups.setdefault((pre, skip), []).append(p)
    out = []
    for (pre, skip), params in sorted(groups.items()):
        group = {"params": params, "weight_decay": 0.0 if skip else weight_decay}
        peak = lr_pretrained if pre else lr
        if peak is not None:
            group["lr"] = peak
        out.append(group)
    return out


def train(cfg: TrainConfig, ds_config_path: str, stop: "StopRequest | None" = None) -> dict:
    stop = stop or StopRequest()
    model_cfg, samples_per_epoch, vocab = check_inputs(cfg, ds_config_path)
    ds_stage = _zero_stage(load_ds_config(ds_config_path))
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    set_threads()
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    out_dir = Path(cfg.run.out_dir)
    ckpt_dir = out_dir / "checkpoints"

    accum = cfg.optim.grad_accum
    micro_per_epoch = samples_per_epoch // (cfg.data.batch_size * world)
    micro_per_epoch -= micro_per_epoch % accum
    if micro_per_epoch == 0:
        raise SetupError(f"--samples-per-epoch {samples_per_epoch} is smaller than one global batch "
                         f"({cfg.data.batch_size} x {world} ranks x {accum} accumulation)")
    steps_per_epoch = micro_per_epoch // accum
    total_steps = steps_per_epoch * cfg.run.epochs
    if cfg.run.max_steps:
        total_steps = min(total_steps, cfg.run.max_steps)
    # Fractions of the run -> steps, K from the global batch; printed once with what is known to hurt.
    samples_per_step = cfg.data.batch_size * world * accum
    cfg = recipe.resolve(cfg, total_steps, samples_per_step)
    if rank == 0:
        for line in recipe.describe(cfg, total_steps, samples_per_step):
            log.info("recipe: %s", line)
        for line in recipe.warnings_for(cfg, total_steps, samples_per_step):
            log.warning("recipe: %s", line)

    bf16_ok = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None
    ds_config = resolve_ds_config(load_ds_config(ds_config_path), cfg, world, total_steps, bf16_ok)
    try:
        # ZeRO-3: built under deepspeed.zero.Init, each rank holds only its partition (same weights).
        clip = build_model(model_cfg, pretrained_text=cfg.model.pretrained_text,
                           pretrained_image=cfg.model.pretrained_image or None,
                           init_temperature=cfg.model.init_temperature, init_from=cfg.model.init_from or None,
                           zero3_config=ds_config if ds_stage == 3 else None)
        choice = adapters.TrainChoice.from_model_config(cfg.model)  # freeze / LoRA, before the optimizer
        if choice.active():
            counts = adapters.apply(clip, choice)
            if rank == 0:
                log.info("trainable parameters: %s", ", ".join(
                    f"{k} {v['trainable']:,}/{v['total']:,}" for k, v in counts.items() if v["total"]))
    except (warm_start.WarmStartError, adapters.TrainChoiceError) as e:
        raise SetupError(str(e)) from e
    if cfg.model.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    tokenizer = build_tokenizer(model_cfg)
    # The MLIP parts that the objective switches on (none with --objective clip); EMA copies are
    # made here, before deepspeed.initialize, and live in the engine's module (saved with it).
    model = MLIPModel(clip, cfg.objective, num_concepts=len(vocab) if vocab else 0,
                      num_categories=len(vocab.categories) if vocab else 0,
                      special_ids=tuple(tokenizer.tokenizer.all_special_ids))

    nan_check = resolve_nan_check(cfg.run.nan_check, ds_config)
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.lr, recipe.pretrained_towers(cfg),
                          cfg.optim.lr_pretrained)
    one_device = one_device_route(ds_config, world)
    if rank == 0 and world == 1 and ds_stage in (1, 2):
        log.warning("one rank with ZeRO-%d: nothing to shard, and DeepSpeed's per-parameter bookkeeping "
                    "doubles the host work per step; --deepspeed_config ds_configs/one_gpu.json takes the "
                    "one-device route (docs/benchmarks.md, section 7)", ds_stage)
    if rank == 0 and (hang := fork_hang_warning(cfg.data.workers, world)):
        log.warning("%s", hang)
    grad_clip = take_gradient_clipping(ds_config) if one_device else 0.0
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, model_parameters=groups)
    clip_grads = one_device_step(engine, grad_clip) if one_device else None
    device = engine.device
    if cfg.run.compile:  # in place: parameter names (checkpoints, export) stay the same
        engine.compile(backend=cfg.run.compile_backend)
    # Flags the host already knows (a stop signal) are reduced over gloo: over NCCL, reading the
    # result back would be a device sync every micro-step.
    host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" and nan_check != "sync" else None
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    module = engine.module
    objective = Objective(cfg.objective, module, tokenizer, vocab, cfg.knowledge, dtype, ds_stage)
    run_info = {"objective": cfg.objective.__dict__, "concepts": vocab.fingerprint() if vocab else None}

    streams = max(1, cfg.data.workers)
    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "samples_seen": 0, "nan_skipped": 0,
             "skipped_before_epoch": 0, "streams": streams}
    rank_state = {"positions": [0] * streams, "skipped": [0] * streams}
    signature = checkpoint.run_signature(module, {**model_cfg, "trainable": choice.as_dict()} if choice.active()
                                         else model_cfg, cfg.objective.__dict__, run_info["concepts"], world,
                                         ds_stage)
    if cfg.run.resume:
        try:
            loaded = checkpoint.resume(engine, ckpt_dir, cfg.run.resume, signature)
        except checkpoint.CheckpointError as e:
            raise SetupError(str(e)) from e
        except RuntimeError as e:
            raise SetupError(f"could not load the checkpoint in {ckpt_dir} into this model: was it saved with "
                             f"another objective (--objective/--use-<term>), model or concept vocabulary (--kb)? "
                             f"({str(e)[:400]})") from e
        if loaded:
            client_state, saved_rank_state = loaded
            if client_state.get("concepts", run_info["concepts"]) != run_info["concepts"]:
                raise SetupError("the checkpoint was trained with another concept vocabulary (--kb): resume with "
                                 "the same KB file")
            state.update({k: client_state[k] for k in state if k in client_state})
            rank_state.update({k: saved_rank_state[k] for k in rank_state if k in saved_rank_state})
            if state["streams"] != streams:
                log.warning("--workers changed from %s to %s: the rest of this epoch draws a new stream "
                            "(exact data replay needs the same --workers)", state["streams"], streams)
                state.update(epoch=state["epoch"], streams=streams)
                rank_state = {"positions": [0] * streams, "skipped": [0] * streams}

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        out_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(out_dir / "tb"))
        (out_dir / "train_config.json").write_text(json.dumps(
            {"cfg": _asdict(cfg), "deepspeed": ds_config, "world_size": world}, indent=2, default=str))

    image_size = model_cfg["preprocess"]["image_size"]
    mean = tuple(model_cfg["preprocess"].get("mean", CLIP_MEAN))
    std = tuple(model_cfg["preprocess"].get("std", CLIP_STD))
    progress = tqdm(total=total_steps, initial=state["step"], desc="train", disable=rank != 0, dynamic_ncols=True)
    global_batch = cfg.data.batch_size * world
    last_loss = float("nan")
    window = {"t0": time.time(), "wait": 0.0, "samples": 0}
    nan_in_a_row = 0
    injected_nan = _injected_nan_steps()

    def save_checkpoint():
        checkpoint.save(engine, ckpt_dir, state["step"], {**state, **run_info}, dict(rank_state), cfg.run.keep_last,
                        signature)

    loader_restarts, stalled_at, stalls_here = 0, -1, 0
    sync_audit = SyncAudit(cfg.run.sync_debug and torch.device(device).type == "cuda")
    while state["step"] < total_steps and state["epoch"] < cfg.run.epochs:
        spec = LoaderSpec(cfg.data.train_shards, cfg.data.batch_size, micro_per_epoch - state["micro_in_epoch"],
                          image_size, mean, std, cfg.data.workers, cfg.data.shuffle_buffer, cfg.run.seed,
                          cfg.data.data_mode, text_word_dropout=cfg.data.text_word_dropout,
                          text_sentence_shuffle=cfg.data.text_sentence_shuffle, timeout=cfg.data.loader_timeout,
                          intensity_jitter=cfg.data.intensity_jitter, **objective.loader_options())
        loader = StallGuard(make_train_loader(spec, tokenizer, epoch=state["epoch"],
                                              start_batch=state["micro_in_epoch"],
                                              resume_positions=rank_state["positions"]))
        t_wait = time.time()
        for batch in loader:
            window["wait"] += time.time() - t_wait
            sid = int(batch["stream"][-1])
            rank_state["positions"][sid] = int(batch["pos"][-1])
            rank_state["skipped"][sid] = int(batch["skipped"][-1])
            state["micro_in_epoch"] += 1
            state["samples_seen"] += global_batch
            window["samples"] += global_batch

            objective.before_step(state["step"])
            inputs = objective.prepare_batch(batch, device, dtype)
            out = engine(**inputs, active=objective.active(state["step"]))  # a delayed term is not computed
            loss, named = objective.loss(out, inputs, state["step"])
            if state["samples_seen"] // global_batch in injected_nan:
                loss = loss * float("nan")
            if nan_check == "sync":
                # Both flags are built on the device (the stop flag by a fill, no host-to-device copy),
                # reduced in one all-reduce and read with one ``tolist()``: the one host sync per
                # micro-step. Every rank agrees to skip a non-finite micro-step, so none waits in a
                # collective the others skipped. Exact, and free on CPU.
                bad = (~torch.isfinite(loss.detach())).to(torch.float32)
                flags = torch.stack([bad, bad.new_full((), float(stop.requested))])
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                skip, stop_now = (v > 0 for v in flags.tolist())
            else:
                # DeepSpeed's gradient-overflow check (bf16/fp16) drops the whole optimizer step on
                # every rank; here only the objective's own state is guarded, on the device. The stop
                # flag goes over gloo: no device sync.
                flag = torch.tensor([float(stop.requested)])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=host_group)
                skip, stop_now = False, bool(flag[0] > 0)
                objective.discard_if_non_finite(loss)
            if skip:
                objective.discard()  # the skipped step leaves no trace in the objective's state
                nan_in_a_row = _count_nan_step(state, nan_in_a_row, cfg, save_checkpoint, ckpt_dir)
            else:
                boundary = engine.is_gradient_accumulation_boundary()
                engine.backward(loss)
                if boundary and clip_grads is not None:
                    clip_grads()
                engine.step()
                if boundary and nan_check == "deepspeed" and getattr(engine.optimizer, "overflow", False):
                    nan_in_a_row = _count_nan_step(state, nan_in_a_row, cfg, save_checkpoint, ckpt_dir)
                elif boundary:
                    nan_in_a_row = 0
                    state["step"] += 1
                    objective.after_step(state["step"], total_steps)
                    sync_audit.after_step(state["step"])
                    progress.update(1)
                    if state["step"] % cfg.run.log_every == 0 or state["step"] == total_steps:
                        with sync_audit.paused():
                            terms, skipped = _reduce_for_log(named, rank_state["skipped"])
                            last_loss = terms["loss/total"]
                            _log(writer, state, skipped, window, terms, engine, out["logit_scale"], progress,
                                 out_dir)
                    if cfg.run.save_every and state["step"] % cfg.run.save_every == 0:
                        with sync_audit.paused():
                            save_checkpoint()
                elif nan_check == "sync":
                    nan_in_a_row = 0
            if stop_now and state["micro_in_epoch"] % accum == 0:
                save_checkpoint()
                raise Interrupted(f"stopped by {stop.signal_name or 'another rank (a signal there)'} at step "
                                  f"{state['step']}: checkpoint saved, "
                                  "resume with --resume latest")
            if state["step"] >= total_steps:
                break
            t_wait = time.time()
        else:
            if loader.stalled:  # rebuilt at the same positions: the same batches follow
                loader_restarts += 1
                stalls_here = stalls_here + 1 if stalled_at == state["step"] else 1
                stalled_at = state["step"]
                if stalls_here > MAX_STALLS_AT_ONE_STEP:  # not a hung fork: the data itself is this slow
                    # No save here: a checkpoint is collective and the other ranks wait in the step.
                    raise RuntimeError(f"rank {rank}: the data loader stalled {stalls_here} times at step "
                                       f"{state['step']} ({loader.stalled}): check the shards' storage, or raise "
                                       "--loader-timeout; resume from the last checkpoint with --resume latest")
                log.warning("rank %d: %s; rebuilding the loader at step %d (restart %d)", rank, loader.stalled,
                            state["step"], loader_restarts)
                continue
            state["epoch"] += 1
            state["micro_in_epoch"] = 0
            state["skipped_before_epoch"] += sum(_all_ranks_sum(rank_state["skipped"], device))
            rank_state.update(positions=[0] * streams, skipped=[0] * streams)
            continue
        break
    progress.close()
    sync_report = sync_audit.close()

    if not (cfg.run.save_every and state["step"] % cfg.run.save_every == 0):
        save_checkpoint()
    export_dir = out_dir / "export"
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None,
                                           enabled=ds_stage == 3):
        if rank == 0:
            if adapters.has_adapters(module):  # training is over: fold LoRA into the base weights
                adapters.merge_adapters_(module)
            export_model(module.clip_model(), model_cfg, str(export_dir),
                         info={"step": state["step"], "samples_seen": state["samples_seen"],
                               "objective": cfg.objective.__dict__})
            objective.export(export_dir)
    summary = {"step": state["step"], "samples_seen": state["samples_seen"], "loss": last_loss,
               "nan_skipped": state["nan_skipped"], "export": str(export_dir), "world_size": world,
               "precision": ("bf16" if dtype == torch.bfloat16 else
                             "bf16 autocast" if ds_config.get("torch_autocast", {}).get("enabled") else "fp32"),
               "one_device_route": one_device,
               "loader_restarts": int(sum(_all_ranks_sum([loader_restarts], device))),
               "peak_device_memory_gb": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else None,
               "sync_audit": sync_report}
    if writer:
        writer.close()
        checkpoint.atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
        print(f"done: {summary}", flush=True)
    dist.barrier()
    return summary


class NonFiniteLossError(RuntimeError):
    pass


class Interrupted(RuntimeError):
    """SIGTERM / SIGUSR1 (preemption, time limit): a checkpoint was saved; the job can be requeued."""


class StopRequest:
    """Records SIGTERM / SIGUSR1; the loop checkpoints and stops at the next step on every rank."""

    def __init__(self):
        self.requested, self.signal_name = False, ""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested, self.signal_name = True, signal.Signals(signum).name


def resolve_nan_check(mode: str, ds_config: dict) -> str:
    """``--nan-check auto``: DeepSpeed's overflow check where it runs anyway (bf16 with its default
    ``check_grad_overflow``, fp16), else the host check."""
    bf16, fp16 = ds_config.get("bf16", {}), ds_config.get("fp16", {})
    ds_checks = (bf16.get("enabled") is True and bf16.get("check_grad_overflow", True)) or fp16.get("enabled") is True
    if mode == "auto":
        return "deepspeed" if ds_checks else "sync"
    if mode == "deepspeed" and not ds_checks:
        raise SetupError("--nan-check deepspeed needs DeepSpeed's overflow check: bf16 (check_grad_overflow "
                         "not false) or fp16 enabled in the DeepSpeed config; use --nan-check sync")
    return mode


def _count_nan_step(state: dict, nan_in_a_row: int, cfg: TrainConfig, save_checkpoint, ckpt_dir) -> int:
    """A skipped (non-finite) step: counted; too many in a row stop the run with a checkpoint."""
    state["nan_skipped"] += 1
    nan_in_a_row += 1
    log.warning("non-finite loss at step %d: step skipped on every rank (%d in a row)", state["step"] + 1,
                nan_in_a_row)
    if nan_in_a_row >= cfg.run.max_nan_steps:
        save_checkpoint()
        raise NonFiniteLossError(
            f"{nan_in_a_row} non-finite losses in a row at step {state['step'] + 1}; checkpoint saved at "
            f"{ckpt_dir / checkpoint.tag_for(state['step'])}. Lower --lr, check the data, or resume with "
            "--resume latest")
    return nan_in_a_row


def _injected_nan_steps() -> set[int]:
    """Test hook: MLIP_FAULT_INJECT=nan_at:5,6 makes the loss of the 5th and 6th micro-batches NaN."""
    spec = os.environ.get("MLIP_FAULT_INJECT", "")
    return {int(s) for s in spec[len("nan_at:"):].split(",")} if spec.startswith("nan_at:") else set()


def _all_ranks_sum(values: list[int], device) -> list[int]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def _reduce_for_log(values: dict[str, torch.Tensor], skipped: list[int]) -> tuple[dict[str, float], int]:
    """The loss terms averaged over ranks and the bad samples skipped this epoch summed over ranks,
    in one all-reduce (same keys on every rank): one collective per logged step, not two."""
    names = sorted(values)
    device = values[names[0]].device  # the backend's device (NCCL takes no host tensors)
    x = torch.cat([torch.stack([values[k].detach().reshape(()) for k in names]).double(),
                   torch.tensor([float(sum(skipped))], dtype=torch.float64, device=device)])
    dist.all_reduce(x)
    means = (x[:-1] / dist.get_world_size()).tolist()
    return dict(zip(names, means)), int(x[-1])


def _log(writer, state, skipped_this_epoch, window, terms, engine, logit_scale, progress, out_dir) -> None:
    skipped = state["skipped_before_epoch"] + skipped_this_epoch
    if writer is None:
        return
    elapsed = max(time.time() - window["t0"], 1e-9)
    step = state["step"]
    lr = engine.get_lr()[0]
    loss = terms["loss/total"]
    temperature = 1.0 / float(logit_scale.detach().float().mean())
    scalars = {**terms, "lr": lr, "temperature": temperature,
               "perf/samples_per_s": window["samples"] / elapsed,
               "perf/data_wait_fraction": window["wait"] / elapsed,
               "data/skipped": skipped, "train/nan_skipped": state["nan_skipped"]}
    for name, value in scalars.items():
        writer.add_scalar(name, value, step)
    with open(out_dir / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **scalars}) + "\n")
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{scalars['perf/samples_per_s']:.1f}")
    window.update(t0=time.time(), wait=0.0, samples=0)


def _asdict(cfg):
    import dataclasses
    return dataclasses.asdict(cfg)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, cfg = parse_args(argv)
    stop = StopRequest()  # before start-up: a signal that arrives while building still ends in a checkpoint
    try:
        train(cfg, args.deepspeed_config, stop)
    except (SetupError, ShardPathError, DSConfigError, LaunchError) as e:
        # The same error on every rank of a node: said once (by local rank 0), not once per rank.
        if getattr(e, "every_rank", False) or os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
