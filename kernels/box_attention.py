"""Box-guided cross-attention (the spatial branch of LINK's linking decoder).

Every human-object pair attends to the dense token map of its image. The attention logits get
an additive bias that says, per head, how much to favour tokens that fall inside the human box,
the object box and their union:

    bias[p, h, t] = sum_r strength[h, r] * inside_r(p, t),   r in (human, object, union)
    out[p, h]     = softmax_t(q[p, h] . k[img(p), h, t] * scale + bias[p, h, t]) @ v[img(p), h]

Token t = (row i, col j) of a Gh x Gw grid has centre ((j + 0.5) / Gw, (i + 0.5) / Gh) in
normalised image coordinates. A box is first grown to at least one cell around its centre, so
a degenerate (zero-area) box still covers the token it sits on.

The reference materialises bias and attention, [P, Hd, T] each; the lean torch path and the
Triton kernel recompute the bias from 12 box numbers per pair and never store it.
"""
import torch

from kernels._common import resolve_impl


def grow_boxes(boxes: torch.Tensor, grid_hw) -> torch.Tensor:
    """Grow normalised boxes [..., 4] to at least one grid cell around their centre."""
    gh, gw = grid_hw
    x1, y1, x2, y2 = boxes.unbind(-1)
    xc, yc = (x1 + x2) / 2, (y1 + y2) / 2
    return torch.stack([
        torch.minimum(x1, xc - 0.5 / gw), torch.minimum(y1, yc - 0.5 / gh),
        torch.maximum(x2, xc + 0.5 / gw), torch.maximum(y2, yc + 0.5 / gh),
    ], dim=-1)


def token_centres(grid_hw, device=None, dtype=torch.float32):
    """Centres of the Gh x Gw tokens in row-major order: (cx [T], cy [T])."""
    gh, gw = grid_hw
    ys = (torch.arange(gh, device=device, dtype=dtype) + 0.5) / gh
    xs = (torch.arange(gw, device=device, dtype=dtype) + 0.5) / gw
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
        attn = logits.float().softmax(-1).to(q.dtype)              # [p, Hd, T]
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


def box_attention(q, k, v, pair_image, boxes, strength, grid_hw, scale=None, impl="auto"):
    """Box-guided cross-attention; see the module docstring. Returns [P, Hd, D]."""
    _check(q, k, v, pair_image, boxes, strength, grid_hw)
    impl = resolve_impl(impl, q, k, v)
    if impl == "reference" or q.shape[0] == 0:
        return box_attention_reference(q, k, v, pair_image, boxes, strength, grid_hw, scale)
    # TODO(kernels helper): lean chunked torch path and Triton kernel.
    return box_attention_reference(q, k, v, pair_image, boxes, strength, grid_hw, scale)
