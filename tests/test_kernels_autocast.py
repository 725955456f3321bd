"""Every op of kernels/ through one harness (bench.kernels.make_case at small shapes).

Under an ambient autocast (what a bf16 training step runs them in) each op gives the
gradients it gives without one: each op picks its own dtypes, so autocast must not reach inside.
And impl="auto" on CPU tensors is the lean torch path (the same gradients, to the bit); the
row-wise ops' Triton launches refuse tiles that are not powers of two and fp64 inputs.

Found on an H200: the lean box-attention path raised "Input dtypes must be the same" in a bf16
autocast training step (autocast recast one matmul of an in-place fp32 accumulation). CPU
autocast recasts the same ops, so the check runs here too.
"""
import pytest
import torch

import kernels
from bench.kernels import OPS, make_case
from kernels._common import triton_available

# Tolerance (torch.testing.assert_close) of the fp32 gradients of each op (torch and Triton
# paths) run under a bf16 autocast against the fp32 reference run without one: the same fp32
# computation, so only summation order differs
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-6)}

SMALL = {"box_attention": {"P": 13, "B": 2, "Hd": 2, "gh": 3, "gw": 5, "D": 8},
         "pair_enum": {"N": 9, "H": 3, "D": 16, "Do": 16},
         "kl_distill": {"N": 11, "C": 37}, "kl_distill_sigmoid": {"N": 11, "C": 37},
         "focal_loss": {"N": 11, "C": 37}}


def _grads(op, impl, autocast):
    _, step, leaves = make_case(op, "cpu", shape=SMALL[op])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        step(impl)
    return [leaf.grad.clone() for leaf in leaves]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_autocast_does_not_reach_inside(op, impl):
    want = _grads(op, "reference", autocast=False)
    got = _grads(op, impl, autocast=True)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, **TOL[torch.float32])


@pytest.mark.parametrize("op", OPS)
def test_auto_is_torch_on_cpu(op):
    auto, lean = _grads(op, "auto", autocast=False), _grads(op, "torch", autocast=False)
    assert len(auto) == len(lean) > 0
    assert all(torch.equal(a, t) for a, t in zip(auto, lean))


ROW_OPS = {  # the row-wise ops on logits x [N, C] (teacher = x, prior 1, no positive labels)
    "kl_distill": lambda x, **kw: kernels.kl_distill(x, x, 1.0, torch.ones_like(x), **kw),
    "kl_distill_sigmoid": lambda x, **kw: kernels.kl_distill_sigmoid(x, x, 1.0, torch.ones_like(x), **kw),
    "focal_loss": lambda x, **kw: kernels.focal_loss(x, torch.ones_like(x), torch.zeros_like(x), **kw),
}


@pytest.mark.skipif(not triton_available(), reason="no triton")
@pytest.mark.parametrize("op", list(ROW_OPS))
def test_triton_launch_checks(op):
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="powers of two"):
        ROW_OPS[op](x, impl="triton", blocks=(3, 16))
    with pytest.raises(ValueError, match="dtype"):
        ROW_OPS[op](x.double(), impl="triton")
