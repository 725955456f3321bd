"""Temperature-scaled KL distillation, softmax form, one or many teachers:

    loss = T^2 / N * sum_n KL(mean_m softmax(t_m[n] / T) || softmax(s[n] / T)),   with a prior: t, s -> Psi(t), Psi(s)

Psi(O) = logit(P * sigmoid(O)) the prior-weighted logit (kernels/_psi.py); P == 0 is masked out of both softmaxes.
Used for the latent maps and the queries (rows are tokens, classes channels) and as the softmax ablation at the
logit level (LINK's logit KD is kernels/kl_distill_sigmoid.py). Three implementations (``impl=``):
- "reference": kl_distill_reference, the definition in plain differentiable PyTorch.
- "torch": row chunks; the forward keeps only references to its inputs, the backward recomputes per chunk.
- "triton": a forward kernel (online softmax statistics, per-row loss) and a backward kernel (the gradient).
Both fused paths run inside one autograd.Function, KLDistillFunction; kl_distill is the public op. Only the student
gets a gradient (teacher and prior are constants).
Specification (gradient, saved statistics, chunking, dtypes): docs/kernels.md#kl_distill.
Tests: tests/test_kl_distill.py. Benchmark: bench/kernels.py (`python -m bench.kernels`).
"""
import torch

from kernels._common import acc_dtype, autocast_off, check_launch, resolve_impl, tl, triton
from kernels._psi import check_kd, kd_operands, psi_scaled, psi_transform, row_blocks, row_chunks

if triton is not None:
    from kernels._psi import class_tile, psi_tile


def kl_distill_reference(student, teacher, temperature=1.0, prior=None):
    """Plain definition.

    student: [N, C]; teacher: [N, C] or [M, N, C] (M teachers, target = mean of their
    softmaxes); prior: optional [N, C] in [0, 1] -> Psi transform and masking.
    Returns T^2 / N * sum over rows of KL(p_t || q_s), a 0-dim tensor.
    """
    T = float(temperature)
    t = teacher if teacher.dim() == 3 else teacher[None]           # [M, N, C]
    s = student
    if prior is not None:
        s, t = psi_transform(s, prior), psi_transform(t, prior[None])
        mask = prior > 0                                            # [N, C]
    else:
        mask = torch.ones_like(s, dtype=torch.bool)
    neg_inf = torch.tensor(float("-inf"), device=s.device, dtype=s.dtype)
    log_q = torch.where(mask, s / T, neg_inf).log_softmax(-1)       # [N, C]
    p = torch.where(mask[None], t.detach() / T, neg_inf.to(t.dtype)).softmax(-1).mean(0)  # [N, C]
    rows = mask.any(-1)                                             # rows with something to match
    log_q, p, mask = log_q[rows], p[rows].to(log_q.dtype), mask[rows]
    term = torch.xlogy(p, p) - p * torch.where(mask, log_q, torch.zeros_like(log_q))
    return term.sum() * (T * T) / max(student.shape[0], 1)


# ----------------------------------------------------------------------------- lean torch path

# Rows per chunk: about this many elements (4 MiB per fp32 temporary). At 32,768 x 600 the
# chunk temporaries add ~0.35 of a logits tensor on top of the gradient (bench: 1.35x in all);
# smaller chunks save memory but issue more, smaller ops (slow on a busy multi-threaded CPU).
_CHUNK_ELEMS = 1 << 20


def _teacher_p(t, pc, T):
    """Mean teacher probability of a chunk, t: [M, n, C] -> p [n, C] (0 on masked entries;
    NaN on rows with nothing unmasked, which callers zero)."""
    p = None
    for k in range(t.shape[0]):
        e = torch.softmax(psi_scaled(t[k], pc, T)[0], -1)
        p = e if p is None else p.add_(e)
    return p.div_(t.shape[0])


def _kl_fwd_torch(student, teacher, prior, T):
    """Sum over rows of KL(p || q) as a 0-dim tensor in the compute dtype; chunked over rows.
    Nothing is kept for backward: it recomputes both softmaxes (one fused op each)."""
    total = torch.zeros((), device=student.device, dtype=torch.float64)
    for s, e, x, t, pc in row_chunks(student, teacher, prior, _CHUNK_ELEMS):
        log_q = torch.log_softmax(psi_scaled(x, pc, T)[0], -1)      # [n, C]
        p = _teacher_p(t, pc, T)                                   # [n, C]
        if pc is not None:
            log_q.masked_fill_(pc.masked, 0.0)
        rows = torch.xlogy(p, p).sub_(p.mul_(log_q)).sum(-1)       # [n]
        if pc is not None:
            rows = rows.masked_fill_(~pc.valid_rows, 0.0)
        total += rows.sum(dtype=torch.float64)
    return total.to(acc_dtype(student.dtype, teacher.dtype))


def _kl_bwd_torch(student, teacher, prior, T, coef):
    """Gradient [N, C] (student dtype) of coef * sum of row KLs w.r.t. the raw student logits,
    coef = g * T^2 / N (a 0-dim tensor), recomputed chunk by chunk."""
    grad = torch.empty_like(student)
    for s, e, x, t, pc in row_chunks(student, teacher, prior, _CHUNK_ELEMS):
        zs, lae = psi_scaled(x, pc, T)
        d = torch.softmax(zs, -1).sub_(_teacher_p(t, pc, T))       # q - p, [n, C]
        d.mul_(coef / T)                                           # d loss / d (Psi / T) / T
        if pc is not None:                                         # times dPsi/dO = exp(-x - lae)
            d.mul_(lae.add_(x).neg_().exp_())
            d.masked_fill_(pc.masked, 0.0)
            if not bool(pc.valid_rows.all()):                      # rows with nothing unmasked
                d.masked_fill_(~pc.valid_rows[:, None], 0.0)
        grad[s:e] = d
    return grad


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:
    @triton.jit
    def _row_stats_tl(X, Pr, rows64, mr, N, C, inv_T, HAS_PRIOR: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """Online softmax statistics over the class blocks of BLOCK_N rows: (row max m,
        log sum exp(z - m)); m = -inf for rows with nothing unmasked."""
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        ssum = tl.zeros([BLOCK_N], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            off, m2, log_p, log_1mp, keep, z, x, lae = class_tile(X, Pr, rows64, mr, c0, C, inv_T,
                                                                  HAS_PRIOR, BLOCK_C)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            ssum = ssum * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
            m = m_new
        return m, tl.log(ssum)

    @triton.jit
    def _load_stats(St, rows, mr, N):
        """(max, log-sum) of BLOCK_N rows from a [2, N] stats block; max made finite (0) for
        empty rows, whose entries are all masked anyway."""
        m = tl.load(St + rows, mask=mr, other=float("-inf"))
        ls = tl.load(St + N + rows, mask=mr, other=0.0)
        valid = m > float("-inf")
        return tl.where(valid, m, 0.0), tl.where(valid, ls, 0.0), valid

    @triton.jit
    def _teacher_tile(Tt, StT, rows, mr, off, m2, log_p, log_1mp, keep, N, M, stride_tm, inv_T,
                      HAS_PRIOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """Mean over the M teachers of softmax(Psi(t)/T) on one tile; 0 on masked entries."""
        p = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for mi in range(M):
            zt, x, lae = psi_tile(Tt + mi * stride_tm, off, m2, log_p, log_1mp, keep, inv_T, HAS_PRIOR)
            mt, lt, vt = _load_stats(StT + mi * 2 * N, rows, mr, N)
            p += tl.exp((zt - mt[:, None]) - lt[:, None])
        return p / M

    @triton.jit
    def _kl_fwd_kernel(S, Tt, Pr, LossRows, StS, StT, N, C, M, stride_tm, inv_T,
                       HAS_PRIOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per-row KL(p_t || q_s) of BLOCK_N rows -> LossRows [N]; also the softmax statistics
        StS [2, N] of the student and StT [M, 2, N] of the teachers (max, log-sum)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mr = rows < N
        rows64 = rows.to(tl.int64)
        # pass 1: online softmax statistics of the student and of each teacher
        ms, ls = _row_stats_tl(S, Pr, rows64, mr, N, C, inv_T, HAS_PRIOR, BLOCK_N, BLOCK_C)
        tl.store(StS + rows, ms, mask=mr)
        tl.store(StS + N + rows, ls, mask=mr)
        for mi in range(M):
            mt, lt = _row_stats_tl(Tt + mi * stride_tm, Pr, rows64, mr, N, C, inv_T, HAS_PRIOR,
                                   BLOCK_N, BLOCK_C)
            tl.store(StT + mi * 2 * N + rows, mt, mask=mr)
            tl.store(StT + mi * 2 * N + N + rows, lt, mask=mr)
        # The teachers' statistics were stored by this program's threads in a register layout that
        # need not match the one _teacher_tile reads them back in: without a barrier a thread can
        # read a row's statistics before another thread's store lands (seen on an H200: wrong loss,
        # right gradient, for M = 1). The Triton interpreter runs sequentially and cannot show it.
        tl.debug_barrier()
        # pass 2: sum_c p log p - p log q over the unmasked classes
        valid = ms > float("-inf")
        ms = tl.where(valid, ms, 0.0)
        ls = tl.where(valid, ls, 0.0)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            off, m2, log_p, log_1mp, keep, zs, x, lae = class_tile(S, Pr, rows64, mr, c0, C, inv_T,
                                                                   HAS_PRIOR, BLOCK_C)
            p = _teacher_tile(Tt, StT, rows, mr, off, m2, log_p, log_1mp, keep, N, M, stride_tm,
                              inv_T, HAS_PRIOR, BLOCK_N, BLOCK_C)
            log_p = tl.log(tl.where(p > 0.0, p, 1.0))
            log_q = (zs - ms[:, None]) - ls[:, None]
            term = tl.where(keep, p * (log_p - log_q), 0.0)
            acc += tl.sum(term, axis=1)
        tl.store(LossRows + rows, tl.where(valid, acc, 0.0), mask=mr)

    @triton.jit
    def _kl_bwd_kernel(S, Tt, Pr, StS, StT, G, dS, N, C, M, stride_tm, inv_T, coef,
                       HAS_PRIOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """dS = g * coef * (q - p) * dPsi/dO on unmasked entries of valid rows, else 0;
        coef = T / N, g the upstream gradient (a 0-dim tensor, read here: no host sync)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mr = rows < N
        rows64 = rows.to(tl.int64)
        scale = tl.load(G).to(tl.float32) * coef
        ms, ls, valid = _load_stats(StS, rows, mr, N)
        for c0 in range(0, C, BLOCK_C):
            off, m2, log_p, log_1mp, keep, zs, x, lae = class_tile(S, Pr, rows64, mr, c0, C, inv_T,
                                                                   HAS_PRIOR, BLOCK_C)
            q = tl.exp((zs - ms[:, None]) - ls[:, None])
            p = _teacher_tile(Tt, StT, rows, mr, off, m2, log_p, log_1mp, keep, N, M, stride_tm,
                              inv_T, HAS_PRIOR, BLOCK_N, BLOCK_C)
            d = (q - p) * scale
            if HAS_PRIOR:
                d = d * tl.exp(-x - lae)
            d = tl.where(keep & valid[:, None], d, 0.0)
            tl.store(dS + off, d.to(dS.dtype.element_ty), mask=m2)


def _kl_fwd_triton(student, teacher, prior, T, blocks):
    M, N, C = teacher.shape
    check_launch("kl_distill", student, teacher, *([] if prior is None else [prior]))
    dev = student.device
    loss_rows = torch.empty(N, device=dev, dtype=torch.float32)
    st_s = torch.empty(2, N, device=dev, dtype=torch.float32)
    st_t = torch.empty(M, 2, N, device=dev, dtype=torch.float32)
    bn, bc = row_blocks("kl_distill", N, C, blocks)
    _kl_fwd_kernel[(triton.cdiv(N, bn),)](
        student, teacher, student if prior is None else prior, loss_rows, st_s, st_t,
        N, C, M, N * C, 1.0 / T, HAS_PRIOR=prior is not None, BLOCK_N=bn, BLOCK_C=bc)
    return loss_rows.sum(), st_s, st_t


def _kl_bwd_triton(student, teacher, prior, T, st_s, st_t, g, blocks):
    M, N, C = teacher.shape
    grad = torch.empty_like(student)
    bn, bc = row_blocks("kl_distill", N, C, blocks)
    _kl_bwd_kernel[(triton.cdiv(N, bn),)](
        student, teacher, student if prior is None else prior, st_s, st_t,
        g.reshape(1).contiguous(), grad, N, C, M, N * C, 1.0 / T, T / max(N, 1),
        HAS_PRIOR=prior is not None, BLOCK_N=bn, BLOCK_C=bc)
    return grad


# ----------------------------------------------------------------------------- autograd

class KLDistillFunction(torch.autograd.Function):
    """(student [N, C], teacher [M, N, C], prior [N, C] or None) -> loss []. Saves the inputs
    (no copies) and, for the Triton path, the softmax statistics st_s [2, N], st_t [M, 2, N]
    (row max, log-sum; fp32); gradient to the student only."""

    @staticmethod
    @autocast_off
    def forward(ctx, student, teacher, prior, T, use_triton, blocks):
        M, N, C = teacher.shape
        st_s = st_t = None
        if N == 0:
            total = student.new_zeros((), dtype=torch.float32)
        elif use_triton:
            total, st_s, st_t = _kl_fwd_triton(student, teacher, prior, T, blocks)
        else:
            total = _kl_fwd_torch(student, teacher, prior, T)
        ctx.save_for_backward(student, teacher, prior, st_s, st_t)
        ctx.T, ctx.use_triton, ctx.blocks = T, use_triton, blocks
        return (total * (T * T / max(N, 1))).to(student.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, g):
        student, teacher, prior, st_s, st_t = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        T, N = ctx.T, student.shape[0]
        if N == 0:
            grad = torch.zeros_like(student)
        elif ctx.use_triton:
            grad = _kl_bwd_triton(student, teacher, prior, T, st_s, st_t, g, ctx.blocks)
        else:
            acc = acc_dtype(student.dtype, teacher.dtype)
            grad = _kl_bwd_torch(student, teacher, prior, T, g.to(acc) * (T * T / N))
        return grad, None, None, None, None, None


def kl_distill(student, teacher, temperature=1.0, prior=None, impl="auto", *, blocks=None):
    """Fused KL distillation; see kl_distill_reference for the definition.

    student: [N, C]; teacher: [N, C] or [M, N, C]; prior: optional [N, C] in [0, 1].
    Returns a 0-dim tensor in the student's dtype; gradient to the student only.
    blocks: optional (BLOCK_N, BLOCK_C) for the Triton kernels (powers of two).
    """
    check_kd("kl_distill", student, teacher, temperature, prior)
    impl = resolve_impl(impl, student)
    if impl == "reference":
        return kl_distill_reference(student, teacher, temperature, prior)
    use_triton = impl == "triton"
    student, teacher, prior = kd_operands(student, teacher, prior, use_triton)
    return KLDistillFunction.apply(student, teacher, prior, float(temperature), use_triton, blocks)
