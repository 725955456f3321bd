"""LINK: a two-stage HOI detector on a frozen vision-language model, in one file. Read top to bottom:

  1. LINKConfig               every hyper-parameter, plain types (stored in checkpoints); the
                              frozen VLM's fields and the VLM itself (FrozenVLM: dense feature
                              map F [B, C, Gh, Gw], text embeddings) live in vlm.py
  2. the geometric encoder    ROI-Align unary queries + box sine PE -> self-attention ->
                              human-other pair queries fused with the pair's spatial features
  3. the linking decoder      per layer: box-guided attention on a low-width latent map
                              (spatial branch) + attention on F (semantic branch); guided by
                              an in-box bias and / or box and token PEs (cfg.box_guidance)
  4. the classifier           FFN whose last layer is the VLM's text embedding of each prompt
  5. scores and loss          UPT prior (s_h s_o)^lambda, Psi, focal loss, label association
  6. LINK                     forward(), postprocess(), from_checkpoint(), cache_key()

Shapes: B images, N detections in the batch (all images concatenated), P pairs in the batch,
K interaction classes, D = cfg.d_model, C = VLM feature width, T = Gh * Gw tokens,
Hd = cfg.heads. Boxes are [x1, y1, x2, y2]; "normalised" means divided by the image (w, h).

The memory-heavy ops (pair enumeration, box-guided attention) go through kernels/, whose
reference implementations define them; cfg.impl picks the implementation.

Where LINK.md is silent we follow UPT (Zhang et al., CVPR 2022) and PViC; every such choice
is marked "Choice:" below.
"""
import math
import types
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torchvision.ops import box_iou, roi_align

from common import key_difference
from kernels import box_attention, box_bias, focal_loss, pair_enum, psi_transform
from kernels.box_attention import grow_boxes, token_centres
from vlm import FrozenVLM, VLMConfig

# ----------------------------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------------------------

@dataclass
class LINKConfig(VLMConfig):
    # the frozen VLM's fields come first, from vlm.VLMConfig (vlm, pretrained, image_size,
    # quick_gelu, image_mean, image_std, dense, tokenizer, vlm_seed, vlm_config)
    # widths
    d_model: int = 256             # pair / unary query width D
    d_latent: int = 64             # width of the spatial branch's latent map F^l
    heads: int = 8
    enc_layers: int = 1            # self-attention layers over unary queries
    dec_layers: int = 2            # linking decoder layers
    ffn_mult: int = 4
    dropout: float = 0.1
    roi_size: int = 4              # ROI-Align bins per side, mean-pooled to one vector
    fusion: str = "sum"            # how the decoder fuses its two branches: "sum" | "gated"
    # how the decoder's attention knows where the pair is (LinkingLayer): "mask" = a learnable
    # bias on the tokens inside the pair's boxes, "pe" = PViC's conditional cross-attention
    # (sine PE of token centres on the keys, the pair's box PE on the queries), "both".
    # Choice: "mask". The synthetic ablation (docs/results.md, rows A4-pe / A7-pe) did not
    # separate mask and pe (within one seed std), and pe doubles the head widths.
    box_guidance: str = "mask"
    # scoring and loss (UPT values)
    lam: float = 2.8               # prior exponent at inference (DETR detections)
    lam_train: float = 1.0         # prior exponent in training mode (UPT raises it only at test)
    focal_alpha: float = 0.5
    focal_gamma: float = 0.2
    fg_iou: float = 0.5            # min(IoU_h, IoU_o) for a pair to take a GT pair's class
    # ablation switches (paper's ablation table)
    geometric_encoder: bool = True  # False: no box PE, no spatial MLP (plain self-attention)
    linking_decoder: bool = True    # False: decoder = plain cross-attention to F only
    impl: str = "auto"              # kernels implementation: auto | triton | torch | reference


def _class_space(cs) -> types.SimpleNamespace:
    """Read the fields LINK needs from a ClassSpace dataclass or its asdict() dict."""
    get = cs.get if isinstance(cs, dict) else (lambda k, d=None: getattr(cs, k, d))
    out = types.SimpleNamespace(
        prompts=list(get("prompts")), object_names=list(get("object_names")),
        hoi_object=[list(o) for o in get("hoi_object")], person_label=int(get("person_label")),
        unseen=list(get("unseen", []) or []), rare=list(get("rare", []) or []))
    if len(out.prompts) != len(out.hoi_object) or not out.prompts:
        raise ValueError(f"class_space: {len(out.prompts)} prompts but {len(out.hoi_object)} hoi_object rows")
    return out


# ----------------------------------------------------------------------------------------------
# 2. Geometric encoder
# ----------------------------------------------------------------------------------------------

def sine_encoding(x: torch.Tensor, dim: int, temperature: float = 20.0) -> torch.Tensor:
    """Sine/cosine encoding of scalars in [0, 1]: x [..., n] -> [..., n * dim].

    Choice: temperature 20 and scale 2 pi, PViC's setting for its box PE(C) (+) PE(S).
    """
    i = torch.arange(dim // 2, device=x.device, dtype=torch.float32)
    freq = temperature ** (2 * i / dim)                           # [dim / 2]
    a = x[..., None].float() * (2 * math.pi) / freq               # [..., n, dim / 2]
    return torch.stack([a.sin(), a.cos()], dim=-1).flatten(-3)    # [..., n * dim]


def box_encoding(boxes: torch.Tensor, dim: int) -> torch.Tensor:
    """PE(B) = PE(C) (+) PE(S): normalised boxes [N, 4] -> [N, dim] (dim / 4 per scalar)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    size = boxes[:, 2:] - boxes[:, :2]
    return torch.cat([sine_encoding(centre, dim // 4), sine_encoding(size, dim // 4)], dim=1)


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(inplace=True), nn.Linear(d_hidden, d_out))


class SelfAttentionLayer(nn.Module):
    """Post-norm transformer encoder layer over all unary queries of the batch.

    Choice: one attention call over the N queries of the whole batch with a block-diagonal
    mask (a query sees only its own image's queries) instead of a Python loop per image.
    Choice (every layer of this file): post-norm, as DETR / UPT. It keeps each layer's output
    LayerNorm-ed, which is what the token-wise query distillation compares across layers.
    """

    def __init__(self, d: int, heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.ReLU(inplace=True),
                                 nn.Dropout(dropout), nn.Linear(ffn_mult * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, same_image: torch.Tensor) -> torch.Tensor:
        """x [N, D], same_image Bool[N, N] (True = may attend) -> [N, D]."""
        q, k, v = rearrange(self.qkv(x), "n (three h dh) -> three h n dh", three=3, h=self.heads)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=same_image)          # [Hd, N, dh]
        x = self.norm1(x + self.drop(self.out(rearrange(a, "h n dh -> n (h dh)"))))
        return self.norm2(x + self.drop(self.ffn(x)))


class SpatialFusion(nn.Module):
    """Fuse pair queries [P, D] with the pair's 36 spatial features [P, 36] -> [P, D].

    Choice: UPT's multi-branch fusion reduced to one branch plus a residual:
    LN(q + W_o relu((W_q q) * MLP(f))). The product lets the box layout gate which appearance
    channels of the pair matter (UPT's argument); the residual keeps the appearance path.
    """

    def __init__(self, d: int):
        super().__init__()
        self.spatial = nn.Sequential(mlp(36, d, d), nn.ReLU(inplace=True))
        self.wq, self.wo, self.norm = nn.Linear(d, d), nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, q: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return self.norm(q + self.wo(F.relu(self.wq(q) * self.spatial(f))))


class GeometricEncoder(nn.Module):
    """Unary queries (ROI-Align on F) -> self-attention with box PE -> fused pair queries."""

    def __init__(self, cfg: LINKConfig, c_vlm: int):
        super().__init__()
        d, self.cfg = cfg.d_model, cfg
        self.unary = nn.Sequential(nn.Linear(c_vlm, d), nn.LayerNorm(d))
        self.layers = nn.ModuleList(SelfAttentionLayer(d, cfg.heads, cfg.ffn_mult, cfg.dropout)
                                    for _ in range(cfg.enc_layers))
        # Linear([Q_i, Q_j]) = W1 Q_i + W2 Q_j + b, computed by kernels.pair_enum
        bound = 1 / math.sqrt(2 * d)          # nn.Linear's init for a 2D -> D layer
        self.w1 = nn.Parameter(torch.empty(d, d).uniform_(-bound, bound))
        self.w2 = nn.Parameter(torch.empty(d, d).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.empty(d).uniform_(-bound, bound))
        if cfg.geometric_encoder:
            # Choice: the raw PE(B) [N, D] goes through a 2-layer MLP before it is added
            self.box_pe = mlp(d, d, d)
            self.fusion = SpatialFusion(d)

    def forward(self, feats, boxes_grid, boxes_norm, box_image, idx_h, idx_o, boxes_px, image_wh):
        """feats [B, C, Gh, Gw]; boxes_grid [N, 4] in grid cells; boxes_norm [N, 4];
        box_image Long[N]; idx_h, idx_o Long[P] (into the N boxes); boxes_px [N, 4] the same
        boxes in pixels and image_wh [N, 2] their image's (w, h), for UPT's spatial features
        (aspect ratios of pixel boxes) -> pair queries [P, D]."""
        # ROI-Align: aligned=True because boxes_grid is a continuous frame where cell j spans
        # [j, j + 1). Choice: the roi_size x roi_size bins are mean-pooled to one vector.
        rois = torch.cat([box_image[:, None].to(feats.dtype), boxes_grid], dim=1)    # [N, 5]
        r = self.cfg.roi_size
        q = roi_align(feats, rois, (r, r), spatial_scale=1.0, sampling_ratio=2, aligned=True)
        q = self.unary(q.mean(dim=(2, 3)))                                           # [N, D]
        if self.cfg.geometric_encoder:
            q = q + self.box_pe(box_encoding(boxes_norm, q.shape[1]))               # Q + PE(B)
        same_image = box_image[:, None] == box_image[None, :]                        # [N, N]
        for layer in self.layers:
            q = layer(q, same_image)
        pair_q, spatial = pair_enum(q, boxes_px, idx_h, idx_o, self.w1, self.w2, self.b,
                                    impl=self.cfg.impl, image_wh=image_wh)           # [P, D], [P, 36]
        return self.fusion(pair_q, spatial) if self.cfg.geometric_encoder else pair_q


# ----------------------------------------------------------------------------------------------
# 3. Linking decoder
# ----------------------------------------------------------------------------------------------

def pair_boxes(boxes_h: torch.Tensor, boxes_o: torch.Tensor, grid_hw) -> torch.Tensor:
    """The boxes that guide a pair's attention: normalised human and object boxes [P, 4] ->
    [P, 3, 4] (human, object, union), each grown to at least one grid cell around its centre.

    The union is taken over the GROWN boxes: the one-cell box of a small object must lie inside
    the union, else (equal strengths at initialisation) the object's token gets one bias term
    and the human's tokens two, a 2:1 pull away from the object.
    """
    bh, bo = grow_boxes(boxes_h, grid_hw), grow_boxes(boxes_o, grid_hw)
    union = torch.cat([torch.minimum(bh[:, :2], bo[:, :2]), torch.maximum(bh[:, 2:], bo[:, 2:])], 1)
    return torch.stack([bh, bo, union], dim=1)


def pair_positions(boxes: torch.Tensor, grid_hw, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positional encodings for the PE guidance: pair boxes [P, 3, 4] -> the pair's box PE
    PE(B_h) (+) PE(B_o) [P, 2d] (box_encoding), and the Gh x Gw token centres' PE(C) [T, d / 2].

    Choice: a token's PE is exactly the PE(C) part of a box centred on it (same sine function,
    temperature and width), so a query's centre channels and a key's position channels start in
    one code: PE(C_box) . PE(C_token) = sum_i cos(2 pi (x_box - x_token) / f_i) + the same in y,
    largest at the box centre. The box sizes ride along in the query PE (PViC instead modulates
    the centre PE by them).
    """
    pair = torch.cat([box_encoding(boxes[:, 0], d), box_encoding(boxes[:, 1], d)], dim=1)
    cx, cy = token_centres(grid_hw, boxes.device)
    return pair, sine_encoding(torch.stack([cx, cy], dim=1), d // 4)


class Branch(NamedTuple):
    """The projections of one decoder branch (q_pos, k_pos None without the PE guidance) and
    its box-bias strength [Hd, 3] (zeros where there is no bias)."""
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    out: nn.Linear
    q_pos: nn.Linear | None
    k_pos: nn.Linear | None
    strength: torch.Tensor


class LinkingLayer(nn.Module):
    """One decoder layer: spatial branch (CA_be on F^l) + semantic branch (CA on F), fused.

    Spatial branch: pair queries [P, D] -> heads over the latent map F^l [B, T, d_latent].
    Semantic branch: Q^n = Linear(q) in the VLM width C, multi-head cross-attention to F.
    Both go through kernels.box_attention. How they know where the pair is, cfg.box_guidance:
    - "mask": the spatial branch's attention logits get strength[h, r] on tokens inside the
      pair's human / object / union box (the kernel computes this bias in registers); the
      semantic branch is plain attention (a zero strength).
    - "pe": PViC's conditional cross-attention in both branches: each head's query is
      [content ; Linear(PE(B_h) (+) PE(B_o))] and each key [content ; Linear(PE(token centre))],
      so the logit is content.content + position.position, a soft spatial prior that is
      learned. The values get zeros in the positional half (the kernel takes one head width).
    - "both": the PE in both branches and the bias in the spatial branch.
    Choice: pairs do not attend to each other here (UPT's cooperative layer is not in LINK.md).
    """

    def __init__(self, cfg: LINKConfig, c_vlm: int):
        super().__init__()
        d, dl, self.cfg = cfg.d_model, cfg.d_latent, cfg
        self.pe = cfg.box_guidance in ("pe", "both")
        if cfg.linking_decoder:
            self.sp_q, self.sp_k, self.sp_v, self.sp_o = (nn.Linear(d, dl), nn.Linear(dl, dl),
                                                          nn.Linear(dl, dl), nn.Linear(dl, d))
            if cfg.box_guidance in ("mask", "both"):
                # Choice: strength starts at 1 for all (head, box): a mild pull towards the boxes
                # that training can sharpen, reverse (negative) or switch off per head.
                self.strength = nn.Parameter(torch.ones(cfg.heads, 3))
            if self.pe:   # box PE of the pair [2D] -> query, token PE [D / 2] -> key (per layer)
                self.sp_qpos, self.sp_kpos = nn.Linear(2 * d, dl), nn.Linear(d // 2, dl)
            if cfg.fusion == "gated":
                self.gate = nn.Linear(2 * d, d)
        self.sem_q, self.sem_k, self.sem_v, self.sem_o = (nn.Linear(d, c_vlm), nn.Linear(c_vlm, c_vlm),
                                                          nn.Linear(c_vlm, c_vlm), nn.Linear(c_vlm, d))
        if self.pe:
            self.sem_qpos, self.sem_kpos = nn.Linear(2 * d, c_vlm), nn.Linear(d // 2, c_vlm)
        self.register_buffer("zero_strength", torch.zeros(cfg.heads, 3), persistent=False)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_mult * d), nn.ReLU(inplace=True),
                                 nn.Dropout(cfg.dropout), nn.Linear(cfg.ffn_mult * d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def _branch(self, spatial: bool) -> Branch:
        if spatial:
            return Branch(self.sp_q, self.sp_k, self.sp_v, self.sp_o, getattr(self, "sp_qpos", None),
                          getattr(self, "sp_kpos", None), getattr(self, "strength", self.zero_strength))
        return Branch(self.sem_q, self.sem_k, self.sem_v, self.sem_o, getattr(self, "sem_qpos", None),
                      getattr(self, "sem_kpos", None), self.zero_strength)

    def _heads(self, spatial: bool, q, kv_in, pos):
        """Per-head queries [P, Hd, w], keys and values [B, Hd, T, w] of one branch from pair
        queries q [P, D] and tokens kv_in [B, T, W']; w = W / Hd, or 2 W / Hd with the PE
        (pos = pair_positions' output): [content ; position] per head, zeros in v's second half."""
        br = self._branch(spatial)
        qq, k, v = br.q(q), br.k(kv_in), br.v(kv_in)                               # [P, W], [B, T, W]
        B, Hd = kv_in.shape[0], self.cfg.heads
        qh = rearrange(qq, "p (h w) -> p h w", h=Hd)
        k = rearrange(k, "b t (h w) -> b h t w", h=Hd)                              # [B, Hd, T, W/Hd]
        v = rearrange(v, "b t (h w) -> b h t w", h=Hd)
        if pos is not None:
            qp = rearrange(br.q_pos(pos[0]), "p (h w) -> p h w", h=Hd)
            kp = rearrange(br.k_pos(pos[1]), "t (h w) -> 1 h t w", h=Hd)
            qh = torch.cat([qh, qp.to(qh.dtype)], dim=-1)
            k = torch.cat([k, kp.to(k.dtype).expand(B, -1, -1, -1)], dim=-1)
            v = torch.cat([v, torch.zeros_like(v)], dim=-1)
        return qh, k, v

    def _attend(self, spatial: bool, q, kv_in, pair_image, boxes, grid_hw, pos):
        """One branch: q [P, D] against tokens kv_in [B, T, W'] -> update [P, D]."""
        qh, k, v = self._heads(spatial, q, kv_in, pos)
        br = self._branch(spatial)
        a = box_attention(qh, k, v, pair_image, boxes, br.strength, grid_hw,
                          impl=self.cfg.impl)                                        # [P, Hd, w]
        W = br.out.in_features
        return br.out(a[..., :W // self.cfg.heads].reshape(len(q), W))

    def forward(self, q, tokens, latent, pair_image, boxes, grid_hw):
        """q [P, D]; tokens F [B, T, C]; latent F^l [B, T, d_latent] or None;
        pair_image Long[P]; boxes [P, 3, 4] normalised (human, object, union: pair_boxes) -> [P, D]."""
        pos = pair_positions(boxes, grid_hw, self.cfg.d_model) if self.pe else None
        semantic = self._attend(False, q, tokens, pair_image, boxes, grid_hw, pos)      # [P, D]
        if self.cfg.linking_decoder:
            spatial = self._attend(True, q, latent, pair_image, boxes, grid_hw, pos)    # [P, D]
            if self.cfg.fusion == "gated":  # per-channel convex mix decided by both branches
                g = torch.sigmoid(self.gate(torch.cat([spatial, semantic], dim=1)))
                update = g * spatial + (1 - g) * semantic
            else:
                update = spatial + semantic
        else:
            update = semantic
        q = self.norm1(q + self.drop(update))
        return self.norm2(q + self.drop(self.ffn(q)))

    @torch.no_grad()
    def attention_map(self, q, tokens, latent, pair_image, boxes, grid_hw, pair: int) -> torch.Tensor:
        """Attention weights [Hd, Gh, Gw] of pair ``pair`` over its image's tokens, recomputed
        from this layer's inputs (forward's arguments) and weights, as kernels.box_attention
        defines them:

            attn[h, t] = softmax_t(q[p, h] . k[img(p), h, t] * w**-0.5 + box_bias[p, h, t])

        with the branch's per-head query and key (_heads: [content ; position] with the PE
        guidance, width w) and box_bias = kernels.box_bias(pair boxes, strength). Spatial
        branch; without the linking decoder, the semantic branch on F.
        """
        p, b = int(pair), int(pair_image[pair])
        spatial = self.cfg.linking_decoder
        kv = (latent if spatial else tokens)[b:b + 1]
        pos = pair_positions(boxes[p:p + 1], grid_hw, self.cfg.d_model) if self.pe else None
        qh, k, _ = self._heads(spatial, q[p:p + 1], kv, pos)                          # [1, Hd, w]
        logits = torch.einsum("hd,htd->ht", qh[0], k[0]) * qh.shape[-1] ** -0.5       # [Hd, T]
        strength = self._branch(spatial).strength.float()
        logits = logits + box_bias(boxes[p:p + 1].float(), strength, grid_hw)[0].to(logits.dtype)
        return logits.float().softmax(-1).view(-1, *grid_hw)                          # [Hd, Gh, Gw]


# ----------------------------------------------------------------------------------------------
# 4. Classifier initialised from the VLM's text embeddings
# ----------------------------------------------------------------------------------------------

class TextClassifier(nn.Module):
    """FFN [P, D] -> [P, E] then a cosine layer whose K rows start as the prompts' text embeddings.

    logits = exp(logit_scale) * <h / |h|, w_k / |w_k|> + logit_bias.
    Choice: both sides L2-normalised as in CLIP; scale and bias learnable as in SigLIP's
    sigmoid loss, initialised to scale 10 and bias -log(99) (RetinaNet's prior 0.01 for
    sparse positives). The text embeddings are a buffer (`text_embed`), so a checkpoint
    rebuilds the classifier without the text tower. Unseen classes always use that frozen
    buffer, never the trainable rows: no optimiser (weight decay included) can move them.
    """

    def __init__(self, d: int, text_embed: torch.Tensor, unseen: list[int]):
        super().__init__()
        K, E = text_embed.shape
        text_embed = F.normalize(text_embed.float(), dim=1)
        self.ffn = mlp(d, d, E)
        self.weight = nn.Parameter(text_embed.clone())                             # [K, E]
        self.register_buffer("text_embed", text_embed.clone())                     # [K, E]
        unseen_mask = torch.zeros(K, dtype=torch.bool)
        unseen_mask[list(unseen)] = True
        self.register_buffer("unseen", unseen_mask)                                # [K]
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-math.log(99.0)))

    def rows(self) -> torch.Tensor:
        """The K classifier rows in use, L2-normalised [K, E]."""
        return F.normalize(torch.where(self.unseen[:, None], self.text_embed, self.weight), dim=1)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        h = F.normalize(self.ffn(q), dim=1)                                        # [P, E]
        return h @ self.rows().t() * self.logit_scale.exp().clamp(max=100) + self.logit_bias


# ----------------------------------------------------------------------------------------------
# 5. Scores, label association and loss
# ----------------------------------------------------------------------------------------------

def associate(boxes_h, boxes_o, target, num_classes, thresh=0.5) -> torch.Tensor:
    """Multi-label training targets for one image's pairs -> Float[P, K].

    Pair p is positive for class k if min(IoU_h, IoU_o) >= thresh with some GT pair of class
    k (UPT's rule). IoU is torchvision's continuous box_iou: HICO-DET's +1 convention matters
    for the official evaluator only, not for choosing training labels.
    """
    labels = boxes_h.new_zeros(len(boxes_h), num_classes)
    gt_h, gt_o, hoi = target["boxes_h"], target["boxes_o"], target["hoi"]
    if len(boxes_h) == 0 or len(gt_h) == 0:
        return labels
    gt_h, gt_o = torch.as_tensor(gt_h).to(boxes_h).view(-1, 4), torch.as_tensor(gt_o).to(boxes_h).view(-1, 4)
    overlap = torch.minimum(box_iou(boxes_h, gt_h), box_iou(boxes_o, gt_o))        # [P, G]
    p, g = (overlap >= thresh).nonzero(as_tuple=True)
    labels[p, torch.as_tensor(hoi, device=labels.device).long()[g]] = 1.0
    return labels


# The focal loss is kernels.focal_loss (imported above): UPT's focal loss on the prior-weighted
# probability p = P * sigmoid(O), summed over the entries with P > 0 (impossible classes are
# skipped) and divided by max(number of positives, 1), in log space so that logits of +-1e4
# and priors of exactly 0 or 1 stay finite:
#     log p    = log P - softplus(-O),   log(1-p) = logaddexp(log(1 - P), -O) - softplus(-O)
#     loss     = -alpha (1-p)^gamma log p  (label 1),   -(1 - alpha) p^gamma log(1-p)  (label 0)
# Its reference (kernels.focal_loss_reference) is that formula in plain PyTorch, which keeps
# about a dozen [P, K] tensors for backward; the lean path (impl "torch", the CPU default) and
# the Triton kernel keep only their inputs and recompute in backward. cfg.impl picks the path.


# ----------------------------------------------------------------------------------------------
# 6. LINK
# ----------------------------------------------------------------------------------------------

class Pairs(NamedTuple):
    """A batch's detections (N, canonical order, images concatenated) and its human-other
    pairs (P), as LINK._boxes_and_pairs builds them."""
    boxes: torch.Tensor       # [N, 4] the caller's boxes, image frame
    safe: torch.Tensor        # [N, 4] the boxes the network uses (_safe_boxes), image frame
    scale: torch.Tensor       # [N, 4] (w, h, w, h) of each box's image
    scores: torch.Tensor      # [N]
    labels: torch.Tensor      # Long[N] object labels
    box_image: torch.Tensor   # Long[N] image of each box
    idx_h: torch.Tensor       # Long[P] human box of each pair (index into N)
    idx_o: torch.Tensor       # Long[P] other box of each pair (index into N)
    pair_idx: torch.Tensor    # Long[P, 2] (human, other) as the caller's detection indices
    pair_image: torch.Tensor  # Long[P] image of each pair

    @property
    def boxes_norm(self) -> torch.Tensor:
        """[N, 4] the safe boxes divided by their image's (w, h)."""
        return (self.safe / self.scale).clamp(0, 1)


def _checked_detections(dets: dict, size, b: int, num_labels: int):
    """Image b's detections -> (boxes [n, 4], scores [n], Long labels [n]) on the CPU and its
    (w, h); a ValueError naming the image and the field for anything malformed."""
    try:
        boxes = torch.as_tensor(dets["boxes"], dtype=torch.float32).reshape(-1, 4).cpu()
        scores = torch.as_tensor(dets["scores"], dtype=torch.float32).reshape(-1).cpu()
        labels = torch.as_tensor(dets["labels"]).long().reshape(-1).cpu()
    except (KeyError, RuntimeError, TypeError) as e:
        raise ValueError(f"detections of image {b}: {e}") from None
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"detections of image {b}: boxes/scores/labels lengths "
                         f"{len(boxes)}/{len(scores)}/{len(labels)} differ")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(f"detections of image {b}: field 'labels' outside 0..{num_labels - 1}")
    if not torch.isfinite(boxes).all() or not torch.isfinite(scores).all():
        raise ValueError(f"detections of image {b}: non-finite 'boxes' or 'scores'")
    w, h = float(size[0]), float(size[1])
    if not (w > 0 and h > 0):
        raise ValueError(f"image {b}: size {tuple(size)} must be positive (w, h)")
    return boxes, scores, labels, (w, h)


def _safe_boxes(boxes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[N, 4] boxes -> the boxes the network uses: clipped to the image (scale = (w, h, w, h)),
    grown to >= 1 pixel around their centre, so degenerate / out-of-image boxes stay finite in
    every feature. Outputs keep the caller's boxes."""
    safe = torch.minimum(torch.maximum(boxes, torch.zeros_like(scale)), scale)
    ctr = (safe[:, :2] + safe[:, 2:]) / 2
    half = torch.maximum((safe[:, 2:] - safe[:, :2]) / 2, torch.full_like(ctr, 0.5))
    ctr = torch.minimum(torch.maximum(ctr, half), scale[:, :2] - half)                 # stay inside
    return torch.cat([ctr - half, ctr + half], dim=1)


def _check_config(cfg: LINKConfig) -> None:
    """A ValueError naming the LINKConfig field for a choice the network cannot be built with."""
    if cfg.fusion not in ("sum", "gated"):
        raise ValueError(f"LINKConfig.fusion must be 'sum' or 'gated', got {cfg.fusion!r}")
    if cfg.box_guidance not in ("mask", "pe", "both"):
        raise ValueError(f"LINKConfig.box_guidance must be 'mask', 'pe' or 'both', got {cfg.box_guidance!r}")
    if cfg.d_model % 8:  # box_encoding: d_model / 4 channels per box number, in sine-cosine pairs
        raise ValueError(f"LINKConfig.d_model must be a multiple of 8, got {cfg.d_model}")
    if cfg.d_model % cfg.heads or cfg.d_latent % cfg.heads:
        raise ValueError(f"LINKConfig: d_model ({cfg.d_model}) and d_latent ({cfg.d_latent}) "
                         f"must divide by heads ({cfg.heads})")


class LINK(nn.Module):
    """The LINK network: frozen VLM features + detections -> per-pair interaction scores.

    model = LINK(cfg, class_space)
    feats = model.encode_images(model.preprocess(pil_images))          # [B, C, Gh, Gw]
    out = model(feats, detections, sizes, targets=None)                # dict of per-pair tensors
    preds = model.postprocess(out)                                     # list of [N, 10] arrays
    """

    def __init__(self, cfg: LINKConfig, class_space, text_embed: torch.Tensor | None = None):
        """text_embed [K, E]: cached prompt embeddings (from a checkpoint); None = encode them."""
        super().__init__()
        _check_config(cfg)
        self.class_space = class_space            # as given (dataclass or dict), for checkpoints
        cs = self.classes = _class_space(class_space)
        K = len(cs.prompts)
        self.vlm = FrozenVLM(cfg)                 # where the weights come from is vlm.py's business
        self.cfg = cfg = self.vlm.cfg             # None fields -> what the weights were trained with
        if text_embed is None:  # once per model (minutes for 600 prompts on a CPU; a GPU if any)
            text_embed = self.vlm.encode_text(cs.prompts)
        self.vlm.release_text()                   # only the image tower is kept
        if text_embed.shape[0] != K:
            raise ValueError(f"text_embed has {text_embed.shape[0]} rows, class space has {K} classes")
        c_vlm = self.vlm.width
        if c_vlm % cfg.heads:
            raise ValueError(f"LINKConfig.heads ({cfg.heads}) must divide the VLM width {c_vlm}")
        # allowed[k, o]: class k may take object label o (verb-object masking)
        allowed = torch.zeros(K, len(cs.object_names), dtype=torch.bool)
        for k, objs in enumerate(cs.hoi_object):
            allowed[k, list(objs)] = True
        self.register_buffer("allowed", allowed, persistent=False)                   # [K, O]

        self.encoder = GeometricEncoder(cfg, c_vlm)
        if cfg.linking_decoder:  # connector: F -> low-width latent map F^l, computed once
            self.connector = mlp(c_vlm, cfg.d_model, cfg.d_latent)
        self.decoder = nn.ModuleList(LinkingLayer(cfg, c_vlm) for _ in range(cfg.dec_layers))
        self.classifier = TextClassifier(cfg.d_model, text_embed, cs.unseen)

    def no_weight_decay(self) -> set[str]:
        """Matrices the optimiser must not decay (trainer.param_groups leaves out every
        parameter with < 2 dimensions too: norms, biases, logit scale and bias): the box
        strengths [Hd, 3], whose 0 is "ignore the box", not a prior."""
        return {n for n, _ in self.named_parameters() if n.endswith(".strength")}

    # -- the frozen VLM (vlm.FrozenVLM): the contract trainer.py relies on ------------------------

    def release_vlm(self) -> None:
        """Free the frozen image tower when every image's features come from a feature cache:
        training and evaluation then never run it. The text embeddings stay (a classifier
        buffer); preprocess, cache_key, forward and checkpoints work as before; encode_images
        refuses. LINK.from_checkpoint rebuilds it."""
        self.vlm.release()

    def preprocess(self, images) -> torch.Tensor:
        """list of PIL images -> [B, 3, S, S] (FrozenVLM.preprocess)."""
        return self.vlm.preprocess(images)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised -> dense VLM features [B, C, Gh, Gw] (float32, no grad)."""
        return self.vlm(images)

    def cache_key(self) -> str:
        """What the features are (FrozenVLM.cache_key): feature caches are keyed by it and
        checkpoints store it (from_checkpoint compares)."""
        return self.vlm.cache_key()

    def describe_vlm(self) -> str:
        """One line for the run's log: VLM, weights, activation, input size and token grid."""
        return self.vlm.describe()

    # -- detections -> boxes and pairs ---------------------------------------------------------

    def _boxes_and_pairs(self, detections, sizes, device) -> Pairs:
        """Canonicalise each image's detections and enumerate its pairs.

        Choice: each image's boxes are put in a canonical order (humans first, then by score
        descending, then by coordinates and label) before anything else. The network's output
        then depends on the SET of boxes only: the same boxes from two sources (any list
        order, float64 vs float32) give bit-identical outputs, and teacher and student fed the
        same boxes align pair by pair. pair_idx maps back to the caller's indices.

        Pairs: every human i with every other box j, in canonical order (i outer, j inner).
        """
        per = []
        for b, (dets, size) in enumerate(zip(detections, sizes)):
            boxes, scores, labels, wh = _checked_detections(dets, size, b, self.allowed.shape[1])
            human = labels == self.classes.person_label
            c = boxes.numpy()
            order = np.lexsort((labels.numpy(), c[:, 3], c[:, 2], c[:, 1], c[:, 0],
                                -scores.numpy(), ~human.numpy()))
            order = torch.from_numpy(order).long()
            n, nh = len(order), int(human.sum())
            ii, jj = torch.meshgrid(torch.arange(nh), torch.arange(n), indexing="ij")
            keep = ii != jj
            per.append(dict(order=order, boxes=boxes[order], scores=scores[order], labels=labels[order],
                            ih=ii[keep], io=jj[keep], wh=wh))
        offsets = np.cumsum([0] + [len(p["order"]) for p in per])
        cat = lambda key: torch.cat([p[key] for p in per]).to(device)  # noqa: E731  one field, all images
        boxes = cat("boxes")                                                               # [N, 4]
        scale = torch.tensor([[p["wh"][0], p["wh"][1]] * 2 for p in per for _ in p["order"]],
                             dtype=torch.float32, device=device).view(-1, 4)               # [N, 4]
        return Pairs(
            boxes=boxes, safe=_safe_boxes(boxes, scale), scale=scale,
            scores=cat("scores"), labels=cat("labels"),
            box_image=torch.cat([torch.full((len(p["order"]),), b) for b, p in enumerate(per)]).to(device),
            idx_h=torch.cat([p["ih"] + offsets[b] for b, p in enumerate(per)]).long().to(device),
            idx_o=torch.cat([p["io"] + offsets[b] for b, p in enumerate(per)]).long().to(device),
            pair_idx=torch.cat([torch.stack([p["order"][p["ih"]], p["order"][p["io"]]], 1).view(-1, 2)
                                for p in per]).long().to(device),
            pair_image=torch.cat([torch.full((len(p["ih"]),), b) for b, p in enumerate(per)]).long().to(device),
        )

    # -- forward -------------------------------------------------------------------------------

    # every key forward can return (with targets, labels, loss and num_pos come too)
    OUTPUTS = ("pair_image", "pair_idx", "boxes_h", "boxes_o", "object", "logits", "prior", "psi",
               "scores", "latent_map", "queries", "num_images")

    def forward(self, feats, detections, sizes, targets=None, outputs=None) -> dict:
        """feats [B, C, Gh, Gw] (encode_images); detections: B dicts {boxes [N,4] image frame,
        scores [N], labels [N]}; sizes: B (w, h); targets: B dicts {boxes_h, boxes_o, hoi};
        outputs: the keys wanted (default: all of LINK.OUTPUTS).

        Returns per-pair tensors concatenated over the batch (P pairs, K classes):
        pair_image Long[P], pair_idx Long[P, 2] (human, other; caller's detection indices),
        boxes_h, boxes_o [P, 4] (image frame), object Long[P], logits, prior, psi, scores
        [P, K], latent_map [B, T, d_latent] (None without the linking decoder), queries
        (list of [P, D]: the encoder's pair queries, then each decoder layer's), num_images,
        and with targets: labels [P, K] (every class) and loss (0-dim; unseen classes and
        entries with prior 0 are left out of it).

        psi and scores carry no gradient (nothing differentiates through them: postprocess
        reads scores, kernels.kl_distill applies Psi to the logits itself), so they keep no
        [P, K] tensors alive for backward. What `outputs` leaves out is not built: a frozen
        teacher asked for what distillation reads never makes its prior, psi and scores.
        """
        cfg, B = self.cfg, feats.shape[0]
        want = set(self.OUTPUTS if outputs is None else outputs)
        if want - set(self.OUTPUTS):
            raise ValueError(f"forward: unknown outputs {sorted(want - set(self.OUTPUTS))}; known: {self.OUTPUTS}")
        if B == 0:
            raise ValueError("forward: empty batch (no feature maps)")
        if len(detections) != B or len(sizes) != B or (targets is not None and len(targets) != B):
            raise ValueError(f"forward: {B} feature maps but {len(detections)} detections, "
                             f"{len(sizes)} sizes{'' if targets is None else f', {len(targets)} targets'}")
        feats = feats.to(device=self.classifier.weight.device, dtype=self.classifier.weight.dtype)
        gh, gw = feats.shape[2:]
        d = self._boxes_and_pairs(detections, sizes, feats.device)
        idx_h, idx_o, pair_image = d.idx_h, d.idx_o, d.pair_image
        boxes_norm = d.boxes_norm                                                        # [N, 4]

        # geometric encoder -> pair queries [P, D]
        grid = d.safe / d.scale * torch.tensor([gw, gh, gw, gh], device=feats.device)
        q = self.encoder(feats, grid, boxes_norm, d.box_image, idx_h, idx_o, d.safe, d.scale[:, :2])
        queries = [q]

        # linking decoder: F as tokens [B, T, C], made contiguous once: the connector and every
        # layer's key / value projections then save this one tensor for backward instead of
        # each its own contiguous copy of the strided view; latent map F^l [B, T, d_latent] once
        tokens = rearrange(feats, "b c gh gw -> b (gh gw) c").contiguous()
        latent = self.connector(tokens) if cfg.linking_decoder else None
        boxes = pair_boxes(boxes_norm[idx_h], boxes_norm[idx_o], (gh, gw))              # [P, 3, 4]
        for layer in self.decoder:
            q = layer(q, tokens, latent, pair_image, boxes, (gh, gw))
            queries.append(q)

        out = dict(pair_image=pair_image, pair_idx=d.pair_idx, boxes_h=d.boxes[idx_h], boxes_o=d.boxes[idx_o],
                   object=d.labels[idx_o], latent_map=latent, queries=queries, num_images=B)
        if targets is not None or want & {"logits", "prior", "psi", "scores"}:
            out.update(self._scores(q, out["object"], d.scores[idx_h] * d.scores[idx_o], want))
        if targets is not None:
            out.update(self._loss(out["logits"], out["prior"], out["boxes_h"], out["boxes_o"], pair_image, targets))
        return {k: v for k, v in out.items() if k in want or k in ("labels", "loss", "num_pos")}

    def _scores(self, q, obj, s_pair, want) -> dict:
        """Classifier and UPT prior: pair queries [P, D], object labels Long[P], detection score
        products [P] -> logits and prior [P, K]; psi and scores [P, K] if wanted, without a graph."""
        logits = self.classifier(q).float()  # [P, K]; fp32 so Psi / loss are exact under autocast
        lam = self.cfg.lam_train if self.training else self.cfg.lam  # Choice: UPT's train / test exponents
        allowed = self.allowed[:, obj].t()                                               # [P, K]
        s = s_pair.clamp(0, 1).pow(lam).float()                                          # [P]
        prior = torch.where(allowed, s[:, None], torch.zeros((), dtype=s.dtype, device=s.device))
        out = dict(logits=logits, prior=prior)
        with torch.no_grad():  # read-outs only: no graph, nothing saved for backward
            if "psi" in want:
                out["psi"] = psi_transform(logits, prior)
            if "scores" in want:
                out["scores"] = torch.sigmoid(logits) * prior
        return out

    def _loss(self, logits, prior, boxes_h, boxes_o, pair_image, targets) -> dict:
        """labels [P, K] (label association per image), the focal loss and its positive count."""
        labels = torch.cat([associate(boxes_h[pair_image == b], boxes_o[pair_image == b], t, logits.shape[1],
                                      self.cfg.fg_iou) for b, t in enumerate(targets)])
        # Unseen classes are never supervised: their columns leave the loss (prior -> 0).
        seen_prior = prior.masked_fill(self.classifier.unseen[None, :], 0)
        # loss = focal sum / max(num_pos, 1): data-parallel training re-normalises by the
        # positives of the whole global batch (UPT all-reduces this count too)
        return dict(labels=labels,
                    loss=focal_loss(logits, seen_prior, labels, self.cfg.focal_alpha, self.cfg.focal_gamma,
                                    impl=self.cfg.impl),
                    num_pos=(labels[seen_prior > 0] > 0).sum().float())

    # -- predictions ---------------------------------------------------------------------------

    @torch.no_grad()
    def postprocess(self, out: dict, detections=None, k: int | None = None) -> list[np.ndarray]:
        """Prediction rows per image: float64 [N, 10] = [hoi, score, hx1, hy1, hx2, hy2, ox1, oy1,
        ox2, oy2] for every (pair, allowed class) with score > 0, sorted by score descending
        (stable: ties keep pair then class order), top k per image if k. detections is unused
        (the output carries its boxes); it is accepted for the contract's call form."""
        scores = out["scores"].detach().float().cpu()
        pair_image = out["pair_image"].cpu()
        boxes = torch.cat([out["boxes_h"], out["boxes_o"]], 1).detach().double().cpu()   # [P, 8]
        n_img = out.get("num_images", int(pair_image.max()) + 1 if len(pair_image) else 0)
        preds = []
        for b in range(n_img):
            sel = (pair_image == b).nonzero().squeeze(1)
            p, c = (scores[sel] > 0).nonzero(as_tuple=True)
            s = scores[sel][p, c].double()
            order = torch.sort(-s, stable=True).indices[:k]
            rows = torch.cat([c[order, None].double(), s[order, None], boxes[sel[p[order]]]], 1)
            preds.append(rows.numpy().reshape(-1, 10))
        return preds

    # -- checkpoints ---------------------------------------------------------------------------

    def checkpoint_state_dict(self) -> dict:
        """state_dict without the frozen VLM (its weights come from cfg.pretrained)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vlm.")}

    @classmethod
    def from_checkpoint(cls, ck: dict, device="cpu") -> "LINK":
        """Rebuild a model from a loaded train_teacher.py checkpoint {config, class_space, model,
        cache_key} (runs.load_checkpoint reads the file), on ``device``."""
        for key in ("config", "class_space", "model"):
            if not isinstance(ck, dict) or key not in ck:
                raise ValueError(f"checkpoint has no field '{key}'")
        known = {f.name for f in fields(LINKConfig)}
        unknown = set(ck["config"]) - known
        if unknown:
            raise ValueError(f"field 'config' has unknown keys {sorted(unknown)}")
        state = ck["model"]
        model = cls(LINKConfig(**ck["config"]), ck["class_space"],
                    text_embed=state.get("classifier.text_embed"))
        if ck.get("cache_key") not in (None, model.cache_key()):  # e.g. weights rewritten in place
            raise ValueError(f"the frozen VLM differs from the one this checkpoint was trained with "
                             f"({key_difference(ck['cache_key'], model.cache_key())})")
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.startswith("vlm.")]
        if missing or unexpected:
            raise ValueError(f"field 'model' does not match the config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model.to(device)


__all__ = ["LINKConfig", "LINK", "focal_loss", "associate", "sine_encoding", "box_encoding"]
