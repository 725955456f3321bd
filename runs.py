"""The run folder and its checkpoint: the one checkpoint reader and writer, resume checks.

:class:`RunFolder` (:func:`claim_run_folder`) locks ``runs/NAME`` for one training process and
refuses a name that holds a run unless it is resumed or moved aside: nothing is ever
overwritten. :func:`load_checkpoint` is THE reader of a LINK checkpoint (resume, teachers,
infer.py, demo.py, LINK.from_checkpoint) with one-line errors, :func:`atomic_torch_save` the
writer. :func:`resume_differences`: a resume continues the same run; a setting that differs is
refused unless ``--override`` names it. A checkpoint is a dict: version, config, class_space,
model (:func:`trainable_state`) and what the loop and the command add (optimizer, scheduler,
scaler, rng, epoch, step, order, loop, settings, role, ...).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pickle
import re
import sys
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from common import atomic_write, atomic_write_bytes, check_input_file, key_difference

CKPT_VERSION = 1


class TrainInputError(ValueError):
    """Bad input (file, image, field named in the message). CLIs exit 2."""


class CheckpointError(TrainInputError):
    """A checkpoint that is truncated, corrupt or does not match the run."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A checkpoint path that names no file."""


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
    """The useful line of a library's error: torch's size-mismatch list as 'size mismatch for W: [a, b]
    in the checkpoint, [c, d] in the model (and N more)', torch.load's weights_only refusal as its
    reason without the advice paragraphs, else the first line."""
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
    first = lines[0] if len(lines[0]) < 160 else lines[0].split(". ")[0]   # torch's advice after the reason
    return first if isinstance(e, ValueError) else f"{type(e).__name__}: {first}"


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """The one reader of a LINK checkpoint: torch.load (``mmap``: memory-mapped, for reading
    its settings cheaply) with one-line errors for a missing, truncated or foreign file."""
    path = Path(path)
    check_input_file(path, "checkpoint", CheckpointError, CheckpointNotFound)   # /dev/zero, a FIFO: never read
    try:   # our own files; only a zip-format file can be memory-mapped
        ck = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # truncated zip, garbage bytes, ...
        raise CheckpointError(f"{path}: checkpoint is truncated or corrupt "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    for k in ("config", "class_space", "model", "version"):
        if not isinstance(ck, dict) or k not in ck:
            raise CheckpointError(f"{path}: checkpoint has no field {k!r} (not a LINK checkpoint)")
    if ck["version"] != CKPT_VERSION:
        raise CheckpointError(f"{path}: checkpoint field 'version' is {ck['version']!r}, this code reads "
                              f"version {CKPT_VERSION}")
    return ck


def check_checkpoint_matches(ck: dict, model, path, fingerprint: Optional[str] = None,
                             class_space=None) -> None:
    """Refuse a checkpoint whose config / class space / training images differ from the run's."""
    cs = class_space if class_space is not None else model.class_space
    for key, now, what in (("config", plain_dict(model.cfg), "model config"),
                           ("class_space", plain_dict(cs), "class space")):
        if ck[key] != now:
            diff = sorted(k for k in set(now) | set(ck[key]) if now.get(k) != ck[key].get(k))
            raise CheckpointError(f"checkpoint {path} has a different {what} (fields: {diff[:6]})")
    if ck.get("cache_key") not in (None, model.cache_key()):
        raise CheckpointError(f"checkpoint {path} was trained on other frozen-VLM features (field: cache_key; "
                              f"{key_difference(ck['cache_key'], model.cache_key())})")
    if fingerprint is not None and ck.get("data_fingerprint") not in (None, fingerprint):
        raise CheckpointError(f"checkpoint {path} was trained on a different image list "
                              f"(field: data_fingerprint)")


# ----------------------------------------------------------------------------------------------
# The run folder: one run per folder, one process at a time
# ----------------------------------------------------------------------------------------------
#: what a run writes into runs/NAME (the Trainer)
RUN_OUTPUTS = ("last.pt", "log.jsonl", "metrics.json", "predictions_test.json", "curves.png")


class RunFolder:
    """``runs/NAME`` claimed by one training process: an exclusive ``flock`` on the folder itself,
    taken without waiting, held until :meth:`release` or the process ends. Claiming refuses another
    live process on the name (its pid named), a folder holding a run (any of RUN_OUTPUTS) unless
    it is resumed from its own checkpoint or moved aside whole (``NAME.old-YYYYmmdd-HHMMSS``), and
    a resume from elsewhere into a folder holding another run. A run killed before its first
    checkpoint left only a log: ``--resume`` starts it again without it. A folder this claim
    created is removed again by release() if it stayed empty."""

    def __init__(self, path):
        self.path, self._fd, self._created = Path(path), None, False
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
        dest, k = self.path.with_name(f"{self.path.name}.old-{stamp}"), 2
        while dest.exists():
            dest, k = self.path.with_name(f"{self.path.name}.old-{stamp}-{k}"), k + 1
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


def resume_path(resume: Optional[str], folder: Path) -> Optional[Path]:
    """The checkpoint --resume names (None: no --resume, or --resume alone and none yet)."""
    path = None if not resume else folder / "last.pt" if resume == "auto" else Path(resume)
    if path is not None and not path.exists():
        if resume != "auto":
            raise TrainInputError(f"--resume {path}: checkpoint not found")
        path = None
    return path


def claim_run_folder(path, resume: Optional[str], move_aside: bool, d=None) -> RunFolder:
    """RunFolder(path).claim(...) on rank 0 of ``d`` (a trainer.Dist; None: one process); under
    torchrun every rank gets rank 0's refusal (the same one-line error) instead of waiting at the
    next barrier."""
    run, err = RunFolder(path), None
    if d is None or d.main:
        try:
            run.claim(resume, move_aside)
        except TrainInputError as e:
            err = str(e)
    err = d.all_gather(err)[0] if d is not None else err
    if err is not None:
        raise TrainInputError(err)
    return run


# ----------------------------------------------------------------------------------------------
# Resume: the same run
# ----------------------------------------------------------------------------------------------
#: LoopConfig fields that may change on resume: when things are saved or shown, not what is trained
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


def trim_log(path, step: int) -> None:
    """Drop the lines of a log.jsonl written after ``step`` (a resumed run redoes them) and torn
    lines; an unchanged log is left untouched."""
    if Path(path).exists():
        lines = read_log_lines(path)
        keep = [line for line, rec in lines if rec is not None and rec.get("step", 0) <= step]
        if len(keep) != len(lines):
            atomic_write_bytes(path, ("\n".join(keep) + ("\n" if keep else "")).encode())


def _plain(x):
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def setting_differences(stored: dict, now: dict, prefix: str = "") -> list:
    """[(name, stored value, current value)] for every setting present in both that differs (nested
    dicts by dotted name: files.anno); a setting only one side has (an older version) is not compared."""
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
    """The settings a resume changes: [(name, checkpoint value, this run's value)], all named in
    ``overrides``; CheckpointError for another role (teacher / student), an override naming no
    setting, or a setting that differs without one. Compared: every LoopConfig field but LOOP_FREE
    (checkpoint ``loop``) and the run's ``settings`` (the CLI's options and file content hashes)."""
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

