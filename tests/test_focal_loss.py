"""focal_loss (model.py's training loss): the lean torch path and the Triton kernels (CPU
interpreter) against the reference in fp64, forward and backward, on the extreme cases it handles.
The reference is the formula model.py used before (tests/test_memory.py checks the model's loss
against it): test_hand_computed_values holds it to numbers computed by hand."""
import math

import pytest
import torch
from conftest import BLOCKS, IMPLS, aot_compile_in_subprocess, logit_case

from kernels import focal_loss
from kernels._common import triton_available

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")   # interpreter: log(0), inf * 0 in numpy


# Tolerances (torch.testing.assert_close) of the loss and the logits gradient against the fp64
# reference on the same input values. fp32: a mean over the positives, also with logits of
# +-1e4. fp16 / bf16 logits: computed in fp32, loss and gradient rounded to the dtype.
TOL = {torch.float32: {"loss": dict(rtol=1e-6, atol=1e-6), "grad": dict(rtol=1e-5, atol=1e-7)},
       torch.float16: {"loss": dict(rtol=1e-2, atol=1e-2), "grad": dict(rtol=1e-2, atol=1e-3)},
       torch.bfloat16: {"loss": dict(rtol=1e-2, atol=1e-2), "grad": dict(rtol=1e-2, atol=1e-3)}}
# hand-computed values (fp32 against Python floats): the loss and most gradient entries; the
# gradient entry with a power and a log (0.2 * log(1/2) * (1/2)^0.2) loses a digit more
HAND_REL = {"loss": 1e-6, "grad": 1e-6, "grad_pow_log": 1e-5}


def make(N=11, C=37, seed=0, scale=3.0, extreme=False):
    """logits [N, C], prior [N, C] (conftest.logit_case: zeros, a column of ones, a fully skipped
    row 2, one kept class in row 3), labels [N, C] (about 30% positive, some on skipped entries).
    extreme: logits of +-1e4 (rows 0, 1, 5) against priors 1, tiny and in between, both labels."""
    x, _, prior = logit_case(N, C, None, True, seed, scale)
    g = torch.Generator().manual_seed(seed + 1)
    labels = (torch.rand(N, C, generator=g) < 0.3).float()
    if extreme:
        x[0], x[1, ::2], x[1, 1::2] = 1e4, -1e4, 1e4
        x[5, :6] = -1e4
        prior[0, :8] = 1.0                                 # p = sigmoid(O) exactly
        prior[1, :4] = 1.0
        prior[5, :3] = 1e-30                               # tiny but kept
        labels[0, :8:2], labels[1, :4] = 1.0, 1.0          # saturated right and wrong
        x[2, 0], x[3, 0] = float("nan"), float("inf")      # on skipped entries: never read
    return x, prior, labels


def run(impl, x, prior, labels, seed=1, **kw):
    """Loss and logits gradient for a fixed non-unit upstream gradient."""
    x = x.detach().clone().requires_grad_()
    loss = focal_loss(x, prior, labels, impl=impl, **kw, **BLOCKS.get(impl, {}))
    up = 0.5 + torch.rand((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).item()
    (loss * up).backward()
    return loss.detach(), x.grad


def run_ref64(x, prior, labels, **kw):
    return run("reference", x.double(), prior.double(), labels, **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("alpha,gamma", [(0.5, 0.2), (0.25, 2.0)])
def test_matches_reference(impl, extreme, alpha, gamma):
    x, prior, labels = make(extreme=extreme)
    ref_loss, ref_grad = run_ref64(x, prior, labels, alpha=alpha, gamma=gamma)
    loss, grad = run(impl, x, prior, labels, alpha=alpha, gamma=gamma)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, **TOL[torch.float32]["loss"])
    torch.testing.assert_close(grad.double(), ref_grad, **TOL[torch.float32]["grad"])
    assert (grad[prior == 0] == 0).all()


def test_hand_computed_values():
    """Four kept entries, P = 1 or 0.5, O = 0 or +-1e4, alpha 0.5, gamma 0.2; one skipped entry
    with a NaN logit and a positive label; 2 kept positives."""
    x = torch.tensor([[0.0, 0.0, 1e4, -1e4, float("nan")]])
    prior = torch.tensor([[1.0, 0.5, 1.0, 0.5, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0]])
    # entry 0: p = 1/2, label 1: -0.5 (1/2)^0.2 log(1/2)
    # entry 1: p = 1/4, label 0: -0.5 (1/4)^0.2 log(3/4)
    # entry 2: p = sigmoid(1e4) = 1 - e^-1e4, label 0: -0.5 * 1 * log(1 - p) = 0.5 * 1e4
    # entry 3: p = 0.5 e^-1e4, label 1: -0.5 * 1 * log p = 0.5 (1e4 + log 2)
    want = (-0.5 * 0.5 ** 0.2 * math.log(0.5) - 0.5 * 0.25 ** 0.2 * math.log(0.75)
            + 0.5 * 1e4 + 0.5 * (1e4 + math.log(2))) / 2
    # d/dO: entry 0: -0.5 (1/2)^0.2 (0.2 * (-1/2) * log(1/2) + 1/2); entry 2: +0.5; entry 3: -0.5
    g0 = -0.5 * 0.5 ** 0.2 * (0.2 * -0.5 * math.log(0.5) + 0.5) / 2
    for impl in ["reference", "torch"] + (["triton"] if triton_available() else []):
        xx = x.clone().requires_grad_()
        loss = focal_loss(xx, prior, labels, 0.5, 0.2, impl=impl)
        loss.backward()
        assert loss.item() == pytest.approx(want, rel=HAND_REL["loss"])
        assert xx.grad[0, 0].item() == pytest.approx(g0, rel=HAND_REL["grad_pow_log"])
        assert xx.grad[0, 2].item() == pytest.approx(0.25, rel=HAND_REL["grad"])
        assert xx.grad[0, 3].item() == pytest.approx(-0.25, rel=HAND_REL["grad"])
        assert xx.grad[0, 4].item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_computed_in_fp32(impl, dtype):
    """fp16 / bf16 logits (and prior): computed in fp32, compared with the fp64 reference on the
    same rounded values; loss and gradient in the logits' dtype."""
    x, prior, labels = make(seed=2)
    x, prior = x.to(dtype), prior.to(dtype)
    ref_loss, ref_grad = run_ref64(x, prior, labels)
    loss, grad = run(impl, x, prior, labels)
    assert loss.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, **TOL[dtype]["loss"])
    torch.testing.assert_close(grad.double(), ref_grad, **TOL[dtype]["grad"])


@pytest.mark.parametrize("impl", IMPLS)
def test_label_dtypes_no_positives_and_all_skipped(impl):
    x, prior, labels = make(N=6, C=9, seed=3)
    want = run(impl, x, prior, labels)
    for lab in (labels.bool(), labels.to(torch.uint8), labels.long(), labels * 0.7):
        got = run(impl, x, prior, lab)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # no positive: the sum is divided by 1
    loss, _ = run(impl, x, prior, torch.zeros_like(labels))
    ref, _ = run_ref64(x, prior, torch.zeros_like(labels))
    assert loss.item() == pytest.approx(ref.item(), rel=TOL[torch.float32]["loss"]["rtol"])
    # every entry skipped: 0, zero gradient, labels ignored
    loss, grad = run(impl, x, torch.zeros_like(prior), torch.ones_like(labels))
    assert loss.item() == 0.0 and (grad == 0).all()
    e = torch.zeros(0, 5, requires_grad=True)
    loss = focal_loss(e, torch.zeros(0, 5), torch.zeros(0, 5), impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and e.grad.shape == (0, 5)


def test_gradcheck_fp64_torch_path():
    x, prior, labels = make(N=5, C=7, seed=5, extreme=False)
    x, prior = x.double().requires_grad_(), prior.double()
    for a, g in ((0.5, 0.2), (0.25, 2.0)):
        assert torch.autograd.gradcheck(lambda t: focal_loss(t, prior, labels, a, g, impl="torch"), (x,))


def test_saves_only_its_inputs():
    """The lean path keeps no [N, C] tensor of its own for backward (only the inputs and the
    0-dim positive count); prior and labels get no gradient."""
    x, prior, labels = make(N=6, C=8)
    x.requires_grad_()
    prior.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = focal_loss(x, prior, labels, impl="torch")
    ptrs = {x.data_ptr(), prior.data_ptr(), labels.data_ptr()}
    assert saved and all(t.data_ptr() in ptrs or t.numel() == 1 for t in saved)
    loss.backward()
    assert prior.grad is None and x.grad is not None


def test_bad_input():
    z = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="prior"):
        focal_loss(z, torch.zeros(2, 4), z)
    with pytest.raises(ValueError, match="labels"):
        focal_loss(z, z, torch.zeros(5))
    with pytest.raises(ValueError, match="logits"):
        focal_loss(torch.zeros(5), torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="impl"):
        focal_loss(z, z, z, impl="cuda")


@pytest.mark.skipif(not triton_available(), reason="no triton")
def test_triton_default_blocks():
    x, prior, labels = make(N=6, C=300, seed=6, extreme=True)
    ref_loss, ref_grad = run_ref64(x, prior, labels)
    xx = x.clone().requires_grad_()
    loss = focal_loss(xx, prior, labels, impl="triton")            # default (interpreter) tiles
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, **TOL[torch.float32]["loss"])
    up = 0.5 + torch.rand((), generator=torch.Generator().manual_seed(1), dtype=torch.float64).item()
    torch.testing.assert_close(xx.grad.double() * up, ref_grad, **TOL[torch.float32]["grad"])


@pytest.mark.skipif(not triton_available(), reason="no triton")
def test_triton_kernels_compile_for_h100():
    """The interpreter checks no GPU limit: compile the launch configuration the wrapper picks
    on a GPU (8 x 256 tiles) for sm_90: fp32 logits with float labels, bf16 logits with uint8."""
    code = """
import sys
import kernels
from kernels._common import aot_compile
K = sys.modules["kernels.focal_loss"]
c = {"BLOCK_N": 8, "BLOCK_C": 256}
for dt, lab in (("fp32", "fp32"), ("bf16", "u8")):
    common = {"N": "i32", "C": "i32", "alpha": "fp32", "gamma": "fp32", "BLOCK_N": "constexpr",
              "BLOCK_C": "constexpr"}
    aot_compile(K._focal_fwd_kernel, {"L": "*" + dt, "Pr": "*" + dt, "Lab": "*" + lab, "LossRows": "*fp32",
                                      "PosRows": "*fp32", **common}, c)
    aot_compile(K._focal_bwd_kernel, {"L": "*" + dt, "Pr": "*" + dt, "Lab": "*" + lab, "Scale": "*fp32",
                                      "dL": "*" + dt, **common}, c)
print("ok")
"""
    assert aot_compile_in_subprocess(code).strip().endswith("ok")
