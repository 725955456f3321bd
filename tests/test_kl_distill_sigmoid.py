"""kl_distill_sigmoid (per-class Bernoulli KL): lean torch path and Triton kernels (CPU
interpreter) against the fp64 reference, hand-computed values, and the push both logit-KD
forms give a common shift of an unlabelled pair's logits."""
import math

import pytest
import torch
from conftest import BLOCKS, IMPLS, aot_compile_in_subprocess
from conftest import logit_case as make

from kernels import kl_distill, kl_distill_sigmoid
from kernels._common import triton_available

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")   # interpreter: log(0), inf * 0 in numpy


# Tolerances (torch.testing.assert_close) of the loss and the student gradient against the fp64
# reference on the same input values. fp32: a sum over pairs and classes, hence the wider loss
# atol. fp16 / bf16 logits: the fused paths compute in fp32; the gradient comes back rounded.
TOL = {torch.float32: {"loss": dict(rtol=1e-5, atol=1e-4), "grad": dict(rtol=1e-5, atol=1e-6)},
       torch.float16: {"loss": dict(rtol=1e-2, atol=1e-2), "grad": dict(rtol=1e-2, atol=2e-3)},
       torch.bfloat16: {"loss": dict(rtol=1e-2, atol=1e-2), "grad": dict(rtol=1e-2, atol=2e-3)}}
# logits of +-1e4 (fp32): per-class terms up to 1e4, so the loss atol is wider
EXTREME_LOSS_TOL = dict(rtol=1e-5, atol=1e-3)
# two fp32 computations of the same value (two teachers against their mean)
SAME_TOL = {"loss": dict(rtol=1e-5, atol=1e-5), "grad": dict(rtol=1e-5, atol=1e-6)}
# teacher == student: KL and its gradient are 0 up to fp32 rounding (max abs)
ZERO_ATOL = {"loss": 1e-5, "grad": 1e-6}
# hand-computed values (fp32 against Python floats); the fp16 sum of 100,000 terms in fp32
HAND_REL, FP16_SUM_REL = 1e-6, 1e-3


def run(impl, s, t, T, prior, reduction="sum", seed=1):
    """Loss and student gradient for a fixed non-unit upstream gradient."""
    s = s.detach().clone().requires_grad_()
    loss = kl_distill_sigmoid(s, t, T, prior, impl=impl, reduction=reduction, **BLOCKS.get(impl, {}))
    up = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    (loss * up.to(loss.dtype)).sum().backward()
    return loss.detach(), s.grad


def run_ref64(s, t, T, prior, reduction="sum"):
    """The reference in float64 on the same input values."""
    loss, grad = run("reference", s.double(), t.double(), T, None if prior is None else prior.double(), reduction)
    return loss, grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("M", [None, 1, 3])
@pytest.mark.parametrize("with_prior", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_matches_reference(impl, M, with_prior, reduction):
    s, t, prior = make(11, 37, M, with_prior)
    ref_loss, ref_grad = run_ref64(s, t, 2.5, prior, reduction)
    loss, grad = run(impl, s, t, 2.5, prior, reduction)
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape and grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, **TOL[torch.float32]["loss"])
    torch.testing.assert_close(grad.double(), ref_grad, **TOL[torch.float32]["grad"])


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_logits_and_prior_edges(impl):
    """Logits +-1e4 on both sides (saturated students and teachers, agreeing and not), P = 0,
    P = 1, tiny P: finite, equal to the fp64 reference, zero gradient where P = 0."""
    s, t, prior = make(8, 20, 2, True, seed=2)
    s[0], s[1, ::2], s[1, 1::2] = 1e4, -1e4, 1e4
    t[:, 0], t[0, 1, ::3], t[1, 1, 1::3] = 1e4, 1e4, -1e4    # row 0 agrees, row 1 partly not
    t[0, 5], s[5, :4] = -1e4, -1e4
    prior[0, :6] = 1.0                                        # Psi = O exactly
    prior[4] = 1.0
    prior[5, :10] = 1e-30                                     # tiny but allowed
    for T in (1.0, 0.5, 3.0):
        ref_loss, ref_grad = run_ref64(s, t, T, prior, "none")
        loss, grad = run(impl, s, t, T, prior, "none")
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(loss.double(), ref_loss, **EXTREME_LOSS_TOL)
        torch.testing.assert_close(grad.double(), ref_grad, **TOL[torch.float32]["grad"])
        assert (grad[prior == 0] == 0).all() and (grad[2] == 0).all() and loss[2] == 0
    # a student saturated in the teacher's direction costs nothing and gets no push
    one = torch.full((1, 3), 1e4)
    loss, grad = run(impl, one, one.clone(), 1.0, torch.ones(1, 3))
    assert loss.item() == 0.0 and (grad == 0).all()
    # saturated the wrong way: p = 1, q = sigmoid(-1e4), KL = -log q = 1e4 per class, and
    # d KL / d O = q - p = -1
    s = (-one).requires_grad_()
    loss = kl_distill_sigmoid(s, one, 1.0, None, impl=impl, **BLOCKS[impl])
    loss.backward()
    assert loss.item() == pytest.approx(3e4, rel=HAND_REL) and (s.grad == -1.0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(impl, dtype):
    """fp16 / bf16 logits: the fused paths compute in fp32; compared with the fp64 reference on
    the same rounded values; the loss comes back in fp32 (a sum over pairs and classes), the
    gradient in the student's dtype."""
    s, t, prior = make(9, 23, 2, True, seed=1)
    s, t = s.to(dtype), t.to(dtype)
    ref_loss, ref_grad = run_ref64(s, t, 1.0, prior)
    loss, grad = run(impl, s, t, 1.0, prior)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, **TOL[dtype]["loss"])
    torch.testing.assert_close(grad.double(), ref_grad, **TOL[dtype]["grad"])


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_sum_beyond_fp16_range_stays_finite(impl):
    """A sum over many pairs exceeds fp16's largest value (65,504) although every pair's term is
    small: the loss is the fp32 sum, not inf (it was inf on an H200 at 3,480 x 600)."""
    s = torch.full((2000, 50), -3.0, dtype=torch.float16)
    t = torch.full((2000, 50), 3.0, dtype=torch.float16)
    p = 1 / (1 + math.exp(-3.0))                           # teacher sigmoid(3); student 1 - p
    want = 2000 * 50 * (2 * p - 1) * 3.0                   # KL(Bern(p) || Bern(1 - p)) = (2p - 1) logit(p)
    loss = kl_distill_sigmoid(s, t, 1.0, impl=impl)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(want, rel=FP16_SUM_REL) and want > 65504


def test_hand_computed_value():
    """One pair, two classes, T = 2, no prior: T^2 * sum of the two Bernoulli KLs by hand; with
    a prior of (0.5, 0): Psi = logit(0.5 * sigmoid(O)) and class 1 left out."""
    sig = lambda x: 1 / (1 + math.exp(-x))                                    # noqa: E731
    kl = lambda p, q: p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))   # noqa: E731
    s, t = torch.tensor([[0.0, 2.0]]), torch.tensor([[2.0, -1.0]])
    want = 4.0 * (kl(sig(1.0), sig(0.0)) + kl(sig(-0.5), sig(1.0)))
    psi = lambda o: math.log(0.5 * sig(o) / (1 - 0.5 * sig(o)))               # noqa: E731
    want_p = 4.0 * kl(sig(psi(2.0) / 2), sig(psi(0.0) / 2))
    prior = torch.tensor([[0.5, 0.0]])
    for impl in ["reference", "torch"] + (["triton"] if triton_available() else []):
        assert kl_distill_sigmoid(s, t, 2.0, impl=impl).item() == pytest.approx(want, rel=HAND_REL)
        assert kl_distill_sigmoid(s, t, 2.0, prior, impl=impl).item() == pytest.approx(want_p, rel=HAND_REL)


@pytest.mark.parametrize("impl", ["reference"] + IMPLS)
def test_target_is_mean_of_teacher_probabilities(impl):
    """Two teachers with probabilities a and b = one teacher with probability (a + b) / 2."""
    s, t, _ = make(5, 7, 2, False, seed=3, scale=2.0)
    mean_p = (torch.sigmoid(t[0]) + torch.sigmoid(t[1])) / 2
    single = torch.log(mean_p) - torch.log1p(-mean_p)                          # logit of the mean
    two, g_two = run(impl, s, t, 1.0, None)
    one, g_one = run(impl, s, single, 1.0, None)
    torch.testing.assert_close(two, one, **SAME_TOL["loss"])
    torch.testing.assert_close(g_two, g_one, **SAME_TOL["grad"])


def _shift_push(fn, student, teacher, prior, T):
    """d loss / d delta at delta = 0 for student + delta on every class: the push on a common
    shift of the pair's logits (sum of the gradient over the classes)."""
    s = student.clone().requires_grad_()
    fn(s, teacher, T, prior).backward()
    return s.grad.sum().item()


def test_push_on_common_shift_of_an_unlabelled_pair():
    """A hand-made unlabelled pair: prior 0.64 on three allowed classes, 0 on the fourth.
    Sigmoid form: a teacher that says 'interacting' pushes the student's logits up (negative
    gradient), one that says 'not interacting' pushes them down, with sizes
        sum_c T (sigmoid(Psi_s / T) - sigmoid(Psi_t / T)) dPsi/dO(O_s).
    Softmax form: P cancels and so does any common shift; the push is ~0 and need not even take
    the teacher's side."""
    prior = torch.tensor([[0.64, 0.64, 0.64, 0.0]])
    # 1. a flat student (O = 0): q = 0.64 / 2 = 0.32, dPsi/dO = 1 / (2 - 0.64); teacher O = +-4:
    #    push = 3 (0.32 - 0.64 sigmoid(+-4)) / 1.36 = -+0.680490; the softmax form: exactly 0
    flat = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    yes, no = torch.tensor([[4.0, 4.0, 4.0, -3.0]]), torch.tensor([[-4.0, -4.0, -4.0, 2.0]])
    for impl in ["reference"] + (["torch", "triton"] if triton_available() else ["torch"]):
        sig_form = lambda s, t, T, p: kl_distill_sigmoid(s, t, T, p, impl=impl)   # noqa: E731
        soft_form = lambda s, t, T, p: kl_distill(s, t, T, p, impl=impl)          # noqa: E731
        assert _shift_push(sig_form, flat, yes, prior, 1.0) == pytest.approx(-0.680490, abs=1e-6)
        assert _shift_push(sig_form, flat, no, prior, 1.0) == pytest.approx(0.680490, abs=1e-6)
        assert abs(_shift_push(soft_form, flat, yes, prior, 1.0)) < 1e-7
        assert abs(_shift_push(soft_form, flat, no, prior, 1.0)) < 1e-7
    # 2. uneven logits, T = 1 and 2, against the formula written with math (softmax form: the
    #    same formula with softmax over the allowed classes in place of the per-class sigmoid)
    sig = lambda x: 1 / (1 + math.exp(-x))                                     # noqa: E731
    psi = lambda o: math.log(0.64 * sig(o) / (1 - 0.64 * sig(o)))              # noqa: E731
    dpsi = lambda o: math.exp(-o) / (1 + math.exp(-o) - 0.64)                  # noqa: E731

    def by_hand(o_s, o_t, T):
        sigm = sum(T * (sig(psi(a) / T) - sig(psi(b) / T)) * dpsi(a) for a, b in zip(o_s, o_t))
        zs, zt = [math.exp(psi(a) / T) for a in o_s], [math.exp(psi(b) / T) for b in o_t]
        soft = sum(T * (a / sum(zs) - b / sum(zt)) * dpsi(o) for a, b, o in zip(zs, zt, o_s))
        return sigm, soft

    student = torch.tensor([[0.5, 0.0, -0.5, 5.0]])
    yes, no = torch.tensor([[4.0, 3.0, 5.0, -3.0]]), torch.tensor([[-4.0, -3.0, -5.0, 2.0]])
    pushes = {}
    for T in (1.0, 2.0):
        for name, teacher in (("yes", yes), ("no", no)):
            want_sig, want_soft = by_hand(student[0, :3].tolist(), teacher[0, :3].tolist(), T)
            got_sig = _shift_push(lambda s, t, T_, p: kl_distill_sigmoid(s, t, T_, p, impl="torch"),
                                  student, teacher, prior, T)
            got_soft = _shift_push(lambda s, t, T_, p: kl_distill(s, t, T_, p, impl="torch"),
                                   student, teacher, prior, T)
            assert got_sig == pytest.approx(want_sig, rel=1e-5)
            assert got_soft == pytest.approx(want_soft, rel=1e-4, abs=1e-7)
            pushes[T, name] = (got_sig, got_soft)
    # the numbers these formulas give (T = 1): sigmoid -0.6808 / +0.6506, softmax -0.0238 / -0.0116
    assert pushes[1.0, "yes"] == pytest.approx((-0.680843, -0.023773), abs=1e-5)
    assert pushes[1.0, "no"] == pytest.approx((0.650552, -0.011622), abs=1e-5)
    for T in (1.0, 2.0):
        assert pushes[T, "yes"][0] < -0.5 and pushes[T, "no"][0] > 0.5
        assert max(abs(pushes[T, n][1]) for n in ("yes", "no")) < 0.05


def test_gradcheck_fp64_torch_path():
    s, t, prior = make(5, 7, 2, True, seed=5)
    s, t, prior = s.double().requires_grad_(), t.double(), prior.double()
    for reduction in ("sum", "none"):
        assert torch.autograd.gradcheck(
            lambda x: kl_distill_sigmoid(x, t, 1.5, prior, impl="torch", reduction=reduction), (s,))
    assert torch.autograd.gradcheck(lambda x: kl_distill_sigmoid(x, t[0], 0.7, None, impl="torch"), (s,))


@pytest.mark.parametrize("impl", IMPLS)
def test_all_masked_identical_and_empty(impl):
    s, t, prior = make(4, 9, None, True, seed=4)
    loss, grad = run(impl, s, t, 2.0, torch.zeros_like(s))
    assert loss.item() == 0.0 and (grad == 0).all()
    loss, grad = run(impl, s, s.clone(), 2.0, prior, "none")                  # teacher == student
    assert loss.abs().max().item() < ZERO_ATOL["loss"] and grad.abs().max().item() < ZERO_ATOL["grad"]
    e = torch.zeros(0, 5, requires_grad=True)
    loss = kl_distill_sigmoid(e, torch.zeros(0, 5), impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and e.grad.shape == (0, 5)


def test_saves_only_its_inputs_and_teacher_gets_no_gradient():
    """The lean path keeps no [N, C] tensor of its own for backward: only references to the
    student, teacher and prior."""
    s, t, prior = make(6, 8, 2, True)
    s.requires_grad_()
    t.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = kl_distill_sigmoid(s, t, 1.0, prior, impl="torch")
    ptrs = {s.data_ptr(), t.data_ptr(), prior.data_ptr()}
    assert saved and all(x.data_ptr() in ptrs for x in saved)
    loss.backward()
    assert t.grad is None and s.grad is not None


def test_bad_input():
    z = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="teacher"):
        kl_distill_sigmoid(z, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="prior"):
        kl_distill_sigmoid(z, z, prior=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        kl_distill_sigmoid(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        kl_distill_sigmoid(z, z, reduction="mean")
    with pytest.raises(ValueError, match="impl"):
        kl_distill_sigmoid(z, z, impl="cuda")


@pytest.mark.skipif(not triton_available(), reason="no triton")
def test_triton_default_blocks():
    s, t, prior = make(6, 300, 2, True, seed=6)
    s2 = s.clone().requires_grad_()
    loss = kl_distill_sigmoid(s2, t, 1.0, prior, impl="triton")   # default (interpreter) tiles
    loss.backward()
    torch.testing.assert_close(loss.double(), kl_distill_sigmoid(s.double(), t.double(), 1.0, prior.double(),
                                                                 impl="reference"), **TOL[torch.float32]["loss"])
    s3 = s.double().requires_grad_()
    kl_distill_sigmoid(s3, t.double(), 1.0, prior.double(), impl="reference").backward()
    torch.testing.assert_close(s2.grad.double(), s3.grad, **TOL[torch.float32]["grad"])


@pytest.mark.skipif(not triton_available(), reason="no triton")
def test_triton_kernels_compile_for_h100():
    """The interpreter checks no GPU limit: compile the launch configuration the wrapper picks
    on a GPU (8 x 256 tiles) for sm_90, fp32 with and without a prior and bf16 with a prior."""
    code = """
import sys
import kernels
from kernels._common import aot_compile
K = sys.modules["kernels.kl_distill_sigmoid"]
for dt, hp in (("fp32", True), ("fp32", False), ("bf16", True)):
    c = {"HAS_PRIOR": hp, "BLOCK_N": 8, "BLOCK_C": 256}
    common = {"N": "i32", "C": "i32", "M": "i32", "stride_tm": "i32", "inv_T": "fp32",
              "HAS_PRIOR": "constexpr", "BLOCK_N": "constexpr", "BLOCK_C": "constexpr"}
    aot_compile(K._bkl_fwd_kernel, {"S": "*" + dt, "Tt": "*" + dt, "Pr": "*fp32", "LossRows": "*fp32",
                                    **common}, c)
    aot_compile(K._bkl_bwd_kernel, {"S": "*" + dt, "Tt": "*" + dt, "Pr": "*fp32", "G": "*fp32",
                                    "dS": "*" + dt, "N": "i32", "C": "i32", "M": "i32", "stride_tm": "i32",
                                    "inv_T": "fp32", "T": "fp32", "HAS_PRIOR": "constexpr",
                                    "BLOCK_N": "constexpr", "BLOCK_C": "constexpr"}, c)
print("ok")
"""
    assert aot_compile_in_subprocess(code).strip().endswith("ok")
