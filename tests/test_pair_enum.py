"""pair_enum / spatial_features: lean torch path and Triton kernels (CPU interpreter) against the
reference and hand-computed values."""
import math

import pytest
import torch
from conftest import IMPLS, aot_compile_in_subprocess

from kernels import pair_enum, spatial_features
from kernels._common import triton_available

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")   # interpreter: log(0) in numpy


# Tolerances (torch.testing.assert_close, rtol and atol alike) of the pair features, spatial
# features and gradients against the reference: fp32 against fp32; fp16 / bf16 against the fp32
# reference on the same rounded values (outputs rounded to the dtype; bf16 keeps 8 bits).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.float16: dict(rtol=2e-2, atol=2e-2),
       torch.bfloat16: dict(rtol=8e-2, atol=8e-2)}
# a hand-computed spatial feature read back (IoU 1, log(1e-10) = -23.02585 printed to 5 digits)
FEATURE_ABS = 1e-4


def make(N=7, D=5, Do=9, dtype=torch.float32, seed=0):
    """N pixel boxes (the first 3 humans) in images of 640 x 480 (see sizes), all (human, other
    box) pairs, random weights."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, D, generator=g).to(dtype)
    w1 = (torch.randn(Do, D, generator=g) / D ** 0.5).to(dtype)
    w2 = (torch.randn(Do, D, generator=g) / D ** 0.5).to(dtype)
    b = torch.randn(Do, generator=g).to(dtype)
    xy = torch.rand(N, 2, generator=g) * 0.6
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(N, 2, generator=g) * 0.35], 1)
    boxes[4, 2] = boxes[4, 0]                          # zero width
    boxes[5, 2:] = boxes[5, :2]                        # a point
    boxes[6] = boxes[0]                                # identical to human 0
    boxes = boxes * torch.tensor([640.0, 480.0, 640.0, 480.0])
    pairs = [(h, o) for h in range(3) for o in range(N) if o != h]
    idx_h = torch.tensor([p[0] for p in pairs])
    idx_o = torch.tensor([p[1] for p in pairs])
    return q, boxes, idx_h, idx_o, w1, w2, b


def sizes(boxes):
    """(w, h) of each box's image [N, 2]: 640 x 480, except that human 1 sits in a 500 x 700
    image, so a path that reads the size at the wrong box (not the pair's human) differs."""
    wh = torch.tensor([[640.0, 480.0]]).repeat(len(boxes), 1)
    wh[1] = torch.tensor([500.0, 700.0])
    return wh


def run(impl, q, boxes, idx_h, idx_o, w1, w2, b, blocks=None, seed=1):
    """Forward, then backward with a fixed non-unit upstream gradient -> outputs and grads."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, w1, w2, b)]
    kw = {"blocks": blocks} if blocks else {}
    pq, sp = pair_enum(leaves[0], boxes, idx_h, idx_o, *leaves[1:], impl=impl, image_wh=sizes(boxes), **kw)
    g = torch.randn(pq.shape, generator=torch.Generator().manual_seed(seed)).to(pq.dtype)
    (pq * g).sum().backward()
    return [pq.detach(), sp] + [t.grad for t in leaves]


NAMES = ["pair_q", "spatial", "dq", "dw1", "dw2", "db"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("blocks", [None, (4, 4)])
def test_matches_reference_fp32(impl, blocks):
    inputs = make()
    ref = run("reference", *inputs)
    out = run(impl, *inputs, blocks=blocks if impl == "triton" else None)
    for name, a, r in zip(NAMES, out, ref):
        assert a.dtype == r.dtype, name
        torch.testing.assert_close(a, r, **TOL[torch.float32], msg=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(impl, dtype):
    """fp16 / bf16: outputs and grads in the input dtype, close to the fp32 reference on the same
    rounded values (the Triton kernel adds in fp32; the backward accumulates in fp32)."""
    inputs = make(N=11, D=16, Do=24, dtype=dtype, seed=2)
    q, boxes, idx_h, idx_o, w1, w2, b = inputs
    ref = run("reference", q.float(), boxes, idx_h, idx_o, w1.float(), w2.float(), b.float())
    out = run(impl, *inputs)
    for name, a, r in zip(NAMES, out, ref):
        if name != "spatial":
            assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), r, **TOL[dtype], msg=name)


def test_gradcheck_fp64_torch_path():
    q, boxes, idx_h, idx_o, w1, w2, b = [t.double() if t.is_floating_point() else t for t in make(N=7, D=3, Do=4)]
    leaves = [t.requires_grad_() for t in (q, w1, w2, b)]
    fn = lambda *x: pair_enum(x[0], boxes, idx_h, idx_o, *x[1:], impl="torch", image_wh=sizes(boxes))[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


def test_spatial_features_hand_computed():
    """UPT's features, every term by hand: in a 640 x 480 image, the human box (100, 100, 200, 200)
    is a 100-px square (aspect ratio 1, not the 0.75 of its normalised box) and the object
    (150, 150, 350, 250) is 200 x 100 (aspect 2, not 1.5). Centres (150, 150), (250, 200); areas
    10,000 and 20,000 px of 307,200; intersection 50 x 50 = 2,500, union 27,500; dx = 100 / 100,
    dy = 50 / 100. Logs with UPT's eps 1e-10 (log(1e-10) = -23.03 for the zero terms)."""
    bh = torch.tensor([[100.0, 100.0, 200.0, 200.0]])
    bo = torch.tensor([[150.0, 150.0, 350.0, 250.0]])
    wh = torch.tensor([[640.0, 480.0]])
    f = [150 / 640, 150 / 480, 100 / 640, 100 / 480, 250 / 640, 200 / 480, 200 / 640, 100 / 480,
         10000 / 307200, 20000 / 307200, 2.0, 1.0, 2.0, 2500 / 27500,
         1.0, 0.0, 0.5, 0.0]
    expected = torch.tensor([f + [math.log(v + 1e-10) for v in f]])
    assert expected[0, 18 + 15].item() == pytest.approx(-23.02585, abs=FEATURE_ABS)
    torch.testing.assert_close(spatial_features(bh, bo, wh), expected, **TOL[torch.float32])
    # the same pair as the second of an image's 3 boxes; the other image's size is never read
    boxes = torch.cat([bo, bh, torch.tensor([[0.0, 0.0, 10.0, 10.0]])])
    q, w = torch.zeros(3, 3), torch.zeros(4, 3)
    image_wh = torch.tensor([[640.0, 480.0], [640.0, 480.0], [33.0, 17.0]])
    impls = ["reference", "torch"] + (["triton"] if triton_available() else [])
    for impl in impls:
        _, sp = pair_enum(q, boxes, torch.tensor([1]), torch.tensor([0]), w, w, torch.zeros(4), impl=impl,
                          image_wh=image_wh)
        torch.testing.assert_close(sp, expected, **TOL[torch.float32], msg=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_degenerate_and_identical_boxes(impl):
    q, boxes, idx_h, idx_o, w1, w2, b = make()
    _, sp = pair_enum(q, boxes, idx_h, idx_o, w1, w2, b, impl=impl, image_wh=sizes(boxes))
    assert sp.shape == (idx_h.shape[0], 36) and sp.dtype == torch.float32
    assert torch.isfinite(sp).all()
    same = ((idx_h == 0) & (idx_o == 6)).nonzero().item()          # box 6 == box 0
    assert sp[same, 13].item() == pytest.approx(1.0, abs=FEATURE_ABS)  # IoU 1
    assert (sp[same, 14:18] == 0).all()                            # no offset
    point = ((idx_h == 0) & (idx_o == 5)).nonzero().item()         # zero-area object
    assert sp[point, 6] == 0 and sp[point, 7] == 0 and sp[point, 9] == 0
    assert sp[point, 24] == pytest.approx(math.log(1e-10))         # log(w_o + eps), UPT's eps


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_pairs(impl):
    q, boxes, _, _, w1, w2, b = make()
    q.requires_grad_()
    empty = torch.zeros(0, dtype=torch.long)
    pq, sp = pair_enum(q, boxes, empty, empty, w1, w2, b, impl=impl, image_wh=sizes(boxes))
    assert pq.shape == (0, 9) and sp.shape == (0, 36)
    pq.sum().backward()
    assert (q.grad == 0).all()


def test_bad_input():
    q, boxes, idx_h, idx_o, w1, w2, b = make()
    wh = sizes(boxes)
    with pytest.raises(ValueError, match="idx_o"):
        pair_enum(q, boxes, idx_h, idx_o + 7, w1, w2, b, image_wh=wh)
    with pytest.raises(ValueError, match="boxes"):
        pair_enum(q, boxes[:3], idx_h, idx_o, w1, w2, b, image_wh=wh)
    with pytest.raises(ValueError, match="w1"):
        pair_enum(q, boxes, idx_h, idx_o, w1[:, :2], w2, b, image_wh=wh)
    with pytest.raises(ValueError, match="image_wh"):
        pair_enum(q, boxes, idx_h, idx_o, w1, w2, b, image_wh=wh[:, :1])
    with pytest.raises(ValueError, match="image_wh"):
        pair_enum(q, boxes, idx_h, idx_o, w1, w2, b, image_wh=wh * 0)
    with pytest.raises(TypeError, match="image_wh"):                 # no silent default frame
        pair_enum(q, boxes, idx_h, idx_o, w1, w2, b)
    if triton_available():
        with pytest.raises(ValueError, match="powers of two"):
            pair_enum(q, boxes, idx_h, idx_o, w1, w2, b, impl="triton", blocks=(3, 4), image_wh=wh)
        with pytest.raises(ValueError, match="dtype"):
            pair_enum(q.double(), boxes, idx_h, idx_o, w1.double(), w2.double(), b.double(), impl="triton",
                      image_wh=wh)


def test_auto_is_torch_on_cpu_and_no_pair_sized_saves():
    """impl="auto" on CPU = the torch path; its graph saves nothing of size [P, *]."""
    q, boxes, idx_h, idx_o, w1, w2, b = make(N=20, D=4, Do=4)
    idx_h = idx_h.repeat(50)
    idx_o = idx_o.repeat(50)                                       # P = 2850 >> N = 20
    q.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pq, _ = pair_enum(q, boxes, idx_h, idx_o, w1, w2, b, image_wh=sizes(boxes))
    ref, _ = pair_enum(q, boxes, idx_h, idx_o, w1, w2, b, impl="torch", image_wh=sizes(boxes))
    assert torch.equal(pq, ref)
    assert all(t.numel() <= idx_h.numel() for t in saved)          # q, w1, w2 and the indices only


@pytest.mark.skipif(not triton_available(), reason="no triton")
def test_triton_kernels_compile_for_h100():
    """The interpreter checks no GPU limit: compile the launch configuration the wrapper picks on
    a GPU (32 pairs x 128 columns) for sm_90, for fp32 and bf16."""
    code = """
import sys
import kernels
from kernels._common import aot_compile
PE = sys.modules["kernels.pair_enum"]
c = {"BLOCK_P": 32, "BLOCK_D": 128}
for dt in ("fp32", "bf16"):
    aot_compile(PE._pair_fwd_kernel, {"A": "*" + dt, "B": "*" + dt, "bias": "*" + dt, "idx_h": "*i64",
        "idx_o": "*i64", "boxes": "*fp32", "image_wh": "*fp32", "out": "*" + dt, "sp": "*fp32", "P": "i32", "Do": "i32",
        "eps": "fp32", "BLOCK_P": "constexpr", "BLOCK_D": "constexpr"}, c)
    aot_compile(PE._pair_bwd_kernel, {"G": "*" + dt, "idx_h": "*i64", "idx_o": "*i64", "dA": "*fp32",
        "dB": "*fp32", "P": "i32", "Do": "i32", "BLOCK_P": "constexpr", "BLOCK_D": "constexpr"}, c)
print("ok")
"""
    assert aot_compile_in_subprocess(code).strip().endswith("ok")
