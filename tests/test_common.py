"""common.py: atomic writes (permissions, atomicity), the JSON reader's one-line errors, the data
root, the zero-shot split table, and the special files every writer and reader refuses."""
import os
import socket
import stat
from pathlib import Path

import pytest

import common


class MyError(ValueError):
    pass


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_gets_the_permissions_of_a_plain_write(tmp_path, umask):
    old = os.umask(umask)
    try:
        common.atomic_write_bytes(tmp_path / "a.bin", b"xyz")
        with open(tmp_path / "plain.bin", "wb") as f:
            f.write(b"xyz")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.bin") == 0o666 & ~umask == _mode(tmp_path / "plain.bin")


def test_atomic_write_variants_write_the_exact_content(tmp_path):
    common.atomic_write_bytes(tmp_path / "sub" / "b.bin", b"\x00\x01\xff")
    common.atomic_write_text(tmp_path / "t.txt", "h\u00e9")
    common.atomic_write_json(tmp_path / "j.json", {"a": [1, 2.5]}, indent=1)
    common.atomic_write_json(tmp_path / "c.json", {"a": 1}, separators=(",", ":"))
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01\xff"
    assert (tmp_path / "t.txt").read_bytes() == "h\u00e9".encode("utf-8")
    assert (tmp_path / "j.json").read_text() == '{\n "a": [\n  1,\n  2.5\n ]\n}'
    assert (tmp_path / "c.json").read_text() == '{"a":1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "j.json", "sub", "t.txt"]


def test_atomic_write_leaves_the_target_untouched_when_the_write_raises_midway(tmp_path):
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"OLD CONTENT")
    seen = {}

    def half_then_fail(f):
        f.write(b"NEW-HALF")
        f.flush()
        seen["tmp"] = [p.name for p in tmp_path.iterdir() if p.name != "ckpt.bin"]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        common.atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"OLD CONTENT"
    assert len(seen["tmp"]) == 1 and seen["tmp"][0].startswith(".ckpt.bin.") and seen["tmp"][0].endswith(".tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]      # the temp file is gone
    with pytest.raises(TypeError):                                       # json fails before any byte
        common.atomic_write_json(target, {"x": object()})
    assert target.read_bytes() == b"OLD CONTENT"


def test_clean_stale_temps_removes_only_temp_files(tmp_path):
    (tmp_path / ".last.pt.123.abcd.tmp").write_bytes(b"half")
    (tmp_path / "last.pt").write_bytes(b"full")
    for user in (".notes.tmp", ".a.b.tmp", ".x.12ab.c.tmp"):         # not atomic_write's names: a user's
        (tmp_path / user).write_bytes(b"mine")
    common.clean_stale_temps(tmp_path)
    common.clean_stale_temps(tmp_path / "absent")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.b.tmp", ".notes.tmp", ".x.12ab.c.tmp", "last.pt"]


@pytest.mark.parametrize("content, needle", [
    (None, "annotation file not found"),
    (b"", "annotation file is empty"),
    (b"  \n", "annotation file is empty"),
    (b'{"a": [1, 2}', "annotation file is not valid JSON (Expecting"),
    (b"\xff\xfe{}", "annotation file is not"),
])
def test_read_json_one_line_error_naming_the_file(tmp_path, content, needle):
    p = tmp_path / "anno.json"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises((MyError, FileNotFoundError)) as ei:
        common.read_json(p, "annotation file", error=MyError)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: ") and needle in msg and "\n" not in msg
    assert isinstance(ei.value, FileNotFoundError if content is None else MyError)


def test_read_json_directory_and_missing_class(tmp_path):
    with pytest.raises(MyError, match="is a directory"):
        common.read_json(tmp_path, error=MyError)
    with pytest.raises(MyError, match="file not found"):
        common.read_json(tmp_path / "x.json", error=ValueError, missing=MyError)


def test_read_json_parses_nan_and_values(tmp_path):
    p = tmp_path / "r.json"
    p.write_text('{"a": NaN, "b": [1, 2.5, "c"]}')
    d = common.read_json(p)
    assert d["a"] != d["a"] and d["b"] == [1, 2.5, "c"]


def test_data_root_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("LINK_DATA", str(tmp_path))
    assert common.data_root() == tmp_path
    monkeypatch.delenv("LINK_DATA")
    assert common.data_root() == Path(common.__file__).resolve().parent.parent / "shared" / "data"


def test_zero_shot_split_table():
    assert common.ZERO_SHOT_SPLITS == {"rf-uc": "rare_first", "nf-uc": "non_rare_first",
                                       "uo": "unseen_object", "uv": "unseen_verb"}


# ----------------------------------------------------------------------------------------------
# Special files: writers write only regular files or new paths, readers read only regular files
# ----------------------------------------------------------------------------------------------
SPECIAL = ["/dev/null", "/dev/zero", "/dev/full", "fifo", "socket", "directory", "dangling link",
           "link to a file"]


def special_file(tmp_path: Path, kind: str) -> Path:
    """A path of the given kind: a device node of /dev, or one made in tmp_path."""
    if kind.startswith("/dev/"):
        return Path(kind)
    p = tmp_path / kind.replace(" ", "_")
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as s:    # the socket file stays after close
            s.bind(str(p))
    elif kind == "directory":
        p.mkdir()
    elif kind == "dangling link":
        p.symlink_to(tmp_path / "nowhere")
    elif kind == "link to a file":
        (tmp_path / "real.json").write_text('{"a": 1}')
        p.symlink_to(tmp_path / "real.json")
    return p


def node(p: Path) -> tuple:
    """What a path is, not following a link: (mode, device number, link target or None)."""
    st = os.lstat(p)
    return st.st_mode, st.st_rdev, os.readlink(p) if p.is_symlink() else None




@pytest.mark.parametrize("kind", SPECIAL)
@pytest.mark.parametrize("writer", ["bytes", "json", "callback"])
def test_atomic_write_refuses_what_is_not_a_regular_file(tmp_path, kind, writer, no_hang):
    p = special_file(tmp_path, kind)
    before = node(p)
    listing = sorted(os.listdir(p.parent))
    write = {"bytes": lambda: common.atomic_write_bytes(p, b"x"),
             "json": lambda: common.atomic_write_json(p, {"a": 2}),
             "callback": lambda: common.atomic_write(p, lambda f: f.write(b"x"))}[writer]
    with pytest.raises(common.WriteError) as ei:
        write()
    msg = str(ei.value)
    assert msg.startswith(f"{p}: cannot write: it is a ") and "\n" not in msg
    assert ("symbolic link" in msg) == ("link" in kind)
    assert node(p) == before and sorted(os.listdir(p.parent)) == listing     # no temp file left
    if kind == "link to a file":
        assert (tmp_path / "real.json").read_text() == '{"a": 1}'


@pytest.mark.parametrize("kind, want", [("directory", "is a directory"), ("fifo", "is a FIFO"),
                                        ("socket", "is a socket"), ("/dev/null", "is a character device")])
def test_check_output_path_names_the_kind(tmp_path, kind, want):
    p = special_file(tmp_path, kind)
    with pytest.raises(common.WriteError, match=want):
        common.check_output_path(p)
    common.check_output_path(tmp_path / "new.json")                 # a new path
    (tmp_path / "old.json").write_text("{}")
    common.check_output_path(tmp_path / "old.json")                 # a regular file


@pytest.mark.parametrize("kind, want", [
    ("/dev/null", "annotation file is a character device, expected a regular file"),
    ("/dev/zero", "annotation file is a character device, expected a regular file"),
    ("/dev/full", "annotation file is a character device, expected a regular file"),
    ("fifo", "annotation file is a FIFO (named pipe), expected a regular file"),
    ("socket", "annotation file is a socket, expected a regular file"),
    ("directory", "annotation file is a directory, expected a regular file"),
    ("dangling link", "annotation file not found"),
    ("link to a file", None),                                       # read through the link
])
@pytest.mark.parametrize("reader", ["read_json", "check_input_file", "read_input_bytes"])
def test_readers_accept_regular_files_only(tmp_path, kind, want, reader, no_hang):
    p = special_file(tmp_path, kind)
    fn = getattr(common, reader)
    if want is None:
        got = fn(p, "annotation file", error=MyError)
        assert got == {"read_json": {"a": 1}, "check_input_file": 8, "read_input_bytes": b'{"a": 1}'}[reader]
        return
    with pytest.raises((MyError, FileNotFoundError)) as ei:
        fn(p, "annotation file", error=MyError)
    assert str(ei.value) == f"{p}: {want}"
    assert isinstance(ei.value, FileNotFoundError if kind == "dangling link" else MyError)


def test_read_input_bytes_reads_at_most_the_size_at_open(tmp_path, monkeypatch):
    """A file that grows while it is read (a log, a FIFO-like writer) is read up to the size it
    had when opened, never on."""
    p = tmp_path / "grows.json"
    p.write_bytes(b"[1, 2]")
    real_fdopen = os.fdopen

    def fdopen_then_grow(fd, *a, **k):
        with open(p, "ab") as f:
            f.write(b" " * 1000)
        return real_fdopen(fd, *a, **k)

    monkeypatch.setattr(common.os, "fdopen", fdopen_then_grow)
    assert common.read_input_bytes(p) == b"[1, 2]"
