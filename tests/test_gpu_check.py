"""bench/gpu_check.py in its CPU mode (Triton interpreter, tiny shapes): the numbers it records are real.

One run of the CLI (module fixture) with a deliberately broken op injected; the assertions read
its JSON: every kernel within tolerance of the float64 reference, the broken op recorded as
failed with the error it must have, the training step's loss equal across impls, no
interpreter time presented as a speed.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from bench import gpu_check

CORE = ("box_attention", "pair_enum", "kl_distill[prior,M=1]", "kl_distill[prior,M=2]", "kl_distill[no prior,M=2]")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--cpu-smoke", "--inject-fault", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out / "gpu_check.json") as f:
        data = json.load(f)
    return data, (out / "gpu_check.md").read_text(), res.stdout


def _rows(data, op, impl, dtype):
    return [r for r in data["correctness"] if r["op"] == op and r["impl"] == impl and r["dtype"] == dtype]


def test_every_kernel_matches_the_float64_reference(smoke):
    data, _, _ = smoke
    assert data["mode"] == "cpu-smoke" and data["env"]["triton_interpret"] == "1"
    for op in CORE:
        for impl in ("triton", "torch"):
            (fp32,) = _rows(data, op, impl, "float32")
            (bf16,) = _rows(data, op, impl, "bfloat16")
            assert fp32["passed"] and bf16["passed"], (op, impl)
            # fp32 arithmetic vs float64: far under the 1e-4 tolerance; every gradient was compared
            assert fp32["worst_rel_l2"] < 2e-6, (op, impl, fp32["worst"], fp32["worst_rel_l2"])
            assert 0 < bf16["worst_rel_l2"] < gpu_check.TOL["bfloat16"], (op, impl)
            names = set(fp32["errors"])
            assert {n for n in names if n.startswith("d")}, (op, names)
    box = _rows(data, "box_attention", "triton", "float32")[0]["errors"]
    assert set(box) == {"out", "dq", "dk", "dv", "dstrength"}
    pair = _rows(data, "pair_enum", "triton", "float32")[0]["errors"]
    assert set(pair) == {"pair_q", "spatial", "dq", "dw1", "dw2", "db"}


def test_a_broken_op_is_recorded_as_failed(smoke):
    data, md, stdout = smoke
    (bad,) = _rows(data, "box_attention[injected fault]", "triton", "float32")
    (good,) = _rows(data, "box_attention[injected fault]", "torch", "float32")
    assert not bad["passed"] and good["passed"]
    # output scaled by 1.05: the output and every gradient are off by 5% of their norm
    for name, err in bad["errors"].items():
        assert abs(err["rel_l2"] - 0.05) < 1e-3, (name, err)
    assert data["summary"]["failed_checks"] == ["box_attention[injected fault] odd float32 triton"]
    assert data["summary"]["correctness_kernel_failed"] == 1
    assert "| box_attention[injected fault] | odd |" in md and "| FAIL |" in md
    assert "FAIL" in stdout


def test_training_step_loss_is_the_same_for_every_impl(smoke):
    data, md, _ = smoke
    rows = {r["impl"]: r for r in data["train"]}
    assert set(rows) == {"triton", "torch", "reference"}
    ref = rows["reference"]["loss_first_step"]
    assert math.isfinite(ref) and ref > 0
    for impl in ("triton", "torch"):
        assert abs(rows[impl]["loss_first_step"] - ref) <= 1e-5 * ref, (impl, rows[impl]["loss_first_step"], ref)
    assert all(r["pairs"] == 2 * 3 * 5 for r in rows.values())
    assert "## LINK training step" in md


def test_speed_rows_never_present_interpreter_time_as_speed(smoke):
    data, md, _ = smoke
    got = {(r["op"], r["impl"]) for r in data["speed"]}
    for op in ("box_attention", "pair_enum", "kl_distill[prior,M=1]", "kl_distill[prior,M=2]"):
        assert {(op, i) for i in ("triton", "torch", "reference")} <= got
    assert all(r["is_speed"] is False and r["peak_mib"] is None for r in data["speed"])
    assert "not a speed" in md
    # the alternatives compute the same op: SDPA with the bias as a float mask (forward and
    # gradients), FlexAttention's score_mod bias (forward; eager flex has no CPU backward)
    alts = {r["impl"]: r for r in data["speed"] if "check" in r}
    sdpa = alts["sdpa-float-mask"]["check"]
    assert set(sdpa) == {"out", "dq", "dk", "dv", "dstrength"}
    assert max(e["rel_l2"] for e in sdpa.values()) < 1e-5
    flex = next(r for r in data["speed"] if r["impl"].startswith("flex-attention"))
    assert flex["check"]["out"]["rel_l2"] < 1e-5
    naive = [r for r in data["speed"] if r["impl"] == "naive-eager"]
    assert len(naive) == 2 and all(r["check"]["dstudent"]["rel_l2"] < 1e-6 for r in naive)
    assert not data["summary"]["items_failed"] and not data["summary"]["items_skipped"]


def test_compare_on_hand_values():
    e = gpu_check.compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
    assert e["max_abs"] == pytest.approx(0.5) and e["rel_l2"] == pytest.approx(0.5 / math.sqrt(7.25))
    assert gpu_check.compare(torch.tensor([float("nan"), 1.0]), torch.tensor([0.0, 1.0]))["rel_l2"] == float("inf")
    assert gpu_check.compare(None, torch.ones(2))["note"] == "missing"
    assert gpu_check.compare(torch.zeros(2), torch.zeros(2))["rel_l2"] == 0.0


def test_a_failing_item_is_recorded_and_the_run_goes_on(tmp_path):
    rep = gpu_check.Report(str(tmp_path), "cpu-smoke", 100.0, [])
    assert gpu_check.run_item(rep, "x", "boom", lambda: 1 / 0, 0) is None
    assert gpu_check.run_item(rep, "x", "fine", lambda: 42, 0) == 42
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    boom, fine = on_disk["items"]
    assert boom["status"] == "failed" and boom["error"].startswith("ZeroDivisionError: division by zero")
    assert "1 / 0" in boom["traceback"]
    assert fine["status"] == "ok"
    assert on_disk["summary"]["items_failed"] == ["boom"]


def test_items_past_the_budget_are_skipped_and_recorded(tmp_path):
    assert gpu_check.main(["--cpu-smoke", "--budget-s", "0", "--sections", "correctness", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["items"] and all(i["status"] == "skipped" and i["reason"].startswith("budget") for i in data["items"])
    assert gpu_check.main(["--sections", "nope", "--out", str(tmp_path)]) == 2
