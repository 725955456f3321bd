"""Command-line tests of the training commands (train_teacher.py, train_student.py) end to end
with the real LINK model on the tiny synthetic world."""
from __future__ import annotations

import json

import pytest
import torch
from test_trainer import assert_same

import train_student
import train_teacher
from data import Views
from model import LINK
from runs import CheckpointError, load_checkpoint, trainable_state
from train_student import distill_losses


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
