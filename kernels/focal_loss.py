"""Fused sigmoid focal loss on the prior-weighted probability p = P * sigmoid(O): UPT's interaction
loss and the training loss of model.py (LINK's forward calls it with cfg.impl):

    loss = sum_{P > 0} (-alpha (1-p)^gamma log p if label > 0 else -(1-alpha) p^gamma log(1-p)) / max(#positives, 1)

computed in log space (finite for logits of +-1e4 and priors of 0 or 1); entries with P == 0 are skipped.
Three implementations (``impl=``):
- "reference": focal_loss_reference, plain differentiable PyTorch (the formula model.py used before).
- "torch": row chunks; the forward keeps only its inputs and the positive count, the backward recomputes.
- "triton": a forward kernel (per-row loss sums and positive counts) and a backward kernel (the gradient).
Both fused paths run inside one autograd.Function, FocalLossFunction; focal_loss is the public op. Only the logits
get a gradient.
Specification (log-space formulas, gradient, chunking, dtypes): docs/kernels.md#focal_loss.
Tests: tests/test_focal_loss.py (hand-computed values), tests/test_memory.py (the model's loss against the
reference). Benchmark: bench/kernels.py (`python -m bench.kernels`).
"""
import torch
import torch.nn.functional as F

from kernels._common import (
    FLOAT_DTYPES,
    acc_dtype,
    autocast_off,
    check_launch,
    resolve_impl,
    tl,
    triton,
    triton_constant,
)
from kernels._psi import row_blocks, row_chunks

if triton is not None:
    from kernels._psi import logaddexp, prior_tile, softplus


def focal_loss_reference(logits, prior, labels, alpha=0.5, gamma=0.2):
    """UPT's focal loss on the prior-weighted probability p = P * sigmoid(O), summed over
    entries with P > 0, divided by max(number of positives, 1). All inputs [P, K].

    Computed in log space so that it is finite and has finite gradients for logits of
    +-1e4 and priors of exactly 0 or 1:
        log p     = log P - softplus(-O)
        log(1-p)  = logaddexp(log(1 - P), -O) - softplus(-O)
        loss      = -alpha (1-p)^gamma log p          (label 1)
                    -(1 - alpha) p^gamma log(1-p)     (label 0)
    with x^gamma = exp(gamma log x). Entries with P = 0 are impossible classes: skipped.
    """
    keep = prior > 0
    o = torch.where(keep, logits, torch.zeros_like(logits))       # no NaN gradient through skipped
    P = torch.where(keep, prior, torch.ones_like(prior)).to(o.dtype)
    sp = F.softplus(-o)
    log_p = torch.log(P) - sp
    log_1mp = torch.logaddexp(torch.log1p(-P), -o) - sp
    pos = -alpha * torch.exp(gamma * log_1mp) * log_p
    neg = -(1 - alpha) * torch.exp(gamma * log_p) * log_1mp
    loss = torch.where(labels > 0, pos, neg)
    n_pos = (labels[keep] > 0).sum().clamp(min=1)
    return torch.where(keep, loss, torch.zeros_like(loss)).sum() / n_pos


# ----------------------------------------------------------------------------- lean torch path

# Rows per chunk: about this many elements (2 MiB per fp32 temporary; about ten live at once).
_CHUNK_ELEMS = 1 << 19


def _chunk_logs(x, pc):
    """(O, log p, log(1-p), lae) of a chunk in the compute dtype; O = 0 where P == 0 (as the
    reference), whose entries the callers drop."""
    o = x.masked_fill(pc.masked, 0.0)
    sp = F.softplus(-o)
    lae = torch.logaddexp(pc.log_1mp, -o)
    return o, pc.log_p - sp, lae - sp, lae


def _fwd_torch(logits, prior, labels, alpha, gamma):
    """(sum of the kept entries' losses, number of kept positives), 0-dim, compute dtype."""
    acc = acc_dtype(logits.dtype)
    total = torch.zeros((), device=logits.device, dtype=acc)
    n_pos = torch.zeros((), device=logits.device, dtype=acc)
    for s, e, x, lab, pc in row_chunks(logits, labels[None], prior, _CHUNK_ELEMS):
        o, l0, l1, _ = _chunk_logs(x, pc)
        pos = lab[0] > 0
        loss = torch.where(pos, (gamma * l1).exp_().mul_(l0).mul_(-alpha),
                           (gamma * l0).exp_().mul_(l1).mul_(alpha - 1))
        total += loss.masked_fill_(pc.masked, 0.0).sum()
        n_pos += pos.masked_fill_(pc.masked, False).sum()
    return total, n_pos


def _bwd_torch(logits, prior, labels, alpha, gamma, scale):
    """Gradient [N, C] (logits' dtype) of scale * (sum of the kept entries' losses)."""
    grad = torch.empty_like(logits)
    for s, e, x, lab, pc in row_chunks(logits, labels[None], prior, _CHUNK_ELEMS):
        o, l0, l1, lae = _chunk_logs(x, pc)
        d0 = torch.sigmoid(-o)                                             # d log p / dO
        d1 = torch.sub(pc.log_p, F.softplus(o)).sub_(lae).exp_().neg_()   # d log(1-p) / dO
        dpos = (gamma * l1).exp_().mul_(torch.addcmul(d0, d1, l0, value=gamma)).mul_(-alpha)
        dneg = (gamma * l0).exp_().mul_(torch.addcmul(d1, d0, l1, value=gamma)).mul_(alpha - 1)
        d = torch.where(lab[0] > 0, dpos, dneg).mul_(scale)
        grad[s:e] = d.masked_fill_(pc.masked, 0.0)
    return grad


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:
    @triton.jit
    def _focal_tile(L, Pr, Lab, off, m2):
        """What both kernels need on a tile (fp32): O (0 where P == 0), log p, log(1-p), log P,
        lae = logaddexp(log(1 - P), -O), label > 0, keep = P > 0 (and in bounds)."""
        log_P, log_1mP, keep = prior_tile(Pr, off, m2, True)
        o = tl.where(keep, tl.load(L + off, mask=m2, other=0.0).to(tl.float32), 0.0)
        log_P = tl.where(keep, log_P, 0.0)                       # P -> 1 where skipped, as the reference
        log_1mP = tl.where(keep, log_1mP, float("-inf"))
        sp = softplus(-o)
        lae = logaddexp(log_1mP, -o)
        pos = tl.load(Lab + off, mask=m2, other=0).to(tl.float32) > 0.0
        return o, log_P - sp, lae - sp, log_P, lae, pos, keep

    @triton.jit
    def _focal_fwd_kernel(L, Pr, Lab, LossRows, PosRows, N, C, alpha, gamma,
                          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per-row sums of the kept entries' losses -> LossRows [N], kept positives -> PosRows [N]."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mr = rows < N
        rows64 = rows.to(tl.int64)
        acc = tl.zeros([BLOCK_N], tl.float32)
        npos = tl.zeros([BLOCK_N], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m2 = mr[:, None] & (cols < C)[None, :]
            off = rows64[:, None] * C + cols[None, :]
            o, l0, l1, log_P, lae, pos, keep = _focal_tile(L, Pr, Lab, off, m2)
            loss = tl.where(pos, -alpha * tl.exp(gamma * l1) * l0, (alpha - 1.0) * tl.exp(gamma * l0) * l1)
            acc += tl.sum(tl.where(keep, loss, 0.0), axis=1)
            npos += tl.sum(tl.where(keep & pos, 1.0, 0.0), axis=1)
        tl.store(LossRows + rows, acc, mask=mr)
        tl.store(PosRows + rows, npos, mask=mr)

    @triton.jit
    def _focal_bwd_kernel(L, Pr, Lab, Scale, dL, N, C, alpha, gamma,
                          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """dL = Scale * d(entry loss)/dO on kept entries, else 0; Scale = g / max(n_pos, 1), a
        0-dim fp32 tensor read here (no host sync)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mr = rows < N
        rows64 = rows.to(tl.int64)
        scale = tl.load(Scale)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m2 = mr[:, None] & (cols < C)[None, :]
            off = rows64[:, None] * C + cols[None, :]
            o, l0, l1, log_P, lae, pos, keep = _focal_tile(L, Pr, Lab, off, m2)
            d0 = tl.exp(-softplus(o))                                    # d log p / dO
            d1 = -tl.exp(log_P - softplus(o) - lae)                       # d log(1-p) / dO
            dpos = -alpha * tl.exp(gamma * l1) * (gamma * d1 * l0 + d0)
            dneg = (alpha - 1.0) * tl.exp(gamma * l0) * (gamma * d0 * l1 + d1)
            d = tl.where(keep, tl.where(pos, dpos, dneg) * scale, 0.0)
            tl.store(dL + off, d.to(dL.dtype.element_ty), mask=m2)


def _fwd_triton(logits, prior, labels, alpha, gamma, blocks):
    """Launch the forward kernel -> (loss sum, kept positives), 0-dim fp32."""
    N, C = logits.shape
    loss_rows = torch.empty(N, device=logits.device, dtype=torch.float32)
    pos_rows = torch.empty(N, device=logits.device, dtype=torch.float32)
    bn, bc = row_blocks("focal_loss", N, C, blocks)
    _focal_fwd_kernel[(triton.cdiv(N, bn),)](logits, prior, labels, loss_rows, pos_rows, N, C,
                                             float(alpha), float(gamma), BLOCK_N=bn, BLOCK_C=bc)
    return loss_rows.sum(), pos_rows.sum()


def _bwd_triton(logits, prior, labels, alpha, gamma, scale, blocks):
    """Launch the backward kernel -> gradient [N, C] in the logits' dtype."""
    N, C = logits.shape
    grad = torch.empty_like(logits)
    bn, bc = row_blocks("focal_loss", N, C, blocks)
    _focal_bwd_kernel[(triton.cdiv(N, bn),)](logits, prior, labels, scale.float().reshape(1).contiguous(), grad,
                                             N, C, float(alpha), float(gamma), BLOCK_N=bn, BLOCK_C=bc)
    return grad


# ----------------------------------------------------------------------------- autograd

class FocalLossFunction(torch.autograd.Function):
    """(logits [N, C], prior [N, C], labels [N, C]) -> loss [] in the logits' dtype. Saves the
    inputs (no copies) and the 0-dim positive count; gradient to the logits only."""

    @staticmethod
    @autocast_off
    def forward(ctx, logits, prior, labels, alpha, gamma, use_triton, blocks):
        if logits.numel() == 0:
            total = n_pos = logits.new_zeros((), dtype=acc_dtype(logits.dtype))
        elif use_triton:
            total, n_pos = _fwd_triton(logits, prior, labels, alpha, gamma, blocks)
        else:
            total, n_pos = _fwd_torch(logits, prior, labels, alpha, gamma)
        n_pos = n_pos.clamp(min=1)
        ctx.save_for_backward(logits, prior, labels, n_pos)
        ctx.meta = (alpha, gamma, use_triton, blocks)
        return (total / n_pos).to(logits.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    @autocast_off
    def backward(ctx, g):
        logits, prior, labels, n_pos = ctx.saved_tensors
        alpha, gamma, use_triton, blocks = ctx.meta
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        scale = g.to(n_pos.dtype) / n_pos                                  # 0-dim, no host sync
        if logits.numel() == 0:
            grad = torch.zeros_like(logits)
        elif use_triton:
            grad = _bwd_triton(logits, prior, labels, alpha, gamma, scale, blocks)
        else:
            grad = _bwd_torch(logits, prior, labels, alpha, gamma, scale)
        return grad, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public op

def _check(logits, prior, labels):
    if logits.dim() != 2:
        raise ValueError(f"focal_loss: logits must be [N, C], got {tuple(logits.shape)}")
    for name, t in (("prior", prior), ("labels", labels)):
        if t.shape != logits.shape:
            raise ValueError(f"focal_loss: {name} must be {tuple(logits.shape)} like the logits, got {tuple(t.shape)}")


def focal_loss(logits, prior, labels, alpha=0.5, gamma=0.2, impl="auto", *, blocks=None):
    """Fused focal loss (model.py's training loss); the definition is focal_loss_reference.

    logits: [N, C] raw logits O; prior: [N, C] in [0, 1] (P == 0 skips the entry);
    labels: [N, C] (> 0 = positive; float, bool or integer). Returns the sum over kept entries
    divided by max(kept positives, 1), 0-dim in the logits' dtype; gradient to the logits only.
    blocks: optional (BLOCK_N, BLOCK_C) for the Triton kernels (powers of two).
    """
    _check(logits, prior, labels)
    impl = resolve_impl(impl, logits)
    if impl == "reference":
        return focal_loss_reference(logits, prior, labels, alpha, gamma)
    prior, labels = prior.detach(), labels.detach()
    use_triton = impl == "triton"
    if use_triton:   # constants: read as fp32 / fp16 / bf16 or uint8, whatever they came as
        logits = logits.contiguous()
        prior = triton_constant(prior)
        labels = (labels if labels.dtype in FLOAT_DTYPES + (torch.uint8,) else (labels > 0).to(torch.uint8))
        labels = labels.contiguous()
        check_launch("focal_loss", logits, prior)
        check_launch("focal_loss", labels, dtypes=FLOAT_DTYPES + (torch.uint8,))
    return FocalLossFunction.apply(logits, prior, labels, float(alpha), float(gamma), use_triton, blocks)
