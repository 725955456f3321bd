"""common.py: atomic writes (permissions, atomicity), the JSON reader's one-line errors, the data
root, the zero-shot split table."""
import os
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
    common.clean_stale_temps(tmp_path)
    common.clean_stale_temps(tmp_path / "absent")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


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
