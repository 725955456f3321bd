"""The command lines on special files (issue 24, holes 1 and 3), through tests/clicheck.py's
helper: a device node, a FIFO, a socket, a directory or a link where a CLI writes, or anything
but a regular file where it reads, is refused with exit 2, one line naming the path, no
traceback and no file changed; nothing is read forever and no node is replaced by a file."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from clicheck import refused
from PIL import Image
from test_common import node, special_file

import eval as hoi_eval
import infer
import synthetic
import train_student
import train_teacher

H, OB = [0.0, 0.0, 9.0, 9.0], [20.0, 0.0, 29.0, 9.0]
WRITE_KINDS = ["/dev/null", "/dev/full", "fifo", "socket", "directory", "dangling link", "link to a file"]
READ_KINDS = {"/dev/null": "character device", "/dev/zero": "character device", "/dev/full": "character device",
              "fifo": "FIFO", "socket": "socket", "directory": "directory", "dangling link": "not found"}


@pytest.fixture(autouse=True)
def no_hang():
    """A command that blocks on a special file fails its test after 60 s instead of hanging."""
    def on_alarm(*_):
        raise TimeoutError("blocked on a special file")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def hico_files(folder: Path) -> dict:
    """A valid 1-image, 3-class HICO-DET annotation file and a prediction file (its GT)."""
    anno = {"filenames": ["img_0.jpg"],
            "annotation": [{"boxes_h": [H], "boxes_o": [OB], "hoi": [0], "object": [0], "verb": [0]}],
            "correspondence": [[0, 0, 0], [1, 1, 0], [2, 2, 0]], "empty": [], "rare": [0], "non_rare": [1, 2]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "anno.json").write_text(json.dumps(anno))
    (folder / "pred.json").write_text(json.dumps({"img_0.jpg": [[0, 0.9] + H + OB]}))
    return {"anno": folder / "anno.json", "pred": folder / "pred.json"}


def _refused_keeping(main, argv, tmp_path, p, needles):
    """clicheck.refused on the files under tmp_path (its snapshot reads regular files only, never
    a FIFO or a socket), and the special path is what it was (a device is still the device, a
    link still the link)."""
    before = node(p)
    line = refused(main, argv, [tmp_path], needles)
    assert node(p) == before
    return line


@pytest.mark.parametrize("kind", WRITE_KINDS)
def test_eval_out_special_file_refused(tmp_path, kind):
    f = hico_files(tmp_path / "in")
    p = special_file(tmp_path, kind)
    argv = ["hico", "--anno", str(f["anno"]), "--pred", str(f["pred"]), "--out", str(p)]
    _refused_keeping(hoi_eval.main, argv, tmp_path, p, [str(p), "cannot write"])
    if kind == "link to a file":
        assert (tmp_path / "real.json").read_text() == '{"a": 1}'


@pytest.mark.parametrize("kind", list(READ_KINDS))
@pytest.mark.parametrize("which", ["anno", "pred"])
def test_eval_input_special_file_refused(tmp_path, kind, which):
    f = hico_files(tmp_path / "in")
    f[which] = p = special_file(tmp_path, kind)
    argv = ["hico", "--anno", str(f["anno"]), "--pred", str(f["pred"])]
    _refused_keeping(hoi_eval.main, argv, tmp_path, p, [str(p), READ_KINDS[kind]])


def test_eval_through_a_link_to_a_regular_input_works(tmp_path):
    f = hico_files(tmp_path / "in")
    (tmp_path / "pred_link.json").symlink_to(f["pred"])
    code = hoi_eval.main(["hico", "--anno", str(f["anno"]), "--pred", str(tmp_path / "pred_link.json"),
                          "--out", str(tmp_path / "r.json")])
    assert code == 0 and json.loads((tmp_path / "r.json").read_text())["full"] == pytest.approx(100 / 3)


@pytest.mark.parametrize("kind", list(READ_KINDS))
@pytest.mark.parametrize("which", ["image", "checkpoint"])
def test_infer_input_special_file_refused(tmp_path, kind, which):
    f = hico_files(tmp_path / "in")
    img = tmp_path / "in" / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    ckpt = tmp_path / "in" / "missing.pt"
    p = special_file(tmp_path, kind)
    if kind == "directory" and which == "image":        # a folder of images is an input: an empty one
        pytest.skip("a directory is a folder of images (see test_infer)")
    if which == "image":
        img = p
    else:
        ckpt = p
    argv = [str(img), "--checkpoint", str(ckpt), "--gt-anno", str(f["anno"]), "--out", str(tmp_path / "out"),
            "--quiet"]
    want = "no such image or folder" if (which, kind) == ("image", "dangling link") else READ_KINDS[kind]
    _refused_keeping(infer.main, argv, tmp_path, p, [str(p), want])
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyworld")
    synthetic.make_synthetic_world(root, n_train=4, n_test=2, image_size=64, seed=0, workers=1)
    return root


@pytest.mark.parametrize("kind", ["/dev/zero", "/dev/null", "fifo", "socket", "directory"])
def test_train_student_teacher_special_file_refused(tiny_world, tmp_path, kind):
    p = special_file(tmp_path, kind)
    argv = ["--dataset", "synthetic", "--world", str(tiny_world), "--runs", str(tmp_path / "runs"),
            "--cache", str(tmp_path / "cache"), "--name", "s", "--epochs", "1", "--no-progress",
            "--threads", "1", "--teacher", str(p)]
    main = lambda a: train_teacher.run_cli(lambda: train_student.main(a))  # noqa: E731
    _refused_keeping(main, argv, tmp_path, p, [str(p), READ_KINDS[kind]])
