"""Shared training utilities: seeding, AdamW with warm-up + cosine decay, gradient clipping, a
time- or step-bounded loop with a tqdm bar, and checkpoints that record how they were made.

Each component keeps its own recipe next to its model (e.g. ``speech_tokenizer.train_tokenizer``);
``python -m minicosy.train NAME`` runs a recipe by name from :data:`RECIPES` (resolved at run
time, so this ground-floor module imports no component).

Usage::

    python -m minicosy.train tokenizer            # the FSQ speech tokenizer, ~8 min on 2 cores
    python -m minicosy.train tokenizer --quantizer vq
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pickle
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

RECIPES = {"tokenizer": "minicosy.speech_tokenizer:train_main",
           "text_tokenizer": "minicosy.text_tokenizer:train_main",
           "lm": "minicosy.lm_train:train_main",
           "flow": "minicosy.flow:train_main",
           "hift": "minicosy.hift_train:train_main",
           "campplus": "minicosy.campplus:train_main",
           "spk2info": "minicosy.campplus:spk2info_main",
           "finetune": "minicosy.finetune:finetune_main",
           "dpo": "minicosy.finetune:dpo_main"}


@dataclass
class TrainConfig:
    """Optimisation settings shared by every recipe."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 200
    max_steps: int = 100_000
    max_minutes: float = 8.0
    grad_clip: float = 1.0
    batch_seconds: float = 60.0      # audio seconds per batch (length-bucketed batches)
    seed: int = 0
    threads: int = 2
    log_every: int = 25
    validate_minutes: float = 0.0    # > 0: validate this often, keep the best weights (early stopping)
    device: str = "cpu"              # where the steps run; the model comes back on the CPU
    state_path: str | None = None    # resumable training: weights, optimiser, step and clock saved here ...
    state_minutes: float = 5.0       # ... this often, and a run that finds the file continues from it
    snapshot_dir: str | None = None  # with validation: the weights at every check kept here (learning curves)


@dataclass
class TrainLog:
    """Loss curve and wall time of a run (stored in the checkpoint)."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (used by training scripts only, never by model constructors)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, no weight decay on biases and norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)


def lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 10% as ``progress`` (the larger
    of the step and time fractions of the budget) goes from 0 to 1."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def distributed() -> tuple[int, int]:
    """(rank, world size). Under ``torchrun`` (``WORLD_SIZE`` > 1) the first call joins the process
    group (gloo on CPU, nccl when CUDA is available and ``MINICOSY_BACKEND`` does not say otherwise)
    and silences the other ranks' printing, so that a recipe's report appears once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = os.environ.get("MINICOSY_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if dist.get_rank() != 0:
            sys.stdout = open(os.devnull, "w")
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """Rank 0 (or no ``torchrun``): the process that logs and writes checkpoints."""
    return distributed()[0] == 0


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def from_main(*values: float) -> list[float]:
    """Rank 0's ``values`` on every rank, so that decisions taken from the clock (stop, validate,
    start the GAN) are taken once for all ranks."""
    if distributed()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.broadcast(t, 0)
    return t.tolist()


def local_batch(batches: Iterator) -> object:
    """This rank's share of one step: every rank draws the same ``world`` batches from its own copy
    of the (identically seeded) batch stream and keeps the one with its rank's index."""
    rank, world = distributed()
    return [next(batches) for _ in range(world)][rank]


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over the ranks (in place; unchanged in a single process)."""
    world = distributed()[1]
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value


def broadcast_parameters(*modules: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (replicas start identical)."""
    if distributed()[1] > 1:
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, 0)


def average_gradients(module: torch.nn.Module) -> None:
    """Data parallelism by hand, what DistributedDataParallel does inside its backward: each
    gradient becomes the mean over ranks, so identical replicas take identical steps. For loops
    with several forward passes per step (the GAN vocoder's), where DDP's hooks do not fit."""
    for p in module.parameters():
        if p.grad is not None:
            mean_over_ranks(p.grad)


class _Loss(torch.nn.Module):
    """Makes a recipe's ``loss_fn(batch)`` the forward of a module that owns the model, so that
    DistributedDataParallel sees every step's forward whatever methods the loss calls."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[object], torch.Tensor]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: object) -> torch.Tensor:
        return self.loss_fn(batch)


def to_device(batch: object, device: torch.device | str) -> object:
    """``batch`` with every tensor in it (nested dicts, lists, tuples) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def train_loop(model: torch.nn.Module, batches: Iterator, loss_fn: Callable[[object], torch.Tensor],
               cfg: TrainConfig, desc: str = "training", validate: Callable[[], float] | None = None) -> TrainLog:
    """Optimise ``loss_fn(batch)`` until ``max_steps`` or ``max_minutes``, whichever comes first;
    the learning-rate schedule follows whichever budget runs out first (:func:`lr_factor`).

    The steps run on ``cfg.device`` (batches are moved there); the model is handed back on the
    CPU, where the recipes evaluate and save, and ``validate`` sees it there too.

    With ``cfg.state_path``, the weights, optimiser state, step, clock, loss curve and best
    validated weights are written there every ``cfg.state_minutes``; a run that finds the file
    resumes from it (the batch stream is replayed to the step it had reached), so a long run can
    span several sessions: stop it any time, start the same command again. The file is removed
    when the run ends.

    With ``validate`` (a held-out score, lower is better) and ``cfg.validate_minutes`` > 0, the
    score is taken that often and at the end, and the model ends with the best weights seen
    (early stopping); ``log.extra`` records the curve and the best step.

    Under ``torchrun`` the loop is data-parallel (DistributedDataParallel): every rank draws the
    same batch sequence and takes its share of each step's ``world`` batches, so one step sees a
    global batch of ``world`` batches; rank 0 decides when to stop and validate, and logs the
    loss averaged over ranks."""
    torch.set_num_threads(cfg.threads)
    rank, world = distributed()
    device = torch.device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    model.to(device)
    step_fn: torch.nn.Module = _Loss(model, loss_fn)
    if world > 1:
        step_fn = torch.nn.parallel.DistributedDataParallel(step_fn, find_unused_parameters=True,
                                                            device_ids=[device] if device.type == "cuda" else None)
    opt = make_optimizer(model, cfg)
    log, start, first = TrainLog(), time.time(), 0
    running, best, next_check = None, None, cfg.validate_minutes * 60
    state = Path(cfg.state_path) if cfg.state_path else None
    if state is not None and state.exists():          # resume: the clock and the schedule go on
        saved = torch.load(state, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        first, running, log = saved["step"], saved["running"], TrainLog(**saved["log"])
        start -= saved["elapsed"]
        next_check = saved["next_check"]
        best = saved["best"] and (saved["best"]["score"], saved["best"]["step"], saved["best"]["weights"])
        for _ in range(first * world):                 # the batch stream where it was left
            next(batches)
    model.train()
    bar = tqdm(desc=desc, unit="step", disable=rank != 0, initial=first)
    next_save = time.time() - start + cfg.state_minutes * 60

    def save_state(step: int) -> None:
        write_state(state, {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "optimizer": opt.state_dict(),
                            "step": step, "elapsed": time.time() - start, "running": running, "log": asdict(log),
                            "next_check": next_check,
                            "best": best and {"score": best[0], "step": best[1], "weights": best[2]}})

    def check(step: int) -> None:
        nonlocal best
        model.cpu()
        score = validate()
        if cfg.snapshot_dir and rank == 0:
            save_snapshot(Path(cfg.snapshot_dir) / f"step{step:07d}.pt", model, step, time.time() - start, score)
        model.to(device).train()
        log.extra.setdefault("validation", []).append([step, round(time.time() - start, 1), round(score, 4)])
        if best is None or score < best[0]:
            best = (score, step, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        bar.set_postfix(val=f"{score:.3g}")

    step = first
    for step in range(first, cfg.max_steps):
        elapsed = time.time() - start
        if state is not None and rank == 0 and elapsed >= next_save:
            save_state(step)
            next_save = elapsed + cfg.state_minutes * 60
        progress, due = from_main(max(step / cfg.max_steps, elapsed / (60 * cfg.max_minutes)),
                                  float(validate is not None and cfg.validate_minutes > 0 and elapsed >= next_check))
        if progress >= 1.0:
            break
        if due:
            check(step)
            next_check += cfg.validate_minutes * 60
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, progress, cfg)
        local = to_device(local_batch(batches), device)
        loss = step_fn(local)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        value = mean_over_ranks(loss.detach().float())
        running = value.item() if running is None else 0.95 * running + 0.05 * value.item()
        if step % cfg.log_every == 0:
            log.steps.append(step)
            log.losses.append(round(running, 4))
            bar.set_postfix(loss=f"{running:.3f}")
        bar.update(1)
    if validate is not None and cfg.validate_minutes > 0:
        check(step + 1)
        model.load_state_dict(best[2])
        log.extra["best_step"], log.extra["best_validation"] = best[1], round(best[0], 4)
    bar.close()
    model.cpu().eval()
    log.seconds = round(time.time() - start, 1)
    if state is not None and rank == 0 and state.exists():
        state.unlink()                                   # finished: nothing left to resume
    return log


def write_state(path: Path, state: dict) -> None:
    """Save a training state atomically (to a temporary file, then renamed), so that a run stopped
    while saving leaves the previous state intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def save_snapshot(path: Path, model: torch.nn.Module, step: int, elapsed: float, score: float) -> None:
    """The weights (float16) at a validation check, with the step, the training seconds so far and
    the score (``TrainConfig.snapshot_dir``); the keys of a training state, so a state file can
    stand in for a snapshot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
                "step": step, "elapsed": elapsed, "score": score}, path)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _command() -> str:
    """The command line that is running, without machine paths (``python -m minicosy.train …``)."""
    script = Path(sys.argv[0])
    if script.parent.name == "minicosy":
        return " ".join(["python -m minicosy." + script.stem, *sys.argv[1:]])
    return " ".join([script.name, *sys.argv[1:]])


def provenance() -> dict[str, str]:
    """How a result was made: the command line (no machine paths) and the git commit."""
    return {"command": _command(), "commit": _git_commit()}


def save_checkpoint(path: str | Path, model: torch.nn.Module, model_config: dict, train_cfg: TrainConfig,
                    log: TrainLog, **extra) -> Path:
    """Weights + everything needed to rebuild the model + how it was made (command, config, time,
    git commit, loss curve). Weights are stored in float16 where that keeps files small. Under
    ``torchrun`` only rank 0 writes."""
    path = Path(path)
    if not is_main_process():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "model_config": model_config, "train_config": asdict(train_cfg),
                "log": asdict(log), "made_by": {**provenance(), "torch": str(torch.__version__)}, **extra}, path)
    card = {"file": path.name, "model_config": model_config, "train_config": asdict(train_cfg),
            "train_seconds": log.seconds, "final_loss": log.losses[-1] if log.losses else None,
            "made_by": provenance(),
            **{k: v for k, v in extra.items() if isinstance(v, (int, float, str, dict, list))}}
    path.with_suffix(".json").write_text(json.dumps(card, indent=1, ensure_ascii=False))
    return path


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                            what: str = "state dict", shown: int = 30) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, but a mismatch raises a ``ValueError``
    listing the missing keys, unexpected keys and shape conflicts by name (no deep torch trace)."""
    own = model.state_dict()
    missing = sorted(own.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - own.keys())
    conflicts = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sorted(own.keys() & state_dict.keys()) if tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or conflicts:
        def block(title: str, items: list[str]) -> str:
            more = f"\n    ... and {len(items) - shown} more" if len(items) > shown else ""
            return f"\n  {title} ({len(items)}):" + "".join(f"\n    {x}" for x in items[:shown]) + more
        raise ValueError(f"{what} does not fit {type(model).__name__}:" + block("missing keys", missing)
                         + block("unexpected keys", unexpected) + block("shape conflicts", conflicts))
    check_finite(state_dict, what)
    model.load_state_dict(state_dict, strict=True)


def check_finite(tensors: object, what: str, _key: str = "") -> None:
    """A ``ValueError`` naming ``what`` and the key when any floating tensor in ``tensors`` (nested
    dicts and lists too) holds NaN or Inf: such weights would make all-NaN audio."""
    if isinstance(tensors, torch.Tensor):
        if tensors.is_floating_point() and not torch.isfinite(tensors).all():
            raise ValueError(f"{what}: {_key or 'tensor'} holds NaN or Inf values")
    elif isinstance(tensors, dict):
        for k, v in tensors.items():
            check_finite(v, what, f"{_key}.{k}" if _key else str(k))
    elif isinstance(tensors, (list, tuple)):
        for i, v in enumerate(tensors):
            check_finite(v, what, f"{_key}[{i}]")


def read_torch_file(path: str | Path) -> object:
    """``torch.load(path, weights_only=True)`` with errors that name the file: a pickled object
    (which could run code) is refused, and an empty, truncated or foreign file is called that."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():
            raise ValueError(f"{path} holds more than tensors and plain types (refused: loading it could run code)"
                             ) from None
        raise ValueError(f"{path} is not a readable torch file (damaged or another format)") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable torch file (empty, truncated or another format: "
                         f"{type(e).__name__})") from None


def onnx_session(path: str | Path, what: str, threads: int = 1):
    """An onnxruntime CPU session of ``path``; a missing file is a ``FileNotFoundError`` and a file
    onnxruntime cannot read a ``ValueError``, both naming ``what`` and the file."""
    import onnxruntime

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:      # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
        raise ValueError(f"{what} {path} is not a readable ONNX model ({type(e).__name__})") from None


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint`, weights cast back to float32.

    Loaded with ``weights_only=True``: tensors and plain Python types only, so a pickled object
    (which could run code) is refused with a ``ValueError`` naming the file, never executed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    ckpt = read_torch_file(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"{path} is not a minicosy checkpoint (no state_dict/model_config)")
    ckpt["state_dict"] = {k: (v.float() if v.is_floating_point() else v) for k, v in ckpt["state_dict"].items()}
    return ckpt


def model_from_checkpoint(path: str | Path, build: Callable[[dict], torch.nn.Module],
                          prepare: Callable[[dict], dict] | None = None) -> torch.nn.Module:
    """Rebuild a module from a :func:`save_checkpoint` file, in eval mode: ``build(model_config)``
    makes it, then its weights (through ``prepare``, e.g. a key mapping) load strictly. A
    model_config that does not describe the module and weights that do not fit it are
    ``ValueError``s naming the file."""
    ckpt = load_checkpoint(path)
    try:
        model = build(ckpt["model_config"])
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: its model_config does not describe this model ({type(e).__name__}: {e})") from None
    state = prepare(ckpt["state_dict"]) if prepare else ckpt["state_dict"]
    load_state_dict_checked(model, state, str(path))
    return model.eval()


def recipe_parser(name: str, minutes: float, out: str | None, device: bool = False,
                  resumable: bool = True) -> argparse.ArgumentParser:
    """The options every recipe shares: ``--minutes``, ``--corpus``, ``--out``, ``--seed`` and
    ``--threads`` (default ``$MINICOSY_THREADS`` or 2); with ``device``, ``--device`` too (for the
    recipes whose steps have been run on a GPU: ``TrainConfig.device``); with ``resumable``,
    ``--state`` (:func:`state_file`)."""
    p = argparse.ArgumentParser(prog=f"python -m minicosy.train {name}")
    p.add_argument("--minutes", type=float, default=minutes, help="training time budget")
    p.add_argument("--corpus", default="data/corpus")
    p.add_argument("--out", default=out)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("MINICOSY_THREADS", 2)))
    if device:
        p.add_argument("--device", default="cpu", help="where the training steps run (cpu, cuda)")
    if resumable:
        p.add_argument("--state", default=None, help="resumable training state, saved every few minutes (default: "
                       "beside --out as NAME.state.pt; running the same command again resumes it; 'none': off)")
    return p


def state_file(state: str | None, out: str | Path | None) -> str | None:
    """The recipes' ``--state``: given, derived from ``out`` (``flow_tiny.pt`` → ``flow_tiny.state.pt``), or off."""
    if state == "none" or (state is None and out is None):
        return None
    return state or str(Path(out).with_suffix(".state.pt"))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m minicosy.train", add_help=not argv or argv[0] not in RECIPES)
    parser.add_argument("recipe", choices=sorted(RECIPES))
    args, rest = parser.parse_known_args(argv)
    module, func = RECIPES[args.recipe].split(":")
    getattr(importlib.import_module(module), func)(rest)


if __name__ == "__main__":
    main()
