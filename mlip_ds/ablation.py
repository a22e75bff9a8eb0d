"""The MLIP ablation: CLIP, each MLIP term added alone to CLIP, and full MLIP, trained with the same
steps, seeds and data by the real trainer, then linear-probed (issues #4 and #6).

Plain functions, used by ``tools/ablate.py`` (the CLI) and the tests:

* ``parse_variant`` / ``variant_train_args``: a variant name -> the trainer flags that switch its terms.
  Names: ``clip``, ``mlip``, ``+term[+term...]`` (terms added to CLIP), ``mlip-term[-term...]``
  (terms taken out of MLIP). Terms: global, divergence, local, category, itm, swap, and ``fn`` (the
  knowledge-category false-negative fix, ``--false-negatives drop``; on in ``mlip``, off in ``clip``).
* ``train_command``: the ``deepspeed mlip_ds/train.py --deepspeed_config ... --resume latest`` command of
  one (variant, seed), with the flags every variant shares (steps, seed, data, batch, heads).
* ``run_one``: train (resumes an interrupted run), export, probe on every probe task; skips what is done.
* Probe tasks: ``--probe-train``/``--probe-test`` (one task, ``probe/``) and/or ``--probe NAME=TRAIN,TEST``
  (repeatable, ``probe_NAME/``); each is probed with the same fractions and label-subsample seeds, so
  every encoder is paired with CLIP per (pretraining seed, probe seed): ``summary.tasks[NAME]`` has AUC
  mean ± std and the paired Δ vs CLIP with its standard error (std of the differences / sqrt(n)).
* ``collect`` / ``format_table`` / ``plot_bars`` / ``write_outputs``: ``ablation.json``, ``ablation.md``
  and ``ablation.png``.

Layout of ``--out``: ``runs/<variant>/seed<k>/`` is the trainer's ``--out-dir`` (checkpoints, export,
``train_log.jsonl``, ``summary.json``, ``train.log`` = its output) with ``probe/probe.json`` (and
``probe_<task>/probe.json`` per ``--probe`` task) next to it,
and ``ablation_run.json`` (the settings it was made with: a rerun with other settings is refused).
"""
from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from mlip_ds.launch import deepspeed_cmd, train_env
from mlip_ds.losses.objective import TERMS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = ("clip", "+divergence", "+local", "+category", "+itm", "+swap", "mlip")
ABLATION_TERMS = TERMS + ("fn",)  # "fn": --false-negatives drop (MLIP's knowledge-category fix)
# MLIP head sizes for the tiny towers, spelled out so the commands in docs/ablation.md stay exact:
# the local and Tucker sizes equal what the model's auto sizing (model/mlip.py ``head_sizes``) picks
# for them; 128 prototypes instead of 500 (the default) for the tiny embedding.
TINY_HEADS = ("--local-dim", "64", "--num-prototypes", "128", "--tucker-rank-v", "16", "--tucker-rank-t", "16",
              "--tucker-rank-k", "8", "--tucker-out", "64")


class AblationError(RuntimeError):
    """A user-facing error (bad path or argument, a failed training or probe run); the CLI exits 2."""


# ---------------------------------------------------------------------------------------------
# variants


@dataclass(frozen=True)
class Variant:
    name: str
    terms: tuple[str, ...]          # loss terms on, in TERMS order
    false_negatives: str            # "off" | "drop"

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in "-_" else {"+": "plus_"}.get(c, "_") for c in self.name)


def parse_variant(name: str) -> Variant:
    """``clip`` | ``mlip`` | ``+a+b`` (added to CLIP) | ``mlip-a-b`` (removed from MLIP)."""
    name = name.strip()
    if name in ("clip", "mlip"):
        on = {"global"} if name == "clip" else set(TERMS)
        fn = name == "mlip"
    elif name.startswith("+"):
        parts = name[1:].split("+")
        _check_terms(name, parts)
        on, fn = {"global"} | (set(parts) - {"fn"}), "fn" in parts
    elif name.startswith("mlip-"):
        parts = name[len("mlip-"):].split("-")
        _check_terms(name, parts)
        on, fn = set(TERMS) - set(parts), "fn" not in parts
        if not on:
            raise AblationError(f"variant {name!r} switches every loss term off")
    else:
        raise AblationError(f"unknown variant {name!r}: use clip, mlip, +term[+term] (added to CLIP) or "
                            f"mlip-term[-term] (removed from MLIP); terms: {', '.join(ABLATION_TERMS)}")
    return Variant(name, tuple(t for t in TERMS if t in on), "drop" if fn else "off")


def _check_terms(name: str, parts: Sequence[str]) -> None:
    bad = [p for p in parts if p not in ABLATION_TERMS]
    if bad or not parts:
        raise AblationError(f"variant {name!r}: unknown term(s) {bad or ['']}; terms: {', '.join(ABLATION_TERMS)}")


def variant_train_args(variant: Variant | str) -> list[str]:
    """The trainer flags that give exactly this variant's terms: the closer preset (``--objective
    clip|mlip``) and a ``--use-<term>`` / ``--no-use-<term>`` / ``--false-negatives`` per difference."""
    v = parse_variant(variant) if isinstance(variant, str) else variant
    from mlip_ds.config import OBJECTIVE_PRESETS
    base = "mlip" if len(v.terms) > len(TERMS) / 2 else "clip"
    preset = OBJECTIVE_PRESETS[base]
    args = ["--objective", base]
    for t in TERMS:
        if (t in v.terms) != preset[f"use_{t}"]:
            args.append(f"--use-{t}" if t in v.terms else f"--no-use-{t}")
    if v.false_negatives != preset["false_negatives"]:
        args += ["--false-negatives", v.false_negatives]
    return args


# ---------------------------------------------------------------------------------------------
# settings and commands


@dataclass
class Settings:
    train_shards: str
    probe_train: str
    probe_test: str
    out: str
    steps: int
    seeds: tuple[int, ...] = (0,)
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    ranks: int = 2
    model: str = "tiny"
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    workers: int = 1
    samples_per_epoch: int = 0          # 0: the manifest's count
    save_every: int = 50
    log_every: int = 10
    heads: str = "auto"                 # auto = default (the trainer's recipe) | tiny (the 2026-11 tables' flags)
    ds_config: str = "ds_configs/zero2.json"
    fractions: tuple[float, ...] = (0.01, 0.1)
    probe_seeds: tuple[int, ...] = (0, 1, 2)
    probe_workers: int = 1
    random_baseline: bool = True
    extra_train_args: tuple[str, ...] = field(default_factory=tuple)
    probe_tasks: tuple[tuple[str, str, str], ...] = ()   # (name, train data, test data) from --probe

    def shared(self) -> dict:
        """What must be equal between a run and its resumption (everything but paths to outputs). The
        ``--probe`` tasks are not in it: tasks can be added to an existing --out like seeds and variants
        (a task's probe.json records its data, and a task whose data changed is probed again)."""
        d = {k: v for k, v in self.__dict__.items() if k not in ("out", "variants", "seeds", "probe_tasks")}
        return json.loads(json.dumps(d))


LEGACY_TASK = "probe"   # the task of --probe-train/--probe-test; its folder is probe/ (as before --probe)


@dataclass(frozen=True)
class ProbeTask:
    name: str
    train: str
    test: str
    folder: str          # sub-folder of a run folder: probe (legacy) or probe_<name>


def probe_tasks(s: Settings) -> list[ProbeTask]:
    """The probe tasks in order: the --probe-train/--probe-test one first (if given), then each --probe."""
    out = [ProbeTask(LEGACY_TASK, s.probe_train, s.probe_test, "probe")] if s.probe_train or s.probe_test else []
    out += [ProbeTask(n, tr, te, f"probe_{n}") for n, tr, te in s.probe_tasks]
    return out


def parse_probe_spec(spec: str) -> tuple[str, str, str]:
    """``NAME=TRAIN,TEST`` -> (name, train, test); AblationError naming what is wrong."""
    name, eq, paths = spec.partition("=")
    name = name.strip()
    parts = paths.split(",")
    if not eq or len(parts) != 2 or not all(p.strip() for p in parts):
        raise AblationError(f"--probe {spec!r}: expected NAME=TRAIN,TEST (two data paths after the '=')")
    _check_task_name(name)
    return name, parts[0].strip(), parts[1].strip()


def _check_task_name(name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise AblationError(f"probe task name {name!r}: use letters, digits, '-' and '_' only")
    if name == LEGACY_TASK:
        raise AblationError(f"probe task name {name!r} is taken by --probe-train/--probe-test: choose another")


def manifest_samples(shards: str) -> int:
    p = Path(shards)
    man = p / "manifest.json" if p.is_dir() else p.parent / "manifest.json"
    if not man.exists():
        raise AblationError(f"{man} not found: give --samples-per-epoch or use shards made by tools/make_shards.py")
    return int(json.loads(man.read_text())["num_samples"])


def check_settings(s: Settings) -> None:
    """Everything that can be wrong before the first (minutes-long) run starts."""
    if s.steps < 1:
        raise AblationError(f"--steps must be >= 1, got {s.steps}")
    if s.ranks < 1:
        raise AblationError(f"--ranks must be >= 1, got {s.ranks}")
    if not s.variants:
        raise AblationError("--variants is empty")
    names = [parse_variant(v).name for v in s.variants]
    if len(set(names)) != len(names):
        raise AblationError(f"--variants lists a variant twice: {names}")
    if len({parse_variant(v).slug for v in s.variants}) != len(names):
        raise AblationError(f"--variants: two names map to the same folder: {names}")
    if not s.seeds:
        raise AblationError("--seeds is empty")
    if any(not 0 < f <= 1 for f in s.fractions):
        raise AblationError(f"--fractions must be in (0, 1], got {list(s.fractions)}")
    if s.heads not in ("auto", "tiny", "default"):
        raise AblationError(f"--heads must be auto, tiny or default, got {s.heads!r}")
    if bool(s.probe_train) != bool(s.probe_test):
        raise AblationError("--probe-train and --probe-test go together (or use --probe NAME=TRAIN,TEST)")
    tasks = probe_tasks(s)
    if not tasks:
        raise AblationError("no probe data: give --probe-train and --probe-test, or --probe NAME=TRAIN,TEST")
    names = [t[0] for t in s.probe_tasks]
    for n in names:
        _check_task_name(n)
    if len(set(names)) != len(names):
        raise AblationError(f"--probe: a task name is used twice: {names}")
    paths = [("--train-shards", s.train_shards)]
    for t in tasks:
        if t.name == LEGACY_TASK:
            paths += [("--probe-train", t.train), ("--probe-test", t.test)]
        else:
            paths += [(f"--probe {t.name} (train)", t.train), (f"--probe {t.name} (test)", t.test)]
    for flag, path in paths:
        p = Path(path)
        if any(c in path for c in "{*?[") and flag == "--train-shards":
            continue  # a brace pattern or glob: train.py checks every file it expands to
        if not p.exists():
            hint = ("make shards with `python tools/make_shards.py synthetic --out " + path + " ...`"
                    if flag in ("--train-shards", "--probe-train", "--probe-test")
                    else "a shard folder, CSV or class-per-folder tree; tools/real_pairs.py builds them")
            raise AblationError(f"{flag} {path}: not found ({hint})")
        if p.is_dir() and not any(p.glob("*.tar")) and flag == "--train-shards":
            raise AblationError(f"{flag} {path}: no *.tar shards in this folder")
    if not ds_config_path(s).exists():
        raise AblationError(f"--deepspeed-config {s.ds_config}: not found")
    if s.samples_per_epoch <= 0:
        manifest_samples(s.train_shards)


def ds_config_path(s: Settings) -> Path:
    """--deepspeed-config relative to the current folder, else to the repository root."""
    p = Path(s.ds_config)
    return p.resolve() if p.is_absolute() or p.exists() else ROOT / p


def schedule(s: Settings) -> dict:
    """Epochs and samples per epoch giving exactly ``s.steps`` optimizer steps (``--max-steps``)."""
    spe = s.samples_per_epoch or manifest_samples(s.train_shards)
    per_step = s.batch_size * s.ranks
    steps_per_epoch = spe // per_step
    if steps_per_epoch < 1:
        raise AblationError(f"{spe} samples per epoch is less than one global batch ({s.batch_size} x {s.ranks} "
                            "ranks): lower --batch-size or use more shards")
    return {"samples_per_epoch": spe, "steps_per_epoch": steps_per_epoch,
            "epochs": math.ceil(s.steps / steps_per_epoch), "global_batch": per_step}


def run_dir(s: Settings, variant: str, seed: int) -> Path:
    return Path(s.out) / "runs" / parse_variant(variant).slug / f"seed{seed}"


def train_args(s: Settings, variant: str, seed: int) -> list[str]:
    """train.py's flags for one (variant, seed): the shared ones, then the variant's switches."""
    sch = schedule(s)
    heads = s.heads if s.heads != "auto" else "default"  # the trainer's own sizes: what a user gets
    args = ["--train-shards", _abs(s.train_shards), "--out-dir", _abs(run_dir(s, variant, seed)), "--model", s.model,
            "--epochs", sch["epochs"], "--max-steps", s.steps, "--samples-per-epoch", sch["samples_per_epoch"],
            "--batch-size", s.batch_size, "--lr", s.lr, "--warmup-steps", s.warmup_steps, "--workers", s.workers,
            "--save-every", s.save_every, "--log-every", s.log_every, "--seed", seed]
    args += list(TINY_HEADS) if heads == "tiny" else []
    args += list(s.extra_train_args) + variant_train_args(variant) + ["--resume", "latest"]
    return [str(a) for a in args]


def _abs(path) -> str:
    """Paths as given are relative to the caller's folder; the subprocesses run in the repository root."""
    path = str(path)
    return path if "{" in path or os.path.isabs(path) else os.path.abspath(path)


def train_command(s: Settings, variant: str, seed: int) -> list[str]:
    """``deepspeed --num_gpus R mlip_ds/train.py --deepspeed_config CFG ARGS`` (the launcher run as
    ``python -m deepspeed.launcher.runner``, which is what the ``deepspeed`` script does)."""
    return deepspeed_cmd(train_args(s, variant, seed), ranks=s.ranks, ds_config=ds_config_path(s))


def shown_command(cmd: Sequence[str]) -> str:
    """The command as a user would type it (``deepspeed ...`` / ``python ...``), paths relative to the repo."""
    cmd = list(cmd)
    if cmd[1:3] == ["-m", "deepspeed.launcher.runner"]:
        cmd = ["deepspeed"] + [c for i, c in enumerate(cmd[3:]) if not (c == "--master_port" or
                                                                        (i > 0 and cmd[3 + i - 1] == "--master_port"))]
    elif cmd[0] == sys.executable:
        cmd = ["python"] + cmd[1:]
    return " ".join(shlex.quote(os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c) for c in cmd)


def probe_command(s: Settings, encoder: str, out: Path, task: ProbeTask | None = None) -> list[str]:
    task = task or probe_tasks(s)[0]
    return [sys.executable, "-m", "mlip_ds.eval.linear_probe", "--encoder", encoder,
            "--train-data", _abs(task.train), "--test-data", _abs(task.test), "--out", _abs(out),
            "--fractions", ",".join(f"{f:g}" for f in s.fractions),
            "--seeds", ",".join(map(str, s.probe_seeds)), "--workers", str(s.probe_workers), "--no-progress"]


# ---------------------------------------------------------------------------------------------
# one run


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_done(s: Settings, d: Path) -> bool:
    summary = _read_json(d / "summary.json")
    return bool(summary) and summary.get("step") == s.steps and (d / "export" / "image_encoder.safetensors").exists()


def probe_done(s: Settings, probe_dir: Path, task: ProbeTask | None = None) -> bool:
    """probe.json is there with the requested fractions and seeds (and, for a ``--probe`` task, was made
    on that task's train and test data)."""
    p = _read_json(probe_dir / "probe.json")
    done = bool(p) and [float(f) for f in p.get("fractions", [])] == [float(f) for f in s.fractions] \
        and list(p.get("seeds", [])) == list(s.probe_seeds)
    if done and task is not None and task.name != LEGACY_TASK:
        done = p.get("train_data") == _abs(task.train) and p.get("test_data") == _abs(task.test)
    return done


def _run_logged(cmd: list[str], log_path: Path, what: str) -> float:
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shown_command(cmd)}\n")
        log.flush()
        r = subprocess.run(cmd, cwd=ROOT, env=train_env(), stdout=log, stderr=subprocess.STDOUT,
                           preexec_fn=_die_with_parent)
    if r.returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise AblationError(f"{what} failed with exit code {r.returncode}; log: {log_path}\n{tail}")
    return time.time() - t0


def _die_with_parent() -> None:
    """Linux: the launcher gets SIGTERM if this process dies (even by kill -9), and passes it on to the
    ranks, so a killed ablation leaves no trainer running into the folder the rerun will use."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _lock(out: Path):
    """One ablation per --out at a time (an exclusive flock, released when this process ends)."""
    import fcntl
    f = open(out / ".ablate.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        raise AblationError(f"another tools/ablate.py is running on {out} (lock {out / '.ablate.lock'})") from e
    return f


def _claim(s: Settings, d: Path) -> None:
    """Record the shared settings in the run folder; refuse to continue a run made with other ones."""
    d.mkdir(parents=True, exist_ok=True)
    path = d / "ablation_run.json"
    mine = s.shared()
    old = _read_json(path)
    if old is not None and old != mine:
        diff = sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))
        raise AblationError(f"{d} holds a run made with other settings ({', '.join(diff)}): use another --out "
                            "or delete that folder")
    path.write_text(json.dumps(mine, indent=2))


def run_one(s: Settings, variant: str, seed: int, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) one (variant, seed), then probe its export. Returns what was done/skipped."""
    d = run_dir(s, variant, seed)
    _claim(s, d)
    did = {"trained": False, "probed": False, "train_wall_s": 0.0}
    if train_done(s, d):
        log(f"  training: done already ({d / 'export'})")
    else:
        resuming = (d / "checkpoints" / "latest").exists()
        log(f"  training {s.steps} steps on {s.ranks} rank(s){' (resuming)' if resuming else ''}; "
            f"log: {d / 'train.log'}")
        wall = _run_logged(train_command(s, variant, seed), d / "train.log", f"training of '{variant}' seed {seed}")
        if not train_done(s, d):
            raise AblationError(f"training of '{variant}' seed {seed} ended without summary.json at step {s.steps} "
                                f"and an export; see {d / 'train.log'}")
        times = _read_json(d / "ablation_times.json") or {}
        times["train_wall_s"] = times.get("train_wall_s", 0.0) + wall
        (d / "ablation_times.json").write_text(json.dumps(times))
        did.update(trained=True, train_wall_s=wall)
        log(f"  trained in {wall:.0f} s")
    walls = probe_all(s, f"{variant}={d / 'export'}", d, f"'{variant}' seed {seed}", log)
    if walls:
        did.update(probed=True, probe_wall_s=walls)
    return did


def probe_all(s: Settings, encoder: str, run: Path, who: str, log: Callable[[str], None] = print,
              prefix: str = "") -> dict[str, float]:
    """Probe ``encoder`` (a linear_probe ``--encoder`` spec) on every probe task into ``run/<task folder>``
    (log ``run/<task folder>.log``), skipping the tasks already done. Returns {task name: wall seconds}
    of the probes it ran."""
    walls = {}
    for task in probe_tasks(s):
        probe_dir = run / task.folder
        what = "probe" if task.name == LEGACY_TASK else f"probe '{task.name}'"
        if probe_done(s, probe_dir, task):
            log(f"  {prefix}{what}: done already")
            continue
        run.mkdir(parents=True, exist_ok=True)
        log(f"  {prefix}{what}: fractions {list(s.fractions)}, seeds {list(s.probe_seeds)}")
        walls[task.name] = _run_logged(probe_command(s, encoder, probe_dir, task), run / f"{task.folder}.log",
                                       f"linear {what} of {who}")
        log(f"  probed in {walls[task.name]:.0f} s")
    return walls


def run_random_baseline(s: Settings, log: Callable[[str], None] = print) -> Path | None:
    """The same architecture with random weights, probed once (context for the table)."""
    src = run_dir(s, s.variants[0], s.seeds[0]) / "export"
    base = Path(s.out) / "runs" / "random-init"
    probe_all(s, f"random-init=random:{src}", base, "the random-init encoder", log, prefix="random-init ")
    return base / probe_tasks(s)[0].folder


def run_all(s: Settings, log: Callable[[str], None] = print) -> dict:
    check_settings(s)
    Path(s.out).mkdir(parents=True, exist_ok=True)
    lock = _lock(Path(s.out))  # noqa: F841 (held until this function returns)
    jobs = [(v, seed) for v in s.variants for seed in s.seeds]
    sch = schedule(s)
    log(f"[ablate] {len(s.variants)} variant(s) x {len(s.seeds)} seed(s), {s.steps} steps each "
        f"(global batch {sch['global_batch']}, {sch['steps_per_epoch']} steps/epoch), out: {s.out}")
    t0 = time.time()
    for i, (v, seed) in enumerate(jobs, 1):
        pv = parse_variant(v)
        log(f"[ablate] {i}/{len(jobs)} variant '{pv.name}' seed {seed}: terms {', '.join(pv.terms)}"
            f"{' + false-negative fix' if pv.false_negatives != 'off' else ''} ({time.time() - t0:.0f} s elapsed)")
        run_one(s, v, seed, log)
    if s.random_baseline:
        run_random_baseline(s, log)
    result = collect(s)
    paths = write_outputs(result, s.out)
    log(f"[ablate] done in {time.time() - t0:.0f} s: " + ", ".join(map(str, paths)))
    return result


# ---------------------------------------------------------------------------------------------
# collect


def _mean_std(values: Sequence[float]) -> dict:
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(v)}


def paired_stats(differences: Sequence[float]) -> dict:
    """Mean ± std of paired differences, their standard error ``se = std / sqrt(n)`` (std with ddof 1)
    and ``beyond_2se`` (|mean| > 2 se). With fewer than two differences se and beyond_2se are None:
    one pair says nothing about the spread."""
    ms = _mean_std(differences)
    n = ms["n"]
    if n < 2:
        return {**ms, "se": None, "beyond_2se": None}
    se = ms["std"] / math.sqrt(n)
    return {**ms, "se": se, "beyond_2se": bool(abs(ms["mean"]) > 2 * se)}


def read_train_log(d: Path) -> list[dict]:
    path = d / "train_log.jsonl"
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec  # a step logged again after a resume keeps its last record
    return [by_step[k] for k in sorted(by_step)]


def train_stats(d: Path, steps: int) -> dict:
    """Final losses (mean over the log records of the last 10% of steps) and train samples/s (median of
    the logged windows, the first one, which holds start-up, left out)."""
    log = read_train_log(d)
    if not log:
        return {"final_losses": {}, "samples_per_s": None}
    tail = [r for r in log if r["step"] > steps - max(1, steps // 10)] or log[-1:]
    keys = sorted({k for r in tail for k in r if k.startswith("loss/")})
    final = {k[len("loss/"):]: sum(r[k] for r in tail) / len(tail) for k in keys}
    sps = [r["perf/samples_per_s"] for r in (log[1:] or log) if "perf/samples_per_s" in r]
    median = statistics.median(sps) if sps else None
    return {"final_losses": final, "samples_per_s": median, "first_total": log[0].get("loss/total"),
            "logged_steps": len(log)}


def probe_means(probe_json: dict, fractions: Sequence[float]) -> dict[str, dict[int, float]]:
    """{fraction_key: {probe_seed: mean AUC over labels}} from a probe.json (one encoder)."""
    enc = next(iter(probe_json["encoders"].values()))
    labels = enc["label_names"]
    out = {}
    for f in fractions:
        key = f"{float(f):g}"
        per_seed: dict[int, list] = {}
        for row in enc["per_seed"]:
            if f"{float(row['fraction']):g}" == key and row["label"] in labels:
                per_seed.setdefault(int(row["seed"]), []).append(row["metric"])
        # as the probe's own "mean" column: labels that could not be probed (None) are left out
        out[key] = {seed: (sum(x for x in m if x is not None) / sum(x is not None for x in m)
                           if any(x is not None for x in m) else None) for seed, m in per_seed.items()}
    return out


def probe_reused(probe_json: dict, fractions: Sequence[float]) -> dict[str, list[int]]:
    """{fraction_key: [probe seeds whose number repeats another seed's fit]}: at 100% of the labels every
    seed fits the same data, so the probe fits once and repeats it (``reused_from_seed``). Those repeats
    are not independent values and are left out of the per-task statistics."""
    enc = next(iter(probe_json["encoders"].values()))
    out: dict[str, list[int]] = {}
    for f in fractions:
        key = f"{float(f):g}"
        seeds = {int(r["seed"]) for r in enc["per_seed"]
                 if f"{float(r['fraction']):g}" == key and r.get("reused_from_seed") is not None}
        out[key] = sorted(seeds)
    return out


def _task_probe(path: Path, fractions) -> tuple[dict | None, dict | None]:
    p = _read_json(path)
    return (probe_means(p, fractions), probe_reused(p, fractions)) if p else (None, None)


def collect(s: Settings) -> dict:
    """``ablation.json``'s content: per variant the runs (losses, speed, probe AUC per probe seed), the
    summary (mean ± std over pretraining seeds x probe seeds) and the paired difference to CLIP."""
    sch = schedule(s)
    tasks = probe_tasks(s)
    result = {"settings": {**s.shared(), "out": s.out, "variants": list(s.variants), "seeds": list(s.seeds),
                           **sch},
              "commands": {}, "variants": {}, "fractions": [f"{float(f):g}" for f in s.fractions],
              "tasks": {t.name: {"train": t.train, "test": t.test, "folder": t.folder} for t in tasks}}
    for v in s.variants:
        pv = parse_variant(v)
        runs = []
        for seed in s.seeds:
            d = run_dir(s, v, seed)
            result["commands"][f"{pv.name} seed {seed}"] = shown_command(train_command(s, v, seed))
            summary = _read_json(d / "summary.json") or {}
            probes, reused = {}, {}
            for t in tasks:
                probes[t.name], reused[t.name] = _task_probe(d / t.folder / "probe.json", s.fractions)
            runs.append({"seed": seed, "run_dir": str(d), "steps": summary.get("step"),
                         **train_stats(d, s.steps),
                         "train_wall_s": (_read_json(d / "ablation_times.json") or {}).get("train_wall_s"),
                         "probe": probes[tasks[0].name], "probes": probes, "probe_reused": reused})
        result["variants"][pv.name] = {"terms": list(pv.terms), "false_negatives": pv.false_negatives,
                                       "train_args": variant_train_args(pv), "runs": runs}
    rnd, rnd_reused = {}, {}
    for t in tasks:
        rnd[t.name], rnd_reused[t.name] = _task_probe(Path(s.out) / "runs" / "random-init" / t.folder / "probe.json",
                                                      s.fractions)
    result["random_init"] = ({"probe": rnd[tasks[0].name], "probes": rnd, "probe_reused": rnd_reused}
                             if any(v is not None for v in rnd.values()) else None)
    summarize(result)
    return result


def _seed_key(seed):
    """Probe seeds are ints in memory and strings after a JSON round trip."""
    return str(seed)


def _auc_and_deltas(runs: list[dict], ref_runs: list[dict] | None, f: str, task: str | None) -> tuple[list, list]:
    """The AUC values of one variant at fraction f (over pretraining seed x probe seed) and the paired
    differences to the reference (same pretraining seed, same probe seed). ``task`` None: the run's
    ``probe`` (first task); a task name: ``probes[task]``, without the repeated 100% fits."""
    def means(run):
        m = run.get("probe") if task is None else (run.get("probes") or {}).get(task)
        return {_seed_key(k): x for k, x in ((m or {}).get(f) or {}).items()}

    def reused(run):
        pr = run.get("probe_reused") or {}
        key = task if task is not None else next(iter(pr), None)  # None: the first task's
        return {_seed_key(x) for x in ((pr.get(key) or {}).get(f) or [])}

    vals, deltas = [], []
    for run in runs:
        skip = reused(run)
        rrun = next((r for r in ref_runs or [] if r["seed"] == run["seed"]), None)
        rmeans = means(rrun) if rrun is not None else {}
        for seed, val in means(run).items():
            if seed in skip:
                continue
            vals.append(val)
            rval = rmeans.get(seed)
            if val is not None and rval is not None:
                deltas.append(val - rval)
    return vals, deltas


def _per_seed_deltas(runs: list[dict], ref_runs: list[dict], fracs: Sequence[str], task: str) -> tuple[dict, dict]:
    """Per pretraining seed: both encoders' mean AUC and the paired difference over that seed's label
    subsamples (mean, SE over the subsamples); and over seeds: the mean of those per-seed differences
    with its SE over *pretraining* seeds. The pooled Δ treats (pretraining seed, subsample) pairs as one
    sample; a recipe that wins for one seed and loses for another shows here."""
    per_seed, over_seeds = {}, {}
    for f in fracs:
        rows = []
        for run in runs:
            rrun = next((r for r in ref_runs if r["seed"] == run["seed"]), None)
            if rrun is None:
                continue
            vals, deltas = _auc_and_deltas([run], [rrun], f, task)
            ref_vals, _ = _auc_and_deltas([rrun], None, f, task)
            if not deltas:
                continue
            rows.append({"seed": run["seed"], "auc": _mean_std(vals)["mean"], "clip_auc": _mean_std(ref_vals)["mean"],
                         **paired_stats(deltas)})
        per_seed[f] = rows
        over_seeds[f] = paired_stats([r["mean"] for r in rows])
    return per_seed, over_seeds


def summarize(result: dict) -> dict:
    """Fill ``summary`` (AUC mean ± std over all (pretraining seed, probe seed) pairs, speed, losses),
    ``delta_vs_clip`` (paired differences to CLIP: same pretraining and probe seed; mean ± std, se,
    beyond_2se) for the first probe task, and ``summary.tasks[name]`` with both for every task."""
    fracs = result["fractions"]
    ref = result["variants"].get("clip")
    tasks = list(result.get("tasks") or {})
    for name, v in result["variants"].items():
        summ = {"auc": {}, "delta_vs_clip": {}}
        for f in fracs:
            vals, deltas = _auc_and_deltas(v["runs"], ref["runs"] if ref else None, f, None)
            summ["auc"][f] = _mean_std(vals)
            summ["delta_vs_clip"][f] = paired_stats(deltas) if ref is not None else None
        summ["tasks"] = {}
        for t in tasks:
            ts = summ["tasks"][t] = {"auc": {}, "delta_vs_clip": {}}
            for f in fracs:
                vals, deltas = _auc_and_deltas(v["runs"], ref["runs"] if ref else None, f, t)
                ts["auc"][f] = _mean_std(vals)
                ts["delta_vs_clip"][f] = paired_stats(deltas) if ref is not None else None
            if ref is not None and name != "clip":
                ts["per_seed"], ts["over_seeds"] = _per_seed_deltas(v["runs"], ref["runs"], fracs, t)
        summ["samples_per_s"] = _mean_std([r.get("samples_per_s") for r in v["runs"]])
        keys = sorted({k for r in v["runs"] for k in r.get("final_losses", {})})
        summ["final_losses"] = {k: _mean_std([r["final_losses"].get(k) for r in v["runs"]])["mean"] for k in keys}
        summ["steps"] = sorted({r.get("steps") for r in v["runs"]}, key=lambda x: (x is None, x))
        v["summary"] = summ
    rnd = result.get("random_init")
    if rnd:
        rnd["auc"] = {f: _mean_std(list((rnd.get("probe") or {}).get(f, {}).values())) for f in fracs}
        rnd["tasks"] = {}
        for t in tasks:
            if (rnd.get("probes") or {}).get(t) is None:
                continue
            run = {"seed": None, "probes": rnd["probes"], "probe_reused": rnd.get("probe_reused") or {}}
            rnd["tasks"][t] = {"auc": {f: _mean_std(_auc_and_deltas([run], None, f, t)[0]) for f in fracs}}
    return result


# ---------------------------------------------------------------------------------------------
# outputs

_SHORT = {"global": "g", "divergence": "div", "local": "loc", "category": "cat", "itm": "itm", "swap": "swap",
          "total": "total"}


def _pm(ms: dict | None, digits: int = 3, signed: bool = False) -> str:
    if not ms or ms.get("mean") is None:
        return "n/a"
    sign = "+" if signed else ""
    return f"{ms['mean']:{sign}.{digits}f} ± {ms['std']:.{digits}f}"


def _frac_header(f: str) -> str:
    return f"{float(f) * 100:g}%"


def format_table(result: dict, digits: int = 3) -> str:
    """The Markdown table: variant, terms on, steps, final losses, train samples/s, probe AUC per
    fraction (mean ± std) and the paired difference to CLIP."""
    fracs = result["fractions"]
    has_clip = "clip" in result["variants"]
    header = ["variant", "terms on", "steps", "final losses", "train samples/s"]
    header += [f"AUC {_frac_header(f)}" for f in fracs]
    if has_clip:
        header += [f"Δ vs CLIP {_frac_header(f)}" for f in fracs]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for name, v in result["variants"].items():
        s = v["summary"]
        terms = ", ".join(v["terms"]) + (" (+fn)" if v.get("false_negatives", "off") != "off" else "")
        losses = s.get("final_losses", {})
        order = [k for k in _SHORT if k in losses] + sorted(k for k in losses if k not in _SHORT)
        loss_txt = " / ".join(f"{_SHORT.get(k, k)} {losses[k]:.2f}" for k in order if losses[k] is not None) or "n/a"
        steps = ",".join("?" if x is None else str(x) for x in s.get("steps", [])) or "?"
        sps = s.get("samples_per_s", {})
        row = [f"**{name}**" if name in ("clip", "mlip") else name, terms, steps, loss_txt,
               "n/a" if not sps or sps.get("mean") is None else f"{sps['mean']:.1f}"]
        row += [_pm(s["auc"].get(f), digits) for f in fracs]
        if has_clip:
            row += ["—" if name == "clip" else _pm(s["delta_vs_clip"].get(f), digits, signed=True) for f in fracs]
        lines.append("| " + " | ".join(row) + " |")
    rnd = result.get("random_init")
    if rnd and rnd.get("auc"):
        row = ["random init (no training)", "—", "0", "—", "—"] + [_pm(rnd["auc"].get(f), digits) for f in fracs]
        if has_clip:
            row += ["" for _ in fracs]
        lines.append("| " + " | ".join(row) + " |")
    st = result.get("settings", {})
    n_seeds = len(st.get("seeds", [])) or "?"
    n_probe = len(st.get("probe_seeds", [])) or "?"
    notes = [
        "",
        f"AUC: mean over the labels of the linear probe, mean ± std over {n_seeds} pretraining seed(s) x "
        f"{n_probe} probe seed(s) (label subsamples). Δ vs CLIP: mean ± std of the paired differences "
        "(same pretraining seed, same probe subsample). Final losses: unweighted terms (g = global, div = "
        "divergence, loc = local, cat = category), mean over the log records of the last 10% of steps; they "
        "are not comparable across variants except the global term. Train samples/s: median over the "
        "logged windows (start-up excluded); total = the weighted sum that was optimised. "
        "(+fn) = the knowledge-category false-negative fix (`--false-negatives drop`).",
    ]
    return "\n".join(lines + notes) + "\n"


def task_mode(result: dict) -> bool:
    """True when the run has ``--probe`` tasks: the output then has a training table and one probe table
    per task (else the single table as before ``--probe``)."""
    return any(t != LEGACY_TASK for t in result.get("tasks") or {})


def _variant_label(name: str) -> str:
    return f"**{name}**" if name in ("clip", "mlip") else name


def _loss_text(losses: dict) -> str:
    order = [k for k in _SHORT if k in losses] + sorted(k for k in losses if k not in _SHORT)
    return " / ".join(f"{_SHORT.get(k, k)} {losses[k]:.2f}" for k in order if losses[k] is not None) or "n/a"


def format_training_table(result: dict) -> str:
    """variant | terms on | steps | final losses | train samples/s | train wall s (mean over seeds)."""
    lines = ["| variant | terms on | steps | final losses | train samples/s | train wall s |",
             "|---|---|---:|---|---:|---:|"]
    for name, v in result["variants"].items():
        s = v["summary"]
        terms = ", ".join(v["terms"]) + (" (+fn)" if v.get("false_negatives", "off") != "off" else "")
        steps = ",".join("?" if x is None else str(x) for x in s.get("steps", [])) or "?"
        sps = s.get("samples_per_s") or {}
        wall = _mean_std([r.get("train_wall_s") for r in v["runs"]])
        lines.append("| " + " | ".join([
            _variant_label(name), terms, steps, _loss_text(s.get("final_losses", {})),
            "n/a" if sps.get("mean") is None else f"{sps['mean']:.1f}",
            "n/a" if wall["mean"] is None else f"{wall['mean']:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def _delta_cell(d: dict | None, digits: int) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    if d.get("se") is None:
        return f"{d['mean']:+.{digits}f} (n={d['n']}, no SE)"
    return f"{d['mean']:+.{digits}f} ± {d['se']:.{digits}f} (n={d['n']})"


def format_task_table(result: dict, task: str, digits: int = 3) -> str:
    """One probe task: variant | AUC per fraction (mean ± std) | Δ vs CLIP per fraction (mean ± SE of the
    paired differences) | the fractions where |Δ| > 2 SE; the random-init row last."""
    fracs = result["fractions"]
    has_clip = "clip" in result["variants"]
    header = ["variant"] + [f"AUC {_frac_header(f)}" for f in fracs]
    if has_clip:
        header += [f"Δ vs CLIP {_frac_header(f)} (± SE)" for f in fracs] + ["Δ beyond 2 SE at"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join(["---:"] * (len(header) - 1)) + "|"]
    for name, v in result["variants"].items():
        ts = (v["summary"].get("tasks") or {}).get(task) or {"auc": {}, "delta_vs_clip": {}}
        row = [_variant_label(name)] + [_pm(ts["auc"].get(f), digits) for f in fracs]
        if has_clip:
            if name == "clip":
                row += ["—" for _ in fracs] + ["—"]
            else:
                ds = [ts["delta_vs_clip"].get(f) for f in fracs]
                row += [_delta_cell(d, digits) for d in ds]
                beyond = [_frac_header(f) for f, d in zip(fracs, ds) if d and d.get("beyond_2se")]
                row.append(", ".join(beyond) or "none")
        lines.append("| " + " | ".join(row) + " |")
    rnd = ((result.get("random_init") or {}).get("tasks") or {}).get(task)
    if rnd:
        row = ["random init (no training)"] + [_pm(rnd["auc"].get(f), digits) for f in fracs]
        if has_clip:
            row += ["" for _ in fracs] + [""]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _signed_delta(d: dict, digits: int) -> str:
    """Δ ± SE with ✓ (beyond 2 SE above 0) or ✗ (beyond 2 SE below 0)."""
    txt = _delta_cell(d, digits).replace(f" (n={d['n']})", "")
    if d.get("beyond_2se"):
        txt += " **✓**" if d["mean"] > 0 else " ✗"
    return txt


def format_seed_table(result: dict, task: str, digits: int = 3) -> str:
    """With several pretraining seeds: variant | seed | per fraction CLIP AUC, the variant's AUC and Δ ± SE
    over that seed's label subsamples; then a row per variant with the mean over seeds ± SE over seeds.
    Empty when there is no CLIP or only one seed."""
    fracs = result["fractions"]
    if "clip" not in result["variants"] or len(result.get("settings", {}).get("seeds", [])) < 2:
        return ""
    header = ["variant", "pretraining seed"]
    for f in fracs:
        header += [f"CLIP {_frac_header(f)}", f"AUC {_frac_header(f)}", f"Δ {_frac_header(f)} (± SE)"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "|".join(["---:"] * (len(header) - 2)) + "|"]
    for name, v in result["variants"].items():
        ts = (v["summary"].get("tasks") or {}).get(task) or {}
        per_seed, over = ts.get("per_seed") or {}, ts.get("over_seeds") or {}
        if not per_seed:
            continue
        seeds = sorted({r["seed"] for rows in per_seed.values() for r in rows})
        for seed in seeds:
            row = [_variant_label(name), str(seed)]
            for f in fracs:
                r = next((x for x in per_seed.get(f, []) if x["seed"] == seed), None)
                row += (["n/a"] * 3 if r is None else
                        [f"{r['clip_auc']:.{digits}f}", f"{r['auc']:.{digits}f}", _signed_delta(r, digits)])
            lines.append("| " + " | ".join(row) + " |")
        row = [_variant_label(name), f"mean of {len(seeds)} (± SE over seeds)"]
        for f in fracs:
            rows = per_seed.get(f, [])
            ca = _mean_std([r["clip_auc"] for r in rows])["mean"]
            va = _mean_std([r["auc"] for r in rows])["mean"]
            o = over.get(f) or {}
            row += ["n/a" if ca is None else f"{ca:.{digits}f}", "n/a" if va is None else f"{va:.{digits}f}",
                    "n/a" if o.get("mean") is None else _signed_delta(o, digits)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _captioned_seed_table(result: dict, task: str, digits: int = 3) -> str:
    """The per-seed table under its caption, or "" when there is none (both output modes)."""
    table = format_seed_table(result, task, digits)
    return ("\nPer pretraining seed (Δ ± SE over that seed's label subsamples; ✓/✗: beyond 2 SE above/below "
            "CLIP; last row: the mean of the per-seed Δ ± SE over pretraining seeds):\n\n" + table) if table else ""


def format_task_tables(result: dict, digits: int = 3) -> str:
    st = result.get("settings", {})
    n_seeds = len(st.get("seeds", [])) or "?"
    n_probe = len(st.get("probe_seeds", [])) or "?"
    parts = ["\n## Training\n\n", format_training_table(result)]
    for task, info in (result.get("tasks") or {}).items():
        parts += [f"\n## Probe task `{task}`\n\n", f"Train `{info.get('train')}`, test `{info.get('test')}`.\n\n",
                  format_task_table(result, task, digits)]
        parts.append(_captioned_seed_table(result, task, digits))
    parts.append(
        f"\nAUC: linear-probe ROC AUC (mean over the task's labels), mean ± std over {n_seeds} pretraining seed(s) "
        f"x {n_probe} label-subsample seed(s). Δ vs CLIP: mean of the paired differences (same pretraining "
        "seed, same label subsample) ± their standard error, SE = std of the differences / sqrt(n); "
        "'Δ beyond 2 SE at' lists the fractions where the mean difference is more than two SE from 0. At 100% of "
        "the labels every subsample seed fits the same data, so n counts pretraining seeds only there (one "
        "pretraining seed: no SE). The SE covers label subsampling (and pretraining seeds when there are "
        "several), not the test set's own sampling noise. Final losses: unweighted terms, mean over the log "
        "records of the last 10% of steps. (+fn) = the knowledge-category false-negative fix.\n")
    return "".join(parts)


def plot_bars(result: dict, path: str) -> str:
    """Grouped bars: probe AUC per variant, one bar per label fraction, ± std; CLIP's level dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if task_mode(result):
        return _plot_tasks(result, path, plt)
    names = list(result["variants"])
    rows = [(n, result["variants"][n]["summary"]["auc"]) for n in names]
    if result.get("random_init") and result["random_init"].get("auc"):
        rows.append(("random init", result["random_init"]["auc"]))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 1.5), 4))
    clip = result["variants"].get("clip", {}).get("summary", {}).get("auc", {})
    _bars(ax, rows, result["fractions"], clip)
    ax.set_ylabel("linear-probe AUC (mean over labels)")
    ax.set_title(f"Ablation: {result.get('settings', {}).get('steps', '?')} steps per variant (dashed: CLIP)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_tasks(result: dict, path: str, plt) -> str:
    """One panel per probe task, bars as in ``plot_bars``."""
    tasks = list(result.get("tasks") or {})
    names = list(result["variants"])
    width_in = max(5.0, 1.1 * (len(names) + 1) + 1.5)
    fig, axes = plt.subplots(1, len(tasks), figsize=(width_in * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [(n, ((result["variants"][n]["summary"].get("tasks") or {}).get(task) or {}).get("auc", {}))
                for n in names]
        rnd = ((result.get("random_init") or {}).get("tasks") or {}).get(task)
        if rnd:
            rows.append(("random init", rnd["auc"]))
        clip = (((result["variants"].get("clip") or {}).get("summary", {}).get("tasks") or {}).get(task) or {})
        _bars(ax, rows, result["fractions"], clip.get("auc", {}))
        ax.set_title(f"probe '{task}' (dashed: CLIP)")
        ax.set_ylabel("linear-probe AUC")
    fig.suptitle(f"Ablation: {result.get('settings', {}).get('steps', '?')} steps per variant; bars: mean ± std "
                 "over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bars(ax, rows: list, fracs: list, clip_auc: dict) -> None:
    width = 0.8 / max(1, len(fracs))
    lo = []
    for j, f in enumerate(fracs):
        xs = [i + (j - (len(fracs) - 1) / 2) * width for i in range(len(rows))]
        ms = [(r[1].get(f) or {}) for r in rows]
        ys = [m.get("mean") if m.get("mean") is not None else math.nan for m in ms]
        es = [m.get("std") or 0.0 for m in ms]
        bars = ax.bar(xs, ys, width, yerr=es, capsize=3, label=f"{_frac_header(f)} labels")
        lo += [y - e for y, e in zip(ys, es) if not math.isnan(y)]
        clip = (clip_auc.get(f) or {}).get("mean")
        if clip is not None:
            ax.axhline(clip, color=bars.patches[0].get_facecolor(), ls="--", lw=0.8, alpha=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r[0] for r in rows], rotation=30, ha="right")
    if lo:
        ax.set_ylim(max(0.0, min(lo) - 0.05), None)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def write_outputs(result: dict, out: str) -> tuple[Path, Path, Path]:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    st = result.get("settings", {})
    head = [f"# MLIP ablation: {st.get('steps', '?')} steps per variant", ""]
    if st and task_mode(result):
        head += [f"Pretraining: `{st.get('train_shards')}` ({st.get('samples_per_epoch')} samples/epoch), model "
                 f"`{st.get('model')}`, {st.get('ranks')} rank(s) x batch {st.get('batch_size')} (global "
                 f"{st.get('global_batch')}), lr {st.get('lr')}, seeds {st.get('seeds')}. Probe tasks: "
                 f"{', '.join(result.get('tasks') or {})}; fractions {st.get('fractions')}, probe seeds "
                 f"{st.get('probe_seeds')}.", ""]
    elif st:
        head += [f"Pretraining: `{st.get('train_shards')}` ({st.get('samples_per_epoch')} samples/epoch), model "
                 f"`{st.get('model')}`, {st.get('ranks')} rank(s) x batch {st.get('batch_size')} (global "
                 f"{st.get('global_batch')}), lr {st.get('lr')}, seeds {st.get('seeds')}. Probe: train "
                 f"`{st.get('probe_train')}`, test `{st.get('probe_test')}`, fractions {st.get('fractions')}, "
                 f"probe seeds {st.get('probe_seeds')}.", ""]
    if task_mode(result):
        body = format_task_tables(result)
    else:
        body = format_table(result) + _captioned_seed_table(result, LEGACY_TASK)
    md = "\n".join(head) + body
    if result.get("commands"):
        md += "\nTrainer commands:\n\n```\n" + "\n".join(result["commands"].values()) + "\n```\n"
    paths = (out_dir / "ablation.json", out_dir / "ablation.md", out_dir / "ablation.png")
    tmp = paths[0].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, paths[0])
    paths[1].write_text(md)
    plot_bars(result, str(paths[2]))
    return paths
