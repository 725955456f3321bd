"""Ground-floor helpers every script shares, torch-free, importing no project file: atomic writes and the
special-file checks of outputs and inputs (:func:`atomic_write`, :func:`check_output_path`, :func:`check_input_file`,
:func:`read_input_bytes`, :func:`refuse_outputs_over_inputs`), the strict JSON reader (:func:`read_json`), the shared
data folder, the zero-shot split names, the box frames, the command lines (:func:`run_command`: one-line errors and
interrupts, held notes; :class:`OneLineParser`, argument types), file stamps and hashes. Rules: docs/reliability.md.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import signal
import stat
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Optional

try:  # optional, ~2x faster parsing of large JSON files; stdlib json otherwise
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None
orjson = None if os.environ.get("LINK_EVAL_JSON") == "stdlib" else orjson   # force the stdlib parser (benchmarks)

#: zero-shot split names of the CLIs -> keys of shared/data/hicodet/derived/zero_shot_unseen_hoi_indices.json
ZERO_SHOT_SPLITS = {"rf-uc": "rare_first", "nf-uc": "non_rare_first", "uo": "unseen_object", "uv": "unseen_verb"}

#: Box frames -> the frame's pixel offset o (docs/data.md, "Box frames"): ``hico1`` 1-based inclusive pixel
#: indices (HICO-DET), ``continuous`` pixel edges (COCO, DETR-style detectors); x1 and y1 differ by o.
BOX_FRAMES = {"continuous": 0, "hico1": 1}


def data_root() -> Path:
    """Folder of the shared data: ``$LINK_DATA`` or ``<repo>/../shared/data``."""
    return Path(os.environ.get("LINK_DATA") or Path(__file__).resolve().parent.parent / "shared" / "data")


# --- Atomic writes ----------------------------------------------------------------------------
class WriteError(OSError):
    """An output file could not be written (disk full, quota, permissions); one line naming it."""

    def __str__(self) -> str:
        return str(self.strerror)


class _RecordingWriter:
    """The temp file as ``write`` sees it: records the OSError of a failed write (torch.save hides it)."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, b):
        try:
            return self._f.write(b)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


_KINDS = {stat.S_IFREG: "regular file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symbolic link",
          stat.S_IFIFO: "FIFO (named pipe)", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
          stat.S_IFBLK: "block device"}


def file_kind(mode: int) -> str:
    """What an ``os.stat`` mode names, in words: 'regular file', 'directory', 'FIFO' ..."""
    return _KINDS.get(stat.S_IFMT(mode), "special file")


def check_output_path(path) -> None:
    """The one check of every writer's destination: ``path`` is a regular file (replaced) or nothing (created);
    a directory, device, FIFO, socket or symbolic link raises :class:`WriteError` naming it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise write_error(path, e) from None
    if not stat.S_ISREG(st.st_mode):
        what = file_kind(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            what += " (dangling)" if not os.path.exists(path) else f" to {os.path.realpath(path)}"
        raise WriteError(errno.EEXIST, f"{path}: cannot write: it is a {what}, and an output is written "
                                       f"only as a regular file or a new path; choose another path")


def write_error(path, e: OSError) -> WriteError:
    reason = e.strerror or (errno.errorcode.get(e.errno) if e.errno else None) or str(e)
    return WriteError(e.errno or errno.EIO, f"{path}: cannot write ({reason})")


def atomic_write(path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(f)`` into a binary temp file ``f`` beside ``path``, fsync, ``os.replace`` onto ``path``, fsync the
    folder; ``path`` is untouched if ``write`` raises, a failed write is a :class:`WriteError` naming it."""
    path = Path(path)
    check_output_path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    rec = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with mode 0o666 applies the umask like a plain open(); mkstemp would give 0o600
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            rec = _RecordingWriter(f)
            write(rec)
            f.flush()
            os.fsync(f.fileno())
        check_output_path(path)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):      # the rename made durable (best effort: some file systems refuse)
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except WriteError:
        raise
    except OSError as e:
        raise write_error(path, e) from None
    except Exception:
        if rec is not None and rec.error is not None:
            raise write_error(path, rec.error) from None
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, indent=None, separators=None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, separators=separators))


def clean_stale_temps(folder, name: str = "*") -> None:
    """Remove the temps (``.NAME.PID.RAND.tmp``) of writers killed mid-write; a live writer's (its pid) stays."""
    for p in Path(folder).glob(f".{name}.*.tmp"):        # nothing when the folder is absent
        parts = p.name.split(".")
        if len(parts) < 4 or not parts[-3].isdigit():
            continue                      # not a name atomic_write makes: a user's file, kept
        if int(parts[-3]) != os.getpid():
            try:
                os.kill(int(parts[-3]), 0)
                continue                  # its writer still runs
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError, ValueError):
                continue                  # another user's process, or a nonsense number
        with contextlib.suppress(OSError):
            p.unlink()


# --- Outputs are never inputs -----------------------------------------------------------------
def _identity(path) -> Optional[tuple]:
    try:
        st = os.stat(path)                # follows symbolic links; hard links share the inode
    except (OSError, TypeError, ValueError):   # TypeError: no path (None)
        return None
    return (st.st_dev, st.st_ino)


def refuse_outputs_over_inputs(outputs: Iterable, inputs: Iterable, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` if an output is one of the inputs, compared by file identity (device, inode).
    outputs / inputs: ``(label, path)`` pairs; the label (``"--out"``) names the argument, a path may be None."""
    ids: dict = {}
    for label, p in inputs:
        ids.setdefault(_identity(p), (label, p))
    ids.pop(None, None)                   # no file there: not an input
    for label, p in outputs:
        if (ident := _identity(p)) in ids:
            in_label, in_path = ids[ident]
            same = "" if os.path.abspath(p) == os.path.abspath(in_path) else f" {in_path}"
            raise error(f"{p}: {label} would overwrite the input {in_label}{same}; an input is never "
                        f"an output: choose another output path")


# --- Inputs are regular files -----------------------------------------------------------------
def _input_fd(path, what: str, error: type[Exception], missing: type[Exception]) -> tuple[int, int]:
    """Open ``path`` without blocking (a FIFO would block a plain open) -> (fd, size) of a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise missing(f"{path}: {what} not found") from None
    except OSError as e:
        kind = "regular file"
        with contextlib.suppress(OSError):          # a socket cannot be opened: name it
            kind = file_kind(os.stat(path).st_mode)
        if kind != "regular file":
            raise error(f"{path}: {what} is a {kind}, expected a regular file") from None
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error(f"{path}: {what} is a {file_kind(st.st_mode)}, expected a regular file")
    return fd, st.st_size


def check_input_file(path, what: str = "file", error: type[Exception] = ValueError,
                     missing: type[Exception] = FileNotFoundError) -> int:
    """The one check of every reader's input that opens the file itself (PIL, torch.load): a regular file
    (after links) -> its size; anything else raises ``error`` (``missing``: nothing there). Reads nothing."""
    fd, size = _input_fd(path, what, error, missing)
    os.close(fd)
    return size


def read_input_bytes(path, what: str = "file", error: type[Exception] = ValueError,
                     missing: type[Exception] = FileNotFoundError) -> bytes:
    """The bytes of the regular file ``path`` (check_input_file's refusals), at most its size when opened."""
    fd, size = _input_fd(path, what, error, missing)
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read(size)
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None


# --- Reading JSON -----------------------------------------------------------------------------
#: JSON nesting deeper than this is refused (the deepest input format nests 5 levels)
MAX_JSON_DEPTH = 64


class _DupDict(dict):
    """An object that had a duplicate key (stdlib parser's object_pairs_hook marks it)."""
    dup: str = ""


def _pairs_hook(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        d, seen = _DupDict(d), set()
        d.dup = next(k for k, _ in pairs if k in seen or seen.add(k))
    return d


def _json_path(path: tuple) -> str:
    """('annotation', 3, 'hoi', 0) -> annotation[3].hoi[0]; deep paths keep their ends."""
    if len(path) > 12:
        return f"{_json_path(path[:4])}...{_json_path(path[-4:])} (depth {len(path)})"
    out = ""
    for k in path:
        if isinstance(k, int):
            out += f"[{k}]"
        elif k.isidentifier():
            out += f".{k}" if out else k
        else:
            out += f"[{json.dumps(k)}]"
    return out or "(top level)"


def _audit_json(obj, allow_bool: bool) -> Optional[tuple]:
    """First problem in document order: (json path, message), or None; iterative (no recursion limit)."""
    stack = [(obj, (), 0)]
    while stack:
        x, path, depth = stack.pop()
        t = type(x)
        if t is _DupDict:
            return path, f"duplicate key {json.dumps(x.dup)} in one object"
        if t is dict or t is list:
            if depth >= MAX_JSON_DEPTH:
                return path, f"nested deeper than {MAX_JSON_DEPTH} levels"
            items = x.items() if t is dict else enumerate(x)
            stack.extend((v, path + (k,), depth + 1) for k, v in reversed(list(items)))
        elif t is bool and not allow_bool:
            return path, f"{str(x).lower()} is a boolean; booleans are not numbers (use 0 / 1)"
        elif t is int and abs(x) >= 2 ** 1024:       # no float64 holds it
            return path, f"integer of {len(str(abs(x)))} digits is too large for a float64"
    return None


_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}:')


def _structure(raw: bytes) -> Optional[tuple]:
    """(deepest bracket nesting, number of object members) of valid JSON text, counted on its quotes,
    brackets and colons only (bytes.translate, then numpy); None when the text has escaped quotes."""
    import numpy as np
    if b'\\"' in raw:
        return None
    c = np.frombuffer(raw.translate(None, _NOT_STRUCTURE), dtype=np.uint8)
    outside = (np.cumsum(c == 34) & 1) == 0       # quote parity skips brackets and colons in strings
    step = ((c == 91) | (c == 123)).astype(np.int64) - ((c == 93) | (c == 125))
    depth = np.cumsum(np.where(outside, step, 0))
    return int(depth.max()) if len(depth) else 0, int(np.count_nonzero((c == 58) & outside))


def _count_keys(obj) -> int:
    """Members of the parsed objects. A list is entered only when its first item is a container that is
    not a row of scalars; an object missed that way makes the count fall short: slower, never wrong."""
    n, stack = 0, [obj] if type(obj) is dict or (type(obj) is list and obj) else []
    while stack:
        x = stack.pop()
        if type(x) is dict:
            n += len(x)
            stack.extend(v for v in x.values() if type(v) is dict or (type(v) is list and v))
        elif type(x[0]) is dict or (type(x[0]) is list and not (x[0] and type(x[0][0]) not in (dict, list))):
            stack.extend(v for v in x if type(v) is dict or (type(v) is list and v))
    return n


def parse_json_bytes(raw: bytes, allow_bool: bool = False):
    """Parse JSON text -> object; ValueError (one line, with the JSON path) for what :func:`read_json` refuses.
    Fast path orjson; what it cannot rule out (a lost duplicate key, NaN, huge numbers) goes to the stdlib."""
    fast = False                          # orjson's object is kept
    if orjson is not None:
        try:
            obj = orjson.loads(raw)
        except (orjson.JSONDecodeError, RecursionError):
            pass
        else:   # orjson keeps the last of duplicate keys silently: all members in the parsed objects means none
            st = _structure(raw)
            fast = st is not None and st[0] < MAX_JSON_DEPTH and st[1] == _count_keys(obj)
            if fast and b"true" not in raw and b"false" not in raw:
                return obj
    if not fast:
        try:
            obj = json.loads(raw, object_pairs_hook=_pairs_hook)       # marks objects with duplicate keys
        except RecursionError:
            raise ValueError(f"is nested too deeply (more than {MAX_JSON_DEPTH} levels are refused)") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"is not UTF-8 text ({e.reason})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        except ValueError as e:           # e.g. an integer of more than 4300 digits
            msg = str(e) if str(e).startswith("is ") else str(e).split(";")[0].split(":")[0]
            raise ValueError(msg if msg.startswith("is ") else f"is not valid JSON ({msg})") from None
    bad = _audit_json(obj, allow_bool)
    if bad is not None:
        raise ValueError(f"field '{_json_path(bad[0])}': {bad[1]}")
    return obj


def read_json(path, what: str = "file", error: type[Exception] = ValueError,
              missing: type[Exception] = FileNotFoundError, allow_bool: bool = False) -> Any:
    """Parse the JSON file ``path``; a problem (duplicate keys, booleans unless ``allow_bool``, integers beyond
    float64, nesting beyond MAX_JSON_DEPTH, bad JSON) is a one-line ``error`` (``missing``: no file) naming it."""
    path = str(path)
    raw = read_input_bytes(path, what, error, missing)
    if not raw.strip():
        raise error(f"{path}: {what} is empty")
    if raw[:2] == b"\x1f\x8b":
        raise error(f"{path}: {what} is gzip-compressed; decompress it first (gunzip)")
    try:
        return parse_json_bytes(raw, allow_bool)
    except ValueError as e:
        raise error(f"{path}: {what} {e}" if str(e).startswith("is ") else f"{path}: {what}: {e}") from None


# --- Command lines: one entry point, one-line errors and interrupts, argument types checked at parse time --
def error_line(msg) -> str:
    """One line: line breaks and runs of spaces collapsed, at most 600 characters (a library's text can be kB)."""
    text = " ".join(str(msg).split())
    return text if len(text) <= 600 else text[:597] + "..."


def print_error(msg) -> None:
    print(f"error: {error_line(msg)}", file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt, so that the ``finally`` blocks (temp files) run."""


#: the command's step and how to take it up again (the line of an interrupt), its held notes (None: printed)
NOW: dict = {"doing": "starting", "resume": "re-run the command", "held": None}


def note(msg: str) -> None:
    """A note for stderr: printed now, or held by :func:`run_command` until :func:`release_notes`."""
    if NOW["held"] is not None:
        NOW["held"].append(msg)
    else:
        print(msg, file=sys.stderr)


def release_notes() -> None:
    """The command's input is valid: print the held notes, let later ones through."""
    for msg in NOW["held"] or ():
        print(msg, file=sys.stderr)
    NOW["held"] = None


def run_command(main: Callable[[], int], errors=(), **now) -> int:
    """``main()`` -> exit status, under every command line's contract: an exception of the ``(types tuple, status)``
    pairs ``errors`` is one ``error:`` line and that status; SIGINT / SIGTERM one line ``interrupted (SIGINT)
    while <doing>; <resume>`` (:data:`NOW`, ``now`` its start) and 130 / 143, never a traceback. The notes,
    warnings and log records are held until the input is valid (release_notes), so an error line comes alone."""
    def terminate(signum, frame):
        raise Terminated()
    NOW.update({"doing": "starting", "resume": "re-run the command", "held": [], **now})
    old = signal.signal(signal.SIGTERM, terminate), warnings.showwarning, logging.Handler(logging.WARNING)
    old[2].emit = lambda r: note(f"{r.levelname.lower()}: {r.getMessage()}")
    logging.getLogger().addHandler(old[2])     # also keeps basicConfig's stderr handler out
    warnings.showwarning = lambda msg, cat, *a, **k: note(f"warning: {msg}")
    try:
        status = main()
        release_notes()
        return status
    except KeyboardInterrupt as e:
        sig = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        print(f"interrupted ({sig.name}) while {NOW['doing']}; {NOW['resume']}", file=sys.stderr)
        return 128 + sig
    except tuple(c for t, _ in errors for c in t) as e:
        print_error(e)
        return next(s for t, s in errors if isinstance(e, t))
    finally:
        signal.signal(signal.SIGTERM, old[0])
        warnings.showwarning, NOW["held"] = old[1], None
        logging.getLogger().removeHandler(old[2])


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are ONE line of stderr, ``error: <prog>: <problem>``, exit status 2."""

    def error(self, message):
        print_error(f"{self.prog}: {message} (see --help)")
        sys.exit(2)


def number(kind: type, lo=None, hi=None, lo_open=False, hi_open=False, what=""):
    """An argparse type: ``kind`` (int or float) in the given range; the error names the range."""
    def parse(text: str):
        try:
            v = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if (lo is not None and (v < lo or (lo_open and v == lo))) or \
                (hi is not None and (v > hi or (hi_open and v == hi))):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v
    parse.__name__ = kind.__name__        # argparse names the type in some messages
    return parse


positive_int = number(int, lo=1, what=">= 1")
nonneg_int = number(int, lo=0, what=">= 0")
positive_float = number(float, lo=0, lo_open=True, what="> 0")
nonneg_float = number(float, lo=0, what=">= 0")
unit_float = number(float, lo=0, hi=1, what="in [0, 1]")
finite_float = number(float, what="finite")


# --- File contents: stamp and digest ----------------------------------------------------------
def file_stamp(path) -> tuple:
    """(size, mtime_ns, ctime_ns, inode) of a file (following links): equal stamps mean the bytes were not
    rewritten (every write sets the ctime, which no user program can set back; docs/reliability.md)."""
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


_HASHES: dict = {}


def file_hash(path, algorithm: str = "sha256") -> str:
    """Hex digest of the file's bytes, memoised per (real path, algorithm, file_stamp): a rewrite is hashed again."""
    key = (os.path.realpath(path), algorithm) + file_stamp(path)
    if key not in _HASHES:
        h = hashlib.new(algorithm)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def file_sha256(path) -> str:
    """SHA-256 of the whole file (file_hash): the identity of VLM weights and cached images."""
    return file_hash(path, "sha256")


def file_digest(path) -> str:
    """The first 16 hex digits of the SHA-1 of a file's bytes (file_hash): the identity of a run's inputs."""
    return file_hash(path, "sha1")[:16]


def key_difference(old: str, new: str) -> str:
    """What differs between two 'name=value|...' keys (model.LINK.cache_key): "weights sha256:1f... -> ..."."""
    a, b = (dict(p.partition("=")[::2] for p in k.split("|")) for k in (old, new))
    short = lambda v: v if len(v) <= 24 else v[:20] + "..."  # noqa: E731
    diff = [f"{n} {short(a.get(n, '-'))} -> {short(b.get(n, '-'))}" for n in dict.fromkeys([*a, *b])
            if a.get(n) != b.get(n)]
    return "; ".join(diff) or "none"
