"""Box-guided cross-attention (the spatial branch of LINK's linking decoder).

Every human-object pair attends to the dense token map of its image. The attention logits get
an additive bias that says, per head, how much to favour tokens that fall inside the human box,
the object box and their union:

    bias[p, h, t] = sum_r strength[h, r] * inside_r(p, t),   r in (human, object, union)
    out[p, h]     = softmax_t(q[p, h] . k[img(p), h, t] * scale + bias[p, h, t]) @ v[img(p), h]

Token t = (row i, col j) of a Gh x Gw grid has centre ((j + 0.5) / Gw, (i + 0.5) / Gh) in
normalised image coordinates. A box is first grown to at least one cell around its centre, so
a degenerate (zero-area) box still covers the token it sits on.

Three implementations, one definition (``impl=``):

- "reference": plain differentiable PyTorch. Materialises bias and attention, [P, Hd, T] each,
  and autograd keeps several such tensors for backward.
- "torch": the memory-lean path (`_BoxAttentionTorch`, one autograd.Function). Pairs are
  grouped by image and processed in chunks of at most ``_CHUNK_ELEMS / (Hd * T)`` pairs; only
  q, k, v, boxes, strength and the per-row softmax statistics (max and sum, [P, Hd] each) are
  saved. Backward recomputes the bias and the attention probabilities chunk by chunk
  (flash-attention backward):
      P = exp(S - max) / sum,  dV += P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(P * dP)),
      dQ = dS K * scale,  dK += dS^T Q * scale,  dstrength[h, r] = sum_{p,t} dS * inside_r.
- "triton": flash-attention style kernels (`_BoxAttentionTriton`). Pairs are sorted by image
  and cut into blocks of BLOCK_P pairs that never straddle two images, so a block shares one
  image's K/V. A forward program (pair block, head) loops over token blocks, computes the box
  bias in registers from the 12 (grown) box numbers of each pair and the token's grid index,
  and runs an online softmax; it writes out and the row max and sum (the logsumexp, kept as
  two numbers so backward stays exact for logits ~1e3). Backward: a dq kernel (also
  writes per-program d strength partials, summed in torch) and a dk/dv kernel (one program per
  (token block, head, image) that loops over that image's pair blocks; no atomics).
  Pair order is never materialised: kernels gather/scatter rows through the sort permutation.

"auto" = "triton" for CUDA tensors when Triton imports, else "torch" (see kernels/_common.py).
All paths compute softmax statistics in fp32 (fp64 for fp64 inputs, torch path only) and
return out / gradients in the input dtypes.
"""
import os

import torch

from kernels._common import resolve_impl

try:  # Triton is optional: CPU users run the lean torch path.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

# Interpreter mode must be known when the kernels are decorated (tests/conftest.py sets it).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Lean torch path: at most this many elements per [chunk, Hd, T] intermediate (4 MiB in fp32).
_CHUNK_ELEMS = 1 << 20


# ----------------------------------------------------------------------------------------------
# Reference (the definition of the op)
# ----------------------------------------------------------------------------------------------

def grow_boxes(boxes: torch.Tensor, grid_hw) -> torch.Tensor:
    """Grow normalised boxes [..., 4] to at least one grid cell around their centre."""
    gh, gw = grid_hw
    x1, y1, x2, y2 = boxes.unbind(-1)
    xc, yc = (x1 + x2) / 2, (y1 + y2) / 2
    return torch.stack([
        torch.minimum(x1, xc - 0.5 / gw), torch.minimum(y1, yc - 0.5 / gh),
        torch.maximum(x2, xc + 0.5 / gw), torch.maximum(y2, yc + 0.5 / gh),
    ], dim=-1)


def axis_centres(grid_hw, device=None, dtype=torch.float32):
    """Centres of the grid columns and rows: (xs [Gw], ys [Gh])."""
    gh, gw = grid_hw
    ys = (torch.arange(gh, device=device, dtype=dtype) + 0.5) / gh
    xs = (torch.arange(gw, device=device, dtype=dtype) + 0.5) / gw
    return xs, ys


def token_centres(grid_hw, device=None, dtype=torch.float32):
    """Centres of the Gh x Gw tokens in row-major order: (cx [T], cy [T])."""
    xs, ys = axis_centres(grid_hw, device, dtype)
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    return cx.reshape(-1), cy.reshape(-1)


def box_inside(boxes: torch.Tensor, grid_hw) -> torch.Tensor:
    """inside[p, r, t] = 1.0 if token t's centre lies in (grown) box r of pair p.

    boxes: [P, 3, 4] normalised xyxy (human, object, union) -> [P, 3, T] float
    """
    b = grow_boxes(boxes.float(), grid_hw)                        # [P, 3, 4]
    cx, cy = token_centres(grid_hw, boxes.device)                 # [T], [T]
    x1, y1, x2, y2 = (b[..., i, None] for i in range(4))          # [P, 3, 1] each
    return ((cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)).float()


def box_bias(boxes: torch.Tensor, strength: torch.Tensor, grid_hw) -> torch.Tensor:
    """Additive attention bias [P, Hd, T] from pair boxes [P, 3, 4] and strength [Hd, 3]."""
    inside = box_inside(boxes, grid_hw).to(strength.dtype)        # [P, 3, T]
    return torch.einsum("hr,prt->pht", strength, inside)


def box_attention_reference(q, k, v, pair_image, boxes, strength, grid_hw, scale=None):
    """Plain differentiable definition of the op (materialises bias and attention).

    q: [P, Hd, D] pair queries      k, v: [B, Hd, T, D] per-image keys / values
    pair_image: Long[P] image of each pair   boxes: [P, 3, 4]   strength: [Hd, 3]
    returns out [P, Hd, D]
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bias = box_bias(boxes, strength, grid_hw)                      # [P, Hd, T]
    out = q.new_zeros(q.shape)
    for b in pair_image.unique().tolist():  # pairs of one image share its keys and values
        sel = (pair_image == b).nonzero().squeeze(1)
        logits = torch.einsum("phd,htd->pht", q[sel], k[b]) * scale + bias[sel]
        # softmax in fp32 at least (fp64 stays fp64, so gradcheck can run on the reference)
        attn = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1).to(q.dtype)
        out = out.index_copy(0, sel, torch.einsum("pht,htd->phd", attn, v[b]))
    return out


def _check(q, k, v, pair_image, boxes, strength, grid_hw):
    P, Hd, D = q.shape
    if k.dim() != 4 or k.shape != v.shape or k.shape[1] != Hd or k.shape[3] != D:
        raise ValueError(f"box_attention: k, v must be [B, {Hd}, T, {D}], got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] != grid_hw[0] * grid_hw[1]:
        raise ValueError(f"box_attention: T={k.shape[2]} != Gh*Gw={grid_hw[0] * grid_hw[1]}")
    if pair_image.shape != (P,) or boxes.shape != (P, 3, 4) or strength.shape != (Hd, 3):
        raise ValueError("box_attention: pair_image [P], boxes [P, 3, 4], strength [Hd, 3] expected, got "
                         f"{tuple(pair_image.shape)}, {tuple(boxes.shape)}, {tuple(strength.shape)}")


def _check_pair_image(pair_image, n_images):
    """The fused paths index images through pair_image: it must lie in [0, B)."""
    if pair_image.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"box_attention: pair_image must be an integer tensor, got {pair_image.dtype}")
    if pair_image.numel() and (int(pair_image.min()) < 0 or int(pair_image.max()) >= n_images):
        raise ValueError(f"box_attention: pair_image values must lie in [0, {n_images}), got "
                         f"[{int(pair_image.min())}, {int(pair_image.max())}]")


# ----------------------------------------------------------------------------------------------
# Lean chunked PyTorch path
# ----------------------------------------------------------------------------------------------

def _image_chunks(pair_image, n_images, chunk):
    """Yield (image b, LongTensor of pair indices) with pairs grouped by image, <= chunk each."""
    order = torch.argsort(pair_image, stable=True)                # [P]
    counts = torch.bincount(pair_image, minlength=n_images).tolist()
    start = 0
    for b, n in enumerate(counts):
        for s in range(start, start + n, chunk):
            yield b, order[s:min(s + chunk, start + n)]
        start += n


def _inside_rct(boxes_c, grid_hw, dtype):
    """inside masks of a chunk, [3, c, T] in dtype, equal to box_inside(boxes_c).transpose(0, 1).

    Separable: a token is inside a box iff its column centre is in [x1', x2'] and its row centre
    in [y1', y2'], so 2 x 3 x c x (Gh + Gw) compares and one [3, c, Gh, Gw] product.
    """
    b = grow_boxes(boxes_c.float(), grid_hw).transpose(0, 1).contiguous()  # [3, c, 4]
    xs, ys = axis_centres(grid_hw, boxes_c.device)                         # [Gw], [Gh]
    ix = (xs >= b[..., 0:1]) & (xs <= b[..., 2:3])                          # [3, c, Gw]
    iy = (ys >= b[..., 1:2]) & (ys <= b[..., 3:4])                          # [3, c, Gh]
    inside = iy.to(dtype)[..., :, None] * ix.to(dtype)[..., None, :]        # [3, c, Gh, Gw]
    return inside.reshape(b.shape[0], b.shape[1], -1).contiguous()


def _chunk_logits(qh, kb, boxes_c, strength, grid_hw, scale):
    """Logits of one chunk of pairs of one image (head-major), and the inside masks.

    qh: [Hd, c, D]  kb: [Hd, T, D]  boxes_c: [c, 3, 4]  strength: [Hd, 3] (acc dtype)
    returns logits [Hd, c, T] = q k^T * scale + bias, inside [3, c, T]
    """
    Hd, c, _ = qh.shape
    inside = _inside_rct(boxes_c, grid_hw, qh.dtype)                        # [3, c, T]
    bias = torch.mm(strength, inside.view(3, -1)).view(Hd, c, -1)           # [Hd, c, T]
    return bias.baddbmm_(qh, kb.transpose(1, 2), alpha=scale), inside


def _acc_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class _BoxAttentionTorch(torch.autograd.Function):
    """Chunked forward/backward; saves q, k, v, boxes, strength and row max/sum [P, Hd] only.

    Chunks are head-major ([Hd, c, T]) so every product is a plain batched GEMM over heads.
    """

    @staticmethod
    def forward(ctx, q, k, v, strength, pair_image, boxes, grid_hw, scale, chunk):
        P, Hd, D = q.shape
        B = k.shape[0]
        acc = _acc_dtype(q, k, v, strength)
        st = strength.to(acc)                                              # [Hd, 3]
        out = q.new_empty(P, Hd, D)                                        # [P, Hd, D]
        row_max = torch.empty(P, Hd, dtype=acc, device=q.device)           # [P, Hd]
        row_sum = torch.empty(P, Hd, dtype=acc, device=q.device)           # [P, Hd]
        kb = vb = None
        last_b = -1
        for b, idx in _image_chunks(pair_image, B, chunk):
            if b != last_b:
                kb, vb, last_b = k[b].to(acc), v[b].to(acc), b            # [Hd, T, D]
            qh = q[idx].to(acc).transpose(0, 1)                            # [Hd, c, D]
            logits, _ = _chunk_logits(qh, kb, boxes[idx], st, grid_hw, scale)
            m = logits.amax(dim=-1, keepdim=True)                          # [Hd, c, 1]
            e = logits.sub_(m).exp_()                                      # [Hd, c, T]
            l = e.sum(-1, keepdim=True)                                    # [Hd, c, 1]
            oh = torch.bmm(e, vb).div_(l)                                  # [Hd, c, D]
            out[idx] = oh.transpose(0, 1).to(out.dtype)
            row_max[idx], row_sum[idx] = m[..., 0].T, l[..., 0].T
        ctx.save_for_backward(q, k, v, strength, pair_image, boxes, row_max, row_sum)
        ctx.grid_hw, ctx.scale, ctx.chunk = grid_hw, scale, chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, strength, pair_image, boxes, row_max, row_sum = ctx.saved_tensors
        grid_hw, scale, chunk = ctx.grid_hw, ctx.scale, ctx.chunk
        need_q, need_k, need_v, need_s = ctx.needs_input_grad[:4]
        B = k.shape[0]
        acc = _acc_dtype(q, k, v, strength)
        st = strength.to(acc)
        dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device) if need_q else None
        dk = torch.zeros(k.shape, dtype=acc, device=k.device) if need_k else None
        dv = torch.zeros(v.shape, dtype=acc, device=v.device) if need_v else None
        dst = torch.zeros(st.shape, dtype=acc, device=st.device) if need_s else None
        kb = vb = None
        last_b = -1
        for b, idx in _image_chunks(pair_image, B, chunk):
            if b != last_b:
                kb, vb, last_b = k[b].to(acc), v[b].to(acc), b            # [Hd, T, D]
            qh = q[idx].to(acc).transpose(0, 1)                            # [Hd, c, D]
            doh = dout[idx].to(acc).transpose(0, 1)                        # [Hd, c, D]
            logits, inside = _chunk_logits(qh, kb, boxes[idx], st, grid_hw, scale)
            # exp(S - max) / sum rather than exp(S - lse): exact for the max logit even when
            # |S| ~ 1e3 (lse's fp32 ulp would be ~1e-4 there)
            p = logits.sub_(row_max[idx].T[..., None]).exp_()
            p = p.mul_(row_sum[idx].T.reciprocal()[..., None])             # [Hd, c, T]
            if need_v:
                dv[b].baddbmm_(p.transpose(1, 2), doh)                     # [Hd, T, D]
            if not (need_q or need_k or need_s):
                continue
            dp = torch.bmm(doh, vb.transpose(1, 2))                        # [Hd, c, T]
            delta = torch.einsum("hct,hct->hc", p, dp)                     # rowsum(dO * O)
            ds = dp.sub_(delta[..., None]).mul_(p)                         # [Hd, c, T]
            if need_q:
                dq[idx] = torch.bmm(ds, kb).mul_(scale).transpose(0, 1).to(dq.dtype)
            if need_k:
                dk[b].baddbmm_(ds.transpose(1, 2), qh, alpha=scale)
            if need_s:
                dst += torch.mm(ds.view(ds.shape[0], -1), inside.view(3, -1).T)
        return (dq, None if dk is None else dk.to(k.dtype), None if dv is None else dv.to(v.dtype),
                None if dst is None else dst.to(strength.dtype), None, None, None, None, None)


def box_attention_torch(q, k, v, pair_image, boxes, strength, grid_hw, scale=None, chunk=None):
    """Lean chunked path. chunk: pairs per chunk (default: _CHUNK_ELEMS / (Hd * T))."""
    P, Hd, D = q.shape
    T = k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    if chunk is None:
        chunk = max(1, _CHUNK_ELEMS // max(1, Hd * T))
    _check_pair_image(pair_image, k.shape[0])
    return _BoxAttentionTorch.apply(q, k, v, strength, pair_image, boxes, tuple(grid_hw), scale,
                                    int(chunk))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _load_boxes(BOX, pidx, pmask):
        """12 grown box numbers per pair -> 12 [BLOCK_P] fp32 vectors (hx1..hy2, ox1.., ux1..)."""
        base = BOX + pidx * 12
        hx1 = tl.load(base + 0, mask=pmask, other=0.0)
        hy1 = tl.load(base + 1, mask=pmask, other=0.0)
        hx2 = tl.load(base + 2, mask=pmask, other=0.0)
        hy2 = tl.load(base + 3, mask=pmask, other=0.0)
        ox1 = tl.load(base + 4, mask=pmask, other=0.0)
        oy1 = tl.load(base + 5, mask=pmask, other=0.0)
        ox2 = tl.load(base + 6, mask=pmask, other=0.0)
        oy2 = tl.load(base + 7, mask=pmask, other=0.0)
        ux1 = tl.load(base + 8, mask=pmask, other=0.0)
        uy1 = tl.load(base + 9, mask=pmask, other=0.0)
        ux2 = tl.load(base + 10, mask=pmask, other=0.0)
        uy2 = tl.load(base + 11, mask=pmask, other=0.0)
        return hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2, ux1, uy1, ux2, uy2

    @triton.jit
    def _inside(x1, y1, x2, y2, cx, cy):
        """[BLOCK_P, BLOCK_T] fp32 0/1: token centre (cx, cy) [BLOCK_T] inside box [BLOCK_P]."""
        ins = (cx[None, :] >= x1[:, None]) & (cx[None, :] <= x2[:, None]) \
            & (cy[None, :] >= y1[:, None]) & (cy[None, :] <= y2[:, None])
        return ins.to(tl.float32)

    @triton.jit
    def _token_centres(offs_t, Gw, Gw_f, Gh_f):
        """Centres of tokens offs_t [BLOCK_T] (row-major grid), correctly rounded like torch."""
        row = offs_t // Gw
        col = offs_t - row * Gw
        cx = tl.math.div_rn(col.to(tl.float32) + 0.5, Gw_f)
        cy = tl.math.div_rn(row.to(tl.float32) + 0.5, Gh_f)
        return cx, cy

    @triton.jit
    def _scores(q, k, HALF_DOT: tl.constexpr):
        """q [BP, BD] . k [BT, BD]^T -> [BP, BT] fp32 (fp32 operands unless HALF_DOT)."""
        if HALF_DOT:
            s = tl.dot(q, tl.trans(k))
        else:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        return s

    @triton.jit
    def _mm(a, b, HALF_DOT: tl.constexpr):
        """a [M, K] fp32 @ b [K, N] -> [M, N] fp32; a is cast to b's dtype when HALF_DOT."""
        if HALF_DOT:
            r = tl.dot(a.to(b.dtype), b)
        else:
            r = tl.dot(a, b.to(tl.float32), input_precision="ieee")
        return r

    @triton.jit
    def _fwd_kernel(Q, K, V, BOX, STR, OUT, MAX, SUM, PERM, BLK_IMG, BLK_START, BLK_END,
                    scale, Hd, T, D, Gw, Gw_f, Gh_f,
                    BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                    HALF_DOT: tl.constexpr):
        blk = tl.program_id(0)
        h = tl.program_id(1)
        img = tl.load(BLK_IMG + blk).to(tl.int64)
        start = tl.load(BLK_START + blk)
        end = tl.load(BLK_END + blk)
        offs_p = start + tl.arange(0, BLOCK_P)
        pmask = offs_p < end
        pidx = tl.load(PERM + offs_p, mask=pmask, other=0).to(tl.int64)    # original pair ids
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        qd_mask = pmask[:, None] & dmask[None, :]
        q_off = pidx[:, None] * (Hd * D) + h * D + offs_d[None, :]
        q = tl.load(Q + q_off, mask=qd_mask, other=0.0)                     # [BP, BD]
        hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2, ux1, uy1, ux2, uy2 = _load_boxes(BOX, pidx, pmask)
        s_h = tl.load(STR + h * 3 + 0)
        s_o = tl.load(STR + h * 3 + 1)
        s_u = tl.load(STR + h * 3 + 2)
        kv_base = (img * Hd + h) * T * D
        m_i = tl.full([BLOCK_P], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_P], tl.float32)
        acc = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            tmask = offs_t < T
            kv_off = kv_base + offs_t[:, None] * D + offs_d[None, :]
            kv_mask = tmask[:, None] & dmask[None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0)                # [BT, BD]
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0)                # [BT, BD]
            cx, cy = _token_centres(offs_t, Gw, Gw_f, Gh_f)
            s = _scores(q, k, HALF_DOT) * scale                              # [BP, BT]
            s += s_h * _inside(hx1, hy1, hx2, hy2, cx, cy)
            s += s_o * _inside(ox1, oy1, ox2, oy2, cx, cy)
            s += s_u * _inside(ux1, uy1, ux2, uy2, cx, cy)
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))                            # finite: T >= 1
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])                                   # [BP, BT]
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _mm(p, v, HALF_DOT)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(OUT + q_off, out.to(OUT.dtype.element_ty), mask=qd_mask)
        tl.store(MAX + pidx * Hd + h, m_i, mask=pmask)
        tl.store(SUM + pidx * Hd + h, l_i, mask=pmask)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, BOX, STR, DO, MAX, SUM, DELTA, DQ, DSTR, PERM, BLK_IMG, BLK_START,
                       BLK_END, scale, Hd, T, D, Gw, Gw_f, Gh_f,
                       BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                       HALF_DOT: tl.constexpr):
        blk = tl.program_id(0)
        h = tl.program_id(1)
        img = tl.load(BLK_IMG + blk).to(tl.int64)
        start = tl.load(BLK_START + blk)
        end = tl.load(BLK_END + blk)
        offs_p = start + tl.arange(0, BLOCK_P)
        pmask = offs_p < end
        pidx = tl.load(PERM + offs_p, mask=pmask, other=0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        qd_mask = pmask[:, None] & dmask[None, :]
        q_off = pidx[:, None] * (Hd * D) + h * D + offs_d[None, :]
        q = tl.load(Q + q_off, mask=qd_mask, other=0.0)                     # [BP, BD]
        do = tl.load(DO + q_off, mask=qd_mask, other=0.0)                   # [BP, BD]
        m_i = tl.load(MAX + pidx * Hd + h, mask=pmask, other=0.0)           # [BP]
        inv_l = 1.0 / tl.load(SUM + pidx * Hd + h, mask=pmask, other=1.0)   # [BP]
        delta = tl.load(DELTA + pidx * Hd + h, mask=pmask, other=0.0)       # [BP]
        hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2, ux1, uy1, ux2, uy2 = _load_boxes(BOX, pidx, pmask)
        s_h = tl.load(STR + h * 3 + 0)
        s_o = tl.load(STR + h * 3 + 1)
        s_u = tl.load(STR + h * 3 + 2)
        kv_base = (img * Hd + h) * T * D
        dq = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
        g_h = tl.zeros([BLOCK_P], tl.float32)
        g_o = tl.zeros([BLOCK_P], tl.float32)
        g_u = tl.zeros([BLOCK_P], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            tmask = offs_t < T
            kv_off = kv_base + offs_t[:, None] * D + offs_d[None, :]
            kv_mask = tmask[:, None] & dmask[None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
            cx, cy = _token_centres(offs_t, Gw, Gw_f, Gh_f)
            in_h = _inside(hx1, hy1, hx2, hy2, cx, cy)
            in_o = _inside(ox1, oy1, ox2, oy2, cx, cy)
            in_u = _inside(ux1, uy1, ux2, uy2, cx, cy)
            s = _scores(q, k, HALF_DOT) * scale + s_h * in_h + s_o * in_o + s_u * in_u
            p = tl.exp(s - m_i[:, None]) * inv_l[:, None]
            p = tl.where(pmask[:, None] & tmask[None, :], p, 0.0)           # [BP, BT]
            dp = _scores(do, v, HALF_DOT)                                    # [BP, BT]
            ds = p * (dp - delta[:, None])
            dq += _mm(ds, k, HALF_DOT)
            g_h += tl.sum(ds * in_h, 1)
            g_o += tl.sum(ds * in_o, 1)
            g_u += tl.sum(ds * in_u, 1)
        dq = dq * scale
        tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=qd_mask)
        part = DSTR + (blk * Hd + h) * 3
        tl.store(part + 0, tl.sum(g_h, 0))
        tl.store(part + 1, tl.sum(g_o, 0))
        tl.store(part + 2, tl.sum(g_u, 0))

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, BOX, STR, DO, MAX, SUM, DELTA, DK, DV, PERM, BLK_START, BLK_END,
                         IMG_BLK_LO, IMG_BLK_HI, scale, Hd, T, D, Gw, Gw_f, Gh_f,
                         BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                         HALF_DOT: tl.constexpr):
        tb = tl.program_id(0)
        h = tl.program_id(1)
        img = tl.program_id(2)
        offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = offs_t < T
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        kv_off = (img.to(tl.int64) * Hd + h) * T * D + offs_t[:, None] * D + offs_d[None, :]
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)                     # [BT, BD]
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)                     # [BT, BD]
        cx, cy = _token_centres(offs_t, Gw, Gw_f, Gh_f)
        s_h = tl.load(STR + h * 3 + 0)
        s_o = tl.load(STR + h * 3 + 1)
        s_u = tl.load(STR + h * 3 + 2)
        dk = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        lo = tl.load(IMG_BLK_LO + img)
        hi = tl.load(IMG_BLK_HI + img)
        for j in range(lo, hi):                                              # this image's pair blocks
            start = tl.load(BLK_START + j)
            end = tl.load(BLK_END + j)
            offs_p = start + tl.arange(0, BLOCK_P)
            pmask = offs_p < end
            pidx = tl.load(PERM + offs_p, mask=pmask, other=0).to(tl.int64)
            qd_mask = pmask[:, None] & dmask[None, :]
            q_off = pidx[:, None] * (Hd * D) + h * D + offs_d[None, :]
            q = tl.load(Q + q_off, mask=qd_mask, other=0.0)                 # [BP, BD]
            do = tl.load(DO + q_off, mask=qd_mask, other=0.0)               # [BP, BD]
            m_i = tl.load(MAX + pidx * Hd + h, mask=pmask, other=0.0)
            inv_l = 1.0 / tl.load(SUM + pidx * Hd + h, mask=pmask, other=1.0)
            delta = tl.load(DELTA + pidx * Hd + h, mask=pmask, other=0.0)
            hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2, ux1, uy1, ux2, uy2 = _load_boxes(BOX, pidx, pmask)
            s = _scores(q, k, HALF_DOT) * scale
            s += s_h * _inside(hx1, hy1, hx2, hy2, cx, cy)
            s += s_o * _inside(ox1, oy1, ox2, oy2, cx, cy)
            s += s_u * _inside(ux1, uy1, ux2, uy2, cx, cy)
            p = tl.exp(s - m_i[:, None]) * inv_l[:, None]
            p = tl.where(pmask[:, None] & tmask[None, :], p, 0.0)           # [BP, BT]
            dv += _mm(tl.trans(p), do, HALF_DOT)                   # [BT, BD]
            dp = _scores(do, v, HALF_DOT)                                    # [BP, BT]
            ds = p * (dp - delta[:, None])
            dk += _mm(tl.trans(ds), q, HALF_DOT)                    # [BT, BD]
        dk = dk * scale
        tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


_TRITON_MAX_D = 256


def _triton_config(D, T, block_p=None, block_t=None):
    """Fixed block sizes (no autotune: the interpreter cannot run several configs).

    Head dims are padded to BLOCK_D = next power of two >= 16 (masked). GPU tiles (untuned, no GPU
    here; sized for the registers of the [BP, BT] score tile and the [BP, BD] accumulators):
    BLOCK_D <= 64: 32 pairs x 64 tokens, 4 warps; 128: 32 x 32, 4 warps; 256: 16 x 32, 8 warps.
    All three compile for sm_90 within shared memory limits (tests/test_box_attention.py).
    """
    block_d = max(16, triton.next_power_of_2(D))
    bp, bt, warps = (32, 64, 4) if block_d <= 64 else (32, 32, 4) if block_d <= 128 else (16, 32, 8)
    return block_p or bp, block_t or bt, block_d, warps


def _block_plan(pair_image, n_images, block_p):
    """Cut pairs, sorted by image, into blocks of <= block_p pairs of a single image.

    returns perm Int32[P] (sorted position -> pair id), blk_img / blk_start / blk_end
    Int32[n_blocks] (image and [start, end) range in sorted positions), img_lo / img_hi
    Int32[B] (each image's range of blocks).
    """
    dev = pair_image.device
    perm = torch.argsort(pair_image, stable=True).to(torch.int32)              # [P]
    counts = torch.bincount(pair_image, minlength=n_images)                     # [B]
    nblk = (counts + block_p - 1) // block_p                                     # [B]
    img_hi = torch.cumsum(nblk, 0)
    img_lo = img_hi - nblk
    pair_lo = torch.cumsum(counts, 0) - counts
    blk_img = torch.repeat_interleave(torch.arange(n_images, device=dev), nblk)  # [n_blocks]
    local = torch.arange(blk_img.numel(), device=dev) - img_lo[blk_img]
    blk_start = pair_lo[blk_img] + local * block_p
    blk_end = torch.minimum(blk_start + block_p, pair_lo[blk_img] + counts[blk_img])
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return perm, i32(blk_img), i32(blk_start), i32(blk_end), i32(img_lo), i32(img_hi)


class _BoxAttentionTriton(torch.autograd.Function):
    """Fused forward (out, row max/sum) and backward (dq + d strength partials, dk/dv) kernels."""

    @staticmethod
    def forward(ctx, q, k, v, strength, pair_image, boxes, grid_hw, scale, block_p, block_t):
        P, Hd, D = q.shape
        B, _, T, _ = k.shape
        gh, gw = grid_hw
        BP, BT, BD, warps = _triton_config(D, T, block_p, block_t)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        grown = grow_boxes(boxes.float(), grid_hw).contiguous()               # [P, 3, 4] fp32
        st = strength.detach().float().contiguous()                            # [Hd, 3]
        plan = _block_plan(pair_image, B, BP)
        perm, blk_img, blk_start, blk_end, img_lo, img_hi = plan
        n_blocks = blk_img.numel()
        out = torch.empty_like(q)                                              # [P, Hd, D]
        # softmax statistics: row max and sum of exp(S - max), [P, Hd] fp32 each (kept apart
        # rather than as lse = max + log(sum) so backward is exact for |S| ~ 1e3)
        row_max = torch.empty(P, Hd, dtype=torch.float32, device=q.device)
        row_sum = torch.empty(P, Hd, dtype=torch.float32, device=q.device)
        half_dot = (not _INTERPRET) and q.dtype != torch.float32
        if n_blocks:
            _fwd_kernel[(n_blocks, Hd)](
                q, k, v, grown, st, out, row_max, row_sum, perm, blk_img, blk_start, blk_end,
                scale, Hd, T, D, gw, float(gw), float(gh),
                BLOCK_P=BP, BLOCK_T=BT, BLOCK_D=BD, HALF_DOT=half_dot, num_warps=warps)
        ctx.save_for_backward(q, k, v, grown, st, out, row_max, row_sum, *plan)
        ctx.meta = (grid_hw, scale, BP, BT, BD, warps, half_dot, strength.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, grown, st, out, row_max, row_sum, perm, blk_img, blk_start, blk_end, img_lo, img_hi = \
            ctx.saved_tensors
        (gh, gw), scale, BP, BT, BD, warps, half_dot, st_dtype = ctx.meta
        P, Hd, D = q.shape
        B, _, T, _ = k.shape
        n_blocks = blk_img.numel()
        dout = dout.contiguous().to(q.dtype)
        delta = (dout.float() * out.float()).sum(-1).contiguous()               # [P, Hd]
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        dstr_part = torch.zeros(max(n_blocks, 1), Hd, 3, dtype=torch.float32, device=q.device)
        common = dict(BLOCK_P=BP, BLOCK_T=BT, BLOCK_D=BD, HALF_DOT=half_dot, num_warps=warps)
        if n_blocks:
            _bwd_dq_kernel[(n_blocks, Hd)](
                q, k, v, grown, st, dout, row_max, row_sum, delta, dq, dstr_part, perm, blk_img, blk_start,
                blk_end, scale, Hd, T, D, gw, float(gw), float(gh), **common)
        _bwd_dkdv_kernel[(triton.cdiv(T, BT), Hd, B)](
            q, k, v, grown, st, dout, row_max, row_sum, delta, dk, dv, perm, blk_start, blk_end, img_lo, img_hi,
            scale, Hd, T, D, gw, float(gw), float(gh), **common)
        dstr = dstr_part.sum(0).to(st_dtype)                                     # [Hd, 3]
        return dq, dk, dv, dstr, None, None, None, None, None, None


def _check_triton(q, k, v, strength):
    if triton is None:
        raise RuntimeError("box_attention: impl='triton' needs the triton package")
    if not _INTERPRET and not (q.is_cuda and k.is_cuda and v.is_cuda and strength.is_cuda):
        raise ValueError("box_attention: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 "
                         "set before kernels/ is imported)")
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if dt not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"box_attention: impl='triton' needs q, k, v in fp32/fp16/bf16, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > _TRITON_MAX_D:
        raise ValueError(f"box_attention: impl='triton' supports head dim <= {_TRITON_MAX_D}, "
                         f"got {q.shape[-1]}")
    return dt


def box_attention_triton(q, k, v, pair_image, boxes, strength, grid_hw, scale=None,
                         block_p=None, block_t=None):
    """Triton path. block_p / block_t override the fixed config (powers of two >= 16).

    q, k, v: fp32 / fp16 / bf16 (mixed dtypes are cast to their promoted type), head dim <= 256.
    """
    dt = _check_triton(q, k, v, strength)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)  # mixed dtypes (e.g. autocast): one common dtype
    _check_pair_image(pair_image, k.shape[0])
    for name, b in (("block_p", block_p), ("block_t", block_t)):
        if b is not None and (b < 16 or b & (b - 1)):
            raise ValueError(f"box_attention: {name} must be a power of two >= 16, got {b}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    pair_image, boxes = pair_image.to(q.device), boxes.to(q.device)
    return _BoxAttentionTriton.apply(q, k, v, strength, pair_image, boxes,
                                     (int(grid_hw[0]), int(grid_hw[1])), scale, block_p, block_t)


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------

def box_attention(q, k, v, pair_image, boxes, strength, grid_hw, scale=None, impl="auto"):
    """Box-guided cross-attention; see the module docstring. Returns [P, Hd, D].

    q: [P, Hd, D]  k, v: [B, Hd, T = Gh*Gw, D]  pair_image: Long[P] in [0, B)
    boxes: [P, 3, 4] normalised xyxy (human, object, union)  strength: [Hd, 3]
    Gradients flow to q, k, v and strength; boxes and pair_image are constants.
    """
    _check(q, k, v, pair_image, boxes, strength, grid_hw)
    requested, impl = impl, resolve_impl(impl, q, k, v)
    if requested == "auto" and impl == "triton" and q.shape[-1] > _TRITON_MAX_D:
        impl = "torch"  # the lean path runs on any device
    if impl == "reference" or q.shape[0] == 0:
        return box_attention_reference(q, k, v, pair_image, boxes, strength, grid_hw, scale)
    if impl == "triton":
        return box_attention_triton(q, k, v, pair_image, boxes, strength, grid_hw, scale)
    return box_attention_torch(q, k, v, pair_image, boxes, strength, grid_hw, scale)


# ----------------------------------------------------------------------------------------------
# Measurement helpers: analytic cost model and CPU peak memory
# ----------------------------------------------------------------------------------------------

def cost_model(P=4096, Hd=8, T=1369, D=32, B=4, elem=4, block_p=32, block_t=64):
    """Analytic FLOPs and bytes of forward and backward (fp32 by default: elem = 4 bytes).

    FLOPs: a multiply-add is 2; elementwise work per [P, Hd, T] element: scale 1, bias 6
    (3 multiply-adds of strength by the 0/1 inside masks), softmax 5 (max, sub, exp, sum, div),
    backward dS 3 and d strength 6; inside tests 12 compares per (pair, token).
    Bytes: the reference counts one read or write per pass over a materialised [P, Hd, T]
    tensor (its forward makes ~12 such passes: bias, gathered bias, logits, scaled, biased,
    softmax and the reads of them; backward ~13). The lean torch path makes ~10 (forward) and
    ~22 (backward) passes over [Hd, chunk, T] buffers of <= 4 MiB (cache-sized working set).
    The Triton kernels never materialise [P, Hd, T]: "hbm" is the compulsory traffic (q, out, dO, dq, K, V, dK, dV once, 12 box numbers and 2
    softmax statistics per row) and "l2" the re-reads of K/V per pair block (forward, dq) and of
    q/dO per token block (dk/dv) of the Triton kernels, served by the L2 cache in practice.
    """
    PHT, PHD, BHTD, PT = P * Hd * T, P * Hd * D, B * Hd * T * D, P * T
    mm = 2 * PHT * D                                             # one [P, Hd, T] x D contraction
    fwd = 2 * mm + 12 * PHT + 12 * PT                            # QK^T, PV; scale, bias, softmax
    n_pblk, n_tblk = -(-P // block_p), -(-T // block_t)
    stats = 2 * P * Hd * 4 + 12 * P * 4                          # row max/sum + boxes (fp32)
    hbm_fwd = elem * (2 * PHD + 2 * BHTD) + stats
    hbm_bwd = elem * (4 * PHD + 4 * BHTD) + stats + P * Hd * 4   # + delta
    return {
        "shape": {"P": P, "Hd": Hd, "T": T, "D": D, "B": B, "bytes_per_elem": elem},
        "reference": {
            "fwd_flops": fwd, "bwd_flops": 4 * mm + 10 * PHT,    # dV, dP, dQ, dK; dS; d strength
            "fwd_bytes": elem * (12 * PHT + 2 * PHD + 2 * BHTD) + 2 * 3 * PT * 4,
            "bwd_bytes": elem * (13 * PHT + 4 * PHD + 4 * BHTD) + 3 * PT * 4,
        },
        "torch_lean": {  # backward recomputes QK^T, bias and P once
            "fwd_flops": fwd, "bwd_flops": 5 * mm + 22 * PHT + 12 * PT,
            # not fused: passes over [Hd, chunk, T] buffers of <= 4 MiB, a cache-sized working set
            "fwd_bytes_chunked": elem * (10 * PHT + 2 * PHD + 2 * BHTD),
            "bwd_bytes_chunked": elem * (22 * PHT + 4 * PHD + 4 * BHTD),
        },
        "triton": {  # dq and dk/dv kernels each recompute QK^T, bias, P and dP
            "fwd_flops": fwd, "bwd_flops": 7 * mm + 30 * PHT + 24 * PT,
            "fwd_bytes_hbm": hbm_fwd, "bwd_bytes_hbm": hbm_bwd,
            "fwd_bytes_l2": elem * (n_pblk * Hd * 2 * T * D + 2 * PHD),
            "bwd_bytes_l2": elem * (n_pblk * Hd * 2 * T * D + n_tblk * 2 * PHD + 4 * PHD
                                    + 2 * BHTD),
        },
    }


def make_inputs(P=4096, Hd=8, grid_hw=(37, 37), D=32, B=4, dtype=torch.float32, seed=0,
                device="cpu"):
    """Random inputs at a given shape (pairs split as evenly as possible over B images)."""
    g = torch.Generator().manual_seed(seed)
    T = grid_hw[0] * grid_hw[1]
    q = torch.randn(P, Hd, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hd, T, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hd, T, D, generator=g).to(device, dtype)
    pair_image = (torch.arange(P) * B // max(P, 1)).to(device)
    xy = torch.rand(P, 2, 2, generator=g)
    wh = torch.rand(P, 2, 2, generator=g) * 0.5
    hb = torch.cat([xy[:, 0] * 0.5, xy[:, 0] * 0.5 + wh[:, 0]], -1)              # [P, 4]
    ob = torch.cat([xy[:, 1] * 0.5, xy[:, 1] * 0.5 + wh[:, 1]], -1)              # [P, 4]
    ub = torch.cat([torch.minimum(hb[:, :2], ob[:, :2]), torch.maximum(hb[:, 2:], ob[:, 2:])], -1)
    boxes = torch.stack([hb, ob, ub], 1).to(device)                              # [P, 3, 4]
    strength = torch.randn(Hd, 3, generator=g).to(device, dtype)
    return q, k, v, pair_image, boxes, strength


def _profiler_peak_bytes(fn):
    """Peak of live CPU tensor bytes allocated during fn() (torch.profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:  # nbytes > 0: allocation, < 0: free
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def measure_peak_extra_mb(impl, P=4096, Hd=8, grid_hw=(37, 37), D=32, B=4, backward=True,
                          method="profiler"):
    """Peak extra memory (MiB) of one forward(+backward) on CPU beyond the inputs.

    The extra memory includes out and the gradients (q, k, v, strength) themselves.
    method="profiler": peak of live tensor bytes from torch.profiler memory events (exact,
    allocator level; slow). method="rss": the peak resident memory the step adds, measured as
    kernels.bench measures it (VmHWM reset through /proc/self/clear_refs); includes glibc heap
    caching, so run one impl per fresh process (python -m kernels.box_attention --mem IMPL
    --method rss).
    """
    torch.set_grad_enabled(True)
    q, k, v, pair_image, boxes, strength = make_inputs(P, Hd, grid_hw, D, B)
    for t in (q, k, v, strength):
        t.requires_grad_(True)
    dout = torch.randn(P, Hd, D)
    # warm up code paths (small shape) so lazy initialisation is not counted
    box_attention(*make_inputs(8, Hd, (3, 3), D, 2), grid_hw=(3, 3), impl=impl)

    def step():
        out = box_attention(q, k, v, pair_image, boxes, strength, grid_hw, impl=impl)
        if backward:
            out.backward(dout)

    if method == "profiler":
        return _profiler_peak_bytes(step) / 2 ** 20
    from kernels.bench import _cpu_peak_mb  # the benchmark's RSS measurement, one definition
    return _cpu_peak_mb(step)[0]


if __name__ == "__main__":  # python -m kernels.box_attention [--mem IMPL | --time IMPL]
    import argparse
    import json

    ap = argparse.ArgumentParser(description="box_attention: CPU peak memory / cost model")
    ap.add_argument("--mem", choices=["torch", "reference"], help="measure peak extra memory")
    ap.add_argument("--time", choices=["torch", "reference"],
                    help="CPU seconds (process time, 1 thread) of forward and backward, 3 runs")
    ap.add_argument("--pairs", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--grid", type=int, nargs=2, default=[37, 37])
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--method", choices=["profiler", "rss"], default="profiler")
    a = ap.parse_args()
    shape = dict(P=a.pairs, Hd=a.heads, D=a.dim, B=a.images)
    if a.mem:
        mb = measure_peak_extra_mb(a.mem, grid_hw=tuple(a.grid), backward=not a.forward_only,
                                   method=a.method, **shape)
        print(json.dumps({"impl": a.mem, **shape, "grid": a.grid,
                          "method": a.method, "peak_extra_MiB": round(mb, 1)}))
    elif a.time:
        import time
        torch.set_num_threads(1)
        q, k, v, pi, boxes, st = make_inputs(grid_hw=tuple(a.grid), **shape)
        for t in (q, k, v, st):
            t.requires_grad_(True)
        dout = torch.randn(q.shape)
        runs = []
        for _ in range(3):
            t0 = time.process_time()
            out = box_attention(q, k, v, pi, boxes, st, tuple(a.grid), impl=a.time)
            t1 = time.process_time()
            out.backward(dout)
            runs.append((round(t1 - t0, 3), round(time.process_time() - t1, 3)))
        print(json.dumps({"impl": a.time, **shape, "grid": a.grid, "threads": 1,
                          "cpu_s_fwd_bwd": runs}))
    else:
        print(json.dumps(cost_model(T=a.grid[0] * a.grid[1], **shape), indent=1))
