"""The model-agnostic training loop of LINK, shared by the teacher and the student.

train_teacher.py (teacher CLI, run set-up: arguments, model, splits, metric) and train_student.py
(adds the distillation through the ``extra_loss`` hook) both drive :class:`Trainer`. Nothing
here imports model.py, data.py or eval.py; what the loop needs from them is the contract below.

* :class:`Split`          one dataset split: targets, detections (file -> select; GT boxes
                          appended while training only on request), image paths, the raw
                          annotation, its box frame and training :class:`Views`.
* :class:`FeatureCache`   frozen-VLM feature maps computed once per (image, VLM, view), stored as
                          one memory-mapped file plus an index JSON per cache key; stale caches
                          (other key, other image list, image mtime/size changed) are rebuilt.
* :class:`FeatureSource`  the features of a split for one model: the cache or on-the-fly encoding.
* :class:`Trainer`        AdamW, warm-up + cosine/step schedule, gradient clipping (after
                          unscaling under fp16 AMP), bf16/fp16 autocast on GPU, plain fp32 on CPU,
                          atomic checkpoints, full resume (model, optimiser, scheduler, scaler,
                          RNG states, data order, epoch, step), torchrun data parallel (explicit
                          gradient all-reduce, gloo on CPU / nccl on GPU), distributed evaluation
                          that covers every image exactly once, tqdm, runs/NAME/log.jsonl and a PNG
                          of the curves, the metric after each evaluated epoch.

The contract (model.LINK follows it; tests/test_train.py's StandIn is a 100-line example):

* model, see :class:`LoopModel`: a torch.nn.Module with ``cfg`` (a dataclass) and
  ``class_space`` (a dataclass or dict), both stored in checkpoints and compared on resume;
  ``cache_key()``, ``preprocess(images)``, ``encode_images(x)`` (the frozen VLM),
  ``forward(feats, detections, sizes, targets=None)`` and ``postprocess(out, detections)``.
  Frozen parameters (requires_grad False) are neither optimised nor checkpointed; a model may
  say what it stores with ``checkpoint_state_dict()``, and free its frozen image tower with
  ``release_vlm()`` once every image's features come from the cache (:func:`release_unused_towers`).
* dataset (inside :class:`Split`): ``filenames``, ``ds[i] -> (PIL image, target dict)`` and
  optionally ``target(i)`` and ``image_path(i)``; a target holds ``size`` (w, h), ``boxes_h``,
  ``boxes_o`` [N, 4] xyxy and whatever the model's loss reads.
* ``metric_fn(anno, predictions, **eval_kwargs) -> dict``: predictions are
  {filename: ndarray[N, 10]} (hoi, score, human box, object box); the keys full, rare,
  non_rare, unseen, seen are logged and kept.
* ``extra_loss(ctx) -> {name: 0-dim tensor | SumLoss}`` (already weighted), added to the
  model's loss; ``ctx`` holds model, out, feats, indices, views, dets, sizes, targets, split.
  A plain tensor is a per-image mean; a :class:`SumLoss` is a sum over items (pairs, tokens)
  with its item count, divided by the items of the whole global batch. An ``extra_loss`` that
  is a torch.nn.Module (the student's distillation adapters) has its trainable parameters
  optimised with the model's and its state checkpointed under ``extra_state`` (restored on
  resume); it is not part of the model's weights, so inference never sees it. An optional
  ``extra_loss.prepare(ctx)`` runs before the model's forward (ctx without ``out``): the
  Distiller runs its frozen teachers there, so their forward temporaries never coincide with
  the model's saved activations (the step's peak memory).

Design choices written down (LINK.md is silent on them):

* GT boxes in training: off by default, as UPT and PViC train on the detector's boxes alone (the
  candidates then look in training as they will at test time). ``Split(append_gt=True)``
  (``--append-gt``) is SCG's practice: the ground-truth boxes of the image (score 1.0) are
  concatenated to the detector's boxes BEFORE the split's ``select`` (data.select_boxes), so they
  survive NMS and the 3..15 caps and duplicate detections of the same object (IoU > 0.5, same
  label) are suppressed; every training image then has its labelled pairs among the candidates.
  Evaluation never sees GT boxes.
* Data parallel: gradients are averaged by one flat all-reduce per step instead of DDP's
  bucket hooks, because the number of pairs per image varies and some parameters get no
  gradient in some steps (DDP would need find_unused_parameters). A global batch of B images is
  split rank r <- batch[r::W]; per-image-mean losses (distillation) are weighted by
  n_local * W / n_global, a loss normalised by its positives (the model's focal loss,
  which reports ``num_pos``) by W * max(pos_local, 1) / max(pos_global, 1), and a
  :class:`SumLoss` (per-pair / per-token distillation) by W / max(items_global, 1), the
  positives and items being summed over ranks each step, so that the averaged gradient is
  exactly the gradient one process computes on the global batch (up to float summation order).
* Views (augmentation with a frozen, cached VLM): a ViT is neither flip- nor scale-equivariant,
  so each view is encoded on its own and the cache stores all of them ([N, V, C, Gh, Gw]; the
  view count and the crop scales are part of the cache key): the whole image, one crop per
  ``crop_scales`` entry at a fixed, hashed position per image (:func:`crop_window`), each also
  mirrored with ``flip``. Each epoch trains every image on one view drawn by :func:`view_of`
  from (seed, epoch, index). Boxes follow the view in the split's box frame (:func:`view_boxes`:
  mirror x -> w - x in the continuous frame, w + 1 - x for HICO-DET's 1-based inclusive boxes).
  The detections are mapped into the view before ``select``. Any other image augmentation must
  bypass the cache.
* Cache dtype float16 by default (half the disk; CLIP-like features are far below fp16's
  range); float32 for bit-exact reuse of the encoder's output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Protocol

import numpy as np
import torch
import torch.distributed as tdist
from PIL import ImageOps
from tqdm import tqdm

from common import (
    BOX_FRAMES,
    WriteError,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    check_input_file,
    clean_stale_temps,
    file_sha256,
    file_stamp,
    key_difference,
    note,
    write_error,
)
from viz import plot_curves

CKPT_VERSION = 1


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

    # optional: def no_weight_decay(self) -> set[str], names of matrices AdamW must not decay
    # (see param_groups; timm's convention)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
class TrainInputError(ValueError):
    """Bad input (file, image, field named in the message). CLIs exit 2."""


class CheckpointError(TrainInputError):
    """A checkpoint that is truncated, corrupt or does not match the run."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the step and the images."""


class NonFiniteOutputError(TrainInputError):
    """The model scored images NaN or inf at evaluation (non-finite features or weights); the
    message names the images. Never turned into a lower mAP by dropped predictions."""


def nonfinite_images(out: dict, rows: list) -> list:
    """Batch positions of the images with a NaN / inf score: in the model output's ``scores``
    [P, ...] (pairs of image ``pair_image`` [P]), which postprocess may filter (``score > 0`` is
    False for NaN), or in the prediction rows [N, 10] themselves."""
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


# ----------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------
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


def barrier(d: Dist) -> None:
    if d.enabled:
        tdist.barrier()


def all_gather_objects(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    tdist.all_gather_object(out, obj)
    return out


def allreduce_grads(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Average gradients over ranks with one flat all-reduce (None grads count as zeros)."""
    if not d.enabled or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [has])
    tdist.all_reduce(flat)
    has = flat[-len(params):]
    flat = flat[:-len(params)] / d.world
    off = 0
    for p, h in zip(params, has.tolist()):
        n = p.numel()
        # a parameter no rank produced a gradient for stays None (AdamW then skips it, exactly
        # as in a single process; a zero gradient would still apply weight decay)
        p.grad = flat[off:off + n].view_as(p).to(p.dtype).clone() if h > 0 else None
        off += n


def broadcast_params(module: torch.nn.Module, d: Dist) -> None:
    if d.enabled:
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                tdist.broadcast(t.data, 0)


def eval_shard(n: int, rank: int, world: int) -> list[int]:
    """Evaluation sharding that neither drops nor duplicates: rank r gets r, r+W, r+2W, ...
    (ranks may get one image fewer; nothing is padded)."""
    return list(range(rank, n, world))


# ----------------------------------------------------------------------------------------------
# Schedule and data order
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


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a permutation of range(n), a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(int(seed) * 100003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


def view_of(seed: int, epoch: int, index: int, n_views: int) -> int:
    """The view (see :class:`Views`) an image is trained on in an epoch, uniform over
    range(n_views); a pure function of (seed, epoch, index), so a resumed run sees the same
    views. With 2 views (flip only) the same choice as before crop views existed."""
    if isinstance(n_views, bool) or n_views < 1:
        raise TypeError(f"view_of: n_views must be a positive int, got {n_views!r}")
    if n_views == 1:
        return 0
    h = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") % n_views


#: version of crop_window's placement rule (part of the feature-cache key of crop views)
CROP_RULE = "blake2b-v1"


def crop_window(filename: str, k: int, scale: float, w: int, h: int) -> tuple[int, int, int, int]:
    """(x0, y0, cw, ch): the k-th crop window of an image of w x h pixels, ``scale`` of its width
    and height: cw = floor(scale * w + 0.5) (at least 1), ch likewise; its top-left pixel
    offset (x0, y0) is drawn uniformly from [0, w - cw] x [0, h - ch] by a hash of (file name,
    k, scale): fixed per image, so that the cache holds it once, and independent of the seed."""
    cw = min(int(w), max(1, math.floor(scale * w + 0.5)))
    ch = min(int(h), max(1, math.floor(scale * h + 0.5)))
    dg = hashlib.blake2b(f"{filename}|{k}|{scale!r}".encode(), digest_size=8).digest()
    ux, uy = (int.from_bytes(dg[a:a + 4], "little") / 2 ** 32 for a in (0, 4))
    return int(ux * (w - cw + 1)), int(uy * (h - ch + 1)), cw, ch


@dataclass(frozen=True)
class Views:
    """The views of each training image (README "Augmentation"), each encoded once into the
    feature cache: window 0 is the whole image, window k >= 1 the crop ``crop_scales[k - 1]``
    of its width and height (:func:`crop_window`; squashed to the VLM's input it is a zoom by
    1 / scale); with ``flip`` every window also comes mirrored. View v = window * F + m (F = 2
    with flip, else 1; m = 1: mirrored): view 0 is the image itself (evaluation's only view)
    and flip alone keeps the layout [original, mirrored]."""
    flip: bool = False
    crop_scales: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "flip", bool(self.flip))
        object.__setattr__(self, "crop_scales", tuple(float(s) for s in self.crop_scales))
        bad = [s for s in self.crop_scales if not 0 < s < 1]
        if bad:
            raise TrainInputError(f"crop scales must lie strictly between 0 and 1 (the whole image is always "
                                  f"a view), got {bad[0]}")

    @classmethod
    def of(cls, cfg) -> "Views":
        """The views a LoopConfig (or its checkpointed dict) asks for."""
        get = cfg.get if isinstance(cfg, dict) else (lambda k, dflt: getattr(cfg, k, dflt))
        return cls(get("flip", False), tuple(get("crop_scales", ()) or ()))

    @property
    def count(self) -> int:
        return (1 + len(self.crop_scales)) * (2 if self.flip else 1)

    def parts(self, v: int) -> tuple[int, bool]:
        """(window, mirrored) of view v."""
        if not 0 <= v < self.count:
            raise IndexError(f"view {v} out of range for {self.count} views")
        f = 2 if self.flip else 1
        return v // f, bool(v % f)

    def key(self) -> str:
        """What the views add to the feature-cache key: nothing for the whole image and its
        mirror (the cache's view count names them), else the crop scales and placement rule."""
        if not self.crop_scales:
            return ""
        return "|crops=" + ",".join(repr(s) for s in self.crop_scales) + "@" + CROP_RULE

    def window(self, v: int, filename: str, w: int, h: int) -> tuple[int, int, int, int]:
        """(x0, y0, cw, ch) of view v's window in image ``filename`` of w x h pixels."""
        k, _ = self.parts(v)
        if k == 0:
            return 0, 0, int(w), int(h)
        return crop_window(filename, k, self.crop_scales[k - 1], w, h)


# ----------------------------------------------------------------------------------------------
# Feature cache
# ----------------------------------------------------------------------------------------------
def _image_stamp(path: Path) -> list:
    """[size, mtime_ns, ctime_ns, inode] of an image file (common.file_stamp)."""
    try:
        return list(file_stamp(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} not found (field: filename)") from None


def _same_image(path: Path, stamp: list, sha256: str) -> bool:
    """Are the image's bytes those the cache was built from? size or mtime changed: no; ctime
    and inode unchanged: yes (a write would have moved ctime); otherwise (a copied or touched
    dataset, or a writer that restored size and mtime) the SHA-256 of the whole file decides."""
    try:
        now = _image_stamp(path)
    except FileNotFoundError:
        return False
    if now[:2] != stamp[:2]:
        return False
    return now[2:] == stamp[2:] or file_sha256(path) == sha256


class FeatureCache:
    """Frozen-VLM feature maps of a list of images, memory-mapped from disk.

    Layout: ``root/<hash of key and image list>/index.json`` and ``feats-<token>.bin`` holding
    a C-order array [N, V, C, Gh, Gw] (V = 1 view, or 2 with flips: original, mirrored).
    index.json = {"version", "key", "views", "dtype", "shape": [C, Gh, Gw], "data": file name,
    "images": [[path, size, mtime_ns, ctime_ns, inode, sha256], ...]}. The index is written last
    and atomically, and it names its data file, so a crash at any point leaves either the old
    valid cache or none. The cache is used only when the key (the model's cache_key: VLM, weights
    content, activation, input size, pixel statistics, dense mode), the image list and every
    image's bytes match (_same_image: size, mtime, then ctime + inode or the SHA-256 of the whole
    file); otherwise it is rebuilt (``self.rebuilt`` tells which happened). Indexes of an older
    version are never reused.
    """

    def __init__(self, root, key: str, image_paths: list, views: int = 1, dtype: str = "float16"):
        if dtype not in ("float16", "float32"):
            raise TrainInputError(f"cache dtype must be float16 or float32, got {dtype!r}")
        self.key = f"{key}|views={views}|dtype={dtype}"
        self.paths = [str(Path(p)) for p in image_paths]
        self.views, self.dtype = int(views), dtype
        h = hashlib.sha1((self.key + "\n" + "\n".join(self.paths)).encode()).hexdigest()[:16]
        self.dir = Path(root) / h
        self.index_path = self.dir / "index.json"
        self.mm = None
        self.rebuilt = False
        self._restamp = None

    def _read_index(self):
        try:
            return json.loads(self.index_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_valid(self) -> bool:
        idx = self._read_index()
        if not idx or idx.get("version") != 2 or idx.get("key") != self.key:
            return False
        imgs = idx.get("images", [])
        if [i[0] for i in imgs] != self.paths:
            return False
        if not all(_same_image(Path(p), stamp, sha) for p, *stamp, sha in imgs):
            return False
        fresh = [[p] + _image_stamp(Path(p)) + [sha] for p, *_, sha in imgs]
        self._restamp = fresh if fresh != imgs else None   # same bytes, new ctime / inode
        data = self.dir / idx["data"]
        n = len(self.paths) * self.views * int(np.prod(idx["shape"])) * np.dtype(self.dtype).itemsize
        return data.exists() and data.stat().st_size == n

    def open(self) -> None:
        idx = self._read_index()
        self.shape = tuple(idx["shape"])
        self.mm = np.memmap(self.dir / idx["data"], dtype=self.dtype, mode="r",
                            shape=(len(self.paths), self.views) + self.shape)

    def ensure(self, encode: Callable, load: Callable, batch_size: int = 16,
               d: Optional[Dist] = None, progress: bool = True) -> "FeatureCache":
        """Use the cache if valid, else build it. ``load(i, view) -> PIL image``,
        ``encode(list[PIL]) -> FloatTensor[B, C, Gh, Gw]``. Rank 0 builds, the others wait."""
        d = d or Dist()
        if d.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            # an exclusive lock: two runs sharing the cache folder (e.g. demo.py's parallel
            # chains) never build the same cache at once; the second one finds it valid
            with open(self.dir / ".lock", "a+") as lk:
                fcntl.flock(lk, fcntl.LOCK_EX)
                try:
                    sweep_cache_folder(self.dir)          # what killed builds left here
                    sweep_stale_caches(self.dir.parent, skip=self.dir)
                    if not self.is_valid():
                        self._build(encode, load, batch_size, progress)
                        self.rebuilt = True
                    elif self._restamp:     # a copied / touched dataset: hash it once, not every run
                        atomic_write_json(self.index_path, {**self._read_index(), "images": self._restamp})
                except OSError as e:                     # a full disk, a read-only folder, ...
                    raise e if isinstance(e, WriteError) else write_error(self.dir, e) from None
                finally:
                    fcntl.flock(lk, fcntl.LOCK_UN)
        barrier(d)
        if not self.is_valid():
            raise TrainInputError(f"feature cache {self.dir} could not be built")
        self.open()
        return self

    def _build(self, encode, load, batch_size, progress) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        stamps = [[p] + _image_stamp(Path(p)) + [file_sha256(p)] for p in self.paths]   # before encoding
        token = uuid.uuid4().hex[:12]
        data_name = f"feats-{token}.bin"
        tmp = self.dir / f".{data_name}.tmp"
        n = len(self.paths)
        mm, shape = None, None
        jobs = [(i, v) for i in range(n) for v in range(self.views)]
        bar = tqdm(total=len(jobs), desc=f"cache {self.dir.name}", disable=not progress,
                   leave=False, file=sys.stderr)
        try:
            for s in range(0, len(jobs), batch_size):
                chunk = jobs[s:s + batch_size]
                with torch.no_grad():
                    f = encode([load(i, v) for i, v in chunk])          # [b, C, Gh, Gw]
                f = f.detach().float().cpu().numpy()
                if mm is None:
                    shape = tuple(int(x) for x in f.shape[1:])
                    reserve_file(tmp, n * self.views * math.prod(shape) * np.dtype(self.dtype).itemsize,
                                 f"{n} images x {self.views} view(s) x {list(shape)} {self.dtype}")
                    mm = np.memmap(tmp, dtype=self.dtype, mode="r+", shape=(n, self.views) + shape)
                for (i, v), fi in zip(chunk, f):
                    mm[i, v] = fi
                bar.update(len(chunk))
            bar.close()
            if mm is None:
                raise TrainInputError("feature cache: no images to encode")
            mm.flush()
            del mm
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.dir / data_name)
            atomic_write_json(self.index_path, {"version": 2, "key": self.key, "views": self.views,
                                                "dtype": self.dtype, "shape": list(shape),
                                                "data": data_name, "images": stamps})
        finally:
            if tmp.exists():
                tmp.unlink()
        for old in self.dir.glob("feats-*.bin"):          # data files no index names any more
            if old.name != data_name:
                with contextlib.suppress(OSError):
                    old.unlink()

    def get(self, indices: list[int], views: list[int]) -> torch.Tensor:
        """-> FloatTensor[B, C, Gh, Gw] (float32 copy of the memory-mapped rows)."""
        arr = np.stack([np.asarray(self.mm[i, v]) for i, v in zip(indices, views)])
        return torch.from_numpy(arr.astype(np.float32))


def reserve_file(path: Path, nbytes: int, what: str) -> None:
    """Create ``path`` with ``nbytes`` allocated on disk before anything is written through a
    memory map: a memory-mapped write to a sparse file on a full disk kills the process with
    SIGBUS and no message. The free space is checked first (one-line TrainInputError naming
    the folder and the sizes); file systems without posix_fallocate get a sparse file, guarded
    by the free-space check only."""
    def too_big() -> TrainInputError:
        gib, free = 1024 ** 3, shutil.disk_usage(path.parent).free
        return TrainInputError(f"feature cache {path.parent}: needs {nbytes / gib:.2f} GiB ({what}) but only "
                               f"{free / gib:.2f} GiB are free on that disk: free some space, put --cache on "
                               f"another disk, or pass --no-cache")
    if nbytes > shutil.disk_usage(path.parent).free:
        raise too_big()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            os.posix_fallocate(fd, 0, max(nbytes, 1))
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise too_big() from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)


def sweep_cache_folder(folder: Path) -> None:
    """Remove what killed builds left in a cache folder whose lock the caller holds: temp files
    (a dataset-sized ``.feats-*.bin.tmp`` per interrupted build) and data files that its index
    does not name (a build killed between its data file and its index)."""
    try:
        named = json.loads((folder / "index.json").read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        named = None
    for p in list(folder.glob(".*.tmp")) + [p for p in folder.glob("feats-*.bin") if p.name != named]:
        with contextlib.suppress(OSError):
            p.unlink()


def sweep_stale_caches(root: Path, skip: Optional[Path] = None) -> None:
    """sweep_cache_folder on every other cache folder of ``root`` whose lock is free right now;
    a folder whose builder is running (lock held) is left alone."""
    for lock in root.glob("*/.lock"):
        if skip is not None and lock.parent == skip:
            continue
        with contextlib.suppress(OSError), open(lock, "a+") as lk:
            try:
                fcntl.flock(lk, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue                          # a build in progress
            try:
                sweep_cache_folder(lock.parent)
            finally:
                fcntl.flock(lk, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def view_boxes(boxes: torch.Tensor, size: tuple, window: tuple, mirrored: bool,
               offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 4] xyxy boxes of an image of ``size`` (w, h) -> (the boxes in the view, Bool[N] kept).

    ``offset`` is the box frame's o (common.BOX_FRAMES: 0 continuous, 1 hico1): the image spans
    [o, w] and a width is x2 - x1 + o. Crop to window (x0, y0, cw, ch): x' = x - x0, y' = y - y0,
    clamped to [o, cw] x [o, ch]; a box is kept when its overlap with the window has a positive
    width and height in the frame's convention (min(x2, x0 + cw) - max(x1, x0 + o) + o > 0),
    as DETR's crops keep any box with a positive area left. Mirror: x' = cw + o - x, i.e.
    w - x for continuous boxes and w + 1 - x for 1-based inclusive pixel indices. The whole
    image's window is no crop (boxes unchanged, all kept)."""
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    x0, y0, cw, ch = window
    keep = torch.ones(len(b), dtype=torch.bool)
    if (x0, y0, cw, ch) != (0, 0, int(size[0]), int(size[1])):
        lo = torch.tensor([x0 + offset, y0 + offset], dtype=torch.float32)
        hi = torch.tensor([x0 + cw, y0 + ch], dtype=torch.float32)
        overlap = torch.minimum(b[:, 2:], hi) - torch.maximum(b[:, :2], lo) + offset      # [N, 2]
        keep = (overlap > 0).all(1)
        shift = torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        high = torch.tensor([cw, ch, cw, ch], dtype=torch.float32)
        b = torch.minimum(torch.clamp(b - shift, min=float(offset)), high)
    if mirrored:
        b = b.clone()
        b[:, 0], b[:, 2] = cw + offset - b[:, 2], cw + offset - b[:, 0]
    return b, keep


def _empty_dets() -> dict:
    return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}


#: the per-row fields of a target (rows dropped with their boxes when a crop leaves them out)
TARGET_ROW_FIELDS = ("boxes_h", "boxes_o", "object", "hoi", "verb")


class Split:
    """A dataset split as the loop sees it.

    dataset: see the module docstring (a data.py dataset); dets_file: {filename: dets}
    (detector output, before ``select``); image_root: folder of the image files; anno: the raw
    annotation handed to the metric; select: callable(dets) -> dets (data.select_boxes with the
    class space's person label); gt_dets: callable(target) -> dets (data.gt_detections).
    views: the training views (:class:`Views`; evaluation uses view 0 only). frame: the boxes'
    frame (common.BOX_FRAMES; default the dataset's ``box_frame``, else continuous), which the
    views' mirror and crop follow. append_gt: add the GT boxes to the detector's in training
    (SCG's practice; UPT trains on the detector's boxes alone, the default).
    """

    def __init__(self, dataset, dets_file: dict, image_root, anno: Optional[dict], select: Callable,
                 gt_dets: Callable, name: str = "split", views: Optional[Views] = None,
                 frame: Optional[str] = None, append_gt: bool = False):
        self.ds, self.dets_file, self.anno, self.name = dataset, dets_file, anno, name
        self.select, self.gt_dets = select, gt_dets
        self.views = views if views is not None else Views()
        self.frame = frame or getattr(dataset, "box_frame", "continuous")
        if self.frame not in BOX_FRAMES:
            raise TrainInputError(f"split {name}: box frame {self.frame!r} is not one of {sorted(BOX_FRAMES)}")
        self.append_gt = bool(append_gt)
        self.filenames = list(dataset.filenames)
        self.image_root = Path(image_root)
        if hasattr(dataset, "image_path"):
            self.image_paths = [Path(dataset.image_path(i)) for i in range(len(self.filenames))]
        else:
            self.image_paths = [self.image_root / f for f in self.filenames]
        self._targets = {}

    def __len__(self):
        return len(self.filenames)

    def target(self, i: int) -> dict:
        if i not in self._targets:
            if hasattr(self.ds, "target"):
                self._targets[i] = self.ds.target(i)
            else:
                self._targets[i] = self.ds[i][1]
        return self._targets[i]

    def image(self, i: int, view: int = 0):
        """The PIL image of view ``view`` of image i: its window cropped, then mirrored."""
        img, tgt = self.ds[i]
        self._targets.setdefault(i, tgt)
        if view == 0:
            return img
        w, h = tgt["size"]
        x0, y0, cw, ch = self.views.window(view, self.filenames[i], w, h)
        if (x0, y0, cw, ch) != (0, 0, w, h):
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
        return ImageOps.mirror(img) if self.views.parts(view)[1] else img

    def item(self, i: int, view: int, train: bool):
        """-> (detections, size (w, h), target) for image i in the given view (its window's
        size; boxes mapped by view_boxes, boxes and GT rows outside the window dropped), the
        detections selected by ``select`` in the view. With append_gt, training adds the GT
        boxes to the detector's first (see module docstring)."""
        tgt = self.target(i)
        dets = self.dets_file.get(self.filenames[i], _empty_dets())
        if train and self.append_gt:
            g = self.gt_dets(tgt)
            dets = {"boxes": torch.cat([g["boxes"].float(), dets["boxes"].float().reshape(-1, 4)]),
                    "scores": torch.cat([g["scores"].float(), dets["scores"].float().reshape(-1)]),
                    "labels": torch.cat([g["labels"].long(), dets["labels"].long().reshape(-1)])}
        size = tuple(tgt["size"])
        if view != 0:
            dets, tgt, size = self._in_view(i, view, dets, tgt)
        return self.select(dets), size, tgt

    def _in_view(self, i: int, view: int, dets: dict, tgt: dict) -> tuple[dict, dict, tuple]:
        """Detections and target of image i mapped into view ``view`` -> (dets, target, size)."""
        w, h = tgt["size"]
        win = self.views.window(view, self.filenames[i], w, h)
        mirrored, o = self.views.parts(view)[1], BOX_FRAMES[self.frame]
        boxes, kd = view_boxes(dets["boxes"], (w, h), win, mirrored, o)
        dets = {"boxes": boxes[kd], "scores": torch.as_tensor(dets["scores"]).reshape(-1)[kd],
                "labels": torch.as_tensor(dets["labels"]).reshape(-1)[kd]}
        bh, kh = view_boxes(tgt["boxes_h"], (w, h), win, mirrored, o)
        bo, ko = view_boxes(tgt["boxes_o"], (w, h), win, mirrored, o)
        rows = kh & ko                                 # a GT pair needs both boxes in the window
        new = dict(tgt, size=(win[2], win[3]), boxes_h=bh[rows], boxes_o=bo[rows])
        for k in TARGET_ROW_FIELDS[2:]:
            if k in tgt:
                new[k] = torch.as_tensor(tgt[k])[rows]
        return dets, new, (win[2], win[3])

    def fingerprint(self) -> str:
        return hashlib.sha1("\n".join(self.filenames).encode()).hexdigest()[:16]


class FeatureSource:
    """Features of a split for one frozen VLM: the cache, or on-the-fly encoding (no cache)."""

    def __init__(self, model, split: Split, cache_root=None, views: Optional[int] = None, dtype: str = "float16",
                 d: Optional[Dist] = None, batch_size: int = 16, progress: bool = True):
        """views: the split's view count (split.views.count, the default); another number is
        refused rather than caching views the split does not produce."""
        if views is not None and views != split.views.count:
            raise TrainInputError(f"feature source of split {split.name}: {views} views asked, the split has "
                                  f"{split.views.count} ({split.views})")
        self.model, self.split, self.views = model, split, split.views.count
        self.device = d.device if d else torch.device("cpu")
        self.cache = None
        if cache_root is not None:
            self.cache = FeatureCache(cache_root, model.cache_key() + split.views.key(), split.image_paths,
                                      self.views, dtype)
            self.cache.ensure(self._encode, split.image, batch_size, d, progress)

    def _encode(self, images) -> torch.Tensor:
        x = self.model.preprocess(images).to(self.device)          # [B, 3, S, S]
        with torch.no_grad():
            return self.model.encode_images(x)                       # [B, C, Gh, Gw]

    def get(self, indices: list[int], views: list[int]) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.get(indices, views).to(self.device)
        return self._encode([self.split.image(i, v) for i, v in zip(indices, views)])


def release_unused_towers(sources: list) -> int:
    """Free the frozen image tower (``model.release_vlm()``) of every model all of whose
    FeatureSources read a cache: from then on training and evaluation never run it, and a frozen
    ViT-L/14 tower is 1.1 GiB of memory per model. A model with a source without cache
    (``--no-cache``) keeps its tower. Pass every source of the run (None entries are skipped);
    -> the number of models released."""
    models = {}
    for s in sources:
        if s is not None:
            models.setdefault(id(s.model), [s.model, True])[1] &= s.cache is not None
    released = 0
    for model, cached in models.values():
        if cached and hasattr(model, "release_vlm"):
            model.release_vlm()
            released += 1
    if released and torch.cuda.is_available():
        torch.cuda.empty_cache()          # hand the towers' blocks back to the device
    return released


# ----------------------------------------------------------------------------------------------
# Model state and checkpoints
# ----------------------------------------------------------------------------------------------
def trainable_state(model: torch.nn.Module) -> dict:
    """state_dict without the frozen VLM (model.checkpoint_state_dict() if it has one, else the
    state_dict minus the parameters that do not require grad)."""
    if hasattr(model, "checkpoint_state_dict"):
        return model.checkpoint_state_dict()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_trainable_state(model: torch.nn.Module, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = set(trainable_state(model))
    miss = [k for k in missing if k in trainable]
    if miss or unexpected:
        raise CheckpointError(f"checkpoint weights do not fit the model: missing {miss[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")


def plain_dict(x) -> dict:
    """A dataclass or mapping as a plain dict (how configs and class spaces are checkpointed)."""
    return asdict(x) if dataclasses.is_dataclass(x) else dict(x)


def atomic_torch_save(obj, path) -> None:
    """torch.save through common.atomic_write: a crash leaves the old checkpoint or the new one."""
    atomic_write(path, lambda f: torch.save(obj, f))


#: what building a model from a file can raise when the file is not what it should be
BUILD_ERRORS = (ValueError, KeyError, IndexError, TypeError, RuntimeError, EOFError, pickle.UnpicklingError)


def build_error_reason(e: BaseException) -> str:
    """The useful line of a library's error (one line): torch's size-mismatch list as 'size
    mismatch for W: [a, b] in the checkpoint, [c, d] in the model (and N more)', torch.load's
    weights_only refusal as its own reason without the advice paragraphs, else the first line."""
    text = str(e)
    sizes = re.findall(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[(.*?)\]\) from "
                       r"checkpoint, the shape in current model is torch\.Size\(\[(.*?)\]\)", text)
    if sizes:
        n, a, b = sizes[0]
        more = f" (and {len(sizes) - 1} more)" if len(sizes) > 1 else ""
        return f"size mismatch for {n}: [{a}] in the checkpoint, [{b}] in the model{more}"
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(e).__name__]
    if lines[0].startswith("Weights only load failed"):
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
        why = " ".join(m.group(1).split()).split(". Please use")[0] if m else "not a plain tensor file"
        return f"torch.load with weights_only=True refuses it ({why})"
    return lines[0] if isinstance(e, ValueError) else f"{type(e).__name__}: {lines[0]}"


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load with clear errors for missing, truncated or foreign files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    check_input_file(path, "checkpoint", CheckpointError)      # /dev/zero or a FIFO: never read
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, garbage bytes, ...
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ck, dict) or ck.get("version") != CKPT_VERSION or "model" not in ck:
        raise CheckpointError(f"checkpoint {path} is not a LINK checkpoint of version {CKPT_VERSION} "
                              f"(field: version)")
    for k in ("config", "class_space"):
        if k not in ck:
            raise CheckpointError(f"checkpoint {path} lacks the field {k!r}")
    return ck


def check_checkpoint_matches(ck: dict, model, path, fingerprint: Optional[str] = None,
                             class_space=None) -> None:
    """Refuse a checkpoint whose config / class space / training images differ from the run's."""
    cfg = plain_dict(model.cfg)
    cs = plain_dict(class_space if class_space is not None else model.class_space)
    if ck["config"] != cfg:
        diff = sorted(k for k in set(cfg) | set(ck["config"]) if cfg.get(k) != ck["config"].get(k))
        raise CheckpointError(f"checkpoint {path} has a different model config (fields: {diff[:6]})")
    if ck["class_space"] != cs:
        diff = sorted(k for k in set(cs) | set(ck["class_space"]) if cs.get(k) != ck["class_space"].get(k))
        raise CheckpointError(f"checkpoint {path} has a different class space (fields: {diff[:6]})")
    if ck.get("cache_key") not in (None, model.cache_key()):
        raise CheckpointError(f"checkpoint {path} was trained on other frozen-VLM features (field: cache_key; "
                              f"{key_difference(ck['cache_key'], model.cache_key())})")
    if fingerprint is not None and ck.get("data_fingerprint") not in (None, fingerprint):
        raise CheckpointError(f"checkpoint {path} was trained on a different image list "
                              f"(field: data_fingerprint)")


# ----------------------------------------------------------------------------------------------
# The run folder: one run per folder, one process at a time
# ----------------------------------------------------------------------------------------------
#: what a run writes into runs/NAME (the Trainer and train_teacher.finish)
RUN_OUTPUTS = ("last.pt", "log.jsonl", "metrics.json", "predictions_test.json", "curves.png")


class RunFolder:
    """``runs/NAME`` claimed by one training process.

    The lock is an exclusive ``flock`` on the folder itself (no lock file is written), taken
    without waiting and held until :meth:`release` or the end of the process (a killed process
    releases it). Claiming refuses: another live process on the same name (its pid named, from
    /proc/locks where available); a folder holding a run (any of RUN_OUTPUTS) unless the run is
    resumed from its own checkpoint, or moved aside first (``move_aside``: renamed to
    ``NAME.old-YYYYmmdd-HHMMSS``, whole); a ``resume`` checkpoint from elsewhere into a folder
    that holds another run. A run killed before its first checkpoint left only a log (and
    curves): ``--resume`` starts it again and removes them, so that a log holds one run. A
    folder this claim created is removed again by release() if it stayed empty.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._fd = None
        self._created = False
        self.pending: Optional[str] = None     # "move_aside" | "restart": done by prepare()

    def existing(self) -> list:
        return [n for n in RUN_OUTPUTS if (self.path / n).exists()]

    def claim(self, resume: Optional[str] = None, move_aside: bool = False) -> "RunFolder":
        """Lock and check the folder (rank 0's job); raises TrainInputError naming the folder."""
        if resume and move_aside:
            raise TrainInputError("--resume and --move-aside exclude each other: resume the run in "
                                  f"{self.path}, or move it aside and start a new one")
        self._acquire()
        try:
            self._check(resume, move_aside)
        except BaseException:
            self.release()
            raise
        return self

    def _acquire(self) -> None:
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _flock_holder(fd)
            os.close(fd)
            raise TrainInputError(f"{self.path}: another training process (pid {holder}) is using this "
                                  f"run name; wait for it to finish or choose another --name") from None
        self._fd = fd

    def _check(self, resume: Optional[str], move_aside: bool) -> None:
        have = self.existing()
        if move_aside:
            self.pending = "move_aside" if any(self.path.iterdir()) else None
            return
        if not have:
            return
        listing = ", ".join(have)
        if not resume:
            raise TrainInputError(f"{self.path}: holds a run already ({listing}); pass --resume to continue "
                                  f"it, --move-aside to keep it as {self.path.name}.old-<time>, or choose "
                                  f"another --name")
        own = self.path / "last.pt"
        if resume != "auto" and not _same_file(resume, own):
            raise TrainInputError(f"{self.path}: holds a run already ({listing}); resuming from {resume} here "
                                  f"would mix two runs: pass --move-aside or choose another --name")
        if not own.exists():
            if {"metrics.json", "predictions_test.json"} & set(have):
                raise TrainInputError(f"{self.path}: holds the outputs of a run ({listing}) but no checkpoint "
                                      f"last.pt to resume; pass --move-aside or choose another --name")
            self.pending = "restart"   # killed before its first checkpoint: start it again

    def prepare(self) -> None:
        """Do what claim() decided once the run is about to train (the command's input is
        valid by then, so a refused command moves or removes nothing): move the old run aside,
        or remove the log of a run that never reached its first checkpoint."""
        if self.pending == "move_aside":
            self._move_aside()
        elif self.pending == "restart":
            have = self.existing()
            for n in have:
                (self.path / n).unlink()
            print(f"note: {self.path} has no checkpoint (the run stopped before its first one): "
                  f"starting it again, its log ({', '.join(have)}) removed", file=sys.stderr)
        self.pending = None

    def _move_aside(self) -> None:
        """Rename the locked folder (the lock goes with it), lock a new empty one, let go of the old."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = self.path.with_name(f"{self.path.name}.old-{stamp}")
        k = 2
        while dest.exists():
            dest = self.path.with_name(f"{self.path.name}.old-{stamp}-{k}")
            k += 1
        os.rename(self.path, dest)
        old = self._fd
        self._fd = None
        try:
            self._acquire()
            self._created = False
        finally:
            os.close(old)
        print(f"note: the previous run in {self.path} was moved to {dest}", file=sys.stderr)

    def release(self) -> None:
        if self._fd is not None:
            if self._created:
                with contextlib.suppress(OSError):    # only if empty: a refused run leaves nothing
                    self.path.rmdir()
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _flock_holder(fd: int) -> str:
    """The pid holding a flock on the file open as ``fd`` (Linux /proc/locks), else '?'."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            f = line.split()
            if len(f) >= 6 and f[1] == "FLOCK" and f[5] == ident:
                return f[4]
    return "?"


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def claim_run_folder(path, resume: Optional[str], move_aside: bool, d: Optional[Dist] = None) -> RunFolder:
    """RunFolder(path).claim(...) on rank 0; under torchrun every rank gets rank 0's refusal
    (the same one-line error) instead of waiting at the next barrier."""
    d = d or Dist()
    run, err = RunFolder(path), None
    if d.main:
        try:
            run.claim(resume, move_aside)
        except TrainInputError as e:
            err = str(e)
    err = all_gather_objects(err, d)[0]
    if err is not None:
        raise TrainInputError(err)
    return run


# ----------------------------------------------------------------------------------------------
# Resume: the same run
# ----------------------------------------------------------------------------------------------
#: LoopConfig fields that may change on resume: they change when things are saved or shown,
#: not what is trained
LOOP_FREE = ("progress", "ckpt_every", "eval_every")

#: why a setting is compared, for the messages of the ones users change most
RESUME_HINTS = {"epochs": "the learning-rate schedule spans the planned epochs; --override epochs "
                          "continues on the schedule of a run planned for the new number"}


def read_log_lines(path) -> list:
    """[(line, record or None)] of a log.jsonl; a line that does not parse (a torn last line of a
    killed writer) gets None instead of stopping the reader."""
    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        out.append((line, rec if isinstance(rec, dict) else None))
    return out


def _plain(x):
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def setting_differences(stored: dict, now: dict, prefix: str = "") -> list:
    """[(name, stored value, current value)] for every setting present in both that differs;
    nested dicts by dotted name (files.anno). Settings only one side has (a checkpoint from an
    older version) are not compared."""
    out = []
    for k in sorted(set(stored) & set(now)):
        a, b = _plain(stored[k]), _plain(now[k])
        if isinstance(a, dict) and isinstance(b, dict):
            out += setting_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((prefix + k, a, b))
    return out


def _setting_names(d: dict, prefix: str = "") -> set:
    names = set()
    for k, v in d.items():
        names |= _setting_names(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return names


def _option(name: str) -> str:
    """files.test_anno -> --test-anno (file content); lr -> --lr."""
    base = name.split(".")[-1]
    opt = "--" + base.replace("_", "-")
    return f"{opt} (file content)" if name.startswith("files.") else opt


def resume_differences(ck: dict, path, loop: dict, extra: dict, overrides=()) -> list:
    """The settings a resume changes: [(name, checkpoint value, this run's value)], all of them
    named in ``overrides``; raises CheckpointError for another role (a teacher never resumes
    from a student checkpoint or the reverse), an override naming no setting, or a setting that
    differs without an override. Compared: every LoopConfig field but LOOP_FREE (checkpoint
    ``loop``) and every entry of the run's ``settings`` (ckpt_extra, written by the CLI: its
    options and the content hashes of its data and teacher files)."""
    role_now, role_ck = extra.get("role"), ck.get("role")
    if role_now and role_ck and role_now != role_ck:
        raise CheckpointError(f"checkpoint {path} is a {role_ck} checkpoint and this is a {role_now} run: "
                              f"a {role_now} never resumes from a {role_ck} checkpoint")
    now = {"loop": {k: v for k, v in loop.items() if k not in LOOP_FREE}}
    stored = {"loop": {k: v for k, v in (ck.get("loop") or {}).items() if k not in LOOP_FREE}}
    if isinstance(extra.get("settings"), dict) and isinstance(ck.get("settings"), dict):
        now["settings"], stored["settings"] = extra["settings"], ck["settings"]
    diffs = [(n.split(".", 1)[1], a, b) for n, a, b in setting_differences(stored, now)]
    known = {n.split(".", 1)[1] for n in _setting_names(now)}
    want = {o.strip().lstrip("-").replace("-", "_") for o in overrides}
    for o in sorted(want):
        if not any(o in (k, k.split(".")[-1]) for k in known):
            raise CheckpointError(f"--override {o}: no such setting (settings: {', '.join(sorted(known))})")
    refused = [d for d in diffs if not ({d[0], d[0].split(".")[-1]} & want)]
    if refused:
        what = "; ".join(f"{_option(n)}: {a!r} in the checkpoint, {b!r} now" for n, a, b in refused[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        hint = "".join(f" ({RESUME_HINTS[n]})" for n, _, _ in refused[:4] if n in RESUME_HINTS)
        names = " ".join(f"--override {n.split('.')[-1]}" for n, _, _ in refused[:4])
        raise CheckpointError(f"checkpoint {path}: resuming would not continue the same run: {what}{more}{hint}; "
                              f"use the checkpoint's values, or change them from here with {names} (logged)")
    return diffs


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


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if device.type != "cuda":         # (fit() notes an --amp bf16/fp16 ignored on CPU)
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class SumLoss(NamedTuple):
    """An ``extra_loss`` term given as this rank's sum over items (pairs, tokens) and the
    number of items summed. The loop divides by the items of the whole global batch (summed
    over ranks each step, like the positives), so N ranks give one process's per-item mean."""
    total: torch.Tensor     # 0-dim, with its graph, already weighted
    count: float            # items summed over on this rank

    def mean(self) -> torch.Tensor:
        """The per-item mean over this rank's items (one process: the loss itself)."""
        return self.total / max(float(self.count), 1.0)


class _StepLosses(NamedTuple):
    """The local batch's losses of one step: the model's loss and the per-image-mean extra
    terms as 0-dim float tensors with their graphs, the :class:`SumLoss` extra terms, the
    per-image-mean parts detached for the log, and the model's ``num_pos`` (None when its loss
    is not normalised by positives)."""
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
    """The shared loop over a :class:`LoopModel` (see the module docstring for the contract).

    ``extra_loss(ctx) -> {name: 0-dim tensor | SumLoss}`` (already weighted) is added to the
    model's own ``out["loss"]``; ctx holds model, out, feats, indices, views, dets, sizes,
    targets, split (``extra_loss.prepare(ctx)``, if it exists, runs before the model's forward).
    An extra_loss that is an nn.Module trains and checkpoints with the model.
    ``metric_fn(anno, preds, **eval_kwargs) -> dict`` scores the test split (needed with one).
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
        rngs = all_gather_objects(rng_state(), self.d)        # every rank's RNG
        if self.d.main:
            atomic_torch_save(self.state(rngs), self.ckpt_path)
        barrier(self.d)

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
            log = self.out / "log.jsonl"
            if log.exists():
                lines = read_log_lines(log)
                keep = [line for line, rec in lines if rec is not None and rec.get("step", 0) <= self.step]
                if len(keep) != len(lines):       # (an unchanged log is left untouched)
                    atomic_write_bytes(log, ("\n".join(keep) + ("\n" if keep else "")).encode())
        self.ckpt_extra["overrides"] = list(ck.get("overrides", []))
        for name, old, now in changed:
            rec = {"setting": name, "checkpoint": old, "now": now, "epoch": self.epoch, "step": self.step}
            self.ckpt_extra["overrides"].append(rec)
            self.log({"kind": "override", **rec})
            if self.d.main:
                note(f"note: --override {name}: {old!r} in the checkpoint, {now!r} from step {self.step} on")
        note(f"resumed from {path}: epoch {self.epoch}, step {self.step}")

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
        for counts in all_gather_objects(local, self.d):
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
            names = all_gather_objects((d.rank, float(loss_val), [self.train.filenames[i] for i in local]), d)
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
        allreduce_grads(self.params, self.d)
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
        all_names = all_gather_objects(names, d)
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
        mine = eval_shard(len(split), d.rank, d.world)
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
        bad = [x for part in all_gather_objects(bad, d) for x in part]
        if bad:
            names = ", ".join(n for n, _ in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteOutputError(f"non-finite scores at evaluation (epoch {self.epoch}, split {split.name}) "
                                       f"for {len(bad)} image(s): {names} ({bad[0][1]})")
        merged = {}
        for part in all_gather_objects(rows, d):
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
        m = all_gather_objects(m, self.d)[0]
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
        broadcast_params(self.model, self.d)
        if self.extra_module is not None:
            broadcast_params(self.extra_module, self.d)
        if self.d.device.type != "cuda" and cfg.amp in ("bf16", "fp16") and self.d.main:
            print(f"note: --amp {cfg.amp} ignored on CPU (plain fp32)", file=sys.stderr)
        while self.epoch < cfg.epochs:
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
        m = self.evaluate()
        self.log({"kind": "eval", "epoch": self.epoch, "step": self.step, **m})
        if self.d.main:
            print(f"epoch {self.epoch}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()
                                                       if isinstance(v, float)), file=sys.stderr)
