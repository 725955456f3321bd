"""Checks of the command lines' promises on bad input (imported by the tests, not collected).

The promise (docs/reliability.md, "One line, naming the thing"): bad input or a refused command
prints ONE line on stderr, ``error: ...``, naming the file and the image or field; the exit
status is 2; there is no traceback; and no file changed. :func:`refused` runs a CLI's
``main(argv)`` in this process (or a command in a child process) and asserts all four, comparing
a snapshot (size, mtime and SHA-1 of every file) of the given folders before and after.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent


def snapshot(*folders) -> dict:
    """{path: (size, mtime_ns, sha1)} of every file (hidden ones too) under the folders."""
    out = {}
    for folder in folders:
        folder = Path(folder)
        files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
    return out


def run_main(main: Callable, argv: Sequence[str]) -> tuple[int, str, str]:
    """main(argv) in this process -> (exit status, stdout, stderr); SystemExit is the status,
    a returned int the status, anything else 0. An exception escaping main is a traceback:
    it is formatted onto stderr, and the status is 1, as Python would exit."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            r = main(list(argv))
            code = r if isinstance(r, int) else 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001 - the traceback is what the test must see
            import traceback
            traceback.print_exc(file=err)
            code = 1
    return code, out.getvalue(), err.getvalue()


def run_child(cmd: Sequence[str], env: dict | None = None, preexec: Callable | None = None,
              timeout: float = 300) -> tuple[int, str, str]:
    """A command in a child process (cwd = the repository) -> (exit status, stdout, stderr)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    r = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=timeout, preexec_fn=preexec)
    return r.returncode, r.stdout, r.stderr


def assert_one_line_error(code: int, err: str, *needles: str, status: int = 2) -> str:
    """The exit status, exactly one line on stderr starting with 'error: ', no traceback, and
    every needle in that line. Returns the line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err[-3000:]
    assert code == status, f"exit {code}, expected {status}; stderr: {err[-2000:]}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err[-2000:]}"
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def refused(main_or_cmd, argv: Sequence[str] = (), folders: Sequence = (), needles: Sequence[str] = (),
            status: int = 2, **child_kw) -> str:
    """Run a CLI (``main`` callable in process, or a command list in a child) on bad input and
    assert the promise: exit status ``status``, one line naming every needle, no traceback, no
    file changed under ``folders``. Returns the error line."""
    before = snapshot(*folders)
    if callable(main_or_cmd):
        code, _, err = run_main(main_or_cmd, argv)
    else:
        code, _, err = run_child(list(main_or_cmd) + list(argv), **child_kw)
    line = assert_one_line_error(code, err, *needles, status=status)
    after = snapshot(*folders)
    changed = sorted(set(before) ^ set(after) | {k for k in before if k in after and before[k] != after[k]})
    assert not changed, f"files changed: {changed[:10]}"
    return line


def python(*args) -> list:
    """A command list running python on a repository script: python('eval.py', 'hico', ...)."""
    return [sys.executable, str(ROOT / args[0]), *args[1:]]
