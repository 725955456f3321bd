"""Every op under an ambient autocast (what a bf16 training step runs them in) gives the
gradients it gives without one: each op picks its own dtypes, so autocast must not reach inside.

Found on an H200: the lean box-attention path raised "Input dtypes must be the same" in a bf16
autocast training step (autocast recast one matmul of an in-place fp32 accumulation). CPU
autocast recasts the same ops, so the check runs here too.
"""
import pytest
import torch

from kernels.bench import OPS, make_case

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
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
