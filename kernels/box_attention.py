"""Box-guided cross-attention, the spatial branch of LINK's linking decoder: every human-object pair
attends to its image's token map, with a per-head bias towards tokens inside its human, object and union boxes:

    out[p, h] = softmax_t(q[p, h] . k[img(p), h, t] * scale + bias[p, h, t]) @ v[img(p), h],
    bias[p, h, t] = sum_r strength[h, r] * inside_r(p, t)     (boxes grown to at least one grid cell)

Holds the box geometry (grow_boxes, token_centres, box_inside, box_bias) and three implementations (``impl=``):
- "reference": box_attention_reference, plain differentiable PyTorch, the definition.
- "torch": `_fwd_torch` / `_bwd_torch`, pairs by image in chunks; saves softmax max and sum, backward recomputes.
- "triton": flash-attention style kernels `_fwd_triton` / `_bwd_triton` (bias in registers; dq and dk/dv kernels).
Both fused paths run inside one autograd.Function, BoxAttentionFunction; box_attention is the public op ("auto" =
"triton" for CUDA tensors when Triton imports, else "torch": kernels/_common.py).
Specification (gradients, program layout, chunking, dtypes): docs/kernels.md#box_attention.
Tests: tests/test_box_attention.py. Benchmark and cost model: bench/kernels.py (`python -m bench.kernels`).
"""
import torch

from kernels._common import (
    acc_dtype,
    autocast_off,
    check_blocks,
    check_index,
    check_launch,
    interpreting,
    resolve_impl,
    tl,
    triton,
)

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




def _chunk_operands(q, k, v, pair_image, chunk, acc):
    """Yield (image b, pair indices idx, kb, vb [Hd, T, D], qh [Hd, c, D]) per chunk of pairs of
    one image, in the compute dtype; K / V are converted once per image."""
    kb = vb = None
    last_b = -1
    for b, idx in _image_chunks(pair_image, k.shape[0], chunk):
        if b != last_b:
            kb, vb, last_b = k[b].to(acc), v[b].to(acc), b
        yield b, idx, kb, vb, q[idx].to(acc).transpose(0, 1)


def _fwd_torch(q, k, v, strength, pair_image, boxes, grid_hw, scale, chunk):
    """Chunked forward -> (out [P, Hd, D], tensors saved for _bwd_torch: row max / sum [P, Hd]).

    Chunks are head-major ([Hd, c, T]) so every product is a plain batched GEMM over heads.
    """
    P, Hd, D = q.shape
    acc = acc_dtype(q.dtype, k.dtype, v.dtype, strength.dtype)
    st = strength.to(acc)                                              # [Hd, 3]
    out = q.new_empty(P, Hd, D)                                        # [P, Hd, D]
    row_max = torch.empty(P, Hd, dtype=acc, device=q.device)           # [P, Hd]
    row_sum = torch.empty(P, Hd, dtype=acc, device=q.device)           # [P, Hd]
    for b, idx, kb, vb, qh in _chunk_operands(q, k, v, pair_image, chunk, acc):
        logits, _ = _chunk_logits(qh, kb, boxes[idx], st, grid_hw, scale)
        m = logits.amax(dim=-1, keepdim=True)                          # [Hd, c, 1]
        e = logits.sub_(m).exp_()                                      # [Hd, c, T]
        ssum = e.sum(-1, keepdim=True)                                 # [Hd, c, 1]
        oh = torch.bmm(e, vb).div_(ssum)                               # [Hd, c, D]
        out[idx] = oh.transpose(0, 1).to(out.dtype)
        row_max[idx], row_sum[idx] = m[..., 0].T, ssum[..., 0].T
    return out, (row_max, row_sum)


def _bwd_torch(dout, q, k, v, strength, pair_image, boxes, stats, grid_hw, scale, chunk, needs):
    """Chunked backward (flash-attention style, recomputing bias and attention) -> (dq, dk, dv,
    dstrength), None where needs[i] is False."""
    row_max, row_sum = stats
    need_q, need_k, need_v, need_s = needs
    acc = acc_dtype(q.dtype, k.dtype, v.dtype, strength.dtype)
    st = strength.to(acc)
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device) if need_q else None
    dk = torch.zeros(k.shape, dtype=acc, device=k.device) if need_k else None
    dv = torch.zeros(v.shape, dtype=acc, device=v.device) if need_v else None
    dst = torch.zeros(st.shape, dtype=acc, device=st.device) if need_s else None
    for b, idx, kb, vb, qh in _chunk_operands(q, k, v, pair_image, chunk, acc):
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
            None if dst is None else dst.to(strength.dtype))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _load_box(base, pmask):
        """x1, y1, x2, y2 at base + 0..3 -> 4 [BLOCK_P] fp32 vectors."""
        x1 = tl.load(base + 0, mask=pmask, other=0.0)
        y1 = tl.load(base + 1, mask=pmask, other=0.0)
        x2 = tl.load(base + 2, mask=pmask, other=0.0)
        y2 = tl.load(base + 3, mask=pmask, other=0.0)
        return x1, y1, x2, y2

    @triton.jit
    def _load_boxes(BOX, pidx, pmask):
        """12 grown box numbers per pair -> 12 [BLOCK_P] fp32 vectors (hx1..hy2, ox1.., ux1..)."""
        base = BOX + pidx * 12
        hx1, hy1, hx2, hy2 = _load_box(base, pmask)
        ox1, oy1, ox2, oy2 = _load_box(base + 4, pmask)
        ux1, uy1, ux2, uy2 = _load_box(base + 8, pmask)
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


def _triton_config(D, T, blocks=None):
    """(BLOCK_P, BLOCK_T, BLOCK_D, num_warps): fixed block sizes (no autotune: the interpreter
    cannot run several configs); blocks = (BLOCK_P, BLOCK_T) overrides the first two.

    Head dims are padded to BLOCK_D = next power of two >= 16 (masked). GPU tiles (untuned, no GPU
    here; sized for the registers of the [BP, BT] score tile and the [BP, BD] accumulators):
    BLOCK_D <= 64: 32 pairs x 64 tokens, 4 warps; 128: 32 x 32, 4 warps; 256: 16 x 32, 8 warps.
    All three compile for sm_90 within shared memory limits (tests/test_box_attention.py).
    """
    if D > _TRITON_MAX_D:
        raise ValueError(f"box_attention: impl='triton' supports head dim <= {_TRITON_MAX_D}, got {D}")
    block_d = max(16, triton.next_power_of_2(D))
    bp, bt, warps = (32, 64, 4) if block_d <= 64 else (32, 32, 4) if block_d <= 128 else (16, 32, 8)
    if blocks is not None:
        bp, bt = (int(b) for b in blocks)
        if min(bp, bt) < 16:   # tl.dot needs every dimension >= 16
            raise ValueError(f"box_attention: blocks must be powers of two >= 16, got {tuple(blocks)}")
    check_blocks("box_attention", bp, bt)
    return bp, bt, block_d, warps


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



def _fwd_triton(q, k, v, strength, pair_image, boxes, grid_hw, scale, cfg):
    """Forward kernel -> (out [P, Hd, D], tensors saved for _bwd_triton: grown boxes, fp32
    strength, out, row max / sum [P, Hd] and the block plan). q, k, v: contiguous, one dtype."""
    P, Hd, D = q.shape
    B, _, T, _ = k.shape
    gh, gw = grid_hw
    BP, BT, BD, warps = cfg
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
    if n_blocks:
        _fwd_kernel[(n_blocks, Hd)](
            q, k, v, grown, st, out, row_max, row_sum, perm, blk_img, blk_start, blk_end,
            scale, Hd, T, D, gw, float(gw), float(gh),
            BLOCK_P=BP, BLOCK_T=BT, BLOCK_D=BD, HALF_DOT=_half_dot(q), num_warps=warps)
    return out, (grown, st, out, row_max, row_sum, *plan)


def _bwd_triton(dout, q, k, v, strength, saved, grid_hw, scale, cfg):
    """dq kernel (+ d strength partials per program, summed here) and dk/dv kernel ->
    (dq, dk, dv, dstrength)."""
    grown, st, out, row_max, row_sum, perm, blk_img, blk_start, blk_end, img_lo, img_hi = saved
    gh, gw = grid_hw
    BP, BT, BD, warps = cfg
    P, Hd, D = q.shape
    B, _, T, _ = k.shape
    n_blocks = blk_img.numel()
    dout = dout.contiguous().to(q.dtype)
    delta = (dout.float() * out.float()).sum(-1).contiguous()               # [P, Hd]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dstr_part = torch.zeros(max(n_blocks, 1), Hd, 3, dtype=torch.float32, device=q.device)
    common = dict(BLOCK_P=BP, BLOCK_T=BT, BLOCK_D=BD, HALF_DOT=_half_dot(q), num_warps=warps)
    if n_blocks:
        _bwd_dq_kernel[(n_blocks, Hd)](
            q, k, v, grown, st, dout, row_max, row_sum, delta, dq, dstr_part, perm, blk_img, blk_start,
            blk_end, scale, Hd, T, D, gw, float(gw), float(gh), **common)
    _bwd_dkdv_kernel[(triton.cdiv(T, BT), Hd, B)](
        q, k, v, grown, st, dout, row_max, row_sum, delta, dk, dv, perm, blk_start, blk_end, img_lo, img_hi,
        scale, Hd, T, D, gw, float(gw), float(gh), **common)
    return dq, dk, dv, dstr_part.sum(0).to(strength.dtype)                  # dstrength [Hd, 3]


def _half_dot(q):
    """bf16 / fp16 operands go to the tensor cores on a GPU; in the interpreter tl.dot on bf16
    returns garbage, so it gets fp32 operands there."""
    return (not interpreting()) and q.dtype != torch.float32


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------

class BoxAttentionFunction(torch.autograd.Function):
    """(q, k, v, strength, pair_image, boxes) -> out [P, Hd, D] through the lean torch path
    (cfg = pairs per chunk; saves the inputs and row max / sum [P, Hd]) or the Triton kernels
    (cfg = _triton_config; also saves out, the grown boxes and the block plan). Gradients to q,
    k, v and strength."""

    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, strength, pair_image, boxes, grid_hw, scale, use_triton, cfg):
        fwd = _fwd_triton if use_triton else _fwd_torch
        out, saved = fwd(q, k, v, strength, pair_image, boxes, grid_hw, scale, cfg)
        ctx.save_for_backward(q, k, v, strength, pair_image, boxes, *saved)
        ctx.meta = (grid_hw, scale, use_triton, cfg)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    @autocast_off
    def backward(ctx, dout):
        q, k, v, strength, pair_image, boxes, *saved = ctx.saved_tensors
        grid_hw, scale, use_triton, cfg = ctx.meta
        if use_triton:
            grads = _bwd_triton(dout, q, k, v, strength, saved, grid_hw, scale, cfg)
        else:
            grads = _bwd_torch(dout, q, k, v, strength, pair_image, boxes, saved, grid_hw, scale, cfg,
                               ctx.needs_input_grad[:4])
        return (*grads, None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------

def _check(q, k, v, pair_image, boxes, strength, grid_hw):
    P, Hd, D = q.shape
    if k.dim() != 4 or k.shape != v.shape or k.shape[1] != Hd or k.shape[3] != D:
        raise ValueError(f"box_attention: k, v must be [B, {Hd}, T, {D}], got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[2] != grid_hw[0] * grid_hw[1]:
        raise ValueError(f"box_attention: T={k.shape[2]} != Gh*Gw={grid_hw[0] * grid_hw[1]}")
    if pair_image.shape != (P,) or boxes.shape != (P, 3, 4) or strength.shape != (Hd, 3):
        raise ValueError("box_attention: pair_image [P], boxes [P, 3, 4], strength [Hd, 3] expected, got "
                         f"{tuple(pair_image.shape)}, {tuple(boxes.shape)}, {tuple(strength.shape)}")


def box_attention(q, k, v, pair_image, boxes, strength, grid_hw, scale=None, impl="auto", *,
                  blocks=None, chunk=None):
    """Box-guided cross-attention; see the module docstring. Returns [P, Hd, D].

    q: [P, Hd, D]  k, v: [B, Hd, T = Gh*Gw, D]  pair_image: Long[P] in [0, B)
    boxes: [P, 3, 4] normalised xyxy (human, object, union)  strength: [Hd, 3]
    Gradients flow to q, k, v and strength; boxes and pair_image are constants.
    blocks: optional (BLOCK_P, BLOCK_T) for the Triton kernels (powers of two >= 16);
    chunk: optional pairs per chunk of the lean torch path (default _CHUNK_ELEMS / (Hd * T)).
    Triton: q, k, v in fp32 / fp16 / bf16 (mixed dtypes are cast to their promoted type), head
    dim <= 256 ("auto" falls back to the lean path above that).
    """
    _check(q, k, v, pair_image, boxes, strength, grid_hw)
    P, Hd, D = q.shape
    requested, impl = impl, resolve_impl(impl, q, k, v)
    if requested == "auto" and impl == "triton" and D > _TRITON_MAX_D:
        impl = "torch"  # the lean path runs on any device
    if impl == "reference" or P == 0:
        return box_attention_reference(q, k, v, pair_image, boxes, strength, grid_hw, scale)
    check_index("box_attention", "pair_image", pair_image, k.shape[0])
    scale = D ** -0.5 if scale is None else float(scale)
    grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
    use_triton = impl == "triton"
    if use_triton:
        dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        q, k, v = (t.to(dt).contiguous() for t in (q, k, v))  # mixed dtypes (autocast): one dtype
        check_launch("box_attention", q, k, v)
        cfg = _triton_config(D, k.shape[2], blocks)
        pair_image, boxes = pair_image.to(q.device), boxes.to(q.device)
    else:
        cfg = int(chunk) if chunk else max(1, _CHUNK_ELEMS // max(1, Hd * k.shape[2]))
    return BoxAttentionFunction.apply(q, k, v, strength, pair_image, boxes, grid_hw, scale, use_triton, cfg)
