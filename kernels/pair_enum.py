"""Pair enumeration: pair queries W1 Q_i + W2 Q_j + b and pairwise spatial features.

LINK pairs every human i with every other box j (objects and other humans). The pair query is
Linear([Q_i, Q_j]) written as W1 Q_i + W2 Q_j + b, so no [P, 2D] concatenation is built, and
the UPT-style spatial relation vector of the two boxes is computed alongside.

Three implementations (``impl=``):
- "reference": gathers q[idx_h], q[idx_o] ([P, D] each) and multiplies them by the weights,
  2 x P x D x Do multiply-adds; the definition of the op.
- "torch": projects every box once, A = q @ w1.T and B = q @ w2.T ([N, Do], N boxes << P
  pairs), then pair_q[p] = A[idx_h[p]] + B[idx_o[p]] + b, gathered in row chunks. Backward:
  dA = index_add of dOut over idx_h, dB over idx_o ([N, Do]; a sparse one-hot matmul in
  torch, faster than index_add_ on a CPU), then dq = dA @ w1 + dB @ w2,
  dw1 = dA^T q, dw2 = dB^T q, db = sum_p dOut = sum_n dA. Nothing of size [P, D] is built and
  nothing of size [P, *] is saved for backward (only q, the weights and the two index vectors).
  Spatial features are computed in row chunks.
- "triton": the same algebra; the projections and the small [N, *] GEMMs of the backward stay
  with torch (cuBLAS). A Triton kernel does the gather-add for a block of pairs x a block of
  Do, and the programs of the first Do block also compute the 36 spatial features of their
  pairs from the 8 box numbers and the image's width and height. The backward kernel scatters
  dOut into dA and dB with fp32 atomic adds (on a GPU the summation order, hence the last
  bits, may vary run to run).
Boxes and image sizes are constants (no gradient); spatial features are float32 whatever the
input dtype.
"""
import torch

from kernels._common import (
    acc_dtype,
    autocast_off,
    check_blocks,
    check_index,
    check_launch,
    chunk_rows,
    resolve_impl,
    tl,
    triton,
)

NUM_SPATIAL = 36  # 18 terms and their logs
UPT_EPS = 1e-10   # UPT's eps: added to every denominator and inside every log


def spatial_features(boxes_h: torch.Tensor, boxes_o: torch.Tensor, image_wh: torch.Tensor,
                     eps: float = UPT_EPS) -> torch.Tensor:
    """UPT's pairwise spatial features: pixel boxes [P, 4] and their image's (w, h) [P, 2] -> [P, 36].

    The 18 terms, as UPT computes them from a detector's boxes and the image shape: centres and
    sizes of both boxes divided by the image's w and h (8), both areas divided by w h (2), area
    ratio o/h (1), both aspect ratios w/h of the PIXEL boxes (2: a square box is 1 in any image),
    IoU (1), and the horizontal and vertical centre offsets divided by the human box's width /
    height, split into their positive and negative parts (4) so that every term is
    non-negative and has a log. Then f and log(f + eps) are concatenated. Only the order of
    the first 8 differs from UPT's (here per box: centre, size).
    """
    bh, bo = boxes_h.float(), boxes_o.float()
    W, H = image_wh[:, 0].float(), image_wh[:, 1].float()
    wh, hh = (bh[:, 2] - bh[:, 0]).clamp(min=0), (bh[:, 3] - bh[:, 1]).clamp(min=0)
    wo, ho = (bo[:, 2] - bo[:, 0]).clamp(min=0), (bo[:, 3] - bo[:, 1]).clamp(min=0)
    cxh, cyh = (bh[:, 0] + bh[:, 2]) / 2, (bh[:, 1] + bh[:, 3]) / 2
    cxo, cyo = (bo[:, 0] + bo[:, 2]) / 2, (bo[:, 1] + bo[:, 3]) / 2
    ah, ao = wh * hh, wo * ho
    iw = (torch.minimum(bh[:, 2], bo[:, 2]) - torch.maximum(bh[:, 0], bo[:, 0])).clamp(min=0)
    ih = (torch.minimum(bh[:, 3], bo[:, 3]) - torch.maximum(bh[:, 1], bo[:, 1])).clamp(min=0)
    inter = iw * ih
    iou = inter / (ah + ao - inter + eps)
    dx = (cxo - cxh) / (wh + eps)
    dy = (cyo - cyh) / (hh + eps)
    f = torch.stack([
        cxh / W, cyh / H, wh / W, hh / H, cxo / W, cyo / H, wo / W, ho / H,
        ah / (W * H), ao / (W * H), ao / (ah + eps), wh / (hh + eps), wo / (ho + eps), iou,
        dx.clamp(min=0), (-dx).clamp(min=0), dy.clamp(min=0), (-dy).clamp(min=0),
    ], dim=1)                                                     # [P, 18]
    return torch.cat([f, torch.log(f + eps)], dim=1)              # [P, 36]


def pair_enum_reference(q, boxes, idx_h, idx_o, w1, w2, b, image_wh):
    """Plain definition. q: [N, D], boxes: [N, 4] in pixels, idx_h/idx_o: Long[P],
    w1, w2: [Do, D], b: [Do], image_wh: [N, 2] (w, h) of each box's image
    -> (pair_q [P, Do], spatial [P, 36])."""
    pair_q = q[idx_h] @ w1.t() + q[idx_o] @ w2.t() + b
    return pair_q, spatial_features(boxes[idx_h], boxes[idx_o], image_wh[idx_h])


# ----------------------------------------------------------------------------- lean torch path

def _spatial_torch(boxes, image_wh, idx_h, idx_o, eps=UPT_EPS):
    """spatial_features(boxes[idx_h], boxes[idx_o], image_wh[idx_h]) in row chunks -> [P, 36] fp32."""
    P = idx_h.shape[0]
    out = torch.empty(P, NUM_SPATIAL, device=boxes.device, dtype=torch.float32)   # [P, 36]
    step = chunk_rows(64)
    for s in range(0, P, step):
        e = min(P, s + step)
        out[s:e] = spatial_features(boxes[idx_h[s:e]], boxes[idx_o[s:e]], image_wh[idx_h[s:e]], eps)
    return out


def _gather_add_torch(A, B, b, idx_h, idx_o):
    """out[p] = A[idx_h[p]] + B[idx_o[p]] + b, rows in chunks. A, B: [N, Do] -> [P, Do]."""
    P, Do = idx_h.shape[0], A.shape[1]
    out = A.new_empty(P, Do)                                      # [P, Do]
    step = chunk_rows(Do)
    for s in range(0, P, step):
        e = min(P, s + step)
        o = out[s:e]
        torch.index_select(A, 0, idx_h[s:e], out=o)
        o.add_(B.index_select(0, idx_o[s:e])).add_(b)
    return out


def _scatter_torch(g, idx_h, idx_o, N):
    """dA = sum of g rows into idx_h, dB into idx_o, in fp32 (fp64 for fp64 g).
    g: [P, Do] -> ([N, Do], [N, Do]).

    Each chunk is a sparse [N, n] one-hot matrix times the dense chunk of g (a segment sum).
    On a CPU this is ~10x faster than index_add_, which serialises on the repeated rows (every
    human index repeats N - 1 times)."""
    P, Do, acc = g.shape[0], g.shape[1], acc_dtype(g.dtype)
    dA = torch.zeros(N, Do, device=g.device, dtype=acc)
    dB = torch.zeros(N, Do, device=g.device, dtype=acc)
    step = chunk_rows(Do)
    for s in range(0, P, step):
        e = min(P, s + step)
        gc = g[s:e].to(acc)                                       # [n, Do]
        cols = torch.arange(e - s, device=g.device)
        ones = torch.ones(e - s, device=g.device, dtype=acc)
        for out, idx in ((dA, idx_h), (dB, idx_o)):
            onehot = torch.sparse_coo_tensor(torch.stack([idx[s:e].long(), cols]), ones, (N, e - s),
                                             check_invariants=False)
            out.add_(torch.sparse.mm(onehot, gc))
    return dA, dB


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:
    @triton.jit
    def _put(sp_row, k: tl.constexpr, f, eps, mask):
        """Store feature k and its log (column 18 + k) of a block of pairs."""
        tl.store(sp_row + k, f, mask=mask)
        tl.store(sp_row + 18 + k, tl.log(f + eps), mask=mask)

    @triton.jit
    def _spatial_block(boxes, image_wh, ih, io, offs_p, mp, sp, eps):
        """36 spatial features of the pairs offs_p (human box ih, other box io, pixels; the
        image's (w, h) read at the human box's row) -> sp [P, 36]; spatial_features' formulas."""
        W = tl.load(image_wh + ih * 2 + 0, mask=mp, other=1.0).to(tl.float32)
        H = tl.load(image_wh + ih * 2 + 1, mask=mp, other=1.0).to(tl.float32)
        x1h = tl.load(boxes + ih * 4 + 0, mask=mp, other=0.0).to(tl.float32)
        y1h = tl.load(boxes + ih * 4 + 1, mask=mp, other=0.0).to(tl.float32)
        x2h = tl.load(boxes + ih * 4 + 2, mask=mp, other=0.0).to(tl.float32)
        y2h = tl.load(boxes + ih * 4 + 3, mask=mp, other=0.0).to(tl.float32)
        x1o = tl.load(boxes + io * 4 + 0, mask=mp, other=0.0).to(tl.float32)
        y1o = tl.load(boxes + io * 4 + 1, mask=mp, other=0.0).to(tl.float32)
        x2o = tl.load(boxes + io * 4 + 2, mask=mp, other=0.0).to(tl.float32)
        y2o = tl.load(boxes + io * 4 + 3, mask=mp, other=0.0).to(tl.float32)
        wh = tl.maximum(x2h - x1h, 0.0)
        hh = tl.maximum(y2h - y1h, 0.0)
        wo = tl.maximum(x2o - x1o, 0.0)
        ho = tl.maximum(y2o - y1o, 0.0)
        cxh = (x1h + x2h) / 2
        cyh = (y1h + y2h) / 2
        cxo = (x1o + x2o) / 2
        cyo = (y1o + y2o) / 2
        ah = wh * hh
        ao = wo * ho
        iw = tl.maximum(tl.minimum(x2h, x2o) - tl.maximum(x1h, x1o), 0.0)
        ihh = tl.maximum(tl.minimum(y2h, y2o) - tl.maximum(y1h, y1o), 0.0)
        inter = iw * ihh
        iou = inter / (ah + ao - inter + eps)
        dx = (cxo - cxh) / (wh + eps)
        dy = (cyo - cyh) / (hh + eps)
        row = sp + offs_p.to(tl.int64) * 36
        _put(row, 0, cxh / W, eps, mp)
        _put(row, 1, cyh / H, eps, mp)
        _put(row, 2, wh / W, eps, mp)
        _put(row, 3, hh / H, eps, mp)
        _put(row, 4, cxo / W, eps, mp)
        _put(row, 5, cyo / H, eps, mp)
        _put(row, 6, wo / W, eps, mp)
        _put(row, 7, ho / H, eps, mp)
        _put(row, 8, ah / (W * H), eps, mp)
        _put(row, 9, ao / (W * H), eps, mp)
        _put(row, 10, ao / (ah + eps), eps, mp)
        _put(row, 11, wh / (hh + eps), eps, mp)
        _put(row, 12, wo / (ho + eps), eps, mp)
        _put(row, 13, iou, eps, mp)
        _put(row, 14, tl.maximum(dx, 0.0), eps, mp)
        _put(row, 15, tl.maximum(-dx, 0.0), eps, mp)
        _put(row, 16, tl.maximum(dy, 0.0), eps, mp)
        _put(row, 17, tl.maximum(-dy, 0.0), eps, mp)

    @triton.jit
    def _pair_fwd_kernel(A, B, bias, idx_h, idx_o, boxes, image_wh, out, sp, P, Do, eps,
                         BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[p, d] = A[idx_h[p], d] + B[idx_o[p], d] + bias[d] for a BLOCK_P x BLOCK_D tile;
        programs of the first Do block also write the spatial features of their pairs."""
        pid_p = tl.program_id(0)
        pid_d = tl.program_id(1)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mp = offs_p < P
        ih = tl.load(idx_h + offs_p, mask=mp, other=0).to(tl.int64)
        io = tl.load(idx_o + offs_p, mask=mp, other=0).to(tl.int64)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        md = offs_d < Do
        m2 = mp[:, None] & md[None, :]
        a = tl.load(A + ih[:, None] * Do + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        bb = tl.load(B + io[:, None] * Do + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        c = tl.load(bias + offs_d, mask=md, other=0.0).to(tl.float32)
        acc = a + bb + c[None, :]
        tl.store(out + offs_p.to(tl.int64)[:, None] * Do + offs_d[None, :],
                 acc.to(out.dtype.element_ty), mask=m2)
        if pid_d == 0:
            _spatial_block(boxes, image_wh, ih, io, offs_p, mp, sp, eps)

    @triton.jit
    def _pair_bwd_kernel(G, idx_h, idx_o, dA, dB, P, Do,
                         BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        """dA[idx_h[p]] += G[p], dB[idx_o[p]] += G[p] (fp32 atomics) for a tile of pairs x Do."""
        pid_p = tl.program_id(0)
        pid_d = tl.program_id(1)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mp = offs_p < P
        ih = tl.load(idx_h + offs_p, mask=mp, other=0).to(tl.int64)
        io = tl.load(idx_o + offs_p, mask=mp, other=0).to(tl.int64)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m2 = mp[:, None] & (offs_d < Do)[None, :]
        g = tl.load(G + offs_p.to(tl.int64)[:, None] * Do + offs_d[None, :], mask=m2, other=0.0)
        g = g.to(tl.float32)
        tl.atomic_add(dA + ih[:, None] * Do + offs_d[None, :], g, mask=m2)
        tl.atomic_add(dB + io[:, None] * Do + offs_d[None, :], g, mask=m2)


def _blocks(P, Do, blocks):
    """(BLOCK_P, BLOCK_D): given, or 32 x min(128, Do) on a GPU; big tiles in the interpreter
    (each program costs milliseconds there)."""
    if blocks is not None:
        bp, bd = blocks
    elif torch.cuda.is_available():
        bp, bd = 32, min(128, triton.next_power_of_2(max(Do, 1)))
    else:
        bd = min(256, triton.next_power_of_2(max(Do, 1)))
        bp = min(max(16384 // bd, 1), triton.next_power_of_2(max(P, 1)))
    check_blocks("pair_enum", bp, bd)
    return bp, bd


def _gather_add_triton(A, B, b, idx_h, idx_o, boxes, image_wh, eps, blocks):
    """Launch the forward kernel -> (out [P, Do] in A's dtype, spatial [P, 36] float32)."""
    P, Do = idx_h.shape[0], A.shape[1]
    check_launch("pair_enum", A, B, b, boxes, image_wh)
    check_launch("pair_enum", idx_h, idx_o, dtypes=(torch.int64, torch.int32))
    out = A.new_empty(P, Do)
    sp = torch.empty(P, NUM_SPATIAL, device=A.device, dtype=torch.float32)
    if P == 0:
        return out, sp
    bp, bd = _blocks(P, Do, blocks)
    grid = (triton.cdiv(P, bp), triton.cdiv(Do, bd))
    _pair_fwd_kernel[grid](A, B, b, idx_h, idx_o, boxes, image_wh, out, sp, P, Do, float(eps),
                           BLOCK_P=bp, BLOCK_D=bd)
    return out, sp


def _scatter_triton(g, idx_h, idx_o, N, blocks):
    """Launch the backward kernel -> (dA, dB) [N, Do] float32."""
    P, Do = g.shape
    check_launch("pair_enum", g)
    dA = torch.zeros(N, Do, device=g.device, dtype=torch.float32)
    dB = torch.zeros(N, Do, device=g.device, dtype=torch.float32)
    if P == 0:
        return dA, dB
    bp, bd = _blocks(P, Do, blocks)
    grid = (triton.cdiv(P, bp), triton.cdiv(Do, bd))
    _pair_bwd_kernel[grid](g, idx_h, idx_o, dA, dB, P, Do, BLOCK_P=bp, BLOCK_D=bd)
    return dA, dB


# ----------------------------------------------------------------------------- autograd

class PairEnumFunction(torch.autograd.Function):
    """(q, w1, w2, b, boxes, image_wh, idx_h, idx_o) -> (pair_q [P, Do], spatial [P, 36]); spatial,
    boxes and image_wh carry no gradient. Saves q, w1, w2 and the indices only."""

    @staticmethod
    @autocast_off
    def forward(ctx, q, w1, w2, b, boxes, image_wh, idx_h, idx_o, use_triton, blocks):
        A = q @ w1.t()                                            # [N, Do]
        B = q @ w2.t()                                            # [N, Do]
        if use_triton:
            out, sp = _gather_add_triton(A.contiguous(), B.contiguous(), b.contiguous(),
                                         idx_h, idx_o, boxes, image_wh, UPT_EPS, blocks)
        else:
            out = _gather_add_torch(A, B, b, idx_h, idx_o)
            sp = _spatial_torch(boxes, image_wh, idx_h, idx_o)
        del A, B
        ctx.save_for_backward(q, w1, w2, idx_h, idx_o)
        ctx.use_triton, ctx.blocks = use_triton, blocks
        ctx.mark_non_differentiable(sp)
        return out, sp

    @staticmethod
    @autocast_off
    def backward(ctx, g, _g_sp):
        q, w1, w2, idx_h, idx_o = ctx.saved_tensors
        dq = dw1 = dw2 = db = None
        if g is None or not any(ctx.needs_input_grad[:4]):
            return dq, dw1, dw2, db, None, None, None, None, None, None
        N = q.shape[0]
        if ctx.use_triton:
            dA, dB = _scatter_triton(g.contiguous(), idx_h, idx_o, N, ctx.blocks)
        else:
            dA, dB = _scatter_torch(g, idx_h, idx_o, N)          # [N, Do] fp32 each
        acc = dA.dtype                                            # fp32 (fp64 for fp64 inputs)
        if ctx.needs_input_grad[0]:
            dq = (dA @ w1.to(acc) + dB @ w2.to(acc)).to(q.dtype)  # [N, D]
        if ctx.needs_input_grad[1]:
            dw1 = (dA.t() @ q.to(acc)).to(w1.dtype)               # [Do, D]
        if ctx.needs_input_grad[2]:
            dw2 = (dB.t() @ q.to(acc)).to(w2.dtype)
        if ctx.needs_input_grad[3]:
            db = dA.sum(0).to(w1.dtype)                           # sum over pairs = sum over rows of dA
        return dq, dw1, dw2, db, None, None, None, None, None, None


def _check(q, boxes, idx_h, idx_o, w1, w2, b, image_wh):
    if q.dim() != 2:
        raise ValueError(f"pair_enum: q must be [N, D], got {tuple(q.shape)}")
    N, D = q.shape
    if boxes.shape != (N, 4):
        raise ValueError(f"pair_enum: boxes must be [{N}, 4], got {tuple(boxes.shape)}")
    if image_wh.shape != (N, 2) or not bool((image_wh > 0).all()):
        raise ValueError(f"pair_enum: image_wh must be [{N}, 2] positive (w, h) per box, got "
                         f"{tuple(image_wh.shape)}")
    if w1.dim() != 2 or w1.shape != w2.shape or w1.shape[1] != D or b.shape != (w1.shape[0],):
        raise ValueError("pair_enum: w1, w2 must be [Do, D] and b [Do], got "
                         f"{tuple(w1.shape)}, {tuple(w2.shape)}, {tuple(b.shape)} with D={D}")
    if idx_h.shape != idx_o.shape:
        raise ValueError(f"pair_enum: idx_h {tuple(idx_h.shape)} and idx_o {tuple(idx_o.shape)} differ")
    check_index("pair_enum", "idx_h", idx_h, N)
    check_index("pair_enum", "idx_o", idx_o, N)


def pair_enum(q, boxes, idx_h, idx_o, w1, w2, b, impl="auto", *, image_wh, blocks=None):
    """Pair queries and spatial features for the pairs (idx_h[p], idx_o[p]).

    q: [N, D], boxes: [N, 4] in pixels, idx_h/idx_o: Long[P], w1, w2: [Do, D], b: [Do],
    image_wh: [N, 2] the (w, h) of each box's image (a pair's boxes share one image)
    -> (pair_q [P, Do] in q's dtype, spatial [P, 36] float32). Gradients to q, w1, w2, b.
    blocks: optional (BLOCK_P, BLOCK_D) for the Triton kernels (powers of two).
    """
    _check(q, boxes, idx_h, idx_o, w1, w2, b, image_wh)
    impl = resolve_impl(impl, q)
    if impl == "reference":
        return pair_enum_reference(q, boxes, idx_h, idx_o, w1, w2, b, image_wh)
    use_triton = impl == "triton"
    if use_triton:   # boxes and sizes are constants: any float dtype is read as fp32 by the kernel
        idx_h, idx_o = idx_h.contiguous(), idx_o.contiguous()
        boxes, image_wh = boxes.float().contiguous(), image_wh.float().contiguous()
    return PairEnumFunction.apply(q, w1, w2, b, boxes.detach(), image_wh.detach(), idx_h, idx_o,
                                  use_triton, blocks)
