"""The model-agnostic training loop of LINK, shared by the teacher and the student.

:class:`Trainer`: AdamW with parameter groups (:func:`param_groups`), warm-up + cosine / step
schedule, gradient clipping (after unscaling under fp16 AMP), bf16/fp16 autocast on GPU and fp32
on CPU, atomic checkpoints and exact resume (runs.py reads and checks them), torchrun data
parallel (:class:`Dist`: one flat gradient all-reduce, gloo on CPU / nccl on GPU) weighted so
that the averaged gradient is one process's on the global batch, an evaluation that covers
every image exactly once, runs/NAME/log.jsonl and a PNG of the curves; the commands' loop
options (:func:`add_loop_args`) and error contract (:func:`run_cli`).

The contract: the model is a :class:`LoopModel` (model.LINK follows it; tests/test_trainer.py's
StandIn is a 100-line example), a split a data.Split, its features a cache.FeatureSource;
``metric_fn(anno, {filename: ndarray[N, 10]}, **eval_kwargs) -> dict``; ``extra_loss(ctx) ->
{name: 0-dim tensor | SumLoss}`` is added to the model's loss (see :class:`Trainer`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Protocol

import numpy as np
import torch
import torch.distributed as tdist
from tqdm import tqdm

from cache import FeatureSource
from common import (
    NOW,
    atomic_write_bytes,
    atomic_write_json,
    clean_stale_temps,
    finite_float,
    nonneg_float,
    nonneg_int,
    note,
    number,
    positive_float,
    positive_int,
    run_command,
    write_error,
)
from data import Split, Views, epoch_order, view_of
from runs import (
    CKPT_VERSION,
    CheckpointError,
    TrainInputError,
    atomic_torch_save,
    check_checkpoint_matches,
    load_checkpoint,
    load_trainable_state,
    plain_dict,
    read_log_lines,
    resume_differences,
    trainable_state,
    trim_log,
)
from viz import plot_curves


class LoopModel(Protocol):
    """What :class:`Trainer`, :class:`FeatureSource` and the checkpoint helpers call on a model
    (besides torch.nn.Module's parameters, state_dict, train/eval)."""

    cfg: Any            # a dataclass: checkpointed, must match on resume
    class_space: Any    # a dataclass or dict: checkpointed, must match on resume

    def cache_key(self) -> str:
        """Names the frozen VLM and its input (features of equal keys are interchangeable)."""

    def preprocess(self, images: list) -> torch.Tensor:
        """list of B PIL images -> FloatTensor[B, 3, S, S] (the VLM's input)."""

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """FloatTensor[B, 3, S, S] -> frozen feature maps FloatTensor[B, C, Gh, Gw]."""

    def forward(self, feats: torch.Tensor, detections: list[dict], sizes: list[tuple],
                targets: Optional[list[dict]] = None) -> dict:
        """feats [B, C, Gh, Gw]; detections[b] = {boxes [N, 4], scores [N], labels [N]};
        sizes[b] = (w, h). With targets the dict holds ``loss`` (0-dim) and, for a loss
        normalised by its positives, ``num_pos`` (the loop then re-normalises over ranks)."""

    def postprocess(self, out: dict, detections: list[dict]) -> list:
        """-> per image an array [N, 10]: hoi, score, human box xyxy, object box xyxy."""

    # optional: no_weight_decay() -> set[str], names AdamW must not decay (param_groups; timm's)


# ----------------------------------------------------------------------------------------------
# Errors and RNG state
# ----------------------------------------------------------------------------------------------
class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the step and the images."""


class NonFiniteOutputError(TrainInputError):
    """The model scored images NaN or inf at evaluation (non-finite features or weights); the
    message names the images. Never turned into a lower mAP by dropped predictions."""


def nonfinite_images(out: dict, rows: list) -> list:
    """Batch positions of the images with a NaN / inf score: in the output's ``scores`` [P, ...]
    (of image ``pair_image`` [P]; postprocess may drop NaN: ``score > 0`` is False) or in rows."""
    bad = {b for b, r in enumerate(rows) if not np.isfinite(r).all()}
    s, img = out.get("scores"), out.get("pair_image")
    if torch.is_tensor(s) and s.is_floating_point() and s.numel() and torch.is_tensor(img):
        rows_bad = ~torch.isfinite(s.detach()).reshape(s.shape[0], -1).all(1)
        bad |= set(img[rows_bad.to(img.device)].tolist())
    return sorted(bad)


def nonfinite_cause(model: torch.nn.Module, feats: Optional[torch.Tensor], names: list) -> str:
    """Why a model scored images NaN / inf, for the error message. feats [B, ...]: the batch's
    features, names[b] its images (a NaN in one image's features reaches the other images of
    its batch through masked attention: 0 * NaN is NaN)."""
    if feats is not None:
        bad = [n for n, f in zip(names, feats) if not torch.isfinite(f).all()]
        if bad:
            return (f"the VLM features of {', '.join(map(str, bad[:5]))} are non-finite: a corrupt feature "
                    f"cache or image encoder; a NaN spreads to every image of its batch")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            return f"the model's weights are non-finite (first: '{name}'): a corrupt or diverged checkpoint"
    return "features and weights are finite: the model's output overflowed"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place under torchrun (one process: rank 0 of 1, every method a no-op), with
    the collectives the loop and the rooms below it (cache.py, runs.py) call."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def all_gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def allreduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average gradients over ranks with one flat all-reduce (None grads count as zeros)."""
        if not self.enabled or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [has])
        tdist.all_reduce(flat)
        has = flat[-len(params):]
        flat = flat[:-len(params)] / self.world
        off = 0
        for p, h in zip(params, has.tolist()):
            n = p.numel()
            # a parameter no rank produced a gradient for stays None (AdamW then skips it, exactly
            # as in a single process; a zero gradient would still apply weight decay)
            p.grad = flat[off:off + n].view_as(p).to(p.dtype).clone() if h > 0 else None
            off += n

    def broadcast(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers to every rank."""
        if self.enabled:
            with torch.no_grad():
                for t in list(module.parameters()) + list(module.buffers()):
                    tdist.broadcast(t.data, 0)

    def shard(self, n: int) -> list[int]:
        """Evaluation sharding that neither drops nor duplicates: rank r gets r, r+W, r+2W, ...
        (ranks may get one image fewer; nothing is padded)."""
        return list(range(self.rank, n, self.world))


def init_distributed(device: str = "auto") -> Dist:
    """torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; nccl on GPU, gloo on CPU."""
    want_cuda = (device == "cuda") or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if want_cuda else "gloo",
                                 timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, local, dev)



# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------
class WarmupSchedule:
    """Multiplier of the base lr at optimiser step s: linear warm-up over ``warmup`` steps then
    cosine decay to ``min_ratio`` at ``total`` steps, or step decay by ``gamma`` at each
    milestone (in steps). A callable object so LambdaLR's state_dict keeps it."""

    def __init__(self, total: int, warmup: int = 0, kind: str = "cosine",
                 milestones=(), gamma: float = 0.1, min_ratio: float = 0.0):
        if kind not in ("cosine", "step", "constant"):
            raise TrainInputError(f"--schedule must be cosine, step or constant, got {kind!r}")
        self.total, self.warmup, self.kind = int(total), int(warmup), kind
        self.milestones, self.gamma, self.min_ratio = sorted(int(m) for m in milestones), gamma, min_ratio

    def __call__(self, s: int) -> float:
        if self.warmup > 0 and s < self.warmup:
            return (s + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.gamma ** sum(s >= m for m in self.milestones)
        span = max(self.total - self.warmup, 1)
        t = min(max(s - self.warmup, 0) / span, 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
@dataclass
class LoopConfig:
    epochs: int = 10
    batch_size: int = 8              # global batch (images per optimiser step over all ranks)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "cosine"         # cosine | step | constant
    milestones: list = field(default_factory=list)   # epochs, for the step schedule
    gamma: float = 0.1
    clip: float = 0.1                # max grad norm (UPT: 0.1); <= 0 disables
    amp: str = "auto"                # auto | none | bf16 | fp16 (auto: bf16 on CUDA, none on CPU)
    seed: int = 0
    flip: bool = False               # views: each image also mirrored (see Views)
    crop_scales: list = field(default_factory=list)   # views: one crop per scale in (0, 1)
    ckpt_every: int = 0              # also checkpoint every N steps (0: end of epoch only)
    eval_every: int = 1              # evaluate every N epochs (0: only after the last)
    deterministic: bool = False
    progress: bool = True


#: what the loop's options accept (checked when the command line is parsed), and their help
LOOP_TYPES = {"epochs": positive_int, "batch_size": positive_int, "lr": positive_float,
              "weight_decay": nonneg_float, "warmup_steps": nonneg_int, "gamma": positive_float,
              "clip": finite_float, "seed": nonneg_int, "ckpt_every": nonneg_int, "eval_every": nonneg_int}
LOOP_HELP = {"epochs": "epochs", "batch_size": "GLOBAL batch (images per step over all ranks)",
             "lr": "AdamW learning rate", "weight_decay": "AdamW weight decay, on weight matrices only",
             "warmup_steps": "linear warm-up steps", "gamma": "step-schedule decay factor",
             "clip": "max gradient norm (after unscaling; <= 0: off)", "seed": "seed (init, data order, flips)",
             "ckpt_every": "also checkpoint every N steps (0: each epoch)",
             "eval_every": "evaluate every N epochs (0: after the last only)"}


def add_loop_args(p: argparse.ArgumentParser):
    """The command line's "training" group: an option per LoopConfig field -> the group."""
    t = p.add_argument_group("training")
    choices = {"schedule": ["cosine", "step", "constant"], "amp": ["auto", "none", "bf16", "fp16"]}
    for f in dataclasses.fields(LoopConfig):
        if f.name in ("progress", "flip", "crop_scales", "deterministic", "milestones"):
            continue
        t.add_argument("--" + f.name.replace("_", "-"), type=LOOP_TYPES.get(f.name, type(f.default)),
                       default=f.default, choices=choices.get(f.name),
                       help=LOOP_HELP.get(f.name, f.name) + f" (default {f.default})")
    t.add_argument("--milestones", type=positive_int, nargs="*", default=[], help="epochs (step schedule)")
    t.add_argument("--flip", action="store_true", help="horizontal flips (cache stores both views)")
    t.add_argument("--crop-scales", type=number(float, lo=0, hi=1, lo_open=True, hi_open=True, what="in (0, 1)"),
                   nargs="*", default=[], metavar="S",
                   help="crop views: one crop of S x the image's width and height per S in (0, 1), at a "
                        "fixed hashed position per image, each cached (and mirrored with --flip)")
    t.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    t.add_argument("--no-progress", action="store_true")
    return t


def loop_config(args) -> LoopConfig:
    """The LoopConfig of a command line parsed with add_loop_args."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(LoopConfig)
          if f.name != "progress" and hasattr(args, f.name)}
    return LoopConfig(progress=not args.no_progress, **kw)


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if device.type != "cuda":         # (fit() notes an --amp bf16/fp16 ignored on CPU)
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class SumLoss(NamedTuple):
    """An ``extra_loss`` term as this rank's sum over items (pairs, tokens) and their count; the
    loop divides by the items of the global batch, so N ranks give one process's per-item mean."""
    total: torch.Tensor     # 0-dim, with its graph, already weighted
    count: float            # items summed over on this rank

    def mean(self) -> torch.Tensor:
        """The per-item mean over this rank's items (one process: the loss itself)."""
        return self.total / max(float(self.count), 1.0)


class _StepLosses(NamedTuple):
    """The local batch's losses of one step (0-dim, with their graphs): the model's, the per-image
    mean extra terms, the SumLoss terms; the parts detached for the log; the model's num_pos."""
    gt: torch.Tensor
    extra: torch.Tensor
    sums: dict
    parts: dict
    num_pos: Optional[torch.Tensor]

    def value(self) -> torch.Tensor:
        """The local loss, detached (the finiteness check)."""
        return (self.gt + self.extra + sum(s.total for s in self.sums.values())).detach()


def param_groups(model, params, weight_decay: float, extra=None) -> list[dict]:
    """AdamW parameter groups of ``params`` (named through ``model``, or ``extra``, the
    extra_loss module, as ``extra_loss.NAME``): [{decay: weight matrices}, {no decay: the
    rest}], names in ``param_names``.

    Choice: weight decay pulls a parameter towards 0, a sensible prior for the weights of a
    linear map only. Norm gains (1 at rest), biases, scalars such as a logit scale, and
    whatever the model lists in ``no_weight_decay()`` (LINK: the box-attention strengths) are
    not decayed: any parameter with fewer than 2 dimensions, and the listed names.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    if extra is not None:
        names.update({id(p): f"extra_loss.{n}" for n, p in extra.named_parameters()})
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, rest = [], []
    for i, p in enumerate(params):
        name = names.get(id(p), f"unnamed.{i}")
        (rest if p.dim() < 2 or name in skip else decay).append((name, p))
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class Trainer:
    """The shared loop over a :class:`LoopModel`.

    ``extra_loss(ctx) -> {name: 0-dim tensor | SumLoss}`` (already weighted) is added to the
    model's ``out["loss"]``; ctx holds model, out, feats, indices, views, dets, sizes, targets,
    split; ``extra_loss.prepare(ctx)``, if it exists, runs before the model's forward (ctx without
    out). An extra_loss that is an nn.Module (the student's adapters) trains and checkpoints
    (``extra_state``) with the model; inference never sees it. ``metric_fn(anno, preds,
    **eval_kwargs) -> dict`` scores the test split (full, rare, non_rare, unseen, seen are kept).
    """

    def __init__(self, model, cfg: LoopConfig, train: Split, feats: FeatureSource, out_dir,
                 dist: Optional[Dist] = None, test: Optional[Split] = None,
                 test_feats: Optional[FeatureSource] = None, extra_loss: Optional[Callable] = None,
                 metric_fn: Optional[Callable] = None, eval_kwargs: Optional[dict] = None,
                 ckpt_extra: Optional[dict] = None, class_space=None):
        self.model, self.cfg, self.train, self.feats = model, cfg, train, feats
        self.class_space = class_space if class_space is not None else model.class_space
        self.test, self.test_feats = test, test_feats
        self.d = dist or Dist()
        self.out = Path(out_dir)
        if test is not None and metric_fn is None:
            raise TrainInputError("a test split needs a metric_fn")
        if Views.of(cfg) != train.views:
            raise TrainInputError(f"the loop's views {Views.of(cfg)} (flip, crop_scales) differ from the "
                                  f"training split's {train.views}")
        self.extra_loss, self.metric_fn = extra_loss, metric_fn
        self.eval_kwargs = eval_kwargs or {}
        self.ckpt_extra = ckpt_extra or {}
        # an extra_loss with parameters (the distillation adapters) trains with the model
        self.extra_module = extra_loss if isinstance(extra_loss, torch.nn.Module) else None
        extra_params = list(self.extra_module.parameters()) if self.extra_module is not None else []
        self.params = [p for p in list(model.parameters()) + extra_params if p.requires_grad]
        if not self.params:
            raise TrainInputError("the model has no trainable parameter")
        self.opt = torch.optim.AdamW(param_groups(model, self.params, cfg.weight_decay, self.extra_module), lr=cfg.lr)
        steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        schedule = WarmupSchedule(steps_per_epoch * cfg.epochs, cfg.warmup_steps, cfg.schedule,
                                  [m * steps_per_epoch for m in cfg.milestones], cfg.gamma)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        self.amp_dtype = resolve_amp(cfg.amp, self.d.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.epoch, self.step, self.step_in_epoch = 0, 0, 0
        self.last_metrics: dict = {}
        self.last_predictions: Optional[dict] = None
        self.epochs_trained = 0          # epochs fit() finished in this process
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(self.out)

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out / "last.pt"

    def state(self, rngs) -> dict:
        return {"version": CKPT_VERSION, "config": plain_dict(self.model.cfg),
                "class_space": plain_dict(self.class_space),
                "model": trainable_state(self.model), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rngs, "epoch": self.epoch, "step": self.step,
                "step_in_epoch": self.step_in_epoch,
                "order": epoch_order(len(self.train), self.cfg.seed, self.epoch),
                "data_fingerprint": self.train.fingerprint(), "world_size": self.d.world,
                "cache_key": self.model.cache_key(),
                "loop": asdict(self.cfg), "metrics": self.last_metrics, **self.ckpt_extra,
                **({"extra_state": trainable_state(self.extra_module)} if self.extra_module is not None else {})}

    def save(self) -> None:
        rngs = self.d.all_gather(rng_state())        # every rank's RNG
        if self.d.main:
            atomic_torch_save(self.state(rngs), self.ckpt_path)
        self.d.barrier()

    def resume(self, path, overrides=()) -> None:
        """Continue the run of checkpoint ``path`` exactly: refused (CheckpointError naming the
        setting) when it is another kind of run (role), another model, class space or image list,
        or when a setting differs (see :func:`resume_differences`) that ``overrides`` does not
        name; the overridden settings take effect from here and are logged."""
        ck = load_checkpoint(path, map_location=self.d.device)
        check_checkpoint_matches(ck, self.model, path, self.train.fingerprint(), self.class_space)
        changed = resume_differences(ck, path, asdict(self.cfg), self.ckpt_extra, overrides)
        load_trainable_state(self.model, ck["model"])
        if self.extra_module is not None:
            self._load_extra_state(ck, path)
        self._load_optimisation_state(ck, path)
        self.epoch, self.step = int(ck["epoch"]), int(ck["step"])
        self.step_in_epoch = int(ck.get("step_in_epoch", 0))
        self._check_resume_point(changed, path)
        self.last_metrics = ck.get("metrics", {})
        new_seed = any(n == "seed" for n, _, _ in changed)      # at an epoch boundary: a new order
        if ck.get("order") is not None and not new_seed \
                and ck["order"] != epoch_order(len(self.train), self.cfg.seed, self.epoch):
            raise CheckpointError(f"checkpoint {path}: data order differs from this run's (field: order)")
        rngs = ck["rng"]
        set_rng_state(rngs[self.d.rank % len(rngs)])
        if self.d.main:   # drop log lines written after the checkpoint (they will be redone)
            trim_log(self.out / "log.jsonl", self.step)
        self._log_overrides(ck, changed)
        note(f"resumed from {path}: epoch {self.epoch}, step {self.step}")

    def _log_overrides(self, ck: dict, changed: list) -> None:
        """The settings a resume changes, logged and kept in the checkpoint (``overrides``)."""
        self.ckpt_extra["overrides"] = list(ck.get("overrides", []))
        for name, old, now in changed:
            rec = {"setting": name, "checkpoint": old, "now": now, "epoch": self.epoch, "step": self.step}
            self.ckpt_extra["overrides"].append(rec)
            self.log({"kind": "override", **rec})
            if self.d.main:
                note(f"note: --override {name}: {old!r} in the checkpoint, {now!r} from step {self.step} on")

    def _load_optimisation_state(self, ck: dict, path) -> None:
        """Optimiser, scheduler and scaler state from the checkpoint; then THIS run's
        hyper-parameters (learning rate, weight decay, schedule: equal to the checkpoint's unless
        overridden) are put back, and the learning rate of the next step recomputed from them
        (the same expression as LambdaLR's, so an unchanged run continues bit for bit)."""
        fresh = [{k: v for k, v in g.items() if k not in ("params", "param_names", "lr")}
                 for g in self.opt.param_groups]
        schedules = [dict(vars(f)) for f in self.sched.lr_lambdas]
        try:
            self.opt.load_state_dict(ck["optimizer"])
        except ValueError as e:   # another parameter-group layout (e.g. before param_groups)
            raise CheckpointError(f"checkpoint {path}: field 'optimizer' does not match this run's "
                                  f"parameter groups ({e})") from None
        self.sched.load_state_dict(ck["scheduler"])
        if ck["scaler"] or not self.scaler.is_enabled():   # a disabled scaler saved nothing
            self.scaler.load_state_dict(ck["scaler"])
        for f, st in zip(self.sched.lr_lambdas, schedules):
            vars(f).update(st)
        for g, h in zip(self.opt.param_groups, fresh):
            g.update(h)
        self.sched.base_lrs = [g["initial_lr"] for g in self.opt.param_groups]
        for g, base, f in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas):
            g["lr"] = base * f(self.sched.last_epoch)
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]

    def _check_resume_point(self, changed: list, path) -> None:
        """What overrides cannot do: train an epoch that is behind the checkpoint, or change the
        batches (batch size, seed, views: flips and crops) in the middle of an epoch."""
        names = {n for n, _, _ in changed}
        if self.epoch > self.cfg.epochs or (self.epoch == self.cfg.epochs and self.step_in_epoch > 0):
            raise CheckpointError(f"checkpoint {path} is at epoch {self.epoch} (step {self.step}): --epochs "
                                  f"{self.cfg.epochs} is behind it")
        mid = names & {"batch_size", "seed", "flip", "crop_scales"}
        if mid and self.step_in_epoch > 0:
            raise CheckpointError(f"checkpoint {path} is in the middle of epoch {self.epoch}: "
                                  f"{', '.join('--' + n.replace('_', '-') for n in sorted(mid))} can change only "
                                  f"at an epoch boundary (resume from an end-of-epoch checkpoint)")

    def _load_extra_state(self, ck: dict, path) -> None:
        """Restore the extra_loss module's weights (the distillation adapters)."""
        if "extra_state" not in ck:
            raise CheckpointError(f"checkpoint {path} has no distillation adapters (field: extra_state)")
        try:
            load_trainable_state(self.extra_module, ck["extra_state"])
        except RuntimeError as e:   # a shape mismatch: other teachers or widths
            raise CheckpointError(f"checkpoint {path}: field extra_state does not fit this run "
                                  f"({str(e).splitlines()[-1].strip()[:160]})") from None

    # -- logging -------------------------------------------------------------------------------
    def log(self, rec: dict) -> None:
        if not self.d.main:
            return
        rec = {"time": round(time.time(), 3), **rec}
        try:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:                      # a full disk: one line naming the log
            raise write_error(self.out / "log.jsonl", e) from None

    def plot(self) -> None:
        """runs/NAME/curves.png: the losses per step and the metrics per evaluated epoch."""
        if not self.d.main:
            return
        log = self.out / "log.jsonl"
        if not log.exists():
            return
        recs = [rec for _, rec in read_log_lines(log) if rec is not None]
        atomic_write_bytes(self.out / "curves.png", plot_curves(recs))

    # -- one step ------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _inputs(self, split: Split, indices: list[int], views: list[int], train: bool):
        """-> (detections, sizes, targets) of the images, tensors on the device (targets only
        when training)."""
        dev = self.d.device
        dets, sizes, tgts = (list(x) for x in zip(*[split.item(i, v, train=train)
                                                     for i, v in zip(indices, views)]))
        dets = [{k: v.to(dev) for k, v in dt.items()} for dt in dets]
        if train:
            tgts = [{k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in t.items()} for t in tgts]
        return dets, sizes, tgts

    def train_step(self, batch: list[int]) -> dict:
        """One optimiser step on the global batch ``batch`` (dataset indices); -> the log record
        (mean losses over the global batch, grad_norm)."""
        local = batch[self.d.rank::self.d.world]
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        losses = self._local_losses(local) if local else None
        loss_val = losses.value() if losses is not None else torch.zeros((), device=self.d.device)
        pos_total, pos_ranks = self._sync_finite_and_positives(loss_val, losses, local)
        items = self._global_items(losses.sums if losses is not None else {})
        if losses is not None:
            self._backward(losses, len(local) * self.d.world / len(batch), pos_total, pos_ranks, items)
        gnorm = self._optimiser_step()
        rec = self._global_means(self._log_shares(losses, len(local) / len(batch), items))
        if gnorm is not None:
            rec["grad_norm"] = gnorm
        return rec

    def _local_losses(self, local: list[int]) -> _StepLosses:
        """Forward this rank's images; the model's loss plus the extra_loss terms."""
        cfg = self.cfg
        views = [view_of(cfg.seed, self.epoch, i, self.train.views.count) for i in local]
        feats = self.feats.get(local, views)                              # [b, C, Gh, Gw]
        dets, sizes, tgts = self._inputs(self.train, local, views, train=True)
        ctx = dict(model=self.model, feats=feats, indices=local, views=views, dets=dets, sizes=sizes,
                   targets=tgts, split=self.train)
        with self._autocast():
            if hasattr(self.extra_loss, "prepare"):   # its own forward work first (the frozen teachers),
                self.extra_loss.prepare(ctx)          # whose temporaries then never meet the model's graph
            out = self.model(feats, dets, sizes, targets=tgts)
            loss_gt = out["loss"].float()
            parts = {"loss_gt": loss_gt.detach()}
            extra, sums = torch.zeros((), device=self.d.device), {}
            if self.extra_loss is not None:
                ctx["out"] = out
                for k, v in self.extra_loss(ctx).items():
                    if isinstance(v, SumLoss):
                        sums[k] = SumLoss(v.total.float(), float(v.count))
                    else:
                        extra = extra + v.float()
                        parts[k] = v.detach()
        return _StepLosses(loss_gt, extra, sums, parts, out.get("num_pos"))

    def _global_items(self, sums: dict) -> dict:
        """{name: items of that SumLoss over the global batch}: the local counts summed over the
        ranks (a rank without images reports none)."""
        local = {k: s.count for k, s in sums.items()}
        if not self.d.enabled:
            return local
        total: dict = {}
        for counts in self.d.all_gather(local):
            for k, n in counts.items():
                total[k] = total.get(k, 0.0) + n
        return total

    def _sync_finite_and_positives(self, loss_val: torch.Tensor, losses: Optional[_StepLosses],
                                   local: list[int]) -> tuple[float, float]:
        """One all-reduce: whether any rank's loss is non-finite (then raise, naming the images),
        the positives of the global batch and the number of ranks that reported positives."""
        d = self.d
        num_pos = losses.num_pos if losses is not None else None
        sync = torch.tensor([0.0 if torch.isfinite(loss_val) else 1.0,
                             float(num_pos) if num_pos is not None else 0.0,
                             1.0 if num_pos is not None else 0.0], device=d.device)
        if d.enabled:
            tdist.all_reduce(sync)
        bad, pos_total, pos_ranks = sync.tolist()
        if bad > 0:
            names = d.all_gather((d.rank, float(loss_val), [self.train.filenames[i] for i in local]))
            culprits = [f"rank {r}: loss {v} on {fs}" for r, v, fs in names if not math.isfinite(v)]
            raise NonFiniteLossError(f"non-finite loss at epoch {self.epoch} step {self.step} "
                                     f"(images: {'; '.join(culprits)})")
        return pos_total, pos_ranks

    def _backward(self, losses: _StepLosses, weight: float, pos_total: float, pos_ranks: float,
                  items: dict) -> None:
        """Backward with the weights that make the rank-averaged gradient equal one process's on
        the global batch. Per-image means weigh by the rank's share of the images (``weight``);
        a loss normalised by positives (the model's focal loss: sum / max(num_pos, 1)) by its
        share of the global positives instead; a SumLoss by W / (its global item count)."""
        w_gt = weight
        if losses.num_pos is not None and pos_ranks > 0:
            w_gt = self.d.world * max(float(losses.num_pos), 1.0) / max(pos_total, 1.0)
        loss = losses.gt * w_gt + losses.extra * weight
        for k, s in losses.sums.items():
            loss = loss + s.total * (self.d.world / max(items[k], 1.0))
        self.scaler.scale(loss).backward()

    def _optimiser_step(self) -> Optional[float]:
        """Average the gradients over ranks, unscale, clip, step; -> the gradient norm before
        clipping (None without clipping)."""
        self.d.allreduce_grads(self.params)
        self.scaler.unscale_(self.opt)
        gnorm = None
        if self.cfg.clip and self.cfg.clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip))
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return gnorm

    @staticmethod
    def _log_shares(losses: Optional[_StepLosses], image_share: float, items: dict) -> dict:
        """This rank's share of each logged part's global-batch mean: a per-image mean times the
        rank's share of the images, a SumLoss's sum over its global item count ({} without images)."""
        if losses is None:
            return {}
        shares = {k: v * image_share for k, v in losses.parts.items()}
        for k, s in losses.sums.items():
            shares[k] = s.total.detach() / max(items[k], 1.0)
        return shares

    def _global_means(self, shares: dict) -> dict:
        """The mean loss and parts over the global batch from each rank's shares, for the log
        ({} on a rank without images when the ranks' part names differ)."""
        d = self.d
        names = ["loss"] + sorted(shares)
        if shares:
            stats = torch.stack([sum(shares.values())] + [shares[k] for k in sorted(shares)])
        else:
            stats = torch.zeros(1, device=d.device)
        all_names = d.all_gather(names)
        if d.enabled and all(n == all_names[0] for n in all_names):
            tdist.all_reduce(stats)
        return {k: float(v) for k, v in zip(names, stats.tolist())} if shares else {}

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, split: Split, feats: FeatureSource, batch_size: Optional[int] = None) -> dict:
        """Predictions of every image of ``split`` exactly once, gathered on all ranks:
        {filename: ndarray[N, 10]}."""
        d = self.d
        bs = batch_size or max(1, self.cfg.batch_size // d.world)
        mine = d.shard(len(split))
        self.model.eval()
        rows, bad = {}, []
        for s in range(0, len(mine), bs):
            idx = mine[s:s + bs]
            f = feats.get(idx, [0] * len(idx))
            dets, sizes, _ = self._inputs(split, idx, [0] * len(idx), train=False)
            with self._autocast():
                out = self.model(f, dets, sizes)
            batch_rows = [np.asarray(r, dtype=np.float64).reshape(-1, 10)
                          for r in self.model.postprocess(out, dets)]
            # a NaN score fails every "score > 0" test: never let postprocess drop it silently
            for b in nonfinite_images(out, batch_rows):
                bad.append((split.filenames[idx[b]],
                            nonfinite_cause(self.model, f, [split.filenames[i] for i in idx])))
            rows.update(zip(idx, batch_rows))
        bad = [x for part in d.all_gather(bad) for x in part]
        if bad:
            names = ", ".join(n for n, _ in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteOutputError(f"non-finite scores at evaluation (epoch {self.epoch}, split {split.name}) "
                                       f"for {len(bad)} image(s): {names} ({bad[0][1]})")
        merged = {}
        for part in d.all_gather(rows):
            for i, r in part.items():
                if i in merged:
                    raise RuntimeError(f"image {split.filenames[i]} evaluated twice")
                merged[i] = r
        if len(merged) != len(split):
            raise RuntimeError(f"evaluation covered {len(merged)} of {len(split)} images")
        return {split.filenames[i]: merged[i] for i in sorted(merged)}

    def evaluate(self) -> dict:
        if self.test is None:
            return {}
        preds = self.predict(self.test, self.test_feats)
        m = self.metric_fn(self.test.anno, preds, **self.eval_kwargs) if self.d.main else {}
        m = self.d.all_gather(m)[0]
        keep = {k: (float(v) if isinstance(v, (int, float, np.floating)) else v)
                for k, v in m.items() if k in ("full", "rare", "non_rare", "unseen", "seen")}
        self.last_metrics = keep
        self.last_predictions = preds
        return keep

    # -- fit -----------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train from the current epoch/step to cfg.epochs; -> the last evaluation's metrics."""
        cfg = self.cfg
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # needed by cuBLAS
            torch.use_deterministic_algorithms(True)
        self.d.broadcast(self.model)
        if self.extra_module is not None:
            self.d.broadcast(self.extra_module)
        if self.d.device.type != "cuda" and cfg.amp in ("bf16", "fp16") and self.d.main:
            print(f"note: --amp {cfg.amp} ignored on CPU (plain fp32)", file=sys.stderr)
        while self.epoch < cfg.epochs:
            NOW["doing"] = f"training epoch {self.epoch + 1} of {cfg.epochs} of {self.out}"   # the interrupt line
            t0 = time.time()
            self._train_epoch()
            self.epoch += 1
            self.epochs_trained += 1
            self.step_in_epoch = 0
            if self.test is not None and ((cfg.eval_every and self.epoch % cfg.eval_every == 0)
                                          or self.epoch == cfg.epochs):
                self._evaluate_and_log()
            self.log({"kind": "epoch", "epoch": self.epoch, "step": self.step,
                      "seconds": round(time.time() - t0, 2)})
            self.save()
            self.plot()
        return self.last_metrics

    def _train_epoch(self) -> None:
        """The remaining steps of the current epoch (from step_in_epoch), checkpointing every
        ckpt_every steps inside it (fit checkpoints the epoch's end)."""
        cfg = self.cfg
        order = epoch_order(len(self.train), cfg.seed, self.epoch)
        batches = [order[s:s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
        bar = tqdm(total=len(batches), initial=self.step_in_epoch, desc=f"epoch {self.epoch}",
                   disable=not (cfg.progress and self.d.main), leave=False, file=sys.stderr)
        while self.step_in_epoch < len(batches):
            rec = self.train_step(batches[self.step_in_epoch])
            self.step += 1
            self.step_in_epoch += 1
            rec.update(kind="train", epoch=self.epoch, step=self.step, lr=self.opt.param_groups[0]["lr"])
            self.log(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4f}")
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step_in_epoch < len(batches):
                self.save()
        bar.close()

    def _evaluate_and_log(self) -> None:
        NOW["doing"] = f"evaluating epoch {self.epoch} of {self.out}"
        m = self.evaluate()
        self.log({"kind": "eval", "epoch": self.epoch, "step": self.step, **m})
        if self.d.main:
            print(f"epoch {self.epoch}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()
                                                       if isinstance(v, float)), file=sys.stderr)

    def finish(self, name: str) -> dict:
        """Write the final predictions, metrics and curves of a run (rank 0). A resumed run with
        nothing left to train (killed after its last checkpoint, before these files) evaluates the
        checkpoint's weights first, so that every run ends with all of its outputs."""
        if self.epochs_trained == 0:             # nothing left to train in this session
            if self.test is not None:
                self.evaluate()                  # every rank: the evaluation is distributed
            self.plot()
        if self.d.main:
            if self.last_predictions is not None:
                atomic_write_json(self.out / "predictions_test.json",
                                  {k: np.asarray(v).tolist() for k, v in self.last_predictions.items()})
            atomic_write_json(self.out / "metrics.json", self.last_metrics, indent=1)
            print(json.dumps({"run": name, **self.last_metrics}))
        return self.last_metrics


def run_cli(main_fn) -> None:
    """main_fn() with the training commands' contract (common.run_command): bad input (and a file that
    cannot be read or written) -> one ``error:`` line, exit 2; a non-finite loss -> exit 3; SIGINT /
    SIGTERM -> one ``interrupted`` line naming the step and ``--resume``, exit 130 / 143."""
    def main() -> int:
        main_fn()                        # its metrics (a dict): exit 0
        return 0
    errors = [((TrainInputError, FileNotFoundError, ValueError, KeyError, OSError), 2), ((NonFiniteLossError,), 3)]
    try:
        status = run_command(main, errors, doing="setting up", resume="resume: the same command with --resume")
        if status:
            sys.exit(status)
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()
