"""Pair enumeration: pair queries W1 Q_i + W2 Q_j + b and pairwise spatial features.

LINK pairs every human i with every other box j (objects and other humans). The pair query is
Linear([Q_i, Q_j]) written as W1 Q_i + W2 Q_j + b, so no [P, 2D] concatenation is built, and
the UPT-style spatial relation vector of the two boxes is computed alongside.
"""
import torch

from kernels._common import resolve_impl

NUM_SPATIAL = 36  # 18 terms and their logs


def spatial_features(boxes_h: torch.Tensor, boxes_o: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """UPT-style pairwise spatial features from normalised boxes [P, 4] -> [P, 36].

    The 18 terms: centres and sizes of both boxes (8), both areas (2), area ratio o/h (1),
    both aspect ratios w/h (2), IoU (1), and the signed horizontal and vertical centre offsets
    normalised by the human box size, split into their positive and negative parts (4) so
    that every term is non-negative and has a log. Then f and log(f + eps) are concatenated.
    """
    bh, bo = boxes_h.float(), boxes_o.float()
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
        cxh, cyh, wh, hh, cxo, cyo, wo, ho,
        ah, ao, ao / (ah + eps), wh / (hh + eps), wo / (ho + eps), iou,
        dx.clamp(min=0), (-dx).clamp(min=0), dy.clamp(min=0), (-dy).clamp(min=0),
    ], dim=1)                                                     # [P, 18]
    return torch.cat([f, torch.log(f + eps)], dim=1)              # [P, 36]


def pair_enum_reference(q, boxes, idx_h, idx_o, w1, w2, b):
    """Plain definition. q: [N, D], boxes: [N, 4] normalised, idx_h/idx_o: Long[P],
    w1, w2: [Do, D], b: [Do] -> (pair_q [P, Do], spatial [P, 36])."""
    pair_q = q[idx_h] @ w1.t() + q[idx_o] @ w2.t() + b
    return pair_q, spatial_features(boxes[idx_h], boxes[idx_o])


def pair_enum(q, boxes, idx_h, idx_o, w1, w2, b, impl="auto"):
    """Pair queries and spatial features for the pairs (idx_h[p], idx_o[p])."""
    impl = resolve_impl(impl, q)
    # TODO(kernels helper): lean torch path and Triton kernel.
    return pair_enum_reference(q, boxes, idx_h, idx_o, w1, w2, b)
