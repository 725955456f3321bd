"""The command lines end to end: the training commands with the real LINK model on the tiny
synthetic world, and every CLI on special files (issue 24, holes 1 and 3) through
tests/clicheck.py's helper: a device node, a FIFO, a socket, a directory or a link where a CLI
writes, or anything but a regular file where it reads, is refused with exit 2, one line naming
the path, no traceback and no file changed; nothing is read forever and no node is replaced."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clicheck import refused
from PIL import Image
from test_common import node, special_file
from test_trainer import assert_same

import eval as hoi_eval
import infer
import train_student
import train_teacher
from data import Views
from model import LINK
from runs import CheckpointError, load_checkpoint, trainable_state
from train_student import distill_losses
from world import synthetic


def test_teacher_and_student_cli_end_to_end_real_model(tmp_path, capsys, monkeypatch):
    pytest.importorskip("open_clip")
    base = ["--world", str(tmp_path / "world"), "--world-train", "16", "--world-test", "6",
            "--world-size", "64", "--runs", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"),
            "--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--no-progress", "--threads", "1",
            "--model-opt", "d_model=32", "--model-opt", "d_latent=16", "--model-opt", "heads=2",
            "--model-opt", "ffn_mult=1", "--model-opt", "impl=reference"]
    mt = train_teacher.main(base + ["--name", "t"])
    assert set(mt) >= {"full", "rare", "non_rare"} and 0 <= mt["full"] <= 100
    tck = tmp_path / "runs" / "t" / "last.pt"
    teacher = LINK.from_checkpoint(load_checkpoint(tck))           # the model helper's reader
    assert teacher.cfg.d_model == 32
    ms = train_student.main(base + ["--name", "s", "--teacher", str(tck), "--teacher", str(tck), "--temperature", "2"])
    assert 0 <= ms["full"] <= 100
    recs = [json.loads(line) for line in (tmp_path / "runs" / "s" / "log.jsonl").read_text().splitlines()]
    tr = [r for r in recs if r["kind"] == "train"]
    assert tr and all(r["loss_kd_logit"] > 0 and r["loss_kd_map"] > 0 and r["loss_kd_query"] > 0 for r in tr)
    ck = load_checkpoint(tmp_path / "runs" / "s" / "last.pt")
    assert ck["role"] == "student" and len(ck["teachers"]) == 2 and ck["init_seed"] == 1
    # the adapters (2 teachers x map and query) are in the student's checkpoint, not in its
    # weights: LINK.from_checkpoint rebuilds the student for inference without them
    assert sorted(ck["extra_state"]) == sorted(f"adapters.{lvl}.{m}.{p}" for lvl in ("map", "query")
                                               for m in (0, 1) for p in ("weight", "bias"))
    assert ck["extra_state"]["adapters.map.1.weight"].shape == (16, 16)
    assert not any("adapter" in k for k in ck["model"])
    LINK.from_checkpoint(load_checkpoint(tmp_path / "runs" / "s" / "last.pt"))
    # with every KD weight 0 and --init-seed same, the student reproduces the teacher exactly
    # (the student is built from the same initial weights; the teachers' forward draws no RNG)
    train_student.main(base + ["--name", "s0", "--teacher", str(tck), "--init-seed", "same",
                               "--w-map", "0", "--w-query", "0", "--w-logit", "0"])
    w_t = load_checkpoint(tck)["model"]
    w_s = load_checkpoint(tmp_path / "runs" / "s0" / "last.pt")["model"]
    assert_same(w_t, w_s)
    # real model: KD against an identical copy is zero
    sp, _, cs = train_teacher.build_splits(train_teacher.teacher_parser().parse_args(base))
    # the recipe's defaults: no views, no GT boxes appended, the world's continuous frame;
    # the flags set them, on the training split only; --det-frame hico1 converts the
    # detection files into the world's frame when read (x1 - 1, y1 - 1)
    assert sp.views == Views() and not sp.append_gt and sp.frame == "continuous"
    flags = ["--flip", "--crop-scales", "0.5", "0.8", "--append-gt", "--det-frame", "hico1"]
    sp2, te2, _ = train_teacher.build_splits(train_teacher.teacher_parser().parse_args(base + flags))
    assert sp2.views == Views(True, (0.5, 0.8)) and sp2.append_gt and sp2.views.count == 6
    assert te2.views == Views() and not te2.append_gt
    f0 = next(f for f in sp.filenames if len(sp.dets_file[f]["boxes"]))
    b1, b2 = sp.dets_file[f0]["boxes"], sp2.dets_file[f0]["boxes"]
    torch.testing.assert_close(b2, torch.cat([b1[:, :2] - 1, b1[:, 2:]], 1))
    # a teacher trained on crop views of the real model (sizes of the crops, boxes in them)
    mv = train_teacher.main(base + ["--name", "tv", "--flip", "--crop-scales", "0.6"])
    assert 0 <= mv["full"] <= 100
    assert load_checkpoint(tmp_path / "runs" / "tv" / "last.pt")["loop"]["crop_scales"] == [0.6]
    f = torch.randn(2, 64, 8, 8)
    dets = [sp.item(i, 0, True)[0] for i in range(2)]
    sizes = [sp.target(i)["size"] for i in range(2)]
    teacher.eval()
    with torch.no_grad():
        o1, o2 = teacher(f, dets, sizes), teacher(f, dets, sizes)
    z = distill_losses(o1, (8, 8), [o2], [(8, 8)])
    assert all(abs(float(v.mean())) < 1e-6 for v in z.values())
    # initial weights: the student's own by default (init seed 1 for the teacher's seed 0),
    # the teacher's with --init-seed same (runs stopped before training)
    with monkeypatch.context() as mp:
        for mod in (train_teacher, train_student):
            mp.setattr(mod, "fit_and_finish", lambda tr, resume, name: trainable_state(tr.model))
        init_t = train_teacher.main(base + ["--name", "ti"])
        init_same = train_student.main(base + ["--name", "si", "--teacher", str(tck), "--init-seed", "same"])
        init_own = train_student.main(base + ["--name", "si", "--teacher", str(tck)])
        init_t1 = train_teacher.main(base + ["--name", "ti", "--seed", "1"])
    assert_same(init_t, init_same)
    drawn = [k for k, v in init_t.items() if k.endswith(".weight") and v.dim() == 2 and k != "classifier.weight"]
    assert len(drawn) > 10 and all(not torch.equal(init_own[k], init_t[k]) for k in drawn)
    assert_same(init_own, init_t1)          # the student's init seed 1 = a teacher's --seed 1
    # a truncated teacher checkpoint is refused with a clear message (CLI: exit 2)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(tck.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train_student.main(base + ["--name", "s2", "--teacher", str(bad)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_teacher.run_cli(lambda: train_student.main(base + ["--name", "s3", "--teacher", str(bad)]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: " in err and "bad.pt: checkpoint is truncated or corrupt" in err


H, OB = [0.0, 0.0, 9.0, 9.0], [20.0, 0.0, 29.0, 9.0]
WRITE_KINDS = ["/dev/null", "/dev/full", "fifo", "socket", "directory", "dangling link", "link to a file"]
READ_KINDS = {"/dev/null": "character device", "/dev/zero": "character device", "/dev/full": "character device",
              "fifo": "FIFO", "socket": "socket", "directory": "directory", "dangling link": "not found"}




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
def test_eval_out_special_file_refused(tmp_path, kind, no_hang):
    f = hico_files(tmp_path / "in")
    p = special_file(tmp_path, kind)
    argv = ["hico", "--anno", str(f["anno"]), "--pred", str(f["pred"]), "--out", str(p)]
    _refused_keeping(hoi_eval.main, argv, tmp_path, p, [str(p), "cannot write"])
    if kind == "link to a file":
        assert (tmp_path / "real.json").read_text() == '{"a": 1}'


@pytest.mark.parametrize("kind", list(READ_KINDS))
@pytest.mark.parametrize("which", ["anno", "pred"])
def test_eval_input_special_file_refused(tmp_path, kind, which, no_hang):
    f = hico_files(tmp_path / "in")
    f[which] = p = special_file(tmp_path, kind)
    argv = ["hico", "--anno", str(f["anno"]), "--pred", str(f["pred"])]
    _refused_keeping(hoi_eval.main, argv, tmp_path, p, [str(p), READ_KINDS[kind]])


def test_eval_through_a_link_to_a_regular_input_works(tmp_path, no_hang):
    f = hico_files(tmp_path / "in")
    (tmp_path / "pred_link.json").symlink_to(f["pred"])
    code = hoi_eval.main(["hico", "--anno", str(f["anno"]), "--pred", str(tmp_path / "pred_link.json"),
                          "--out", str(tmp_path / "r.json")])
    assert code == 0 and json.loads((tmp_path / "r.json").read_text())["full"] == pytest.approx(100 / 3)


# a directory is an input of infer.py as an image argument (a folder of images: see test_infer)
INFER_CASES = [(w, k) for w in ("image", "checkpoint") for k in READ_KINDS if (w, k) != ("image", "directory")]


@pytest.mark.parametrize("which,kind", INFER_CASES)
def test_infer_input_special_file_refused(tmp_path, kind, which, no_hang):
    f = hico_files(tmp_path / "in")
    img = tmp_path / "in" / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    ckpt = tmp_path / "in" / "missing.pt"
    p = special_file(tmp_path, kind)
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
def test_train_student_teacher_special_file_refused(tiny_world, tmp_path, kind, no_hang):
    p = special_file(tmp_path, kind)
    argv = ["--dataset", "synthetic", "--world", str(tiny_world), "--runs", str(tmp_path / "runs"),
            "--cache", str(tmp_path / "cache"), "--name", "s", "--epochs", "1", "--no-progress",
            "--threads", "1", "--teacher", str(p)]
    main = lambda a: train_teacher.run_cli(lambda: train_student.main(a))  # noqa: E731
    _refused_keeping(main, argv, tmp_path, p, [str(p), READ_KINDS[kind]])


# --- Interrupts (issue 24, hole 5) -------------------------------------------------------------
# The child runs a CLI with one function wrapped: after the real call it touches a marker file and
# sleeps, so the signal lands at that moment (mid-write of a temp, mid-training, mid-cache-build),
# whatever the machine's load. SIGINT is reset to its default in the child: a background child of a
# non-interactive shell ignores it, and the test would test nothing.
HOLD = r"""
import functools, importlib, pathlib, sys, time
marker, target, entry, *argv = sys.argv[1:]
parts = target.split(".")
owner = importlib.import_module(parts[0])
for p in parts[1:-1]:
    owner = getattr(owner, p)
real = getattr(owner, parts[-1])
@functools.wraps(real)
def held(*a, **k):
    r = real(*a, **k)
    pathlib.Path(marker).touch()
    time.sleep(120)
    return r
setattr(owner, parts[-1], held)
mod = importlib.import_module(entry)
sys.exit(mod.run_cli(lambda: mod.main(argv)) if hasattr(mod, "run_cli") else mod.main(argv))
"""


def interrupted(entry: str, argv: list, target: str, sig: int, tmp_path: Path, timeout: float = 240) -> str:
    """Run ``entry``'s CLI in a child held at ``target``, send ``sig`` there -> the one line it printed,
    asserting exit 128 + sig, no traceback, and that the line is the last of stderr."""
    import signal
    import subprocess
    import sys
    import time

    from clicheck import ROOT
    marker = tmp_path / f"held-{time.monotonic_ns()}"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(marker), target, entry, *map(str, argv)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(__import__("os").environ, OMP_NUM_THREADS="1"),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while not marker.exists():
        if p.poll() is not None or time.time() - t0 > timeout:
            p.kill()
            pytest.fail(f"never reached {target} (exit {p.wait()}): {p.communicate()[1][-2000:]}")
        time.sleep(0.05)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    if sig == signal.SIGKILL:
        assert p.returncode == -sig
        return ""
    assert "Traceback" not in err, err[-3000:]
    assert p.returncode == 128 + sig, (p.returncode, err[-2000:])
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err[-2000:]
    assert lines[0].startswith(f"interrupted ({signal.Signals(sig).name}) while "), lines[0]
    return lines[0]


def temps(*folders) -> list:
    return sorted(str(p) for f in folders for p in Path(f).rglob(".*.tmp"))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("moment", ["evaluating", "writing --out"])
def test_eval_interrupted(tmp_path, sig, moment):
    import signal
    f = hico_files(tmp_path / "in")
    out = tmp_path / "o" / "r.json"
    out.parent.mkdir()
    out.write_text("old")
    argv = ["hico", "--anno", f["anno"], "--pred", f["pred"], "--out", out]
    target = "eval.evaluate_hico_files" if moment == "evaluating" else "common._RecordingWriter.write"
    line = interrupted("eval", argv, target, getattr(signal, sig), tmp_path)
    assert "evaluating hico; re-run the command" in line
    assert out.read_text() == "old" and not temps(tmp_path)         # the old file, whole; no temp
    assert hoi_eval.main([str(a) for a in argv]) == 0 and json.loads(out.read_text())["full"] > 0


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_world, tmp_path_factory):
    """A teacher trained 1 epoch on the tiny world (its checkpoint feeds infer)."""
    tmp = tmp_path_factory.mktemp("tinyrun")
    train_teacher.main(["--dataset", "synthetic", "--world", str(tiny_world), "--runs", str(tmp / "runs"),
                        "--cache", str(tmp / "cache"), "--name", "t", "--epochs", "1", "--no-progress",
                        "--threads", "1"])
    return tmp / "runs" / "t" / "last.pt"


@pytest.mark.parametrize("sig,moment", [("SIGTERM", "writing predictions.json"), ("SIGINT", "drawing"),
                                        ("SIGKILL", "writing predictions.json")])
def test_infer_interrupted(tiny_world, tiny_ckpt, tmp_path, sig, moment):
    """An earlier run's outputs stay whole; the next run with --force succeeds and sweeps the temps
    (SIGKILL: no handler runs, the temp stays until that next run)."""
    import signal
    out = tmp_path / "out"
    argv = [tiny_world / "images" / "test", "--checkpoint", tiny_ckpt, "--gt-anno", tiny_world / "instances_test.json",
            "--out", out, "--quiet", "--threads", "1"] + (["--no-pictures"] if moment != "drawing" else [])
    argv = [str(a) for a in argv]
    if moment != "drawing":
        assert infer.main(argv) == 0
    before = out.joinpath("predictions.json").read_bytes() if moment != "drawing" else None
    argv += ["--force"] if moment != "drawing" else []
    target = "common._RecordingWriter.write"
    if sig == "SIGKILL":
        interrupted("infer", argv, target, signal.SIGKILL, tmp_path)
        assert temps(out)                                               # killed mid-write: its temp is left
    else:
        line = interrupted("infer", argv, target, getattr(signal, sig), tmp_path)
        assert f"inferring (image 1 of 2) into {out}; re-run the command" in line and "--force" not in line
        assert not temps(out)
    if before is not None:
        assert out.joinpath("predictions.json").read_bytes() == before
    else:
        assert not list(out.glob("*"))                                  # nothing half-written
    assert infer.main(argv) == 0 and not temps(out)
    assert json.loads(out.joinpath("predictions.json").read_text())


@pytest.mark.parametrize("sig,target,doing", [
    ("SIGINT", "trainer.Trainer.train_step", "training epoch 1 of 2 of "),
    ("SIGTERM", "cache.reserve_file", "building the feature cache "),
    ("SIGINT", "cache.reserve_file", "building the feature cache ")])
def test_train_teacher_interrupted_resumes(tiny_world, tmp_path, sig, target, doing):
    import signal
    argv = ["--dataset", "synthetic", "--world", str(tiny_world), "--runs", str(tmp_path / "runs"),
            "--cache", str(tmp_path / "cache"), "--name", "t", "--epochs", "2", "--no-progress", "--threads", "1"]
    line = interrupted("train_teacher", argv, target, getattr(signal, sig), tmp_path)
    assert doing in line and line.endswith("resume: the same command with --resume"), line
    assert not temps(tmp_path / "runs", tmp_path / "cache")
    for folder in (tmp_path / "cache").iterdir():       # a data file only where an index names it
        idx = folder / "index.json"
        named = [json.loads(idx.read_text())["data"]] if idx.exists() else []
        assert [p.name for p in folder.glob("feats-*.bin")] == named
    m = train_teacher.main(argv + ["--resume"])
    assert 0 <= m["full"] <= 100 and not temps(tmp_path / "runs", tmp_path / "cache")
    assert load_checkpoint(tmp_path / "runs" / "t" / "last.pt")["epoch"] == 2


CHAINS = r"""
import sys, threading
from common import run_command
from world import recipe
marker = sys.argv[1]
def main():                   # demo.py's parallel chains, ablation.py's workers: threads waiting on runs
    run = lambda i: recipe.run_child(["-c", "import os, pathlib, time; pathlib.Path(%r).write_text(str(os.getpid()))"
                                      "; time.sleep(120)" % f"{marker}{i}"], None)
    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    try:
        for t in ts:
            t.join()
    except KeyboardInterrupt:
        recipe.stop_children()
        raise
    return 0
sys.exit(run_command(main, doing="running the demo"))
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupt_ends_the_training_children(tmp_path, sig):
    """demo.py / ablation.py: an interrupt of the command (SIGTERM to it alone, too) ends the training
    runs it waits on in other threads, instead of exiting only once they finish."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from clicheck import ROOT
    marker = tmp_path / "child"
    p = subprocess.Popen([sys.executable, "-c", CHAINS, str(marker)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while not all(Path(f"{marker}{i}").exists() and Path(f"{marker}{i}").read_text() for i in range(2)):
        assert p.poll() is None and time.time() - t0 < 120, p.communicate()[1][-2000:]
        time.sleep(0.05)
    pids = [int(Path(f"{marker}{i}").read_text()) for i in range(2)]
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=60)                  # not the children's 120 s
    assert p.returncode == 128 + getattr(signal, sig) and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"interrupted ({sig}) while running the demo")
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
