"""Small torch-free helpers every script shares: atomic writes, reading a JSON file with the
project's one-line error, the shared data folder, the zero-shot split names.

Atomic write: the bytes go to a temp file in the target's folder (``.NAME.PID.RAND.tmp``), the
file is fsynced, ``os.replace``d onto the target, then the folder is fsynced. A crash or an
exception at any point leaves either the old file or the complete new one, never a half-written
one; a killed writer may leave a ``.*.tmp`` file, which never replaces anything. The new file
gets the permissions a plain ``open(path, "w")`` would give (0o666 minus the umask).
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable

try:  # optional, ~2x faster parsing of large JSON files; stdlib json otherwise
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None
if os.environ.get("LINK_EVAL_JSON") == "stdlib":   # force the stdlib parser (benchmarks, tests)
    orjson = None

#: zero-shot split names of the CLIs -> keys of
#: shared/data/hicodet/derived/zero_shot_unseen_hoi_indices.json
ZERO_SHOT_SPLITS = {"rf-uc": "rare_first", "nf-uc": "non_rare_first", "uo": "unseen_object",
                    "uv": "unseen_verb"}


def data_root() -> Path:
    """Folder of the shared data: ``$LINK_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("LINK_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "shared" / "data"


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------
def fsync_dir(folder) -> None:
    """Make a rename inside ``folder`` durable (best effort: some file systems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(str(folder), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(f)`` into a temp file ``f`` (binary, opened for writing) in ``path``'s folder, then
    fsync, ``os.replace`` onto ``path``, fsync the folder. If ``write`` raises, ``path`` is
    untouched and the temp file removed. Missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    # os.open with mode 0o666 applies the umask like a plain open(); mkstemp would give 0o600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path, obj, indent=None, separators=None) -> None:
    """``json.dumps(obj, indent=indent, separators=separators)`` written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, separators=separators))


def clean_stale_temps(folder) -> None:
    """Remove temp files left by writers killed mid-write (they never replaced a real file)."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


# ----------------------------------------------------------------------------------------------
# Reading JSON
# ----------------------------------------------------------------------------------------------
def read_json(path, what: str = "file", error: type[Exception] = ValueError,
              missing: type[Exception] = FileNotFoundError) -> Any:
    """Parse the JSON file ``path``. Every problem raises a one-line ``error`` (``missing`` when
    the file does not exist) whose message starts with the path and says ``what`` the file is,
    e.g. ``error=DataError, what="annotation file"``."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise missing(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: {what} is a directory, expected a JSON file") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None
    if not raw.strip():
        raise error(f"{path}: {what} is empty")
    if orjson is not None:
        with contextlib.suppress(orjson.JSONDecodeError):   # e.g. NaN literals: stdlib json below
            return orjson.loads(raw)
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno} "
                    f"column {e.colno})") from None
