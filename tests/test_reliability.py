"""The README's reliability promises, tried the way a hostile user would (issue 12).

Nothing a user wrote is lost: an output is never an input (eval.py, infer.py, training); a run
name in use is refused (or moved aside), one process per run; a resumed run with nothing left
to train still writes every output; killed feature-cache builds are swept; a full disk is a
one-line error. Every refusal goes through tests/clicheck.py: exit status 2, one line on stderr
naming the thing, no traceback, no file changed.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from clicheck import refused, run_main
from test_formats import vcoco_docs

import cache
import common
import eval as hoi_eval
import infer
import runs
import train_teacher
import trainer
from common import data_root
from model import LINK, LINKConfig
from vlm import register_tiny_vlm
from world import synthetic

TINY = register_tiny_vlm()
SWIG_META = data_root() / "swig_hoi" / "derived" / "swig_v1_meta.json"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# small valid inputs
# ----------------------------------------------------------------------------------------------
H, OB = [0.0, 0.0, 9.0, 9.0], [20.0, 0.0, 29.0, 9.0]


def hico_files(folder: Path) -> dict:
    """A valid 2-image, 3-class HICO-DET annotation file and a prediction file (its GT)."""
    anno = {"filenames": ["img_0.jpg", "img_1.jpg"],
            "annotation": [{"boxes_h": [H], "boxes_o": [OB], "hoi": [0], "object": [0], "verb": [0]},
                           {"boxes_h": [], "boxes_o": [], "hoi": [], "object": [], "verb": []}],
            "correspondence": [[0, 0, 0], [1, 1, 0], [2, 2, 0]], "empty": [1], "rare": [0],
            "non_rare": [1, 2]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "anno.json").write_text(json.dumps(anno))
    (folder / "pred.json").write_text(json.dumps({"img_0.jpg": [[0, 0.9] + H + OB]}))
    (folder / "labels.json").write_text(json.dumps({"img_0.jpg": [0]}))
    return {"anno": folder / "anno.json", "pred": folder / "pred.json", "labels": folder / "labels.json"}


def vcoco_files(folder: Path) -> dict:
    vsrl, coco, dets = vcoco_docs()
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, obj in (("vsrl", vsrl), ("coco", coco), ("pred", dets)):
        out[name] = folder / f"{name}.json"
        out[name].write_text(json.dumps(obj))
    return out


def swig_files(folder: Path) -> dict:
    meta = json.loads(SWIG_META.read_text())
    x = next(i for i in meta["SWIG_INTERACTIONS"] if i["evaluation"] == 1)
    anno = [{"file_name": "a.jpg", "box_annotations": [{"bbox": [0, 0, 10, 10], "category_id": 0},
                                                       {"bbox": [20, 0, 30, 10], "category_id": x["object_id"]}],
             "hoi_annotations": [{"subject_id": 0, "object_id": 1, "action_id": x["action_id"]}]}]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "anno.json").write_text(json.dumps(anno))
    (folder / "pred.json").write_text(json.dumps({"a.jpg": [[x["id"], 0.9, 0, 0, 10, 10, 20, 0, 30, 10]]}))
    (folder / "meta.json").write_text(SWIG_META.read_text())
    return {"anno": folder / "anno.json", "pred": folder / "pred.json", "meta": folder / "meta.json"}


# ----------------------------------------------------------------------------------------------
# Data loss: an output is never an input
# ----------------------------------------------------------------------------------------------
def _alias(tmp: Path, target: Path, how: str) -> Path:
    """Another path to the same file: itself, a symbolic link, a hard link, a '..' spelling."""
    if how == "same":
        return target
    if how == "symlink":
        (tmp / "alias.json").symlink_to(target)
        return tmp / "alias.json"
    if how == "hardlink":
        os.link(target, tmp / "alias.json")
        return tmp / "alias.json"
    (tmp / "sub").mkdir(exist_ok=True)
    return tmp / "sub" / ".." / target.name


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dotdot"])
@pytest.mark.parametrize("which", ["anno", "pred", "labels"])
def test_eval_hico_out_never_an_input(tmp_path, which, how):
    f = hico_files(tmp_path)
    out = _alias(tmp_path, f[which], how)
    argv = ["hico", "--anno", str(f["anno"]), "--pred", str(f["pred"]), "--known-object",
            "--image-labels", str(f["labels"]), "--out", str(out)]
    opt = {"anno": "--anno", "pred": "--pred", "labels": "--image-labels"}[which]
    refused(hoi_eval.main, argv, [tmp_path], [str(out), f"the input {opt}"])
    # the same command with a fresh output path works
    code, so, se = run_main(hoi_eval.main, argv[:-1] + [str(tmp_path / "r.json")])
    assert code == 0 and json.loads((tmp_path / "r.json").read_text())["full"] == pytest.approx(100 / 3)


@pytest.mark.parametrize("which", ["vsrl", "coco", "pred"])
def test_eval_vcoco_out_never_an_input(tmp_path, which):
    f = vcoco_files(tmp_path)
    argv = ["vcoco", "--vsrl", str(f["vsrl"]), "--coco", str(f["coco"]), "--pred", str(f["pred"]),
            "--out", str(f[which])]
    refused(hoi_eval.main, argv, [tmp_path], [str(f[which]), f"--{which}"])


@pytest.mark.skipif(not SWIG_META.exists(), reason="shared data not found")
@pytest.mark.parametrize("which", ["anno", "pred", "meta"])
def test_eval_swig_out_never_an_input(tmp_path, which):
    f = swig_files(tmp_path)
    argv = ["swig", "--anno", str(f["anno"]), "--pred", str(f["pred"]), "--meta", str(f["meta"]),
            "--out", str(_alias(tmp_path, f[which], "symlink"))]
    refused(hoi_eval.main, argv, [tmp_path], [f"--{which}"])


def test_refuse_outputs_over_inputs_unit(tmp_path):
    a = tmp_path / "a.json"
    a.write_text("{}")
    common.refuse_outputs_over_inputs([("--out", tmp_path / "new.json")], [("--anno", a)])   # absent: fine
    common.refuse_outputs_over_inputs([("--out", tmp_path / "b.json")], [("--anno", a), ("--x", None)])
    (tmp_path / "b.json").write_text("{}")                   # same content, other file: fine
    common.refuse_outputs_over_inputs([("--out", tmp_path / "b.json")], [("--anno", a)])
    with pytest.raises(ValueError, match=r"a.json: --out would overwrite the input --anno; an input"):
        common.refuse_outputs_over_inputs([("--out", a)], [("--anno", a)])


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyworld")
    paths = synthetic.make_synthetic_world(root, n_train=8, n_test=4, image_size=64, seed=0, workers=1)
    return {k: Path(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """An untrained tiny LINK checkpoint on the synthetic class space (infer only needs one)."""
    cfg = LINKConfig(vlm=TINY, pretrained=None, image_size=64, d_model=32, d_latent=16, heads=2,
                     enc_layers=1, dec_layers=1, impl="reference")
    torch.manual_seed(0)
    net = LINK(cfg, synthetic.synthetic_class_space())
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"config": asdict(cfg), "class_space": net.class_space.asdict(),
                "model": net.checkpoint_state_dict(), "version": 1}, path)
    return path


def test_infer_never_draws_over_its_input_image(tiny_world, tiny_ckpt, tmp_path):
    """infer.py IMAGE --out DIR --force where DIR holds IMAGE: refused, even with --force, and
    the message names the input instead of inviting --force."""
    src = tiny_world["test_images"] / "synth_test_000000.png"
    img = tmp_path / "synth_test_000000.png"
    img.write_bytes(src.read_bytes())
    argv = [str(img), "--checkpoint", str(tiny_ckpt), "--gt-anno", str(tiny_world["test_anno"]),
            "--out", str(tmp_path), "--quiet"]
    for extra in ([], ["--force"]):
        line = refused(infer.main, argv + extra, [tmp_path], [str(img), "input image"])
        assert "--force" not in line
    # a folder of images as its own output folder, a detection file called predictions.json
    argv = [str(tmp_path), "--checkpoint", str(tiny_ckpt), "--gt-anno", str(tiny_world["test_anno"]),
            "--out", str(tmp_path), "--force", "--quiet"]
    refused(infer.main, argv, [tmp_path], ["input image"])
    dets = tmp_path / "out" / "predictions.json"
    dets.parent.mkdir()
    dets.write_text(json.dumps({"synth_test_000000.png": {"boxes": [], "scores": [], "labels": []}}))
    argv = [str(img), "--checkpoint", str(tiny_ckpt), "--detections", str(dets), "--out", str(dets.parent),
            "--force", "--quiet"]
    refused(infer.main, argv, [tmp_path], [str(dets), "--detections"])
    # and with another output folder the same command works
    code, _, err = run_main(infer.main, argv[:-3] + [str(tmp_path / "o2"), "--quiet"])
    assert code == 0, err


# ----------------------------------------------------------------------------------------------
# Data loss: run folders
# ----------------------------------------------------------------------------------------------
def hold_flock(path: Path, mkdir: bool = False) -> subprocess.Popen:
    """A child process holding an exclusive flock on ``path`` (a file or a folder) for a minute."""
    if mkdir:
        path.mkdir(parents=True)
    code = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def teacher_argv(world: dict, tmp: Path, name: str = "t", *extra) -> list:
    return ["--dataset", "synthetic", "--world", str(world["root"]), "--runs", str(tmp / "runs"),
            "--cache", str(tmp / "cache"), "--name", name, "--epochs", "1", "--batch-size", "4",
            "--lr", "1e-3", "--no-progress", "--threads", "1", "--model-opt", "d_model=32",
            "--model-opt", "d_latent=16", "--model-opt", "heads=2", "--model-opt", "ffn_mult=1",
            "--model-opt", "enc_layers=1", "--model-opt", "dec_layers=1", "--model-opt", "impl=reference",
            *extra]


def _train_cli(argv, main=None):
    return run_main(main or (lambda a: train_teacher.run_cli(lambda: train_teacher.main(a))), argv)


@pytest.fixture(scope="module")
def finished_run(tiny_world, tmp_path_factory):
    """A finished 1-epoch teacher run (runs/t) and its outputs' bytes."""
    tmp = tmp_path_factory.mktemp("run")
    code, out, err = _train_cli(teacher_argv(tiny_world, tmp))
    assert code == 0, err
    run = tmp / "runs" / "t"
    return tmp, run, {n: (run / n).read_bytes() for n in runs.RUN_OUTPUTS}


def test_run_name_in_use_is_refused_then_moved_aside(tiny_world, finished_run, tmp_path):
    tmp0, run0, files = finished_run
    tmp = tmp_path
    import shutil
    shutil.copytree(tmp0 / "runs", tmp / "runs")
    run = tmp / "runs" / "t"
    argv = teacher_argv(tiny_world, tmp)
    refused(lambda a: train_teacher.run_cli(lambda: train_teacher.main(a)), argv, [tmp / "runs"],
            [str(run), "holds a run already", "--resume", "--move-aside"])
    # a checkpoint from elsewhere resumed into a folder that holds another run: refused too
    other = tmp / "other.pt"
    other.write_bytes(files["last.pt"])
    refused(lambda a: train_teacher.run_cli(lambda: train_teacher.main(a)), argv + ["--resume", str(other)],
            [tmp / "runs"], [str(run), "would mix two runs"])
    # --move-aside keeps the old run, whole, and trains a new one
    code, _, err = _train_cli(argv + ["--move-aside"])
    assert code == 0, err
    old = [p for p in (tmp / "runs").iterdir() if p.name.startswith("t.old-")]
    assert len(old) == 1 and {n: (old[0] / n).read_bytes() for n in runs.RUN_OUTPUTS} == files
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2]        # one run in the log


def test_two_processes_on_one_run_name(tiny_world, tmp_path):
    """A second process on a run name whose lock is held is refused with the holder's pid."""
    p = hold_flock(tmp_path / "runs" / "t", mkdir=True)
    try:
        refused(lambda a: train_teacher.run_cli(lambda: train_teacher.main(a)),
                teacher_argv(tiny_world, tmp_path) + ["--resume"], [tmp_path / "runs"],
                [str(tmp_path / "runs" / "t"), f"pid {p.pid}", "another training process"])
    finally:
        p.kill()
        p.wait()


def test_resumed_finished_run_writes_every_output(tiny_world, finished_run, tmp_path):
    """Killed after its final checkpoint, before predictions / metrics / curves: --resume has
    nothing left to train and still writes them, equal to the uninterrupted run's."""
    import shutil
    tmp0, _, files = finished_run
    shutil.copytree(tmp0 / "runs", tmp_path / "runs")
    run = tmp_path / "runs" / "t"
    for n in ("predictions_test.json", "metrics.json", "curves.png"):
        (run / n).unlink()
    code, out, err = _train_cli(teacher_argv(tiny_world, tmp_path, "t", "--resume"))
    assert code == 0, err
    assert (run / "predictions_test.json").read_bytes() == files["predictions_test.json"]
    assert (run / "metrics.json").read_bytes() == files["metrics.json"]
    assert (run / "curves.png").stat().st_size > 0 and (run / "last.pt").read_bytes() == files["last.pt"]


def test_run_killed_before_its_first_checkpoint_restarts_with_one_log(tiny_world, finished_run, tmp_path):
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    torn = '{"time": 1, "kind": "train", "epoch": 0, "step": 1, "loss": 9.9}\n{"time": 2, "kind": "tr'
    (run / "log.jsonl").write_text(torn)
    refused(lambda a: train_teacher.run_cli(lambda: train_teacher.main(a)), teacher_argv(tiny_world, tmp_path),
            [tmp_path / "runs"], ["holds a run already (log.jsonl)"])
    code, _, err = _train_cli(teacher_argv(tiny_world, tmp_path, "t", "--resume"))
    assert code == 0, err
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2] and all(r.get("loss") != 9.9 for r in recs)


def test_student_named_like_its_teacher_never_overwrites_it(tiny_world, finished_run, tmp_path):
    import shutil

    import train_student
    tmp0, _, files = finished_run
    shutil.copytree(tmp0 / "runs", tmp_path / "runs")
    ck = tmp_path / "runs" / "t" / "last.pt"
    main = lambda a: train_teacher.run_cli(lambda: train_student.main(a))  # noqa: E731
    argv = teacher_argv(tiny_world, tmp_path, "t", "--teacher", str(ck), "--resume")
    refused(main, argv, [tmp_path / "runs"], [str(ck), "--teacher"])


# ----------------------------------------------------------------------------------------------
# Data loss: feature-cache temp files, full disks, permissions
# ----------------------------------------------------------------------------------------------
def _encode(images):
    return torch.ones(len(images), 2, 2, 2)


def test_cache_sweeps_what_killed_builds_left_but_not_a_running_build(tmp_path):
    root = tmp_path / "cache"
    dead, busy = root / "dead", root / "busy"
    for d in (dead, busy):
        d.mkdir(parents=True)
        (d / ".lock").write_text("")
        (d / ".feats-aaaa.bin.tmp").write_bytes(b"x" * 1000)       # an interrupted build
        (d / "feats-bbbb.bin").write_bytes(b"y" * 1000)            # data no index names
    (dead / "index.json").write_text(json.dumps({"data": "feats-cccc.bin"}))
    (dead / "feats-cccc.bin").write_bytes(b"z")                    # the current data: kept
    p = hold_flock(busy / ".lock")
    try:
        img = tmp_path / "a.png"
        img.write_bytes(b"png")
        c = cache.FeatureCache(root, "key", [img], 1, "float32")
        (c.dir).mkdir(parents=True)
        (c.dir / ".feats-own.bin.tmp").write_bytes(b"o" * 100)
        c.ensure(_encode, lambda i, v: None, progress=False)
        assert c.rebuilt and not (c.dir / ".feats-own.bin.tmp").exists()
        assert sorted(x.name for x in dead.iterdir()) == [".lock", "feats-cccc.bin", "index.json"]
        assert sorted(x.name for x in busy.iterdir()) == [".feats-aaaa.bin.tmp", ".lock", "feats-bbbb.bin"]
    finally:
        p.kill()
        p.wait()


def test_cache_build_checks_space_before_allocating(tmp_path, monkeypatch):
    img = tmp_path / "a.png"
    img.write_bytes(b"png")
    c = cache.FeatureCache(tmp_path / "cache", "key", [img] * 3, 2, "float16")
    real = cache.shutil.disk_usage
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda p: real(p)._replace(free=10))
    with pytest.raises(runs.TrainInputError) as e:
        c.ensure(_encode, lambda i, v: None, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(c.dir) in msg and "needs 0.00 GiB (3 images x 2 view(s) x [2, 2, 2] float16)" in msg
    assert [x.name for x in c.dir.iterdir()] == [".lock"]            # nothing allocated, no temp left
    monkeypatch.setattr(cache.shutil, "disk_usage", real)

    def no_space(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cache.os, "posix_fallocate", no_space)
    with pytest.raises(runs.TrainInputError, match="free on that disk"):
        c.ensure(_encode, lambda i, v: None, progress=False)
    assert [x.name for x in c.dir.iterdir()] == [".lock"]


def test_full_disk_is_one_line_naming_the_file(tmp_path):
    """A real write failure (a file-size limit: the kernel refuses the write, EFBIG, as it does
    ENOSPC on a full disk) inside torch.save, an atomic JSON write and the log append."""
    code = f"""
import resource, signal, sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
import common, runs
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
for f in (lambda: runs.atomic_torch_save({{"w": torch.zeros(100000)}}, sys.argv[1] + "/last.pt"),
          lambda: common.atomic_write_json(sys.argv[1] + "/r.json", list(range(100000)))):
    try:
        f()
    except OSError as e:
        print(type(e).__name__, e)
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 2, r.stderr
    assert lines[0] == f"WriteError {tmp_path}/last.pt: cannot write (File too large)"
    assert lines[1] == f"WriteError {tmp_path}/r.json: cannot write (File too large)"
    assert sorted(os.listdir(tmp_path)) == []                        # no temp file left behind


def test_stale_temp_of_a_live_writer_is_kept(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".last.pt.{p.pid}.abcd1234.tmp"
        dead = tmp_path / ".last.pt.999999999.abcd1234.tmp"
        for f in (live, dead):
            f.write_bytes(b"half")
        common.clean_stale_temps(tmp_path)
        assert live.exists() and not dead.exists()
    finally:
        p.kill()
        p.wait()


def test_outputs_get_the_permissions_of_a_plain_write(tiny_world, finished_run, tmp_path):
    """Checkpoints, logs, metrics, predictions, curves, eval results: 0o666 minus the umask
    (the run was made under the test process's umask)."""
    _, run, _ = finished_run
    umask = os.umask(0)
    os.umask(umask)
    for n in runs.RUN_OUTPUTS:
        assert stat.S_IMODE((run / n).stat().st_mode) == 0o666 & ~umask, n
    f = hico_files(tmp_path)
    assert hoi_eval.main(["hico", "--anno", str(f["anno"]), "--pred", str(f["pred"]),
                          "--out", str(tmp_path / "r.json")]) == 0
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o666 & ~umask


# ----------------------------------------------------------------------------------------------
# Resume means the same run
# ----------------------------------------------------------------------------------------------
def _copy_run(finished_run, tmp: Path) -> Path:
    import shutil
    tmp0, _, _ = finished_run
    shutil.copytree(tmp0 / "runs", tmp / "runs")
    shutil.copytree(tmp0 / "cache", tmp / "cache")
    return tmp / "runs" / "t"


def _teacher_cli(argv):
    return train_teacher.run_cli(lambda: train_teacher.main(argv))


CHANGED = [  # (option and value, the setting named)
    (["--lr", "2e-3"], "--lr"), (["--weight-decay", "0.5"], "--weight-decay"),
    (["--warmup-steps", "3"], "--warmup-steps"), (["--schedule", "step"], "--schedule"),
    (["--batch-size", "2"], "--batch-size"), (["--clip", "0.5"], "--clip"), (["--flip"], "--flip"),
    (["--score-thresh", "0.3"], "--score-thresh"), (["--cache-dtype", "float32"], "--cache-dtype"),
    (["--no-cache"], "--no-cache"), (["--gamma", "0.5"], "--gamma"), (["--amp", "bf16"], "--amp"),
    (["--epochs", "2"], "--epochs"), (["--deterministic"], "--deterministic"),
]


@pytest.mark.parametrize("change, name", CHANGED, ids=[n for _, n in CHANGED])
def test_resume_refuses_a_changed_setting_by_name(tiny_world, finished_run, tmp_path, change, name):
    _copy_run(finished_run, tmp_path)
    line = refused(_teacher_cli, teacher_argv(tiny_world, tmp_path, "t", "--resume", *change),
                   [tmp_path / "runs"], [str(tmp_path / "runs" / "t" / "last.pt"), f"{name}:", "--override"])
    assert "would not continue the same run" in line
    if name == "--epochs":
        assert "schedule" in line


def test_resume_refuses_changed_data_file_content(tiny_world, finished_run, tmp_path):
    """The data files are compared by content (a hash stored in the checkpoint), not by path."""
    import shutil
    _copy_run(finished_run, tmp_path)
    world = dict(tiny_world, root=tmp_path / "world")
    shutil.copytree(tiny_world["root"], world["root"])
    dets = world["root"] / "detections_train.json"
    d = json.loads(dets.read_text())
    first = next(iter(d))
    d[first]["scores"][0] = 0.123
    dets.write_text(json.dumps(d))
    refused(_teacher_cli, teacher_argv(world, tmp_path, "t", "--resume"), [tmp_path / "runs"],
            ["--detections (file content)"])


def test_override_extends_training_on_the_longer_schedule_and_is_logged(tiny_world, finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"time": 5, "kind": "tr')                       # a torn last line: tolerated
    code, _, err = _train_cli(teacher_argv(tiny_world, tmp_path, "t", "--resume", "--epochs", "2",
                                           "--override", "epochs"))
    assert code == 0, err
    assert "note: --override epochs: 1 in the checkpoint, 2 from step 2 on" in err
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    ov = [r for r in recs if r["kind"] == "override"]
    assert ov == [dict(ov[0], setting="epochs", checkpoint=1, now=2, epoch=1, step=2)]
    lrs = {r["step"]: r["lr"] for r in recs if r["kind"] == "train"}
    assert sorted(lrs) == [1, 2, 3, 4]
    # epoch 2 runs on the schedule of a run planned for 2 epochs (cosine over 4 steps), never at 0
    sched = trainer.WarmupSchedule(total=4, warmup=0, kind="cosine")
    assert lrs[3] == pytest.approx(1e-3 * sched(3), rel=1e-12) and lrs[3] > 0
    assert lrs[4] == pytest.approx(1e-3 * sched(4), rel=1e-12)
    ck = runs.load_checkpoint(run / "last.pt")
    assert ck["epoch"] == 2 and ck["loop"]["epochs"] == 2 and ck["overrides"][0]["setting"] == "epochs"
    # the next resume compares with the new value: no override needed any more
    code, _, err = _train_cli(teacher_argv(tiny_world, tmp_path, "t", "--resume", "--epochs", "2"))
    assert code == 0, err


def test_override_learning_rate_takes_effect(tiny_world, finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    code, _, err = _train_cli(teacher_argv(tiny_world, tmp_path, "t", "--resume", "--epochs", "2", "--lr", "5e-4",
                                           "--override", "epochs", "--override=--lr"))
    assert code == 0, err
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in recs if r["kind"] == "train"}
    assert lrs[3] == pytest.approx(5e-4 * trainer.WarmupSchedule(total=4)(3), rel=1e-12)
    assert {r["setting"] for r in recs if r["kind"] == "override"} == {"epochs", "lr"}


def test_override_mistakes_are_refused(tiny_world, finished_run, tmp_path):
    _copy_run(finished_run, tmp_path)
    refused(_teacher_cli, teacher_argv(tiny_world, tmp_path, "t", "--resume", "--override", "lr_typo"),
            [tmp_path / "runs"], ["--override lr_typo: no such setting"])
    refused(_teacher_cli, teacher_argv(tiny_world, tmp_path, "t2", "--override", "lr"),
            [tmp_path / "runs"], ["--override", "needs --resume"])
    refused(_teacher_cli, teacher_argv(tiny_world, tmp_path, "t", "--resume", "--epochs", "2",
                                       "--batch-size", "2", "--override", "epochs"),
            [tmp_path / "runs"], ["--batch-size:"])


def test_teacher_and_student_never_resume_each_other(tiny_world, finished_run, tmp_path):
    import train_student
    run = _copy_run(finished_run, tmp_path)
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes((run / "last.pt").read_bytes())
    student = lambda a: train_teacher.run_cli(lambda: train_student.main(a))  # noqa: E731
    # a student run "t" resuming runs/t/last.pt, which is a teacher checkpoint
    refused(student, teacher_argv(tiny_world, tmp_path, "t", "--teacher", str(teacher), "--resume"),
            [tmp_path / "runs"], ["is a teacher checkpoint and this is a student run"])
    # a finished student run; a teacher run resuming it
    code, _, err = run_main(student, teacher_argv(tiny_world, tmp_path, "s", "--teacher", str(teacher)))
    assert code == 0, err
    refused(_teacher_cli, teacher_argv(tiny_world, tmp_path, "s", "--resume"), [tmp_path / "runs"],
            ["is a student checkpoint and this is a teacher run"])
    # the student's teacher file changed (same path, other bytes): refused by content
    original = teacher.read_bytes()
    ck = torch.load(teacher, weights_only=False)
    ck["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in ck["model"].items()}
    torch.save(ck, teacher)
    line = refused(student, teacher_argv(tiny_world, tmp_path, "s", "--teacher", str(teacher), "--resume"),
                   [tmp_path / "runs"], ["--teacher (file content)"])
    assert line.count(" in the checkpoint, ") == 1
    # and a changed distillation weight or temperature
    teacher.write_bytes(original)
    for opt, val in (("--w-logit", "0.5"), ("--temperature", "3"), ("--w-map", "0"), ("--kd-unseen", None)):
        line = refused(student, teacher_argv(tiny_world, tmp_path, "s", "--teacher", str(teacher), "--resume", opt,
                                             *([val] if val else [])), [tmp_path / "runs"], [f"{opt}:"])
        assert line.count(" in the checkpoint, ") == 1


def test_read_log_lines_tolerates_a_torn_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    assert runs.read_log_lines(log) == [('{"step": 1}', {"step": 1}), ('{"step": 2}', {"step": 2}),
                                            ('{"step": 3, "lo', None)]


# ----------------------------------------------------------------------------------------------
# Never a silently wrong number: JSON input
# ----------------------------------------------------------------------------------------------
JSON_BAD = [  # (text, what the one-line reason says)
    (b'{"img_0.jpg": [[0, 0.9, 0, 0, 9, 9, 20, 0, 29, 9]], "img_0.jpg": []}', 'duplicate key "img_0.jpg"'),
    (b'{"a": {"boxes": [], "boxes": [[1, 2, 3, 4]]}}', "field 'a': duplicate key \"boxes\""),
    (b'{"a": [[0, true, 0, 0, 9, 9, 20, 0, 29, 9]]}', "field 'a[0][1]': true is a boolean"),
    (b'{"a": [[false]]}', "field 'a[0][0]': false is a boolean"),
    (b'[1' + b'0' * 400 + b']', "field '[0]': integer of 401 digits is too large for a float64"),
    (b'[1' + b'0' * 5000 + b']', "is not valid JSON (Exceeds the limit"),
    (b'[' * 100 + b']' * 100, "nested deeper than 64 levels"),
    (b'[' * 5000 + b']' * 5000, "is nested too deeply"),
    (b'{"k\\u003a": 1, "k:": 2}', 'duplicate key "k:"'),
    (b'\x1f\x8b\x08\x00', "is gzip-compressed"),
]


@pytest.mark.parametrize("parser", ["orjson", "stdlib"])
@pytest.mark.parametrize("raw, needle", JSON_BAD, ids=[str(i) for i in range(len(JSON_BAD))])
def test_json_reader_refuses_with_the_field(tmp_path, monkeypatch, parser, raw, needle):
    if parser == "stdlib":
        monkeypatch.setattr(common, "orjson", None)
    elif common.orjson is None:
        pytest.skip("orjson not installed")
    p = tmp_path / "pred.json"
    p.write_bytes(raw)
    with pytest.raises(ValueError) as e:
        common.read_json(p, "prediction file")
    msg = str(e.value)
    assert msg.startswith(f"{p}: prediction file") and needle in msg and "\n" not in msg and len(msg) < 700


@pytest.mark.parametrize("parser", ["orjson", "stdlib"])
def test_json_reader_accepts_what_is_valid(tmp_path, monkeypatch, parser):
    if parser == "stdlib":
        monkeypatch.setattr(common, "orjson", None)
    docs = [{"true.jpg": [[1, 0.5, 1e300]], "x": "a:b{[", "y": 'q"[['}, {"a": float("nan")}, [],
            {"k": [[[[1]]]] * 3}, {"e": "\u003a", "f": [{"a": 1}, {"a": 2}]}, 3, "s", None]
    for d in docs:
        p = tmp_path / "d.json"
        p.write_text(json.dumps(d))
        got = common.read_json(p)
        assert json.dumps(got) == json.dumps(d)


def test_cli_json_refusals_name_file_and_field(tmp_path):
    f = hico_files(tmp_path)
    f["pred"].write_text('{"img_0.jpg": [[0, 0.9, 0, 0, 9, 9, 20, 0, 29, 9]], "img_0.jpg": []}')
    argv = ["hico", "--anno", str(f["anno"]), "--pred", str(f["pred"]), "--out", str(tmp_path / "r.json")]
    refused(hoi_eval.main, argv, [tmp_path], [str(f["pred"]), 'duplicate key "img_0.jpg"'])
    f = hico_files(tmp_path)
    anno = json.loads(f["anno"].read_text())
    anno["annotation"][0]["hoi"] = [True]
    f["anno"].write_text(json.dumps(anno))
    refused(hoi_eval.main, argv, [tmp_path], [str(f["anno"]), "annotation[0].hoi[0]': true is a boolean"])


# ----------------------------------------------------------------------------------------------
# Never a silently wrong number: the annotation side, in the three evaluators and the datasets
# ----------------------------------------------------------------------------------------------
# the bad-input cases of the three evaluators and the datasets: tests/test_formats.py


# ----------------------------------------------------------------------------------------------
# Never a silently wrong number: detection files, non-finite scores
# ----------------------------------------------------------------------------------------------
def _world_copy(tiny_world, tmp: Path) -> dict:
    import shutil
    shutil.copytree(tiny_world["root"], tmp / "world")
    return dict(tiny_world, root=tmp / "world")


@pytest.mark.parametrize("field, value, needle", [
    ("labels", 99, "row 0: labels: index 99 out of range [0, 80)"),
    ("boxes", [0, 0, 1e39, 10], "beyond float32"),
    ("scores", 1e39, "beyond float32"),
])
def test_detection_file_checked_at_load_time(tiny_world, tmp_path, field, value, needle):
    world = _world_copy(tiny_world, tmp_path)
    dets = world["root"] / "detections_test.json"
    d = json.loads(dets.read_text())
    img = sorted(d)[1]
    d[img][field][0] = value
    dets.write_text(json.dumps(d))
    refused(_teacher_cli, teacher_argv(world, tmp_path), [tmp_path], [str(dets), f"image '{img}'", needle])


def test_nan_checkpoint_or_features_name_the_images_at_evaluation(tiny_world, finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    ck = torch.load(run / "last.pt", weights_only=False)
    good = {k: v.clone() for k, v in ck["model"].items()}
    key = next(k for k, v in ck["model"].items() if v.is_floating_point() and v.dim() == 2)
    ck["model"][key][0, 0] = float("nan")
    torch.save(ck, run / "last.pt")
    for n in ("predictions_test.json", "metrics.json", "curves.png"):
        (run / n).unlink()                         # so that the resumed run evaluates
    line = refused(_teacher_cli, teacher_argv(tiny_world, tmp_path, "t", "--resume"), [tmp_path / "runs"],
                   ["non-finite scores at evaluation", "synth_test_000000.png", f"'{key}'"])
    assert "4 image(s)" in line
    # NaN features of one test image in the feature cache
    ck["model"] = good
    torch.save(ck, run / "last.pt")
    idx = next(p for p in (tmp_path / "cache").rglob("index.json")
               if any(i[0].endswith("synth_test_000002.png") for i in json.loads(p.read_text())["images"]))
    meta = json.loads(idx.read_text())
    k = [i for i, x in enumerate(meta["images"]) if x[0].endswith("synth_test_000002.png")][0]
    mm = np.memmap(idx.parent / meta["data"], dtype=meta["dtype"], mode="r+")
    per = mm.size // len(meta["images"])
    mm[k * per] = np.nan
    mm.flush()
    del mm
    refused(_teacher_cli, teacher_argv(tiny_world, tmp_path, "t", "--resume"), [tmp_path / "runs"],
            ["synth_test_000002.png", "the VLM features of synth_test_000002.png are non-finite"])


def test_infer_refuses_a_nan_checkpoint_naming_the_image(tiny_world, tiny_ckpt, tmp_path):
    ck = torch.load(tiny_ckpt, weights_only=False)
    key = next(k for k, v in ck["model"].items() if v.is_floating_point() and v.dim() == 2)
    ck["model"][key] = torch.full_like(ck["model"][key], float("nan"))
    bad = tmp_path / "nan.pt"
    torch.save(ck, bad)
    img = tiny_world["test_images"] / "synth_test_000001.png"
    argv = [str(img), "--checkpoint", str(bad), "--gt-anno", str(tiny_world["test_anno"]), "--out",
            str(tmp_path / "out"), "--quiet"]
    refused(infer.main, argv, [tmp_path], [str(bad), "'synth_test_000001.png'", "non-finite"])
    assert not (tmp_path / "out" / "predictions.json").exists()


# ----------------------------------------------------------------------------------------------
# One line, naming the thing: arguments checked at parse time, library errors summarised
# ----------------------------------------------------------------------------------------------
BAD_TRAIN_ARGS = [  # (arguments, what the line names)
    (["--batch-size", "0"], "--batch-size: must be >= 1, got 0"), (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--lr", "nan"], "--lr: expected a finite number"), (["--lr=-1e-3"], "--lr: must be > 0"),
    (["--warmup-steps", "-1"], "--warmup-steps: must be >= 0"), (["--clip", "inf"], "--clip: expected a finite"),
    (["--score-thresh", "1.5"], "--score-thresh: must be in [0, 1]"), (["--few-shot", "0"], "--few-shot"),
    (["--world-size", "10"], "--world-size: must be >= 64"), (["--threads", "-1"], "--threads"),
    (["--milestones", "-1"], "--milestones"), (["--crop-scales", "0"], "--crop-scales: must be in (0, 1)"),
    (["--model-opt", "d_model=abc"], "d_model='abc': d_model takes int"),
    (["--model-opt", "heads=0"], "heads='0': must be >= 1"), (["--model-opt", "dropout=2"], "dropout='2'"),
    (["--model-opt", "nope=1"], "LINKConfig has no field 'nope'"), (["--model-opt", "d_model"], "KEY=VALUE"),
    (["--model-opt", "geometric_encoder=maybe"], "geometric_encoder takes bool"),
    (["--model-opt", "d_model=36"], "d_model must be a multiple of 8"),
    (["--vlm", "NoSuchModel"], "'NoSuchModel' is not an open_clip model name"),
    (["--schedule", "linear"], "--schedule: invalid choice"),
]


@pytest.mark.parametrize("extra, needle", BAD_TRAIN_ARGS, ids=[n for _, n in BAD_TRAIN_ARGS])
def test_training_arguments_refused_in_one_line(tiny_world, tmp_path, extra, needle):
    refused(_teacher_cli, teacher_argv(tiny_world, tmp_path, "t", *extra), [tmp_path, tiny_world["root"]], [needle])
    assert not (tmp_path / "runs" / "t").exists()


@pytest.mark.parametrize("extra, needle", [(["--w-logit", "-1"], "--w-logit: must be >= 0"),
                                           (["--temperature", "0"], "--temperature: must be > 0"),
                                           (["--init-seed", "x"], "--init-seed")])
def test_student_arguments_refused_in_one_line(tiny_world, finished_run, tmp_path, extra, needle):
    import train_student
    _, run, _ = finished_run
    main = lambda a: train_teacher.run_cli(lambda: train_student.main(a))  # noqa: E731
    refused(main, teacher_argv(tiny_world, tmp_path, "s", "--teacher", str(run / "last.pt"), *extra), [tmp_path],
            [needle])


@pytest.mark.parametrize("extra, needle", [
    (["--batch-size", "0"], "--batch-size: must be >= 1"), (["--top-k", "-1"], "--top-k: must be >= 0"),
    (["--max-predictions", "0"], "--max-predictions"), (["--box-thresh", "2"], "--box-thresh: must be in [0, 1]"),
    (["--nms", "-0.1"], "--nms"), (["--attention", "0"], "--attention: must be >= 1"),
    (["--device", "gpu"], "--device: expected auto, cpu, cuda or cuda:N"), (["--detector", "yolo"], "--detector"),
    (["--threads", "x"], "--threads: expected an integer"),
])
def test_infer_arguments_refused_in_one_line(tiny_world, tiny_ckpt, tmp_path, extra, needle):
    argv = [str(tiny_world["test_images"]), "--checkpoint", str(tiny_ckpt), "--gt-anno",
            str(tiny_world["test_anno"]), "--out", str(tmp_path / "out"), "--quiet", *extra]
    refused(infer.main, argv, [tmp_path], [needle])


def test_demo_and_eval_arguments_refused_in_one_line(tmp_path):
    import demo
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    refused(demo.main, ["--label-drop", "1"], [tmp_path], ["--label-drop: must be in [0, 1)"])
    refused(demo.main, ["--seed", "-2"], [tmp_path], ["--seed: must be >= 0"])
    refused(demo.main, ["--zero-shot", "xx"], [tmp_path], ["--zero-shot: invalid choice"])
    refused(demo.main, ["--out", str(mine), "--fresh"], [tmp_path], [str(mine), "not a demo output folder"])
    refused(hoi_eval.main, ["hico", "--pred", "p.json"], [tmp_path], ["--anno"])
    refused(hoi_eval.main, ["nope"], [tmp_path], ["invalid choice"])


def test_checkpoint_problems_are_one_line_naming_the_file(tiny_world, finished_run, tmp_path):
    """Torch's multi-line size-mismatch text, an inconsistent class space, torch.load's
    weights_only advice: one line each, the file named."""
    import train_student
    _, run, _ = finished_run
    ck = torch.load(run / "last.pt", weights_only=False)
    size = dict(ck, model={k: (torch.zeros(3, 3) if k == next(iter(ck["model"])) else v)
                           for k, v in ck["model"].items()})
    torch.save(size, tmp_path / "size.pt")
    cs = dict(ck["class_space"], hoi_object=ck["class_space"]["hoi_object"][:-1])
    torch.save(dict(ck, class_space=cs), tmp_path / "cs.pt")
    student = lambda a: train_teacher.run_cli(lambda: train_student.main(a))  # noqa: E731
    for name, needle in (("size.pt", "in the checkpoint, ["), ("cs.pt", "16 prompts but 15")):
        path = tmp_path / name
        refused(student, teacher_argv(tiny_world, tmp_path, "s", "--teacher", str(path)), [tmp_path],
                [f"teacher {path}", needle])
        refused(infer.main, [str(tiny_world["test_images"]), "--checkpoint", str(path), "--gt-anno",
                             str(tiny_world["test_anno"]), "--out", str(tmp_path / "o"), "--quiet"],
                [tmp_path], [str(path), needle])
    pickled = tmp_path / "pickled.pt"
    torch.save({"opt": __import__("argparse").Namespace(a=1)}, pickled)
    refused(_teacher_cli, teacher_argv(tiny_world, tmp_path, "p", "--pretrained", str(pickled), "--model-opt",
                                       "image_mean=0.5,0.5,0.5", "--model-opt", "image_std=0.5,0.5,0.5"),
            [tmp_path], [f"--pretrained {pickled}", "weights_only=True refuses it (Unsupported global"])


def _fsize_limit(nbytes: int):
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def test_full_disk_in_infer_and_cache_build_is_one_line(tiny_world, tiny_ckpt, tmp_path):
    """A real failing write (the kernel refuses it: a file-size limit, EFBIG, as ENOSPC on a full
    disk): infer's picture, the feature cache's allocation."""
    from clicheck import python, run_child
    out = tmp_path / "out"
    refused(python("infer.py"), [str(tiny_world["test_images"]), "--checkpoint", str(tiny_ckpt), "--gt-anno",
                                 str(tiny_world["test_anno"]), "--out", str(out), "--quiet"],
            [], ["cannot write (File too large)", str(out)], preexec=_fsize_limit(3000))
    assert not [p for p in out.rglob("*") if p.is_file() and p.suffix != ".png"]   # no temp file left
    code, _, err = run_child(python("train_teacher.py", *teacher_argv(tiny_world, tmp_path, "t")),
                             preexec=_fsize_limit(20000))
    line = [x for x in err.splitlines() if x.strip()][-1]
    assert code == 2 and "Traceback" not in err and line.startswith("error: ")
    assert "cannot write (File too large)" in line
    assert not list((tmp_path / "cache").rglob("*.tmp"))


@pytest.mark.parametrize("mutate, needle", [
    (lambda a: a["annotation"][0].__setitem__("boxes_h", [[9, 9, 1, 1]] * len(a["annotation"][0]["boxes_h"])),
     "has x2 < x1"),
    (lambda a: a["annotation"][0].__setitem__("object", [-1] * len(a["annotation"][0]["object"])), "row 0: object:"),
    (lambda a: a.__setitem__("size", [[64.5, 64]] * len(a["filenames"])), ": size: expected [w, h]"),
    (lambda a: a.__setitem__("filenames", 3), "'filenames' and 'annotation' must be lists"),
])
def test_infer_gt_boxes_checked_like_the_dataset(tiny_world, tiny_ckpt, tmp_path, mutate, needle):
    a = json.loads(tiny_world["test_anno"].read_text())
    mutate(a)
    anno = tmp_path / "anno.json"
    anno.write_text(json.dumps(a))
    img = tiny_world["test_images"] / "synth_test_000000.png"
    refused(infer.main, [str(img), "--checkpoint", str(tiny_ckpt), "--gt-anno", str(anno), "--out",
                         str(tmp_path / "o"), "--quiet"], [tmp_path], [str(anno), needle])


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden"])
def test_run_name_must_be_a_plain_folder_name(tiny_world, tmp_path, name):
    refused(_teacher_cli, teacher_argv(tiny_world, tmp_path, name), [tmp_path], ["--name"])


def test_eval_vcoco_without_any_valid_person_scores_zero(tmp_path):
    """A VSRL person whose COCO box vsrl_eval drops (area 0): no person GT at all, every
    detection a false positive (was an IndexError)."""
    f = vcoco_files(tmp_path)
    c = json.loads(f["coco"].read_text())
    c["annotations"][0]["area"] = 0
    f["coco"].write_text(json.dumps(c))
    r = hoi_eval.evaluate_vcoco_files(f["vsrl"], f["coco"], f["pred"])
    assert r["counts"]["num_gt_persons"] == 0 and r["agent_ap"] is None


@pytest.mark.parametrize("labels, needle", [({"img_0.jpg": [float("nan")]}, "image 'img_0.jpg': labels"),
                                            ({"img_0.jpg": [0.5]}, "0.5 is not an integer index")])
def test_eval_image_labels_checked(tmp_path, labels, needle):
    f = hico_files(tmp_path)
    f["labels"].write_text(json.dumps(labels))
    refused(hoi_eval.main, ["hico", "--anno", str(f["anno"]), "--pred", str(f["pred"]), "--known-object",
                            "--image-labels", str(f["labels"])], [tmp_path], [str(f["labels"]), needle])


HOSTILE = [float("nan"), -1, -2, 1.5, "x", None, [], {}, 10 ** 30, -10 ** 30, 1e300, 0, 3, [1, 2],
           [[1, 2, 3, 4]], "", 2 ** 63, [None], {"a": 1}]


def _mutated(doc, rng):
    """doc with one or two values replaced by a hostile one (or a key removed)."""
    import copy
    d = copy.deepcopy(doc)
    paths, stack = [], [(d, ())]
    while stack:
        x, path = stack.pop()
        items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else []
        for k, v in items:
            paths.append(path + (k,))
            stack.append((v, path + (k,)))
    for _ in range(rng.integers(1, 3)):
        path = paths[rng.integers(len(paths))]
        parent = d
        try:                       # an earlier mutation may have replaced a container on the path
            for k in path[:-1]:
                parent = parent[k]
        except (KeyError, IndexError, TypeError):
            continue
        if not isinstance(parent, (dict, list)):
            continue
        if isinstance(parent, dict) and rng.random() < 0.15:
            parent.pop(path[-1], None)
        elif isinstance(parent, dict) or (isinstance(path[-1], int) and path[-1] < len(parent)):
            parent[path[-1]] = copy.deepcopy(HOSTILE[rng.integers(len(HOSTILE))])
    return d


def test_evaluators_on_hostile_files_never_traceback(tmp_path):
    """150 seeded mutations of valid HICO-DET / V-COCO / SWiG-HOI inputs: every run exits 0 or
    refuses with one line (exit 2), never a traceback."""
    rng = np.random.default_rng(0)
    cases = [(hico_files(tmp_path / "h"), ["anno", "pred", "labels"],
              lambda f: ["hico", "--anno", f["anno"], "--pred", f["pred"], "--known-object", "--image-labels",
                         f["labels"]]),
             (vcoco_files(tmp_path / "v"), ["vsrl", "coco", "pred"],
              lambda f: ["vcoco", "--vsrl", f["vsrl"], "--coco", f["coco"], "--pred", f["pred"]])]
    if SWIG_META.exists():
        cases.append((swig_files(tmp_path / "s"), ["anno", "pred"],
                      lambda f: ["swig", "--anno", f["anno"], "--pred", f["pred"], "--meta", f["meta"]]))
    original = [{k: f[k].read_text() for k in keys} for f, keys, _ in cases]
    for _ in range(150):
        c = int(rng.integers(len(cases)))
        f, keys, argv = cases[c]
        for k in keys:
            f[k].write_text(original[c][k])
        k = keys[int(rng.integers(len(keys)))]
        f[k].write_text(json.dumps(_mutated(json.loads(original[c][k]), rng)))
        code, _, err = run_main(hoi_eval.main, [str(a) for a in argv(f)])
        lines = [x for x in err.splitlines() if x.strip()]
        assert code in (0, 2) and "Traceback" not in err, (f[k].read_text()[:300], err[-1500:])
        assert code == 0 or (len(lines) == 1 and lines[0].startswith("error: ")), (f[k].read_text()[:300], err)
