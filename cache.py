"""The feature cache: frozen-VLM feature maps computed once per (image, VLM, view).

:class:`FeatureCache` is one memory-mapped file [N, V, C, Gh, Gw] plus an index JSON per cache
key and image list, rebuilt when stale, built under a lock and atomically; :class:`FeatureSource`
gives a split's features for one model (the cache, or on-the-fly encoding);
:func:`release_unused_towers` frees the image towers the cache makes unused. float16 by default
(half the disk; CLIP-like features are far below fp16's range), float32 for bit-exact reuse.
Splits are duck-typed (data.Split); ``d`` is a trainer.Dist or None (one process).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from common import NOW, WriteError, atomic_write_json, file_sha256, file_stamp, write_error
from runs import TrainInputError


def read_image(path, fn: Callable, *args):
    """fn(*args), reading the image ``path`` (stamp, hash, pixels): an OSError (missing, truncated, not
    an image) is bad input naming the image (exit 2), not the cache-write error ensure() makes of OSErrors."""
    try:
        return fn(*args)
    except OSError as e:          # data.ImageError names the image already
        raise TrainInputError(str(e) if not e.strerror and str(path) in str(e)
                              else f"image file {path}: cannot read ({e.strerror or e})") from None


def _image_stamp(path: Path) -> list:
    """[size, mtime_ns, ctime_ns, inode] of an image file (common.file_stamp)."""
    return list(read_image(path, file_stamp, path))


def _same_image(path: Path, stamp: list, sha256: str) -> bool:
    """Are the image's bytes those the cache was built from? size or mtime changed: no; ctime
    and inode unchanged: yes (a write would have moved ctime); otherwise (a copied or touched
    dataset, or a writer that restored size and mtime) the SHA-256 of the whole file decides."""
    try:      # an image that cannot be read: stale (the build names it)
        return (now := _image_stamp(path))[:2] == stamp[:2] and (now[2:] == stamp[2:] or file_sha256(path) == sha256)
    except (TrainInputError, OSError):
        return False


class FeatureCache:
    """Frozen-VLM feature maps of a list of images, memory-mapped from disk:
    ``root/<hash of key and image list>/index.json`` names the data file ``feats-<token>.bin``, a
    C-order array [N, V, C, Gh, Gw]. Used only when the key (the model's cache_key + views +
    dtype), the image list and every image's bytes (:func:`_same_image`) match, else rebuilt
    (``self.rebuilt``); the index is written last and atomically, so a crash leaves the old valid
    cache or none. Indexes of an older version are never reused."""

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
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            return json.loads(self.index_path.read_text())

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
               d=None, progress: bool = True) -> "FeatureCache":
        """Use the cache if valid, else build it. ``load(i, view) -> PIL image``,
        ``encode(list[PIL]) -> FloatTensor[B, C, Gh, Gw]``. Rank 0 of ``d`` (a trainer.Dist; None:
        one process) builds, the others wait."""
        if d is None or d.main:
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
        if d is not None:
            d.barrier()
        if not self.is_valid():
            raise TrainInputError(f"feature cache {self.dir} could not be built")
        self.open()
        return self

    def _build(self, encode, load, batch_size, progress) -> None:
        NOW["doing"] = f"building the feature cache {self.dir}"        # the line of an interrupt
        stamps = [[p] + _image_stamp(Path(p)) + [read_image(p, file_sha256, p)] for p in self.paths]  # before encoding
        token = uuid.uuid4().hex[:12]
        data_name = f"feats-{token}.bin"
        tmp = self.dir / f".{data_name}.tmp"
        n = len(self.paths)
        mm, shape = None, None
        jobs = [(i, v) for i in range(n) for v in range(self.views)]
        bar = tqdm(total=len(jobs), desc=f"cache {self.dir.name}", disable=not progress, leave=False, file=sys.stderr)
        try:
            for s in range(0, len(jobs), batch_size):
                chunk = jobs[s:s + batch_size]
                with torch.no_grad():
                    f = encode([read_image(self.paths[i], load, i, v) for i, v in chunk])   # [b, C, Gh, Gw]
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
            tmp.unlink(missing_ok=True)
        for old in [p for p in self.dir.glob("feats-*.bin") if p.name != data_name]:   # no index names them
            with contextlib.suppress(OSError):
                old.unlink()

    def get(self, indices: list[int], views: list[int]) -> torch.Tensor:
        """-> FloatTensor[B, C, Gh, Gw] (float32 copy of the memory-mapped rows)."""
        arr = np.stack([np.asarray(self.mm[i, v]) for i, v in zip(indices, views)])
        return torch.from_numpy(arr.astype(np.float32))


def reserve_file(path: Path, nbytes: int, what: str) -> None:
    """Create ``path`` with ``nbytes`` allocated on disk before anything is written through a
    memory map: a memory-mapped write to a sparse file on a full disk kills the process with
    SIGBUS and no message. The free space is checked first (one line naming the folder and the
    sizes); without posix_fallocate a sparse file, guarded by the free-space check only."""
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
    (``.feats-*.bin.tmp``) and data files its index does not name (killed before the index)."""
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


class FeatureSource:
    """Features of a split for one frozen VLM: the cache, or on-the-fly encoding (no cache)."""

    def __init__(self, model, split, cache_root=None, views: Optional[int] = None, dtype: str = "float16",
                 d=None, batch_size: int = 16, progress: bool = True):
        """views: the split's view count (the default); another number is refused."""
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
    FeatureSources (every source of the run; None skipped) read a cache: training and evaluation
    never run it then (``--no-cache`` keeps it); -> the number of models released."""
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

