"""Tests of the run folder and its checkpoint (runs.py): the one checkpoint reader refuses
missing, truncated, foreign and mismatched files; what a checkpoint holds; a finished run's name
is never reused without --resume or --move-aside (nothing is lost). The loop's resume is tested
in test_trainer.py, the CLI's run-folder rules in test_reliability.py."""
from __future__ import annotations

import pytest
import torch
from test_trainer import make_trainer

from runs import RUN_OUTPUTS, CheckpointError, TrainInputError, claim_run_folder, load_checkpoint, resume_path


def test_corrupt_or_mismatched_checkpoint_refused(tmp_path):
    tr = make_trainer(tmp_path, n=4, epochs=1, bs=4)
    tr.fit()
    ck = tr.ckpt_path
    data = ck.read_bytes()
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(bad)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        tr.resume(garbage)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    obj = torch.load(ck, weights_only=False)
    obj2 = dict(obj, config=dict(obj["config"], width=16))
    torch.save(obj2, tmp_path / "cfg.pt")
    with pytest.raises(CheckpointError, match=r"different model config.*width"):
        make_trainer(tmp_path / "b", n=4).resume(tmp_path / "cfg.pt")
    obj3 = dict(obj, class_space=dict(obj["class_space"], prompts=["x", "y", "z"]))
    torch.save(obj3, tmp_path / "cs.pt")
    with pytest.raises(CheckpointError, match=r"different class space.*prompts"):
        make_trainer(tmp_path / "c", n=4).resume(tmp_path / "cs.pt")
    obj4 = dict(obj, version=99)
    torch.save(obj4, tmp_path / "v.pt")
    with pytest.raises(CheckpointError, match="version"):
        load_checkpoint(tmp_path / "v.pt")
    # a different image list is refused too
    with pytest.raises(CheckpointError, match="image list"):
        make_trainer(tmp_path / "d", n=5).resume(ck)


def test_checkpoint_contents(tmp_path):
    tr = make_trainer(tmp_path, n=4, epochs=1, bs=2)
    tr.fit()
    ck = load_checkpoint(tr.ckpt_path)
    for k in ("config", "class_space", "model", "optimizer", "scheduler", "scaler", "rng", "epoch",
              "step", "version", "order"):
        assert k in ck
    assert ck["epoch"] == 1 and ck["step"] == 2 and ck["config"]["width"] == 8
    assert not any(k.startswith("vlm.") for k in ck["model"])         # frozen VLM not stored
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0


def test_finished_run_name_is_never_reused_without_resume_or_move_aside(tmp_path):
    """A folder holding a finished run: a new run under its name is refused (nothing moved or
    removed); --resume from elsewhere is refused too; --move-aside keeps the old run whole as
    NAME.old-<time> and hands a new, empty folder to the new run."""
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    files = {n: f"{n} of the finished run".encode() for n in RUN_OUTPUTS}
    for n, b in files.items():
        (run / n).write_bytes(b)
    with pytest.raises(TrainInputError, match=r"t: holds a run already \(last.pt, log.jsonl"):
        claim_run_folder(run, None, False)
    with pytest.raises(TrainInputError, match="would mix two runs"):
        claim_run_folder(run, str(tmp_path / "other.pt"), False)
    assert {n: (run / n).read_bytes() for n in RUN_OUTPUTS} == files
    with claim_run_folder(run, None, True) as folder:
        assert {n: (run / n).read_bytes() for n in RUN_OUTPUTS} == files      # moved only by prepare()
        folder.prepare()
        assert list(run.iterdir()) == []
    old = [p for p in run.parent.iterdir() if p.name.startswith("t.old-")]
    assert len(old) == 1 and {n: (old[0] / n).read_bytes() for n in RUN_OUTPUTS} == files


def test_resume_path(tmp_path):
    """--resume alone: runs/NAME/last.pt when it exists, else a fresh start; --resume FILE must exist."""
    assert resume_path(None, tmp_path) is None and resume_path("auto", tmp_path) is None
    (tmp_path / "last.pt").write_bytes(b"x")
    assert resume_path("auto", tmp_path) == tmp_path / "last.pt"
    with pytest.raises(TrainInputError, match="--resume .*nope.pt: checkpoint not found"):
        resume_path(str(tmp_path / "nope.pt"), tmp_path)
