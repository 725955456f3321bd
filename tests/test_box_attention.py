"""Tests of kernels/box_attention.py: the lean torch path and the Triton kernel (interpreter)
against the reference definition, forward and backward (q, k, v, strength)."""
import importlib
import math

import pytest
import torch
from conftest import aot_compile_in_subprocess

from bench.kernels import peak_mb
from kernels import box_attention, box_attention_reference, box_bias

ba = importlib.import_module("kernels.box_attention")  # the module (kernels.box_attention is the op)

# Tolerances err <= atol + rtol * |want| of out and the four gradients against the fp64 reference.
# fp32: rounding of the fp32 softmax and sums. fp16: inputs rounded to fp16, compared with the
# fp64 reference on those same values; error comes from rounding out / grads to fp16 (rel 5e-4)
# and fp16 dO. bf16 (7-bit mantissa): the Triton interpreter truncates fp32 -> bf16 where a GPU
# rounds to nearest, hence the larger bf16 error of the interpreted kernel. Both fused paths
# compute in fp32.
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5),
       torch.float16: dict(atol=4e-3, rtol=4e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
# fp16 q with fp32 k, v: dq is rounded to fp16
MIXED_TOL = dict(atol=2e-3, rtol=2e-3)
# fp32 logits of ~800 carry ~5e-5 rounding: the fp32 reference itself is 1e-5 off fp64
EXTREME_TOL = dict(atol=5e-5, rtol=1e-5)
# fp32 attention weights read back through the op (bias probe, attention mass): max abs error
PROBE_ATOL = 1e-6
# fp64 gradcheck: finite-difference step and tolerance
GRADCHECK_TOL = dict(eps=1e-6, atol=1e-7)


def _inputs(counts, Hd, grid, D, dtype=torch.float32, seed=0, qk_scale=1.0):
    """Random problem; counts[b] pairs on image b (images with 0 pairs allowed), shuffled order.

    returns q [P, Hd, D], k, v [B, Hd, T, D], pair_image [P], boxes [P, 3, 4], strength [Hd, 3]
    """
    g = torch.Generator().manual_seed(seed)
    P, B, T = sum(counts), len(counts), grid[0] * grid[1]
    pair_image = torch.repeat_interleave(torch.arange(B), torch.tensor(counts))
    pair_image = pair_image[torch.randperm(P, generator=g)]           # pairs not sorted by image
    q = torch.randn(P, Hd, D, generator=g) * qk_scale
    k = torch.randn(B, Hd, T, D, generator=g) * qk_scale
    v = torch.randn(B, Hd, T, D, generator=g)
    xy = torch.rand(P, 3, 2, generator=g) * 1.2 - 0.1                 # some boxes leave the image
    wh = torch.rand(P, 3, 2, generator=g) * 0.6
    wh[::4] = 0.0                                                      # zero-area boxes
    boxes = torch.cat([xy, xy + wh], -1)                               # [P, 3, 4]
    strength = torch.randn(Hd, 3, generator=g) * 2
    return [t.to(dtype) for t in (q, k, v)] + [pair_image, boxes, strength.to(dtype)]


def _run(fn, q, k, v, pair_image, boxes, strength, grid, seed=1, **kw):
    """out and grads (q, k, v, strength) for a fixed non-unit random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, strength)]
    out = fn(leaves[0], leaves[1], leaves[2], pair_image, boxes, leaves[3], grid, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)) * 3
    out.backward(g.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _ref64(q, k, v, pair_image, boxes, strength, grid, **kw):
    return _run(box_attention_reference, q.double(), k.double(), v.double(), pair_image, boxes,
                strength.double(), grid, **kw)


def _assert_close(got, want, atol, rtol=0.0):
    names = ["out", "dq", "dk", "dv", "dstrength"]
    for name, a, b in zip(names, got, want):
        assert a is not None, name
        err = (a.double() - b.double()).abs()
        tol = atol + rtol * b.double().abs()
        assert bool((err <= tol).all()), f"{name}: max err {err.max().item():.3e}"


def _triton(block_p=16, block_t=16):
    def fn(q, k, v, pi, boxes, st, grid, scale=None):
        blocks = None if block_p is None else (block_p, block_t)
        return box_attention(q, k, v, pi, boxes, st, grid, scale, impl="triton", blocks=blocks)
    return fn


def _torch(chunk=None):
    def fn(q, k, v, pi, boxes, st, grid, scale=None):
        return box_attention(q, k, v, pi, boxes, st, grid, scale, impl="torch", chunk=chunk)
    return fn


# odd sizes: P = 34 (not a multiple of 16), T = 35 (5 x 7, not a multiple of 16), D = 8
# (padded to 16), unequal pair counts and an image without pairs.
COUNTS, HD, GRID, D = [20, 0, 5, 9], 2, (5, 7), 8


# ---------------------------------------------------------------------------- bias values

def test_box_bias_hand_computed():
    # 2 x 3 grid: centres cx in (1/6, 1/2, 5/6), cy in (1/4, 3/4); t = 3 * row + col.
    boxes = torch.tensor([
        [[0.0, 0.0, 0.6, 0.5],      # human: grown x [0, .6], y [0, .5] -> t 0, 1
         [0.8, 0.7, 0.8, 0.7],      # object, zero area: grown to [.633, .967] x [.45, .95] -> t 5
         [0.0, 0.0, 0.8, 0.7]],     # union: x [0, .8], y [0, .7] -> t 0, 1
        [[1.5, 1.5, 2.0, 2.0],      # outside the image: no token
         [0.5, 0.25, 0.5, 0.25],    # zero area on the centre of t 1: grown [1/3, 2/3] x [0, .5]
         [0.0, 0.0, 1.0, 1.0]],     # whole image
    ])
    strength = torch.tensor([[1.0, 2.0, 4.0], [-1.0, 0.5, 0.0]])
    got = box_bias(boxes, strength, (2, 3))                            # [2, 2, 6]
    want = torch.tensor([
        [[5, 5, 0, 0, 0, 2], [-1, -1, 0, 0, 0, 0.5]],
        [[4, 6, 4, 4, 4, 4], [0, 0.5, 0, 0, 0, 0]],
    ])
    assert torch.equal(got, want)


def _bias_probe(impl_fn, boxes, strength, grid):
    """softmax(bias) read back through the op: q = 0 and v = identity over tokens (D = T)."""
    P, Hd, T = boxes.shape[0], strength.shape[0], grid[0] * grid[1]
    q = torch.zeros(P, Hd, T)
    k = torch.zeros(1, Hd, T, T)
    v = torch.eye(T).expand(1, Hd, T, T).contiguous()
    return impl_fn(q, k, v, torch.zeros(P, dtype=torch.long), boxes, strength, grid)


def test_kernel_bias_matches_box_bias_exactly():
    # box edges exactly on token centres (computed like token_centres) and degenerate boxes:
    # the in-kernel inside test must agree with the reference comparison bit for bit.
    grid = (3, 5)
    cx, cy = ba.token_centres(grid)
    g = torch.Generator().manual_seed(3)
    P = 12
    ix = torch.randint(0, 15, (P, 3, 2), generator=g)
    x = cx[ix].sort(-1).values                                        # [P, 3, 2] on centres
    y = cy[ix].sort(-1).values
    boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)
    boxes[0, 0] = torch.tensor([0.3, 0.5, 0.3, 0.5])                   # zero area
    boxes[1, 1] = torch.tensor([-0.5, -0.5, -0.1, -0.2])               # outside the image
    boxes[2, 2] = boxes[2, 0]                                           # identical boxes
    strength = torch.tensor([[3.0, -2.0, 1.5], [0.7, 5.0, -4.0]])
    want = box_bias(boxes, strength, grid).softmax(-1)                 # [P, Hd, T]
    for fn in (_torch(), _triton(16, 16)):
        got = _bias_probe(fn, boxes, strength, grid)
        assert (got - want).abs().max().item() < PROBE_ATOL


# ---------------------------------------------------------------------------- fp32 vs reference

@pytest.mark.parametrize("fn", [_torch(), _torch(chunk=3)], ids=["torch", "torch_chunk3"])
def test_torch_path_fp32(fn):
    inp = _inputs(COUNTS, HD, GRID, D)
    _assert_close(_run(fn, *inp, GRID), _ref64(*inp, GRID), **TOL[torch.float32])


def test_triton_fp32_odd_sizes_noncontiguous():
    q, k, v, pi, boxes, st = _inputs(COUNTS, HD, GRID, D)
    want = _ref64(q, k, v, pi, boxes, st, GRID, scale=0.3)
    k_nc = k.transpose(1, 2).contiguous().transpose(1, 2)              # non-contiguous view
    got = _run(lambda *a, **kw: _triton(16, 16)(*a, **kw), q, k_nc, v, pi, boxes, st, GRID, scale=0.3)
    _assert_close(got, want, **TOL[torch.float32])


def test_triton_default_config_and_auto():
    inp = _inputs([3, 7], 2, (4, 4), 16, seed=5)
    want = _ref64(*inp, (4, 4))
    _assert_close(_run(_triton(None), *inp, (4, 4)), want, **TOL[torch.float32])
    # "auto" on CPU tensors is the lean torch path
    assert ba.resolve_impl("auto", inp[0]) == "torch"
    _assert_close(_run(lambda *a: box_attention(*a, impl="auto"), *inp, (4, 4)), want, **TOL[torch.float32])


@pytest.mark.parametrize("D", [40, 144])
def test_triton_head_dim_padding_and_mixed_dtypes(D):
    # D = 40 runs in 64-wide tiles, D = 144 in 256-wide tiles (the default config for that D);
    # q in fp16 with fp32 k, v: the wrapper casts all three to fp32
    q, k, v, pi, boxes, st = _inputs([5, 0, 3], 2, (3, 3), D, seed=8)
    q = q.half()
    want = _ref64(q, k, v, pi, boxes, st, (3, 3))
    got = _run(_triton(None), q, k, v, pi, boxes, st, (3, 3))
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float16
    _assert_close(got, want, **MIXED_TOL)


# ---------------------------------------------------------------------------- half precision

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_half_precision(dtype, path):
    inp = _inputs(COUNTS, HD, GRID, D, dtype=dtype, seed=2)
    fn = _torch(chunk=4) if path == "torch" else _triton(16, 16)
    got = _run(fn, *inp, GRID)
    for t, x in zip(got, inp[:3] + inp[5:]):
        assert t.dtype == dtype
    _assert_close(got, _ref64(*inp, GRID), **TOL[dtype])


# ---------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("fn,fast", [(_torch(chunk=2), False), (box_attention_reference, True)],
                         ids=["torch", "reference"])
def test_gradcheck_fp64(fn, fast):
    # the reference is slow under gradcheck (a Python loop over images): fast_mode checks it
    # along random directions instead of element by element
    q, k, v, pi, boxes, st = _inputs([3, 0, 2], 2, (2, 3), 3, dtype=torch.float64, seed=4)
    leaves = [t.requires_grad_(True) for t in (q, k, v, st)]
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_, s_: fn(q_, k_, v_, pi, boxes, s_, (2, 3)), leaves, **GRADCHECK_TOL,
        fast_mode=fast)


# ---------------------------------------------------------------------------- extreme / degenerate

@pytest.mark.parametrize("path", ["torch", "triton"])
def test_extreme_logits(path):
    # |logits| up to ~1e3: softmax saturates to near one-hot; must stay finite and exact
    inp = _inputs([9, 4], 2, (3, 5), 8, seed=6, qk_scale=12.0)
    fn = _torch(chunk=5) if path == "torch" else _triton(16, 16)
    got = _run(fn, *inp, (3, 5))
    assert all(bool(torch.isfinite(t).all()) for t in got)
    _assert_close(got, _ref64(*inp, (3, 5)), **EXTREME_TOL)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_degenerate_boxes(path):
    q, k, v, pi, boxes, st = _inputs([6, 3], 2, (3, 5), 8, seed=7)
    boxes[0] = torch.tensor([0.4, 0.4, 0.4, 0.4])                      # all three zero area
    boxes[1] = torch.tensor([2.0, 2.0, 3.0, 3.0])                      # all outside the image
    boxes[2] = torch.tensor([[0.1, 0.2, 0.7, 0.9]] * 3)                # identical boxes
    boxes[3] = torch.tensor([0.7, 0.9, 0.1, 0.2])                      # inverted (x2 < x1)
    boxes[4] = torch.tensor([-1.0, -1.0, 2.0, 2.0])                    # covers everything
    fn = _torch(chunk=4) if path == "torch" else _triton(16, 16)
    _assert_close(_run(fn, q, k, v, pi, boxes, st, (3, 5)), _ref64(q, k, v, pi, boxes, st, (3, 5)),
                  **TOL[torch.float32])
    # the outside pair gets no bias, so its strength gradient contribution is zero
    one = [t[1:2] for t in (q, pi, boxes)]
    g = _run(fn, one[0], k, v, one[1], one[2], st, (3, 5))
    assert g[4].abs().max().item() == 0.0


@pytest.mark.parametrize("path", ["torch", "triton", "reference"])
def test_mass_inside_box_grows_with_strength(path):
    # uniform logits (q = 0); v[..., 0] = 1 on tokens inside the human box, so out[..., 0] is
    # the attention mass inside it: n_in e^s / (n_in e^s + n_out).
    grid = (4, 4)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 2.0], [2.0, 2.0, 2.0, 2.0]]])
    inside = ba.box_inside(boxes, grid)[0, 0]                          # [16], 4 tokens
    assert inside.sum().item() == 4
    v = torch.zeros(1, 1, 16, 16)
    v[0, 0, :, 0] = inside
    k = torch.zeros(1, 1, 16, 16)
    q = torch.zeros(1, 1, 16)
    fn = {"torch": _torch(), "triton": _triton(16, 16), "reference": box_attention_reference}[path]
    masses = []
    for s in (0.0, 1.0, 2.0, 4.0):
        st = torch.tensor([[s, 0.0, 0.0]])
        out = fn(q, k, v, torch.zeros(1, dtype=torch.long), boxes, st, grid)
        masses.append(out[0, 0, 0].item())
        assert abs(masses[-1] - 4 * math.exp(s) / (4 * math.exp(s) + 12)) < PROBE_ATOL
    assert masses[0] == pytest.approx(0.25, abs=PROBE_ATOL)
    assert all(a < b for a, b in zip(masses, masses[1:]))


# ---------------------------------------------------------------------------- API / memory

def test_bad_inputs_raise():
    q, k, v, pi, boxes, st = _inputs([2, 1], 2, (2, 2), 4)
    with pytest.raises(ValueError, match="pair_image"):
        box_attention(q, k, v, pi + 5, boxes, st, (2, 2), impl="torch")
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        box_attention(q.double(), k.double(), v.double(), pi, boxes, st, (2, 2), impl="triton")
    with pytest.raises(ValueError, match="impl"):
        box_attention(q, k, v, pi, boxes, st, (2, 2), impl="cuda")


def test_lean_path_memory(monkeypatch):
    # allocator-level peak (torch.profiler memory events) of forward + backward, including the
    # outputs and gradients; at this shape a chunk holds 8 of the 192 pairs.
    monkeypatch.setattr(ba, "_CHUNK_ELEMS", 1 << 13)
    shape = dict(P=192, Hd=4, gh=16, gw=16, D=8, B=2)
    ref = peak_mb("box_attention", "reference", "profiler", shape=shape)[0]
    lean = peak_mb("box_attention", "torch", "profiler", shape=shape)[0]
    assert ref > 2.0                                          # [P, Hd, T] fp32 = 0.75 MiB each
    assert lean < ref / 6, (lean, ref)


AOT_CODE = """
import sys
import kernels
from kernels._common import aot_compile
BA = sys.modules["kernels.box_attention"]
for dt, half, bd in (("fp32", False, 32), ("bf16", True, 128), ("fp16", True, 256)):
    bp, bt, _, _ = BA._triton_config(bd, 1369)
    c = {"BLOCK_P": bp, "BLOCK_T": bt, "BLOCK_D": bd, "HALF_DOT": half}
    common = {"scale": "fp32", "Hd": "i32", "T": "i32", "D": "i32", "Gw": "i32", "Gw_f": "fp32",
              "Gh_f": "fp32", "BLOCK_P": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr",
              "HALF_DOT": "constexpr"}
    base = {"Q": "*" + dt, "K": "*" + dt, "V": "*" + dt, "BOX": "*fp32", "STR": "*fp32"}
    stats = {"MAX": "*fp32", "SUM": "*fp32"}
    blocks = {"BLK_START": "*i32", "BLK_END": "*i32"}
    ks = [aot_compile(BA._fwd_kernel, {**base, "OUT": "*" + dt, **stats, "PERM": "*i32",
                                      "BLK_IMG": "*i32", **blocks, **common}, c),
          aot_compile(BA._bwd_dq_kernel, {**base, "DO": "*" + dt, **stats, "DELTA": "*fp32",
                                          "DQ": "*" + dt, "DSTR": "*fp32", "PERM": "*i32",
                                          "BLK_IMG": "*i32", **blocks, **common}, c),
          aot_compile(BA._bwd_dkdv_kernel, {**base, "DO": "*" + dt, **stats, "DELTA": "*fp32",
                                            "DK": "*" + dt, "DV": "*" + dt, "PERM": "*i32", **blocks,
                                            "IMG_BLK_LO": "*i32", "IMG_BLK_HI": "*i32", **common}, c)]
    print(dt, max(k.metadata.shared for k in ks))
print("ok")
"""


@pytest.mark.skipif(ba.triton is None, reason="no triton")
def test_triton_kernels_compile_for_h100():
    """The interpreter checks no GPU limit: compile the three kernels down to sm_90 cubin (no GPU
    needed) in a process without TRITON_INTERPRET, for the fp32 path (fp32 operands, IEEE dots)
    at D = 32 and the bf16 / fp16 tensor-core path (HALF_DOT) at D = 128 and D = 256, each with
    the tiles the wrapper picks; shared memory must fit an H100 block (227 KiB)."""
    stdout = aot_compile_in_subprocess(AOT_CODE)
    lines = stdout.split()
    assert lines[-1] == "ok"
    for dt in ("fp32", "bf16", "fp16"):
        assert 0 < int(lines[lines.index(dt) + 1]) <= 227 * 1024
