"""Stage 1 of LINK: the teacher, trained on ground truth only; and the ONE shared training loop.

train_student.py imports everything here and only adds the distillation terms through the
``extra_loss`` hook of :class:`Trainer`; nothing is copied between the two scripts.

What lives here (model-agnostic, the model only has to follow the contract in model.py):

* :class:`Split`          one dataset split: targets, detections (file -> select_boxes, GT boxes
                          appended while training, as UPT does), image paths, the raw annotation.
* :class:`FeatureCache`   frozen-VLM feature maps computed once per (image, VLM, view), stored as
                          one memory-mapped file plus an index JSON per cache key; stale caches
                          (other key, other image list, image mtime/size changed) are rebuilt.
* :class:`Trainer`        AdamW, warm-up + cosine/step schedule, gradient clipping (after
                          unscaling under fp16 AMP), bf16/fp16 autocast on GPU, plain fp32 on CPU,
                          atomic checkpoints, full resume (model, optimiser, scheduler, scaler,
                          RNG states, data order, epoch, step), torchrun data parallel (explicit
                          gradient all-reduce, gloo on CPU / nccl on GPU), distributed evaluation
                          that covers every image exactly once, tqdm, runs/NAME/log.jsonl and a PNG
                          of the curves, evaluation through eval.evaluate_hico after each epoch.
* the teacher CLI (``python train_teacher.py --help``).

Usage (see README "Training"):

    python train_teacher.py --dataset synthetic --world runs/demo/world --name teacher
    python train_teacher.py --dataset hicodet --image-root IMG/train2015 --anno instances_train2015.json \
        --detections dets_train.json --test-image-root IMG/test2015 --test-anno instances_test2015.json \
        --test-detections dets_test.json --vlm ViT-B-16 --pretrained openai [--zero-shot rf-uc] [--few-shot 8]
    torchrun --nproc_per_node 2 train_teacher.py ...        # data parallel (gloo on CPU, nccl on GPU)
    python train_teacher.py ... --resume                     # continue runs/NAME/last.pt exactly

Design choices written down (LINK.md is silent on them):

* GT boxes appended during training (UPT): the ground-truth boxes of the image (score 1.0) are
  concatenated to the detector's boxes BEFORE data.select_boxes, so they survive NMS and the
  3..15 caps first and duplicate detections of the same object (IoU > 0.5, same label) are
  suppressed. Every training image therefore has at least its labelled pairs among the
  candidates. Evaluation never sees GT boxes.
* Data parallel: gradients are averaged by one flat all-reduce per step instead of DDP's
  bucket hooks, because the number of pairs per image varies and some parameters get no
  gradient in some steps (DDP would need find_unused_parameters). A global batch of B images is
  split rank r <- batch[r::W]; per-image-mean losses (distillation) are weighted by
  n_local * W / n_global, and a loss normalised by its positives (the model's focal loss,
  which reports ``num_pos``) by W * max(pos_local, 1) / max(pos_global, 1), the positives
  being summed over ranks each step, so that the averaged gradient is exactly the gradient
  one process computes on the global batch (up to float summation order).
* Flip augmentation (``--flip``): a ViT is not flip-equivariant, so the flipped image is encoded
  on its own; the cache then stores both views per image ([N, 2, C, Gh, Gw]) and the view count
  is part of the cache key. Any other image augmentation must bypass the cache (``--no-cache``).
* Cache dtype float16 by default (half the disk; CLIP-like features are far below fp16's
  range); ``--cache-dtype float32`` for bit-exact reuse of the encoder's output.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import io
import json
import math
import os
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as tdist

ROOT = Path(__file__).resolve().parent
CKPT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
class TrainInputError(ValueError):
    """Bad input (file, image, field named in the message). CLIs exit 2."""


class CheckpointError(TrainInputError):
    """A checkpoint that is truncated, corrupt or does not match the run."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the step and the images."""


# ----------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path, data: bytes, slow_env: Optional[str] = None) -> None:
    """Write ``data`` to a temp file in the same folder, fsync, then os.replace onto ``path``.

    ``slow_env``: name of an environment variable; when it holds a number of seconds, the
    writer sleeps that long with half of the bytes written (tests kill the process there).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            delay = float(os.environ.get(slow_env, "0") or 0) if slow_env else 0.0
            if delay > 0:
                f.flush()
                print(f"[slow-write] {path.name}: {half}/{len(data)} bytes written, sleeping",
                      file=sys.stderr, flush=True)
                time.sleep(delay)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path, obj, indent=None) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=indent).encode())


_N_CKPT_WRITES = [0]


def atomic_torch_save(obj, path) -> None:
    """torch.save through a temp file + os.replace.

    Test hook: env LINK_SLOW_CKPT_WRITE="SECONDS" or "SECONDS@N" sleeps SECONDS in the middle
    of every (or only the N-th, 1-based) checkpoint write of the process, half of the bytes on
    disk, so that tests/test_train.py can kill -9 the process mid-write."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    _N_CKPT_WRITES[0] += 1
    spec = os.environ.get("LINK_SLOW_CKPT_WRITE", "")
    slow = None
    if spec:
        sec, _, nth = spec.partition("@")
        if not nth or int(nth) == _N_CKPT_WRITES[0]:
            os.environ["_LINK_SLOW_NOW"] = sec
            slow = "_LINK_SLOW_NOW"
    try:
        atomic_write_bytes(path, buf.getvalue(), slow_env=slow)
    finally:
        os.environ.pop("_LINK_SLOW_NOW", None)


def clean_stale_temps(folder) -> None:
    """Remove temp files left by writers killed mid-write (they never replace a real file)."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


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


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a permutation of range(n), a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(int(seed) * 100003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


def view_of(seed: int, epoch: int, index: int, flip: bool) -> int:
    """Flip decision of an image in an epoch (0 = original, 1 = mirrored); pure, resumable."""
    if not flip:
        return 0
    h = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=4).digest()
    return h[0] & 1


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
# Feature cache
# ----------------------------------------------------------------------------------------------
def _image_stamp(path: Path) -> list:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} not found (field: filename)") from None
    return [st.st_size, st.st_mtime_ns]


class FeatureCache:
    """Frozen-VLM feature maps of a list of images, memory-mapped from disk.

    Layout: ``root/<hash of key and image list>/index.json`` and ``feats-<token>.bin`` holding
    a C-order array [N, V, C, Gh, Gw] (V = 1 view, or 2 with flips: original, mirrored).
    index.json = {"version", "key", "views", "dtype", "shape": [C, Gh, Gw], "data": file name,
    "images": [[path, size, mtime_ns], ...]}. The index is written last and atomically, and
    it names its data file, so a crash at any point leaves either the old valid cache or none.
    The cache is used only when the key, the image list and every image's size and mtime_ns
    match; otherwise it is rebuilt (``self.rebuilt`` tells which happened).
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

    def _read_index(self):
        try:
            return json.loads(self.index_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_valid(self) -> bool:
        idx = self._read_index()
        if not idx or idx.get("version") != 1 or idx.get("key") != self.key:
            return False
        imgs = idx.get("images", [])
        if [i[0] for i in imgs] != self.paths:
            return False
        for (p, size, mtime) in imgs:
            try:
                if _image_stamp(Path(p)) != [size, mtime]:
                    return False
            except FileNotFoundError:
                return False
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
                    if not self.is_valid():
                        self._build(encode, load, batch_size, progress)
                        self.rebuilt = True
                finally:
                    fcntl.flock(lk, fcntl.LOCK_UN)
        barrier(d)
        if not self.is_valid():
            raise TrainInputError(f"feature cache {self.dir} could not be built")
        self.open()
        return self

    def _build(self, encode, load, batch_size, progress) -> None:
        from tqdm import tqdm
        self.dir.mkdir(parents=True, exist_ok=True)
        stamps = [[p] + _image_stamp(Path(p)) for p in self.paths]   # before encoding
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
                    mm = np.memmap(tmp, dtype=self.dtype, mode="w+", shape=(n, self.views) + shape)
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
            atomic_write_json(self.index_path, {"version": 1, "key": self.key, "views": self.views,
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


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def flip_boxes(boxes: torch.Tensor, w: float) -> torch.Tensor:
    """Mirror [N, 4] xyxy boxes in an image of width w: x' = w - x (continuous frame)."""
    if boxes.numel() == 0:
        return boxes.clone()
    out = boxes.clone()
    out[:, 0], out[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return out


def _empty_dets() -> dict:
    return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}


class Split:
    """A dataset split as the loop sees it.

    dataset: a data.py dataset (ds[i] -> (PIL image, target)); dets_file: {filename: dets}
    (detector output, before select_boxes); image_root: folder of the image files;
    anno: the raw annotation dict (for eval.evaluate_hico); select: callable(dets) -> dets
    (data.select_boxes with the class space's person label); gt_dets: callable(target) -> dets
    (data.gt_detections).
    """

    def __init__(self, dataset, dets_file: dict, image_root, anno: Optional[dict], select: Callable,
                 gt_dets: Callable, name: str = "split"):
        self.ds, self.dets_file, self.anno, self.name = dataset, dets_file, anno, name
        self.select, self.gt_dets = select, gt_dets
        self.filenames = list(dataset.filenames)
        self.image_root = Path(image_root)
        if hasattr(dataset, "image_path"):
            self.image_paths = [Path(dataset.image_path(i)) for i in range(len(self.filenames))]
        else:
            self.image_paths = [self.image_root / f for f in self.filenames]
        self._targets = {}
        missing = [f for f in self.filenames if f not in dets_file]
        self.n_missing_dets = len(missing)

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
        from PIL import ImageOps
        img, tgt = self.ds[i]
        self._targets.setdefault(i, tgt)
        return ImageOps.mirror(img) if view == 1 else img

    def item(self, i: int, view: int, train: bool):
        """-> (detections, size (w, h), target) for image i in the given view. Training appends
        the GT boxes to the detector boxes before select_boxes (see module docstring)."""
        tgt = self.target(i)
        w, h = tgt["size"]
        dets = self.dets_file.get(self.filenames[i], _empty_dets())
        if train:
            g = self.gt_dets(tgt)
            dets = {"boxes": torch.cat([g["boxes"].float(), dets["boxes"].float().reshape(-1, 4)]),
                    "scores": torch.cat([g["scores"].float(), dets["scores"].float().reshape(-1)]),
                    "labels": torch.cat([g["labels"].long(), dets["labels"].long().reshape(-1)])}
        dets = self.select(dets)
        if view == 1:
            dets = dict(dets, boxes=flip_boxes(dets["boxes"], w))
            tgt = dict(tgt, boxes_h=flip_boxes(tgt["boxes_h"], w), boxes_o=flip_boxes(tgt["boxes_o"], w))
        return dets, (w, h), tgt

    def fingerprint(self) -> str:
        return hashlib.sha1("\n".join(self.filenames).encode()).hexdigest()[:16]


class FeatureSource:
    """Features of a split for one frozen VLM: the cache, or on-the-fly encoding (no cache)."""

    def __init__(self, model, split: Split, cache_root=None, views: int = 1, dtype: str = "float16",
                 d: Optional[Dist] = None, batch_size: int = 16, progress: bool = True):
        self.model, self.split, self.views = model, split, views
        self.device = d.device if d else torch.device("cpu")
        self.cache = None
        if cache_root is not None:
            self.cache = FeatureCache(cache_root, model.cache_key(), split.image_paths, views, dtype)
            self.cache.ensure(self._encode, split.image, batch_size, d, progress)

    def _encode(self, images) -> torch.Tensor:
        x = self.model.preprocess(images).to(self.device)          # [B, 3, S, S]
        with torch.no_grad():
            return self.model.encode_images(x)                       # [B, C, Gh, Gw]

    def get(self, indices: list[int], views: list[int]) -> torch.Tensor:
        if self.cache is not None:
            return self.cache.get(indices, views).to(self.device)
        return self._encode([self.split.image(i, v) for i, v in zip(indices, views)])


# ----------------------------------------------------------------------------------------------
# Model state helpers (the model follows model.py's contract)
# ----------------------------------------------------------------------------------------------
def trainable_state(model: torch.nn.Module) -> dict:
    """state_dict without the frozen VLM (model.checkpoint_state_dict() if it has one, else the
    state_dict minus the parameters that do not require grad)."""
    for name in ("checkpoint_state_dict", "trainable_state_dict"):
        if hasattr(model, name):
            return getattr(model, name)()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_trainable_state(model: torch.nn.Module, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = set(trainable_state(model))
    miss = [k for k in missing if k in trainable]
    if miss or unexpected:
        raise CheckpointError(f"checkpoint weights do not fit the model: missing {miss[:5]}, "
                              f"unexpected {list(unexpected)[:5]}")


def _plain(x):
    return asdict(x) if dataclasses.is_dataclass(x) else dict(x)


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load with clear errors for missing, truncated or foreign files."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
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
    cfg = _plain(model.cfg)
    cs = _plain(class_space if class_space is not None else model.class_space)
    if ck["config"] != cfg:
        diff = sorted(k for k in set(cfg) | set(ck["config"]) if cfg.get(k) != ck["config"].get(k))
        raise CheckpointError(f"checkpoint {path} has a different model config (fields: {diff[:6]})")
    if ck["class_space"] != cs:
        diff = sorted(k for k in set(cs) | set(ck["class_space"]) if cs.get(k) != ck["class_space"].get(k))
        raise CheckpointError(f"checkpoint {path} has a different class space (fields: {diff[:6]})")
    if fingerprint is not None and ck.get("data_fingerprint") not in (None, fingerprint):
        raise CheckpointError(f"checkpoint {path} was trained on a different image list "
                              f"(field: data_fingerprint)")


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
    flip: bool = False
    ckpt_every: int = 0              # also checkpoint every N steps (0: end of epoch only)
    eval_every: int = 1              # evaluate every N epochs (0: only after the last)
    deterministic: bool = False
    progress: bool = True


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if device.type != "cuda":
        if amp in ("bf16", "fp16"):
            print(f"note: --amp {amp} ignored on CPU (plain fp32)", file=sys.stderr)
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


class Trainer:
    """The shared loop. ``extra_loss(ctx) -> dict[name, scalar tensor]`` (already weighted)
    is added to the model's own ``out["loss"]``; ctx holds model, out, feats, indices, views,
    dets, sizes, targets. ``metric_fn(anno, preds) -> dict`` defaults to eval.evaluate_hico.
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
        self.extra_loss, self.metric_fn = extra_loss, metric_fn
        self.eval_kwargs = eval_kwargs or {}
        self.ckpt_extra = ckpt_extra or {}
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise TrainInputError("the model has no trainable parameter")
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        total = self.steps_per_epoch * cfg.epochs
        self.sched_fn = WarmupSchedule(total, cfg.warmup_steps, cfg.schedule,
                                       [m * self.steps_per_epoch for m in cfg.milestones], cfg.gamma)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.sched_fn)
        self.amp_dtype = resolve_amp(cfg.amp, self.d.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.epoch, self.step, self.step_in_epoch = 0, 0, 0
        self.history: list[dict] = []
        self.last_metrics: dict = {}
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(self.out)

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out / "last.pt"

    def state(self, rngs) -> dict:
        return {"version": CKPT_VERSION, "config": _plain(self.model.cfg),
                "class_space": _plain(self.class_space),
                "model": trainable_state(self.model), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rngs, "epoch": self.epoch, "step": self.step,
                "step_in_epoch": self.step_in_epoch,
                "order": epoch_order(len(self.train), self.cfg.seed, self.epoch),
                "data_fingerprint": self.train.fingerprint(), "world_size": self.d.world,
                "loop": asdict(self.cfg), "metrics": self.last_metrics, **self.ckpt_extra}

    def save(self) -> None:
        rngs = all_gather_objects(rng_state(), self.d)        # every rank's RNG
        if self.d.main:
            atomic_torch_save(self.state(rngs), self.ckpt_path)
        barrier(self.d)

    def resume(self, path) -> None:
        ck = load_checkpoint(path, map_location=self.d.device)
        check_checkpoint_matches(ck, self.model, path, self.train.fingerprint(), self.class_space)
        load_trainable_state(self.model, ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.step = int(ck["epoch"]), int(ck["step"])
        self.step_in_epoch = int(ck.get("step_in_epoch", 0))
        self.last_metrics = ck.get("metrics", {})
        if ck.get("order") is not None and ck["order"] != epoch_order(len(self.train), self.cfg.seed, self.epoch):
            raise CheckpointError(f"checkpoint {path}: data order differs from this run's (field: order)")
        rngs = ck["rng"]
        set_rng_state(rngs[self.d.rank % len(rngs)])
        if self.d.main:   # drop log lines written after the checkpoint (they will be redone)
            log = self.out / "log.jsonl"
            if log.exists():
                keep = [l for l in log.read_text().splitlines()
                        if l.strip() and json.loads(l).get("step", 0) <= self.step]
                atomic_write_bytes(log, ("\n".join(keep) + ("\n" if keep else "")).encode())
        print(f"resumed from {path}: epoch {self.epoch}, step {self.step}", file=sys.stderr)

    # -- logging -------------------------------------------------------------------------------
    def log(self, rec: dict) -> None:
        if not self.d.main:
            return
        rec = {"time": round(time.time(), 3), **rec}
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def plot(self) -> None:
        if not self.d.main:
            return
        log = self.out / "log.jsonl"
        if not log.exists():
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        recs = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
        tr = [r for r in recs if r.get("kind") == "train"]
        ev = [r for r in recs if r.get("kind") == "eval"]
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        keys = sorted({k for r in tr for k in r if k.startswith("loss")})
        for k in keys:
            pts = [(r["step"], r[k]) for r in tr if k in r]
            ax[0].plot([p[0] for p in pts], [p[1] for p in pts], label=k)
        ax[0].set_xlabel("step"); ax[0].set_yscale("log"); ax[0].set_title("losses")
        if keys:
            ax[0].legend(fontsize=7)
        for k in ("full", "rare", "non_rare", "unseen", "seen"):
            pts = [(r["epoch"], r[k]) for r in ev if r.get(k) is not None]
            if pts:
                ax[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
        ax[1].set_xlabel("epoch"); ax[1].set_ylabel("mAP"); ax[1].set_title("evaluation")
        if ev:
            ax[1].legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        atomic_write_bytes(self.out / "curves.png", buf.getvalue())

    # -- one step ------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def train_step(self, batch: list[int]) -> dict:
        """One optimiser step on the global batch ``batch`` (dataset indices)."""
        cfg, d = self.cfg, self.d
        local = batch[d.rank::d.world]
        weight = len(local) * d.world / len(batch)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        parts = {}
        loss_val = torch.zeros((), device=d.device)
        num_pos = None
        if local:
            views = [view_of(cfg.seed, self.epoch, i, cfg.flip) for i in local]
            feats = self.feats.get(local, views)                          # [b, C, Gh, Gw]
            items = [self.train.item(i, v, train=True) for i, v in zip(local, views)]
            dets, sizes, tgts = (list(x) for x in zip(*items))
            dets = [{k: v.to(d.device) for k, v in dt.items()} for dt in dets]
            tgts = [{k: (v.to(d.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in tgts]
            with self._autocast():
                out = self.model(feats, dets, sizes, targets=tgts)
                loss_gt = out["loss"].float()
                parts["loss_gt"] = loss_gt.detach()
                extra = torch.zeros((), device=d.device)
                if self.extra_loss is not None:
                    ctx = dict(model=self.model, out=out, feats=feats, indices=local, views=views,
                               dets=dets, sizes=sizes, targets=tgts, split=self.train)
                    for k, v in self.extra_loss(ctx).items():
                        extra = extra + v.float()
                        parts[k] = v.detach()
            loss_val = (loss_gt + extra).detach()
            num_pos = out.get("num_pos")
        # one all-reduce: did any rank see a non-finite loss; positives of the global batch
        sync = torch.tensor([0.0 if torch.isfinite(loss_val) else 1.0,
                             float(num_pos) if local and num_pos is not None else 0.0,
                             1.0 if local and num_pos is not None else 0.0], device=d.device)
        if d.enabled:
            tdist.all_reduce(sync)
        bad, pos_total, pos_ranks = sync.tolist()
        if bad > 0:
            names = all_gather_objects((d.rank, float(loss_val), [self.train.filenames[i] for i in local]), d)
            culprits = [f"rank {r}: loss {v} on {fs}" for r, v, fs in names if not math.isfinite(v)]
            raise NonFiniteLossError(f"non-finite loss at epoch {self.epoch} step {self.step} "
                                     f"(images: {'; '.join(culprits)})")
        if local:
            # The averaged gradient must equal one process's on the global batch. Per-image
            # means (distillation terms) weigh by the rank's share of the images; a loss
            # normalised by positives (the model's focal loss: sum / max(num_pos, 1)) by its
            # share of the global positives instead.
            w_gt = weight
            if num_pos is not None and pos_ranks > 0:
                w_gt = d.world * max(float(num_pos), 1.0) / max(pos_total, 1.0)
            self.scaler.scale(loss_gt * w_gt + extra * weight).backward()
        allreduce_grads(self.params, d)
        self.scaler.unscale_(self.opt)
        gnorm = None
        if cfg.clip and cfg.clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.clip))
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        # the mean loss over the global batch, for the log
        stats = torch.stack([loss_val * len(local)] + [parts.get(k, torch.zeros((), device=d.device)) * len(local)
                                                       for k in sorted(parts)]) if parts else torch.zeros(1, device=d.device)
        names = ["loss"] + sorted(parts)
        all_names = all_gather_objects(names, d)
        if d.enabled and all(n == all_names[0] for n in all_names):
            tdist.all_reduce(stats)
        rec = {k: float(v) / len(batch) for k, v in zip(names, stats.tolist())} if parts else {}
        if gnorm is not None:
            rec["grad_norm"] = gnorm
        return rec

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, split: Split, feats: FeatureSource, batch_size: Optional[int] = None) -> dict:
        """Predictions of every image of ``split`` exactly once, gathered on all ranks:
        {filename: ndarray[N, 10]}."""
        d = self.d
        bs = batch_size or max(1, self.cfg.batch_size // d.world)
        mine = eval_shard(len(split), d.rank, d.world)
        self.model.eval()
        rows = {}
        for s in range(0, len(mine), bs):
            idx = mine[s:s + bs]
            f = feats.get(idx, [0] * len(idx))
            items = [split.item(i, 0, train=False) for i in idx]
            dets, sizes, _ = (list(x) for x in zip(*items))
            dets = [{k: v.to(d.device) for k, v in dt.items()} for dt in dets]
            with self._autocast():
                out = self.model(f, dets, sizes)
            for i, r in zip(idx, self.model.postprocess(out, dets)):
                rows[i] = np.asarray(r, dtype=np.float64).reshape(-1, 10)
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
        metric_fn = self.metric_fn
        if metric_fn is None:
            import eval as E
            metric_fn = E.evaluate_hico
        m = metric_fn(self.test.anno, preds, **self.eval_kwargs) if self.d.main else {}
        m = all_gather_objects(m, self.d)[0]
        keep = {k: (float(v) if isinstance(v, (int, float, np.floating)) else v)
                for k, v in m.items() if k in ("full", "rare", "non_rare", "unseen", "seen")}
        self.last_metrics = keep
        self.last_predictions = preds
        return keep

    # -- fit -----------------------------------------------------------------------------------
    def fit(self) -> dict:
        from tqdm import tqdm
        cfg, d = self.cfg, self.d
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # needed by cuBLAS
            torch.use_deterministic_algorithms(True)
        broadcast_params(self.model, d)
        while self.epoch < cfg.epochs:
            order = epoch_order(len(self.train), cfg.seed, self.epoch)
            batches = [order[s:s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
            bar = tqdm(total=len(batches), initial=self.step_in_epoch, desc=f"epoch {self.epoch}",
                       disable=not (cfg.progress and d.main), leave=False, file=sys.stderr)
            t0 = time.time()
            while self.step_in_epoch < len(batches):
                rec = self.train_step(batches[self.step_in_epoch])
                self.step += 1
                self.step_in_epoch += 1
                rec.update(kind="train", epoch=self.epoch, step=self.step,
                           lr=self.opt.param_groups[0]["lr"])
                self.log(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4f}")
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step_in_epoch < len(batches):
                    self.save()
            bar.close()
            self.epoch += 1
            self.step_in_epoch = 0
            last = self.epoch == cfg.epochs
            if self.test is not None and ((cfg.eval_every and self.epoch % cfg.eval_every == 0) or last):
                m = self.evaluate()
                self.log({"kind": "eval", "epoch": self.epoch, "step": self.step, **m})
                if d.main:
                    print(f"epoch {self.epoch}: " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()
                                                               if isinstance(v, float)), file=sys.stderr)
            self.log({"kind": "epoch", "epoch": self.epoch, "step": self.step,
                      "seconds": round(time.time() - t0, 2)})
            self.save()
            self.plot()
        return self.last_metrics


# ----------------------------------------------------------------------------------------------
# CLI plumbing shared with train_student.py
# ----------------------------------------------------------------------------------------------
def add_common_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["hicodet", "vcoco", "swig", "synthetic"], default="synthetic")
    g.add_argument("--image-root", help="folder of the training images")
    g.add_argument("--anno", help="training annotation file")
    g.add_argument("--detections", help="training detections (per-image JSON or COCO results)")
    g.add_argument("--test-image-root"); g.add_argument("--test-anno"); g.add_argument("--test-detections")
    g.add_argument("--world", default="runs/demo/world",
                   help="synthetic world folder (generated if absent)")
    g.add_argument("--world-train", type=int, default=600); g.add_argument("--world-test", type=int, default=200)
    g.add_argument("--world-size", type=int, default=128, help="synthetic image size")
    g.add_argument("--zero-shot", help="zero-shot split name (rf-uc, nf-uc, uo, uv, or the world's)")
    g.add_argument("--few-shot", type=int, help="k images per class")
    g.add_argument("--score-thresh", type=float, default=0.2)
    m = p.add_argument_group("model")
    m.add_argument("--vlm", default="tiny",
                   help="open_clip model name (e.g. ViT-B-16), or 'tiny': the small random VLM "
                        "model.register_tiny_vlm() registers (demo, tests)")
    m.add_argument("--pretrained", default="",
                   help="open_clip pretrained tag (e.g. openai) or a weights file; empty = random init")
    m.add_argument("--image-size", type=int, help="VLM input resolution (default: the VLM's)")
    m.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any other LINKConfig field (repeatable)")
    t = p.add_argument_group("training")
    helps = {"epochs": "epochs", "batch_size": "GLOBAL batch (images per step over all ranks)",
             "lr": "AdamW learning rate", "weight_decay": "AdamW weight decay",
             "warmup_steps": "linear warm-up steps", "gamma": "step-schedule decay factor",
             "clip": "max gradient norm (after unscaling; <= 0: off)", "seed": "seed (init, data order, flips)",
             "ckpt_every": "also checkpoint every N steps (0: each epoch)",
             "eval_every": "evaluate every N epochs (0: after the last only)"}
    choices = {"schedule": ["cosine", "step", "constant"], "amp": ["auto", "none", "bf16", "fp16"]}
    for f in dataclasses.fields(LoopConfig):
        if f.name in ("progress", "flip", "deterministic", "milestones"):
            continue
        default = f.default
        t.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=default,
                       choices=choices.get(f.name), help=helps.get(f.name, f.name) + f" (default {default})")
    t.add_argument("--milestones", type=int, nargs="*", default=[], help="epochs (step schedule)")
    t.add_argument("--flip", action="store_true", help="horizontal flips (cache stores both views)")
    t.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--name", default="teacher", help="run folder runs/NAME")
    t.add_argument("--runs", default="runs")
    t.add_argument("--resume", nargs="?", const="auto",
                   help="resume from runs/NAME/last.pt (or the given checkpoint)")
    t.add_argument("--cache", default="runs/cache", help="feature cache folder")
    t.add_argument("--no-cache", action="store_true", help="encode images on the fly every step")
    t.add_argument("--cache-dtype", default="float16", choices=["float16", "float32"])
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")


def loop_config(args) -> LoopConfig:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(LoopConfig)
          if f.name != "progress" and hasattr(args, f.name)}
    return LoopConfig(progress=not args.no_progress, **kw)


def _parse_value(v: str):
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return cast(v)
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def build_model(args, class_space, device):
    """A fresh LINK from the CLI (--vlm/--pretrained/--image-size/--model-opt)."""
    import model as M
    names = {f.name for f in dataclasses.fields(M.LINKConfig)}
    if args.vlm == "tiny":   # the registered tiny random VLM (demo, tests): 64 px, 8x8 tokens
        kw = {"vlm": M.register_tiny_vlm(), "pretrained": args.pretrained or None, "image_size": 64}
    else:
        kw = {"vlm": args.vlm, "pretrained": args.pretrained or None}
    if args.image_size:
        kw["image_size"] = args.image_size
    for opt in args.model_opt:
        if "=" not in opt:
            raise TrainInputError(f"--model-opt expects KEY=VALUE, got {opt!r}")
        k, v = opt.split("=", 1)
        if k not in names:
            raise TrainInputError(f"--model-opt: LINKConfig has no field {k!r}")
        kw[k] = _parse_value(v)
    cfg = M.LINKConfig(**kw)
    return M.LINK(cfg, class_space).to(device)


def _synthetic_paths(args, d: Optional[Dist] = None) -> dict:
    """The world's files; generated once (by rank 0 under torchrun) when absent."""
    import synthetic
    d = d or Dist()
    root = Path(args.world)
    anno = root / "instances_train.json"
    if d.main and not (root / "instances_test.json").exists():
        print(f"generating the synthetic world in {root}", file=sys.stderr)
        synthetic.make_synthetic_world(root, n_train=args.world_train, n_test=args.world_test,
                                       image_size=args.world_size, seed=args.seed)
    barrier(d)
    return {"root": root, "train_images": root / "images" / "train", "test_images": root / "images" / "test",
            "train_anno": anno, "test_anno": root / "instances_test.json",
            "train_detections": root / "detections_train.json",
            "test_detections": root / "detections_test.json"}


def _paths(args, d: Optional[Dist] = None) -> dict:
    """Resolve (image_root, anno, detections) for train and test."""
    if args.dataset == "synthetic" and not args.anno:
        p = _synthetic_paths(args, d)
        get = (lambda *ks: next(Path(p[k]) for k in ks if k in p))
        return {"train": (get("train_images", "images_train"), get("train_anno", "instances_train"),
                          get("train_detections", "detections_train")),
                "test": (get("test_images", "images_test"), get("test_anno", "instances_test"),
                         get("test_detections", "detections_test"))}
    if not (args.image_root and args.anno):
        raise TrainInputError("--image-root and --anno are required for --dataset " + args.dataset)
    test = None
    if args.test_anno:
        test = (Path(args.test_image_root or args.image_root), Path(args.test_anno),
                Path(args.test_detections) if args.test_detections else None)
    return {"train": (Path(args.image_root), Path(args.anno),
                      Path(args.detections) if args.detections else None), "test": test}


def _dataset(args, image_root, anno, train: bool):
    import data as D
    if args.dataset in ("hicodet", "synthetic"):
        kw = dict(seed=args.seed)
        if train:
            kw.update(zero_shot=args.zero_shot, few_shot=args.few_shot)
        return D.HICODet(str(image_root), str(anno), **kw)
    if args.zero_shot or args.few_shot:
        raise TrainInputError(f"--zero-shot/--few-shot are implemented for HICO-DET-format data "
                              f"only (data.py), not for --dataset {args.dataset}")
    return (D.VCOCO if args.dataset == "vcoco" else D.SWiGHOI)(str(image_root), str(anno))


def build_splits(args, d: Optional[Dist] = None):
    """-> (train Split, test Split or None, class space)."""
    import data as D
    paths = _paths(args, d)
    splits = []
    cs = None
    for which in ("train", "test"):
        if paths[which] is None:
            splits.append(None)
            continue
        image_root, anno, dets_path = paths[which]
        for pth, fld in ((image_root, "image root"), (anno, "annotation file")):
            if not Path(pth).exists():
                raise FileNotFoundError(f"{fld} {pth} not found")
        ds = _dataset(args, image_root, anno, train=(which == "train"))
        if cs is None:
            cs = ds.class_space()
        if dets_path is not None:
            dets = D.load_detections(str(dets_path), filenames=list(ds.filenames))
        else:
            if which == "test":
                raise TrainInputError("--test-detections is required for evaluation")
            dets = {}
        person = cs.person_label
        thresh = args.score_thresh
        select = (lambda dd, person=person, thresh=thresh:
                  D.select_boxes(dd, person_label=person, score_thresh=thresh))
        n_miss = sum(1 for f in ds.filenames if f not in dets)
        if dets_path is not None and n_miss:
            print(f"note: {n_miss} of {len(ds)} {which} images have no detections in {dets_path}"
                  + (" (GT boxes only in training)" if which == "train" else ""), file=sys.stderr)
        raw = None
        if which == "test":
            raw = getattr(ds, "raw", None)
            if raw is None:
                raw = json.loads(Path(anno).read_text())
        gt = (lambda t, person=person: D.gt_detections(t, person_label=person))
        splits.append(Split(ds, dets, image_root, raw, select, gt, name=which))
    return splits[0], splits[1], cs


def eval_kwargs_for(cs) -> dict:
    return {"zero_shot": list(cs.unseen)} if getattr(cs, "unseen", None) else {}


def metric_for(args, cs):
    """(metric_fn, kwargs) of the dataset: HICO-DET protocol (hicodet, synthetic), the SWiG-HOI
    protocol (swig), none for V-COCO: the official evaluator needs vcoco_test.json + COCO
    annotations and role-format predictions, so V-COCO runs only write predictions_test.json
    (HICO-style rows) and evaluate with eval.py's V-COCO CLI afterwards."""
    import eval as E
    if args.dataset == "swig":
        return (lambda anno, preds: E.evaluate_swig(anno, preds)), {}
    if args.dataset == "vcoco":
        return (lambda anno, preds: {}), {}
    return E.evaluate_hico, eval_kwargs_for(cs)


def setup_run(args):
    """Common set-up of the teacher and student CLIs -> (dist, train, test, class space, caches root)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    d = init_distributed(args.device)
    seed_everything(args.seed + d.rank)
    train, test, cs = build_splits(args, d)
    if len(train) == 0:
        raise TrainInputError(f"no training image left in {args.anno or args.world} "
                              f"(zero-shot/few-shot filtering?)")
    cache = None if args.no_cache else Path(args.cache)
    return d, train, test, cs, cache


def make_sources(model, args, d, train, test, cache):
    views = 2 if args.flip else 1
    prog = not args.no_progress and d.main
    tf = FeatureSource(model, train, cache, views, args.cache_dtype, d, progress=prog)
    ef = FeatureSource(model, test, cache, 1, args.cache_dtype, d, progress=prog) if test is not None else None
    return tf, ef


def fit_and_finish(trainer: Trainer, resume: str | None, name: str) -> dict:
    """Resume if asked (``--resume`` alone = runs/NAME/last.pt when it exists), train, finish."""
    if resume:
        path = trainer.out / "last.pt" if resume == "auto" else Path(resume)
        if path.exists() or resume != "auto":
            trainer.resume(path)
        else:
            print(f"no checkpoint at {path}: starting fresh", file=sys.stderr)
    trainer.fit()
    return finish(trainer, name)


def finish(trainer: Trainer, name: str) -> dict:
    """Write the final predictions and metrics of a run (rank 0)."""
    if trainer.d.main:
        preds = getattr(trainer, "last_predictions", None)
        if preds is not None:
            atomic_write_json(trainer.out / "predictions_test.json",
                              {k: np.asarray(v).tolist() for k, v in preds.items()})
        atomic_write_json(trainer.out / "metrics.json", trainer.last_metrics, indent=1)
        print(json.dumps({"run": name, **trainer.last_metrics}))
    return trainer.last_metrics


def run_cli(main_fn) -> None:
    try:
        main_fn()
    except (TrainInputError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def teacher_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a LINK teacher on ground truth (stage 1).")
    add_common_args(p)
    return p


def main(argv=None) -> dict:
    args = teacher_parser().parse_args(argv)
    d, train, test, cs, cache = setup_run(args)
    model = build_model(args, cs, d.device)
    tf, ef = make_sources(model, args, d, train, test, cache)
    out = Path(args.runs) / args.name
    metric_fn, mkw = metric_for(args, cs)
    tr = Trainer(model, loop_config(args), train, tf, out, d, test, ef, metric_fn=metric_fn,
                 eval_kwargs=mkw, ckpt_extra={"role": "teacher"}, class_space=cs)
    return fit_and_finish(tr, args.resume, args.name)


if __name__ == "__main__":
    run_cli(main)
