"""kl_distill: lean torch path and Triton kernels (CPU interpreter) against the reference."""
import math

import pytest
import torch
from conftest import BLOCKS, IMPLS, aot_compile_in_subprocess
from conftest import logit_case as make

from kernels import kl_distill, psi_transform
from kernels._common import triton_available

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")   # interpreter: log(0) in numpy

# small tiles so that the Triton tests cover several programs and several class blocks

# Tolerances (torch.testing.assert_close) of the loss and the student gradient against the
# reference. fp32: the reference's own rounding. fp16 / bf16 inputs: compared with the fp32
# reference on the same (rounded) values; the loss and gradient come back rounded to the dtype.
TOL = {torch.float32: {"loss": dict(rtol=1e-5, atol=1e-5), "grad": dict(rtol=1e-5, atol=1e-6)},
       torch.float16: {"loss": dict(rtol=1e-2, atol=1e-2), "grad": dict(rtol=1e-2, atol=2e-3)},
       torch.bfloat16: {"loss": dict(rtol=1e-2, atol=1e-2), "grad": dict(rtol=1e-2, atol=2e-3)}}
# logits of +-1e4 (fp32): the summed loss is large, so its absolute tolerance is wider
EXTREME_LOSS_TOL = {"prior": dict(rtol=1e-5, atol=1e-3), "no_prior": dict(rtol=1e-5, atol=1e-2)}
# teacher == student: KL and its gradient are 0 up to fp32 rounding (max abs)
ZERO_ATOL = {"loss": 1e-5, "grad": 1e-6}
# hand-computed values (fp32 against Python floats)
HAND_REL = 1e-6


def run(impl, s, t, T, prior, upstream=1.7):
    s = s.detach().clone().requires_grad_()
    loss = kl_distill(s, t, T, prior, impl=impl, **BLOCKS.get(impl, {}))
    (loss * upstream).backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M", [None, 1, 2])
@pytest.mark.parametrize("with_prior", [False, True])
def test_matches_reference_fp32(impl, M, with_prior):
    s, t, prior = make(11, 37, M, with_prior)
    T = 2.5
    ref_loss, ref_grad = run("reference", s, t, T, prior)
    loss, grad = run(impl, s, t, T, prior)
    assert loss.dtype == torch.float32 and grad.shape == s.shape
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32]["loss"])
    torch.testing.assert_close(grad, ref_grad, **TOL[torch.float32]["grad"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(impl, dtype):
    """fp16 / bf16 inputs: compared with the fp32 reference on the same (rounded) values."""
    s, t, prior = make(9, 23, 2, True, seed=1, dtype=dtype)
    ref_loss, ref_grad = run("reference", s.float(), t.float(), 1.0, prior)
    loss, grad = run(impl, s, t, 1.0, prior)
    assert loss.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(loss.float(), ref_loss, **TOL[dtype]["loss"])
    torch.testing.assert_close(grad.float(), ref_grad, **TOL[dtype]["grad"])


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_logits_and_prior_edges(impl):
    """Logits +-1e4, P = 0 and P = 1 entries, a fully masked row: finite and equal to the
    reference (whose log-space Psi is exact there)."""
    s, t, prior = make(8, 20, 2, True, seed=2)
    s[0], s[1, ::2], s[1, 1::2] = 1e4, -1e4, 1e4
    t[0, 4], t[1, 5, ::3] = -1e4, 1e4
    prior[4] = 1.0                                        # Psi = O exactly
    prior[5, :10] = 1e-30                                 # tiny but unmasked
    for T in (1.0, 0.5):
        ref_loss, ref_grad = run("reference", s, t, T, prior)
        loss, grad = run(impl, s, t, T, prior)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, ref_loss, **EXTREME_LOSS_TOL["prior"])
        torch.testing.assert_close(grad, ref_grad, **TOL[torch.float32]["grad"])
        assert (grad[prior == 0] == 0).all() and (grad[2] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_logits_without_prior(impl):
    s, t, _ = make(5, 13, None, False, seed=3)
    s[0, 0], s[1, 3], t[2, 1], t[3] = 1e4, -1e4, 1e4, -1e4
    ref_loss, ref_grad = run("reference", s, t, 1.0, None)
    loss, grad = run(impl, s, t, 1.0, None)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss, **EXTREME_LOSS_TOL["no_prior"])
    torch.testing.assert_close(grad, ref_grad, **TOL[torch.float32]["grad"])


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_masked_and_identical_inputs(impl):
    s, t, prior = make(4, 9, None, True, seed=4)
    loss, grad = run(impl, s, t, 2.0, torch.zeros_like(s))
    assert loss.item() == 0.0 and (grad == 0).all()
    loss, grad = run(impl, s, s.clone(), 2.0, prior)      # teacher == student: KL = 0
    assert abs(loss.item()) < ZERO_ATOL["loss"] and grad.abs().max().item() < ZERO_ATOL["grad"]


def test_hand_computed_value():
    """One row, two classes, T = 2: KL(p || q) by hand."""
    s = torch.tensor([[0.0, 2.0]])
    t = torch.tensor([[2.0, 0.0]])
    q = torch.tensor([1.0, math.e]) / (1 + math.e)        # softmax(s / 2)
    p = torch.tensor([math.e, 1.0]) / (1 + math.e)
    expected = 4.0 * float((p * (p / q).log()).sum())
    for impl in ("reference", "torch"):
        assert kl_distill(s, t, 2.0, impl=impl).item() == pytest.approx(expected, rel=HAND_REL)
    # with a prior: Psi(O) = logit(P * sigmoid(O)) and the P = 0 class masked out
    prior = torch.tensor([[0.5, 0.0]])
    assert psi_transform(torch.tensor([0.0]), torch.tensor([0.5])).item() == pytest.approx(math.log(0.25 / 0.75))
    assert kl_distill(s, t, 2.0, prior, impl="torch").item() == 0.0


def test_gradcheck_fp64_torch_path():
    s, t, prior = make(5, 7, 2, True, seed=5, dtype=torch.float64)
    prior = prior.double()
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: kl_distill(x, t, 1.5, prior, impl="torch"), (s,))
    assert torch.autograd.gradcheck(lambda x: kl_distill(x, t[0], 0.7, None, impl="torch"), (s,))


def test_teacher_and_prior_get_no_gradient():
    s, t, prior = make(5, 5, None, True)
    s.requires_grad_()
    t.requires_grad_()
    kl_distill(s, t, 1.0, prior, impl="torch").backward()
    assert t.grad is None and s.grad is not None


def test_empty_and_bad_input():
    s = torch.zeros(0, 5, requires_grad=True)
    loss = kl_distill(s, torch.zeros(0, 5), impl="torch")
    loss.backward()
    assert loss.item() == 0.0 and s.grad.shape == (0, 5)
    with pytest.raises(ValueError, match="teacher"):
        kl_distill(torch.zeros(2, 5), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="prior"):
        kl_distill(torch.zeros(2, 5), torch.zeros(2, 5), prior=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        kl_distill(torch.zeros(2, 5), torch.zeros(2, 5), temperature=0.0)
    with pytest.raises(ValueError, match="impl"):
        kl_distill(torch.zeros(2, 5), torch.zeros(2, 5), impl="cuda")


@pytest.mark.skipif(not triton_available(), reason="no triton")
def test_triton_default_blocks():
    s, t, prior = make(6, 300, 2, True, seed=6)
    ref_loss, ref_grad = run("reference", s, t, 1.0, prior)
    s2 = s.clone().requires_grad_()
    loss = kl_distill(s2, t, 1.0, prior, impl="triton")   # default (interpreter) tiles
    (loss * 1.7).backward()
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32]["loss"])
    torch.testing.assert_close(s2.grad, ref_grad, **TOL[torch.float32]["grad"])


@pytest.mark.skipif(not triton_available(), reason="no triton")
def test_triton_kernels_compile_for_h100():
    """The interpreter checks no GPU limit: compile the launch configurations the wrapper picks
    on a GPU (8 x 256 tiles) for sm_90, for fp32 inputs with and without prior and bf16 inputs with a prior (fp16 is
    the same code as bf16)."""
    code = """
import sys
import kernels
from kernels._common import aot_compile
K = sys.modules["kernels.kl_distill"]
for dt, hp in (("fp32", True), ("fp32", False), ("bf16", True)):
    c = {"HAS_PRIOR": hp, "BLOCK_N": 8, "BLOCK_C": 256}
    aot_compile(K._kl_fwd_kernel, {"S": "*" + dt, "Tt": "*" + dt, "Pr": "*fp32", "LossRows": "*fp32",
        "StS": "*fp32", "StT": "*fp32", "N": "i32", "C": "i32", "M": "i32", "stride_tm": "i32",
        "inv_T": "fp32", "HAS_PRIOR": "constexpr", "BLOCK_N": "constexpr", "BLOCK_C": "constexpr"}, c)
    aot_compile(K._kl_bwd_kernel, {"S": "*" + dt, "Tt": "*" + dt, "Pr": "*fp32", "StS": "*fp32",
        "StT": "*fp32", "G": "*" + dt, "dS": "*" + dt, "N": "i32", "C": "i32", "M": "i32",
        "stride_tm": "i32", "inv_T": "fp32", "coef": "fp32", "HAS_PRIOR": "constexpr",
        "BLOCK_N": "constexpr", "BLOCK_C": "constexpr"}, c)
print("ok")
"""
    assert aot_compile_in_subprocess(code).strip().endswith("ok")
