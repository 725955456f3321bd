"""The prior-weighted logit Psi and the row tiling shared by the ops on [pairs, classes] logits
(kl_distill, kl_distill_sigmoid, focal_loss).

The detection prior P (UPT: (s_h * s_o)^lambda on the classes the object allows, 0 elsewhere)
weights the interaction probability, p = P * sigmoid(O), whose logit is

    Psi(O) = log(P / (1 + exp(-O) - P)) = log P - logaddexp(log(1 - P), -O),
    dPsi/dO = exp(-O) / (1 + exp(-O) - P) = exp(-O - logaddexp(log(1 - P), -O)).

In log space both are exact for O = +-1e4 and P = 1 (Psi = O, dPsi/dO = 1); entries with
P == 0 are impossible classes, masked out by every op. Here: the reference transform, what the
lean torch paths need per row chunk, and the Triton tile helpers.
"""
import torch

from kernels._common import acc_dtype, check_blocks, chunk_rows, tl, triton, triton_constant

_NEG_INF = float("-inf")


def psi_transform(logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Psi(O) = log P - log(1 - P + exp(-O)), stable for extreme O and P in [0, 1].

    -inf where P == 0; finite everywhere else, including P == 1 (Psi = O).
    """
    prior = prior.to(logits.dtype)
    return torch.log(prior) - torch.logaddexp(torch.log1p(-prior), -logits)


def check_kd(op, student, teacher, temperature, prior):
    """The inputs of a logit KD op: student [N, C], teacher [N, C] or [M >= 1, N, C], prior None
    or [N, C], temperature > 0; a ValueError naming the op otherwise."""
    if student.dim() != 2:
        raise ValueError(f"{op}: student must be [N, C], got {tuple(student.shape)}")
    if teacher.dim() not in (2, 3) or teacher.shape[-2:] != student.shape:
        raise ValueError(f"{op}: teacher must be [N, C] or [M, N, C] with [N, C] = "
                         f"{tuple(student.shape)}, got {tuple(teacher.shape)}")
    if teacher.dim() == 3 and teacher.shape[0] == 0:
        raise ValueError(f"{op}: teacher has M = 0 teachers")
    if prior is not None and prior.shape != student.shape:
        raise ValueError(f"{op}: prior must be {tuple(student.shape)}, got {tuple(prior.shape)}")
    if not float(temperature) > 0:
        raise ValueError(f"{op}: temperature must be > 0, got {temperature}")


def kd_operands(student, teacher, prior, use_triton):
    """(student, teacher [M, N, C], prior) as the fused paths take them: teacher and prior
    detached (constants); for the Triton kernels contiguous, the prior as triton_constant."""
    teacher = (teacher if teacher.dim() == 3 else teacher[None]).detach()     # [M, N, C]
    prior = None if prior is None else prior.detach()
    if use_triton:
        student, teacher = student.contiguous(), teacher.contiguous()
        prior = None if prior is None else triton_constant(prior)
    return student, teacher, prior


# ----------------------------------------------------------------------------- lean torch paths

class PriorChunk:
    """What the Psi transform needs from the prior of a row chunk, computed once and shared by
    the student and every teacher: log P, log(1 - P), and the masks."""

    def __init__(self, P):                                         # P: [n, C] in the compute dtype
        self.log_p = torch.log(P)
        self.log_1mp = torch.log1p(-P)
        self.masked = P <= 0                                       # [n, C] bool: P == 0
        self.valid_rows = ~self.masked.all(-1)                     # [n] rows with something unmasked


def psi_scaled(x, pc, T):
    """Scaled logits of a chunk: Psi(x) / T with -inf on masked entries (prior), else x / T.

    x: [n, C] in the compute dtype; pc: PriorChunk or None -> (z [n, C], lae or None) with
    lae = logaddexp(log(1 - P), -x), from which dPsi/dO = exp(-x - lae)."""
    if pc is None:
        return x / T, None
    lae = torch.logaddexp(pc.log_1mp, -x)
    z = torch.sub(pc.log_p, lae).div_(T).masked_fill_(pc.masked, _NEG_INF)
    return z, lae


def row_chunks(student, teacher, prior, chunk_elems):
    """Row chunks (s, e, x [n, C], t [M, n, C], PriorChunk or None) in the compute dtype
    (kernels._common.acc_dtype; fp32 inputs are views, not copies), about chunk_elems each.
    student: [N, C] (the logits that get a gradient); teacher: [M, N, C] (teachers' logits, or
    the focal loss's labels[None])."""
    M, N, C = teacher.shape
    acc = acc_dtype(student.dtype, teacher.dtype)
    step = chunk_rows(C, chunk_elems)
    for s in range(0, N, step):
        e = min(N, s + step)
        pc = None if prior is None else PriorChunk(prior[s:e].to(acc))
        yield s, e, student[s:e].to(acc), teacher[:, s:e].to(acc), pc


# ----------------------------------------------------------------------------- Triton helpers

def row_blocks(op, N, C, blocks):
    """(BLOCK_N, BLOCK_C) of a row-tiled kernel: given, or a 2,048-element tile on a GPU; big
    tiles in the interpreter (each program iteration costs milliseconds there)."""
    if blocks is not None:
        bn, bc = blocks
    elif torch.cuda.is_available():
        bc = min(256, triton.next_power_of_2(max(C, 1)))
        bn = max(1, 2048 // bc)
    else:
        bc = min(1024, triton.next_power_of_2(max(C, 1)))
        bn = min(max(1, 16384 // bc), triton.next_power_of_2(max(N, 1)))
    check_blocks(op, bn, bc)
    return bn, bc


if triton is not None:
    @triton.jit
    def logaddexp(a, b):
        mx = tl.maximum(a, b)
        mn = tl.minimum(a, b)
        return mx + tl.log(1.0 + tl.exp(mn - mx))

    @triton.jit
    def class_tile(X, Pr, rows64, mr, c0, C, inv_T, HAS_PRIOR: tl.constexpr, BLOCK_C: tl.constexpr):
        """The class tile c0 .. c0 + BLOCK_C of a block of rows (rows64 [BLOCK_N], mask mr):
        (off, m2, log P, log(1 - P), keep, Psi-logits z, raw logits x, lae) as prior_tile and
        psi_tile give them: the prologue of every class-tile loop of the two KL ops' kernels."""
        cols = c0 + tl.arange(0, BLOCK_C)
        m2 = mr[:, None] & (cols < C)[None, :]
        off = rows64[:, None] * C + cols[None, :]
        log_p, log_1mp, keep = prior_tile(Pr, off, m2, HAS_PRIOR)
        z, x, lae = psi_tile(X, off, m2, log_p, log_1mp, keep, inv_T, HAS_PRIOR)
        return off, m2, log_p, log_1mp, keep, z, x, lae

    @triton.jit
    def softplus(x):
        """log(1 + exp(x)), exact for |x| large (no overflow)."""
        return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))

    @triton.jit
    def prior_tile(Pr, off, m2, HAS_PRIOR: tl.constexpr):
        """(log P, log(1 - P), keep = P > 0) of a tile, shared by the student and the teachers;
        without a prior keep = the in-bounds mask (the two logs are unused placeholders)."""
        if HAS_PRIOR:
            pr = tl.load(Pr + off, mask=m2, other=0.0).to(tl.float32)
            log_p = tl.log(pr)
            log_1mp = tl.log(1.0 - pr)
            keep = m2 & (pr > 0.0)
        else:
            log_p = m2
            log_1mp = m2
            keep = m2
        return log_p, log_1mp, keep

    @triton.jit
    def psi_tile(X, off, m2, log_p, log_1mp, keep, inv_T, HAS_PRIOR: tl.constexpr):
        """Scaled, Psi-transformed, masked logits of a tile in fp32 (-inf where masked); also x
        and lae = logaddexp(log(1 - P), -x), from which dPsi/dO = exp(-x - lae)."""
        x = tl.load(X + off, mask=m2, other=0.0).to(tl.float32)
        if HAS_PRIOR:
            lae = logaddexp(log_1mp, -x)
            z = (log_p - lae) * inv_T
        else:
            lae = x
            z = x * inv_T
        z = tl.where(keep, z, float("-inf"))
        return z, x, lae
