"""Per-class Bernoulli (sigmoid) KL distillation of interaction logits: LINK's logit-level KD.

    loss_n = T^2 * sum_{c: P[n, c] > 0} KL(Bern(p[n, c]) || Bern(q[n, c])),
    p = mean_m sigmoid(Psi(t_m) / T),   q = sigmoid(Psi(s) / T)

Psi = logit(P * sigmoid(O)) the prior-weighted logit (kernels/_psi.py; Psi = O without a prior). Unlike the softmax
form (kernels/kl_distill.py) it keeps what is common to a pair's classes. Not normalised: reduction="sum" returns
the sum over pairs, "none" the per-pair sums [N]; the caller divides. Three implementations (``impl=``):
- "reference": kl_distill_sigmoid_reference, the definition in plain differentiable PyTorch.
- "torch": row chunks; the forward keeps only references to its inputs, the backward recomputes per chunk.
- "triton": a forward kernel (per-row sums) and a backward kernel (the gradient).
Both fused paths run inside one autograd.Function, KLDistillSigmoidFunction; kl_distill_sigmoid is the public op.
The loss comes back in the compute dtype (fp32), the gradient (student only) in the student's dtype.
Specification (the form exact at the extremes, gradient, chunking, dtypes): docs/kernels.md#kl_distill_sigmoid.
Tests: tests/test_kl_distill_sigmoid.py. Benchmark: bench/kernels.py (`python -m bench.kernels`).
"""
import torch
import torch.nn.functional as F

from kernels._common import acc_dtype, autocast_off, check_launch, resolve_impl, tl, triton
from kernels._psi import check_kd, kd_operands, psi_scaled, psi_transform, row_blocks, row_chunks

if triton is not None:
    from kernels._psi import class_tile, psi_tile, softplus

REDUCTIONS = ("sum", "none")


def kl_distill_sigmoid_reference(student, teacher, temperature=1.0, prior=None, reduction="sum"):
    """Plain definition (see the module docstring).

    student: [N, C]; teacher: [N, C] or [M, N, C]; prior: optional [N, C] in [0, 1].
    Returns T^2 * sum of the allowed classes' Bernoulli KLs: per pair [N] (reduction="none")
    or summed over pairs, 0-dim (reduction="sum").
    """
    T = float(temperature)
    t = (teacher if teacher.dim() == 3 else teacher[None]).detach()     # [M, N, C]
    if prior is not None:
        zs, zt = psi_transform(student, prior) / T, psi_transform(t, prior[None]) / T
        mask = prior > 0                                                 # [N, C]
    else:
        zs, zt = student / T, t / T
        mask = torch.ones_like(student, dtype=torch.bool)
    zs = torch.where(mask, zs, torch.zeros_like(zs))                     # masked: finite, left out below
    zt = torch.where(mask[None], zt, torch.zeros_like(zt))
    p, pbar = torch.sigmoid(zt).mean(0), torch.sigmoid(-zt).mean(0)      # [N, C]
    p, pbar = p.to(zs.dtype), pbar.to(zs.dtype)
    term = (p * F.softplus(-zs) + pbar * F.softplus(zs)                  # - p log q - (1-p) log(1-q)
            + torch.xlogy(p, p) + torch.xlogy(pbar, pbar))
    rows = torch.where(mask, term, torch.zeros_like(term)).sum(-1) * (T * T)   # [N]
    return rows if reduction == "none" else rows.sum()


# ----------------------------------------------------------------------------- lean torch path

# Rows per chunk: about this many elements (2 MiB per fp32 temporary). Forward and backward
# hold about eight chunk temporaries at once; at 32,768 x 600 with 2^20-element chunks the
# step peaked at 1.45x one logits tensor (2 teachers), with 2^19 at 1.23x (gradient included).
_CHUNK_ELEMS = 1 << 19


def _teacher_bern(t, pc, T):
    """(p, pbar) [n, C] of a chunk: mean over the teachers t [M, n, C] of sigmoid(+-Psi(t) / T);
    masked entries hold (0, 1) and are left out by the callers."""
    p = pbar = None
    for k in range(t.shape[0]):
        z = psi_scaled(t[k], pc, T)[0]
        if p is None:
            p, pbar = torch.sigmoid(z), z.neg_().sigmoid_()
        else:
            p.add_(torch.sigmoid(z))
            pbar.add_(z.neg_().sigmoid_())
    return p.div_(t.shape[0]), pbar.div_(t.shape[0])


def _fwd_torch(student, teacher, prior, T):
    """Per-pair sums of the Bernoulli KLs (without the T^2) [N] in the compute dtype."""
    rows = torch.empty(student.shape[0], device=student.device, dtype=acc_dtype(student.dtype, teacher.dtype))
    for s, e, x, t, pc in row_chunks(student, teacher, prior, _CHUNK_ELEMS):
        p, pbar = _teacher_bern(t, pc, T)
        zs = psi_scaled(x, pc, T)[0]
        term = torch.xlogy(p, p).add_(torch.xlogy(pbar, pbar))
        term.add_(p.mul_(F.softplus(-zs))).add_(pbar.mul_(F.softplus(zs)))
        if pc is not None:
            term.masked_fill_(pc.masked, 0.0)                            # NaN (0 * inf) there
        rows[s:e] = term.sum(-1)
    return rows


def _bwd_torch(student, teacher, prior, T, g_rows):
    """Gradient [N, C] (student dtype) of sum_n g_rows[n] * T^2 * loss_n w.r.t. the raw
    student logits, recomputed chunk by chunk: g * T * (pbar q - p qbar) * dPsi/dO."""
    grad = torch.empty_like(student)
    for s, e, x, t, pc in row_chunks(student, teacher, prior, _CHUNK_ELEMS):
        p, pbar = _teacher_bern(t, pc, T)                                # teachers first: fewer live temporaries
        zs, lae = psi_scaled(x, pc, T)
        d = pbar.mul_(torch.sigmoid(zs)).sub_(p.mul_(zs.neg_().sigmoid_()))   # q - p, [n, C]
        d.mul_(g_rows[s:e, None] * T)
        if pc is not None:                                               # times dPsi/dO = exp(-x - lae)
            d.mul_(lae.add_(x).neg_().exp_())
            d.masked_fill_(pc.masked, 0.0)
        grad[s:e] = d
    return grad


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:
    @triton.jit
    def _teacher_bern_tile(Tt, off, m2, log_p, log_1mp, keep, M, stride_tm, inv_T,
                           HAS_PRIOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """(p, pbar) of a tile: mean over the M teachers of sigmoid(+-Psi(t) / T); masked
        entries (0, 1)."""
        p = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        pbar = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for mi in range(M):
            zt, x, lae = psi_tile(Tt + mi * stride_tm, off, m2, log_p, log_1mp, keep, inv_T, HAS_PRIOR)
            p += tl.sigmoid(zt)
            pbar += tl.sigmoid(-zt)
        return p / M, pbar / M

    @triton.jit
    def _bkl_fwd_kernel(S, Tt, Pr, LossRows, N, C, M, stride_tm, inv_T,
                        HAS_PRIOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per-row sums over the allowed classes of the Bernoulli KL (without T^2) -> LossRows [N]."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mr = rows < N
        rows64 = rows.to(tl.int64)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            off, m2, log_p, log_1mp, keep, zs, x, lae = class_tile(S, Pr, rows64, mr, c0, C, inv_T,
                                                                   HAS_PRIOR, BLOCK_C)
            p, pbar = _teacher_bern_tile(Tt, off, m2, log_p, log_1mp, keep, M, stride_tm, inv_T,
                                         HAS_PRIOR, BLOCK_N, BLOCK_C)
            zs = tl.where(keep, zs, 0.0)
            term = p * softplus(-zs) + pbar * softplus(zs)
            term += tl.where(p > 0.0, p * tl.log(p), 0.0) + tl.where(pbar > 0.0, pbar * tl.log(pbar), 0.0)
            acc += tl.sum(tl.where(keep, term, 0.0), axis=1)
        tl.store(LossRows + rows, acc, mask=mr)

    @triton.jit
    def _bkl_bwd_kernel(S, Tt, Pr, G, dS, N, C, M, stride_tm, inv_T, T,
                        HAS_PRIOR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """dS = G[row] * T * (pbar q - p qbar) * dPsi/dO on allowed entries, else 0; G [N] fp32."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mr = rows < N
        rows64 = rows.to(tl.int64)
        scale = tl.load(G + rows, mask=mr, other=0.0) * T
        for c0 in range(0, C, BLOCK_C):
            off, m2, log_p, log_1mp, keep, zs, x, lae = class_tile(S, Pr, rows64, mr, c0, C, inv_T,
                                                                   HAS_PRIOR, BLOCK_C)
            p, pbar = _teacher_bern_tile(Tt, off, m2, log_p, log_1mp, keep, M, stride_tm, inv_T,
                                         HAS_PRIOR, BLOCK_N, BLOCK_C)
            zs = tl.where(keep, zs, 0.0)
            d = (pbar * tl.sigmoid(zs) - p * tl.sigmoid(-zs)) * scale[:, None]
            if HAS_PRIOR:
                d = d * tl.exp(-x - lae)
            d = tl.where(keep, d, 0.0)
            tl.store(dS + off, d.to(dS.dtype.element_ty), mask=m2)


def _fwd_triton(student, teacher, prior, T, blocks):
    """Launch the forward kernel -> per-pair sums [N] fp32 (without the T^2)."""
    M, N, C = teacher.shape
    check_launch("kl_distill_sigmoid", student, teacher, *([] if prior is None else [prior]))
    rows = torch.empty(N, device=student.device, dtype=torch.float32)
    bn, bc = row_blocks("kl_distill_sigmoid", N, C, blocks)
    _bkl_fwd_kernel[(triton.cdiv(N, bn),)](
        student, teacher, student if prior is None else prior, rows, N, C, M, N * C, 1.0 / T,
        HAS_PRIOR=prior is not None, BLOCK_N=bn, BLOCK_C=bc)
    return rows


def _bwd_triton(student, teacher, prior, T, g_rows, blocks):
    """Launch the backward kernel -> gradient [N, C] in the student's dtype."""
    M, N, C = teacher.shape
    grad = torch.empty_like(student)
    bn, bc = row_blocks("kl_distill_sigmoid", N, C, blocks)
    _bkl_bwd_kernel[(triton.cdiv(N, bn),)](
        student, teacher, student if prior is None else prior, g_rows.float().contiguous(), grad,
        N, C, M, N * C, 1.0 / T, T, HAS_PRIOR=prior is not None, BLOCK_N=bn, BLOCK_C=bc)
    return grad


# ----------------------------------------------------------------------------- autograd

class KLDistillSigmoidFunction(torch.autograd.Function):
    """(student [N, C], teacher [M, N, C], prior [N, C] or None) -> T^2 * per-pair sums [N] in
    the compute dtype (fp32, fp64 for fp64 inputs on the torch path), so that the sum over
    pairs is taken before any rounding to a half dtype. Saves the inputs only (no copies);
    gradient to the student only."""

    @staticmethod
    @autocast_off
    def forward(ctx, student, teacher, prior, T, use_triton, blocks):
        N = student.shape[0]
        if N == 0:
            rows = student.new_zeros(0, dtype=acc_dtype(student.dtype, teacher.dtype))
        elif use_triton:
            rows = _fwd_triton(student, teacher, prior, T, blocks)
        else:
            rows = _fwd_torch(student, teacher, prior, T)
        ctx.save_for_backward(student, teacher, prior)
        ctx.T, ctx.use_triton, ctx.blocks = T, use_triton, blocks
        return rows * (T * T)

    @staticmethod
    @torch.autograd.function.once_differentiable
    @autocast_off
    def backward(ctx, g_rows):
        student, teacher, prior = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        if student.shape[0] == 0:
            grad = torch.zeros_like(student)
        elif ctx.use_triton:
            grad = _bwd_triton(student, teacher, prior, ctx.T, g_rows, ctx.blocks)
        else:
            grad = _bwd_torch(student, teacher, prior, ctx.T, g_rows)
        return grad, None, None, None, None, None


# ----------------------------------------------------------------------------- public op

def _check(student, teacher, temperature, prior, reduction):
    check_kd("kl_distill_sigmoid", student, teacher, temperature, prior)
    if reduction not in REDUCTIONS:
        raise ValueError(f"kl_distill_sigmoid: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def kl_distill_sigmoid(student, teacher, temperature=1.0, prior=None, impl="auto", *, reduction="sum",
                       blocks=None):
    """Per-class Bernoulli KL distillation; see the module docstring for the definition.

    student: [N, C] raw logits O_s; teacher: [N, C] or [M, N, C] raw logits (M teachers, target
    = mean of their probabilities); prior: optional [N, C] in [0, 1] (Psi transform; P == 0
    masks the class). Returns T^2 * sum over allowed classes of KL(Bern(p) || Bern(q)):
    summed over pairs (reduction="sum", 0-dim) or per pair ([N], reduction="none"), in the
    compute dtype (fp32; fp64 for fp64 inputs): a sum over 3,480 pairs x 600 classes overflows
    fp16 (seen on an H200), so it is never rounded to a half dtype. Not normalised (the caller
    divides). Gradient to the student only, in the student's dtype.
    blocks: optional (BLOCK_N, BLOCK_C) for the Triton kernels (powers of two).
    """
    _check(student, teacher, temperature, prior, reduction)
    impl = resolve_impl(impl, student)
    if impl == "reference":
        return kl_distill_sigmoid_reference(student, teacher, temperature, prior, reduction)
    use_triton = impl == "triton"
    student, teacher, prior = kd_operands(student, teacher, prior, use_triton)
    rows = KLDistillSigmoidFunction.apply(student, teacher, prior, float(temperature), use_triton, blocks)
    return rows if reduction == "none" else rows.sum()
