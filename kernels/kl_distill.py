"""Temperature-scaled KL distillation KL(softmax(t/T) || softmax(s/T)), one or many teachers.

Used at three levels in LINK: logits (through the Psi transform below), latent maps and
queries (token-wise: rows are tokens, classes are channels).

Logit level: the detection prior P (UPT: (s_h * s_o)^lambda on the classes the object allows,
0 elsewhere) weights the probability, so the distilled quantity is the logit of the
prior-weighted probability:  Psi(O) = log(P / (1 + exp(-O) - P)) = logit(P * sigmoid(O)).
Entries with P == 0 are impossible classes: they are masked out of both softmaxes.
"""
import torch

from kernels._common import resolve_impl


def psi_transform(logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Psi(O) = log P - log(1 - P + exp(-O)), stable for extreme O and P in [0, 1].

    -inf where P == 0; finite everywhere else, including P == 1 (Psi = O).
    """
    prior = prior.to(logits.dtype)
    return torch.log(prior) - torch.logaddexp(torch.log1p(-prior), -logits)


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


def kl_distill(student, teacher, temperature=1.0, prior=None, impl="auto"):
    """Fused KL distillation; see kl_distill_reference for the definition."""
    impl = resolve_impl(impl, student)
    # TODO(kernels helper): lean chunked torch path and Triton kernel.
    return kl_distill_reference(student, teacher, temperature, prior)
