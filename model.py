"""LINK: a two-stage HOI detector on a frozen vision-language model, in one file.

Read top to bottom:

  1. LINKConfig               every hyper-parameter, plain types (stored in checkpoints)
  2. the frozen VLM           open_clip image tower -> dense feature map F [B, C, Gh, Gw]
  3. the geometric encoder    ROI-Align unary queries + box sine PE -> self-attention ->
                              human-other pair queries fused with the pair's spatial features
  4. the linking decoder      per layer: box-guided attention on a low-width latent map
                              (spatial branch) + attention on F (semantic branch); guided by
                              an in-box bias and / or box and token PEs (cfg.box_guidance)
  5. the classifier           FFN whose last layer is the VLM's text embedding of each prompt
  6. scores and loss          UPT prior (s_h s_o)^lambda, Psi, focal loss, label association
  7. LINK                     forward(), postprocess(), from_checkpoint(), cache_key()

Shapes: B images, N detections in the batch (all images concatenated), P pairs in the batch,
K interaction classes, D = cfg.d_model, C = VLM feature width, T = Gh * Gw tokens,
Hd = cfg.heads. Boxes are [x1, y1, x2, y2]; "normalised" means divided by the image (w, h).

The memory-heavy ops (pair enumeration, box-guided attention) go through kernels/, whose
reference implementations define them; cfg.impl picks the implementation.

Where LINK.md is silent we follow UPT (Zhang et al., CVPR 2022) and PViC; every such choice
is marked "Choice:" below.
"""
import atexit
import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
import types
import zipfile
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model
from torchvision.ops import box_iou, roi_align

from common import file_sha256, key_difference
from kernels import box_attention, box_bias, focal_loss, pair_enum, psi_transform
from kernels.box_attention import grow_boxes, token_centres
from runs import load_checkpoint

# ----------------------------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------------------------

@dataclass
class LINKConfig:
    # frozen VLM (any open_clip model name; pretrained = tag, local checkpoint path, or None).
    # None = "what the weights were trained with", filled in by resolve_vlm_config (section 2)
    # so that a checkpoint states the value it used.
    vlm: str = "ViT-B-16"
    pretrained: str | None = "openai"
    image_size: int | None = None  # VLM input S (position embedding interpolated); None = the tower's own
    quick_gelu: bool | None = None  # activation; None = the tag's (OpenAI: QuickGELU) or the architecture's
    image_mean: tuple | None = None  # pixel mean / std; None = the tag's (open_clip's preprocess config)
    image_std: tuple | None = None
    dense: str = "tokens"          # dense map F: "tokens" | "maskclip" (vlm_dense_features)
    tokenizer: str | None = None   # Hugging Face tokenizer folder (SigLIP offline); None = open_clip's
    vlm_seed: int = 0              # seeds a randomly initialised VLM (pretrained=None), so a
                                   # checkpoint without VLM weights rebuilds the same network
    vlm_config: dict | None = None  # an open_clip model config registered under `vlm` when the
                                   # VLM is built (an architecture open_clip does not ship, e.g. the
                                   # synthetic world's VLMs): a checkpoint carries it, so open_clip need not know it
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
    # Choice: "mask". The synthetic ablation (README) did not separate mask and pe (pe +0.55 /
    # +0.68 Full for teacher / student, within one seed std), and pe doubles the head widths.
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
# 2. The frozen VLM: open_clip image tower -> dense feature map
# ----------------------------------------------------------------------------------------------

_REGISTERED: set = set()  # names register_vlm_config gave open_clip (never one of open_clip's own)


@functools.lru_cache(maxsize=1)
def _config_dir() -> str:
    """This process's folder of registered configs (one file per name), removed at exit."""
    path = tempfile.mkdtemp(prefix="link_vlm_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def register_vlm_config(name: str, config: dict) -> str:
    """Register the open_clip model config ``config`` under ``name``; returns name.

    The config a checkpoint carries wins: a name this function registered before with another
    config is registered again (two checkpoints of one name but different architectures load
    one after the other in one process; a model, once built, does not read the registry).
    Raises ValueError for one of open_clip's own names with another config (a checkpoint never
    shadows ViT-B-16), or a name containing "siglip" (open_clip would then pick the Hugging Face
    SigLIP tokenizer for it).
    """
    known = open_clip.get_model_config(name)
    if known == config:
        return name
    if known is not None and name not in _REGISTERED:
        raise ValueError(f"LINKConfig.vlm_config: {name!r} is one of open_clip's own models, with another config")
    if "siglip" in name.lower():
        raise ValueError(f"LINKConfig.vlm: {name!r}: a registered config's name must not contain 'siglip' "
                         f"(open_clip would pick the SigLIP tokenizer)")
    path = os.path.join(_config_dir(), f"{name}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    open_clip.add_model_config(path)
    _REGISTERED.add(name)
    if open_clip.get_model_config(name) != config:     # open_clip's rescan kept another file's
        raise RuntimeError(f"open_clip did not take the config registered for {name!r}")
    return name


TINY_VLM = {"embed_dim": 64,
            "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def register_tiny_vlm(name: str = "link-tiny", vision_cfg: dict | None = None) -> str:
    """Register a tiny, randomly initialised open_clip config (tests, demo); returns the name.

    Default (TINY_VLM): ViT width 64, 2 layers, patch 8, 64 px (8 x 8 tokens); text width 64,
    2 layers; about 3.3 M parameters, most of them the text token table. vision_cfg overrides
    the image tower (e.g. {"timm_model_name": "convnext_atto", ...} for a timm tower).
    """
    if name in open_clip.list_models():
        return name
    return register_vlm_config(name, dict(TINY_VLM, vision_cfg=vision_cfg or TINY_VLM["vision_cfg"]))


def _register(cfg: LINKConfig) -> None:
    """Make cfg.vlm known to open_clip: its carried config, or the tiny VLM on demand."""
    if cfg.vlm_config is not None:
        register_vlm_config(cfg.vlm, cfg.vlm_config)
    elif cfg.vlm == "link-tiny":
        register_tiny_vlm()


def _weights_source(cfg: LINKConfig) -> tuple[str, str | None]:
    """-> ("tag", tag) | ("file", absolute path) | ("random", None) for cfg.pretrained."""
    p = cfg.pretrained
    if not p:
        return "random", None
    if get_pretrained_cfg(cfg.vlm, p):  # a tag first, as open_clip.create_model decides
        return "tag", p
    if os.path.isfile(os.path.expanduser(p)):
        return "file", os.path.abspath(os.path.expanduser(p))
    if os.path.sep in p or os.path.splitext(p)[1] in (".pt", ".pth", ".bin", ".safetensors", ".npz"):
        raise FileNotFoundError(f"{p}: VLM checkpoint not found (config field 'pretrained')")
    tags = list_pretrained_tags_by_model(cfg.vlm)
    raise ValueError(f"LINKConfig.pretrained: {p!r} is neither a file nor an open_clip tag of {cfg.vlm} "
                     f"(tags: {', '.join(tags[:8]) or 'none'}{', ...' if len(tags) > 8 else ''})")


def quick_gelu_evidence(path: str) -> str | None:
    """Why the weights file ``path`` looks trained with QuickGELU, or None.

    Recognised (documented in the README): (1) its SHA-256 is the checksum open_clip publishes
    for a QuickGELU tag (OpenAI's releases name theirs in the URL, open_clip's own QuickGELU
    releases end their file names with its first 8 hex digits); (2) it lies in the Hugging
    Face cache folder of a QuickGELU tag's repository (where open_clip downloads it, e.g.
    models--timm--vit_base_patch16_clip_224.openai); (3) it is a TorchScript archive, the
    format of OpenAI's own CLIP releases, all trained with QuickGELU. Other files (a fine-tune
    saved as a state dict, a renamed copy) are not recognised: set quick_gelu yourself.
    """
    sha, where = file_sha256(path), path + "|" + os.path.realpath(path)
    for model_name, tag in open_clip.list_pretrained():
        t = get_pretrained_cfg(model_name, tag)
        if not t.get("quick_gelu"):
            continue
        url, hub = t.get("url", ""), t.get("hf_hub", "").strip("/")
        published = (url.split("/")[-2] if "openaipublic" in url else
                     os.path.splitext(os.path.basename(url))[0].split("-")[-1] if "mlfoundations" in url else "")
        if len(published) >= 8 and sha.startswith(published):
            return f"its SHA-256 is that of open_clip's {model_name} '{tag}' weights"
        if hub and "models--" + hub.replace("/", "--") in where:
            return f"it lies in the Hugging Face cache of {hub} (open_clip's {model_name} '{tag}')"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist()):
                return "it is a TorchScript archive, the format of OpenAI's CLIP releases"
    return None


def _rgb_triple(v, name: str) -> tuple:
    """A config's pixel mean / std -> 3 floats (one number, 3 numbers, or "a,b,c")."""
    try:
        t = tuple(float(x) for x in (v.split(",") if isinstance(v, str) else
                                     v if isinstance(v, (list, tuple)) else [v]))
    except (TypeError, ValueError):
        t = ()
    t = t * 3 if len(t) == 1 else t
    if len(t) != 3 or not all(math.isfinite(x) for x in t) or (name == "image_std" and min(t) <= 0):
        raise ValueError(f"LINKConfig.{name} must be 3 finite numbers{' > 0' * (name == 'image_std')}, got {v!r}")
    return t


def _pixel_stats(cfg: LINKConfig, source: str, tag_cfg: dict) -> tuple[tuple, tuple]:
    """(mean, std) the weights were trained with: the config fields, else open_clip's
    preprocess config of the tag; for a local file the one every tag of this architecture
    shares (e.g. 0.5 for SigLIP), else an error asking for the fields; random weights (no
    statistics to match) take what the tags share or OpenAI's."""
    if cfg.image_mean is not None or cfg.image_std is not None:
        if cfg.image_mean is None or cfg.image_std is None:
            raise ValueError("LINKConfig: set both image_mean and image_std, or neither")
        return _rgb_triple(cfg.image_mean, "image_mean"), _rgb_triple(cfg.image_std, "image_std")
    default = (tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD))
    if source == "tag":
        return tuple(tag_cfg.get("mean", default[0])), tuple(tag_cfg.get("std", default[1]))
    known = {(tuple(t.get("mean", default[0])), tuple(t.get("std", default[1])))
             for t in (get_pretrained_cfg(cfg.vlm, tag) for tag in list_pretrained_tags_by_model(cfg.vlm))}
    if len(known) == 1:
        return known.pop()
    if source == "random":
        return default
    raise ValueError(f"{cfg.pretrained}: its pixel mean/std are unknown (the open_clip tags of {cfg.vlm} "
                     f"{'disagree' if known else 'are none'}): set LINKConfig.image_mean and image_std "
                     f"(e.g. --model-opt image_mean=0.5,0.5,0.5 --model-opt image_std=0.5,0.5,0.5)")


def resolve_vlm_config(cfg: LINKConfig) -> LINKConfig:
    """cfg with the VLM fields left at None filled in from the weights, so that a checkpoint
    states them: image_size (the tower's own input size), quick_gelu, image_mean, image_std.

    quick_gelu: a tag's open_clip pretrained config says (True for OpenAI's weights; open_clip
    itself only warns on a mismatch); a local file or random weights take the architecture's
    config, and a local file that looks trained with QuickGELU (quick_gelu_evidence) on a GELU
    config is refused unless quick_gelu is set explicitly (False forces GELU).
    """
    _register(cfg)  # on demand: a checkpoint of a registered VLM rebuilds in a fresh process
    if ":" in cfg.vlm:
        raise ValueError(f"LINKConfig.vlm: {cfg.vlm!r}: 'hf-hub:' / 'local-dir:' names are not supported; use an "
                         f"open_clip model name and pretrained = a tag or a weights file")
    model_cfg = open_clip.get_model_config(cfg.vlm)
    if model_cfg is None:
        raise ValueError(f"LINKConfig.vlm: {cfg.vlm!r} is not an open_clip model name "
                         f"(open_clip.list_models() lists the {len(open_clip.list_models())} known ones)")
    source, where = _weights_source(cfg)
    tag_cfg = get_pretrained_cfg(cfg.vlm, where) if source == "tag" else {}
    size = cfg.image_size or model_cfg["vision_cfg"].get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"LINKConfig.image_size: {cfg.vlm} takes {tuple(size)} inputs; set a square image_size")
        size = size[0]
    if not (isinstance(size, int) and size > 0):
        raise ValueError(f"LINKConfig.image_size must be a positive integer, got {size!r}")
    quick = cfg.quick_gelu
    if quick is None:
        quick = bool(tag_cfg.get("quick_gelu", model_cfg.get("quick_gelu", False)))
        why = quick_gelu_evidence(where) if source == "file" and not quick else None
        if why:
            raise ValueError(f"{where}: {why}, i.e. trained with QuickGELU, but {cfg.vlm} builds GELU: set "
                             f"quick_gelu=true (--model-opt quick_gelu=true), or quick_gelu=false to force GELU")
    mean, std = _pixel_stats(cfg, source, tag_cfg)
    return dataclasses.replace(cfg, image_size=int(size), quick_gelu=bool(quick), image_mean=mean, image_std=std)


def build_vlm(cfg: LINKConfig) -> nn.Module:
    """The full open_clip model (both towers) of a resolved config (resolve_vlm_config) at
    cfg.image_size, with the activation cfg.quick_gelu and the weights cfg.pretrained.

    pretrained is a tag known to open_clip (downloaded once into its cache), a local
    checkpoint file, or None (random init under cfg.vlm_seed, used by tests and the demo).
    open_clip interpolates the image position embedding to force_image_size on load.
    """
    _register(cfg)
    pretrained = os.path.expanduser(cfg.pretrained) if cfg.pretrained else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.vlm_seed)
        return open_clip.create_model(cfg.vlm, pretrained=pretrained, force_image_size=cfg.image_size,
                                      force_quick_gelu=bool(cfg.quick_gelu))


def _config_id(config: dict) -> str:
    """A carried open_clip config's identity: SHA-256 (16 hex digits) of its canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def weights_id(cfg: LINKConfig) -> str:
    """What the VLM weights are: 'tag:NAME', 'sha256:HEX' of a local file's bytes (path and
    mtime do not matter: a file rewritten in place is another VLM), or 'random:seedN'."""
    source, where = _weights_source(cfg)
    return {"tag": lambda: f"tag:{where}", "file": lambda: f"sha256:{file_sha256(where)}",
            "random": lambda: f"random:seed{cfg.vlm_seed}"}[source]()


@contextlib.contextmanager
def _last_block_attends_to_itself(visual: nn.Module):
    """Within the block, the tower's last transformer block runs with a diagonal attention mask:
    each token attends only to itself, so the block's attention output for a token is
    out_proj(value(token)), MaskCLIP's value path (Zhou et al., ECCV 2022)."""
    blocks = (visual.transformer.resblocks if isinstance(visual, open_clip.transformer.VisionTransformer)
              else getattr(getattr(visual, "trunk", None), "blocks", None))
    last = blocks[-1] if blocks is not None and len(blocks) else None
    if last is None or "attn_mask" not in inspect.signature(last.forward).parameters:
        raise ValueError(f"LINKConfig.dense='maskclip' needs a ViT tower whose blocks take an attention mask "
                         f"(open_clip and timm ViTs); {type(visual).__name__} has none")

    token_dim = 0 if getattr(getattr(visual, "transformer", None), "batch_first", True) is False else 1

    def diagonal_mask(module, args, kwargs):
        n = args[0].shape[token_dim]
        mask = torch.full((n, n), float("-inf"), device=args[0].device, dtype=args[0].dtype)
        return args, {**kwargs, "attn_mask": mask.fill_diagonal_(0.0)}

    handle = last.register_forward_pre_hook(diagonal_mask, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def vlm_dense_features(visual: nn.Module, images: torch.Tensor, dense: str = "tokens") -> torch.Tensor:
    """The dense map F of an open_clip image tower: images [B, 3, S, S] -> [B, C, Gh, Gw].

    What F is, per tower (README "Model" has the table):
    - open_clip ViT (OpenAI / LAION CLIP): the last layer's patch tokens (class token dropped)
      after ln_post and @ proj, i.e. projected into the image-text space (C = embed_dim). This
      is NOT MaskCLIP: in the last block those tokens went through query-key attention, which
      mixes in global context and localises poorly.
    - timm ViT with an attention-pool head (SigLIP, SigLIP2): the trunk's tokens after its final
      norm, then the pool head applied to each token on its own: a one-token attention is the
      identity, so a token goes through the head's value and output projections and its residual
      MLP, what it contributes to the image embedding (MaskCLIP's reading of a pooling head):
      the image-text space (C = embed_dim).
    - other timm towers (EVA, ConvNeXt, ...): the trunk's tokens / map after its norm, then its
      per-token linear head and open_clip's linear / MLP projection: the image-text space; an
      open_clip attention-pool head ('abs_attn', 'rot_attn') is skipped: the trunk's space.
    dense="maskclip" (ViT towers): the last block's attention is replaced by each token's own
    value path (_last_block_attends_to_itself), MaskCLIP's dense CLIP features; the rest as above.
    """
    if dense not in ("tokens", "maskclip"):
        raise ValueError(f"LINKConfig.dense must be 'tokens' or 'maskclip', got {dense!r}")
    with _last_block_attends_to_itself(visual) if dense == "maskclip" else contextlib.nullcontext():
        if isinstance(visual, open_clip.transformer.VisionTransformer):
            return _vit_map(visual, images)
        return _timm_map(visual, images)


def _vit_map(visual, images: torch.Tensor) -> torch.Tensor:
    """open_clip ViT: patch tokens after ln_post and proj -> [B, C, Gh, Gw]."""
    if visual.attn_pool is not None:
        raise ValueError("VLM: attention-pooled ViT towers (CoCa) have no patch tokens to use")
    visual.output_tokens = True
    _, x = visual(images)                                         # [B, T, width], CLS dropped
    if visual.pool_type == "none":                                # then open_clip kept the CLS
        x = x[:, 1:]
    if visual.final_ln_after_pool:                                # then open_clip skipped ln_post
        x = visual.ln_post(x)
    if visual.proj is not None:
        x = x @ visual.proj                                       # [B, T, C]
    gh, gw = visual.grid_size
    return rearrange(x, "b (gh gw) c -> b c gh gw", gh=gh, gw=gw)


def _timm_map(visual, images: torch.Tensor) -> torch.Tensor:
    """timm tower (TimmModel): trunk tokens / map -> per-token head(s) -> [B, C, Gh, Gw]."""
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        raise ValueError(f"VLM: unsupported image tower {type(visual).__name__}")
    B = images.shape[0]
    x = trunk.forward_features(images)
    if x.dim() == 3:                                              # ViT-like: [B, prefix + T, C]
        x = x[:, getattr(trunk, "num_prefix_tokens", 0):]
        gh, gw = getattr(trunk.patch_embed, "grid_size", None) or (int(math.isqrt(x.shape[1])),) * 2
        pool = getattr(trunk, "attn_pool", None)
        if pool is not None:                                      # SigLIP: the head, token by token
            x = pool(x.reshape(B * gh * gw, 1, -1))
        x = x.reshape(B, gh, gw, -1)
        if isinstance(getattr(trunk, "fc_norm", None), nn.LayerNorm):
            x = trunk.fc_norm(x)                                  # avg-pool ViTs normalise here
    else:                                                         # conv: [B, C, H, W]
        norm = getattr(getattr(trunk, "head", None), "norm", None)
        x = (norm(x) if isinstance(norm, nn.Module) else x).permute(0, 2, 3, 1)
    head = getattr(trunk, "head", None)
    fc = head if isinstance(head, nn.Linear) else getattr(head, "fc", None)
    if isinstance(fc, nn.Linear) and fc.in_features == x.shape[-1]:
        x = fc(x)                                                 # timm classifier used as proj
    proj = getattr(visual, "head", None)
    if isinstance(proj, nn.Sequential) and "pool" not in proj._modules and len(proj) > 0:
        x = proj(x)                                               # open_clip linear / mlp proj
    return x.permute(0, 3, 1, 2)


def vlm_tokenizer(cfg: LINKConfig):
    """open_clip's tokenizer of cfg.vlm; with cfg.tokenizer, the Hugging Face tokenizer in that
    folder (or hub name) in place of the one the config names (SigLIP's, offline). One-line
    errors: a Hugging Face tokenizer that cannot be loaded says which and how to point at it."""
    text_cfg = (open_clip.get_model_config(cfg.vlm) or {}).get("text_cfg", {})
    source = cfg.tokenizer or text_cfg.get("hf_tokenizer_name")
    if cfg.tokenizer and not text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"LINKConfig.tokenizer: {cfg.vlm} uses open_clip's own BPE tokenizer; leave it unset")
    try:
        if not cfg.tokenizer:
            return open_clip.get_tokenizer(cfg.vlm)
        return open_clip.tokenizer.HFTokenizer(
            cfg.tokenizer, context_length=text_cfg.get("context_length", 77),
            tokenizer_mode=text_cfg.get("tokenizer_mode"), **text_cfg.get("tokenizer_kwargs", {}))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; one line for all
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ValueError(f"VLM {cfg.vlm}: its tokenizer {source!r} could not be loaded ({type(e).__name__}: {msg}); "
                         f"set LINKConfig.tokenizer to a local folder holding its files") from None


# ----------------------------------------------------------------------------------------------
# 3. Geometric encoder
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
# 4. Linking decoder
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
# 5. Classifier initialised from the VLM's text embeddings
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


@torch.no_grad()
def encode_prompts(clip: nn.Module, tokenizer, prompts: list[str], chunk: int = 256) -> torch.Tensor:
    """Text embeddings of the K prompts from the VLM's text tower -> [K, E], L2-normalised.
    tokenizer: list of str -> Long[n, context] (vlm_tokenizer)."""
    clip.eval()
    dev = next(clip.parameters()).device
    out = [clip.encode_text(tokenizer(prompts[i:i + chunk]).to(dev), normalize=True)
           for i in range(0, len(prompts), chunk)]
    return torch.cat(out).float()


# ----------------------------------------------------------------------------------------------
# 6. Scores, label association and loss
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
# 7. LINK
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
        self.cfg = cfg = resolve_vlm_config(cfg)  # None fields -> what the weights were trained with
        self.class_space = class_space            # as given (dataclass or dict), for checkpoints
        cs = self.classes = _class_space(class_space)
        K = len(cs.prompts)
        clip = build_vlm(cfg)
        if text_embed is None:  # once per model (minutes for 600 prompts on a CPU; a GPU if any)
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            text_embed = encode_prompts(clip.to(dev), vlm_tokenizer(cfg), cs.prompts).cpu()
            clip = clip.cpu()
        if text_embed.shape[0] != K:
            raise ValueError(f"text_embed has {text_embed.shape[0]} rows, class space has {K} classes")
        # Only the image tower is kept (the text tower's job ends with the embeddings above).
        self.vlm = clip.visual.requires_grad_(False).eval()
        self.image_mean, self.image_std = cfg.image_mean, cfg.image_std
        self.interpolation = getattr(self.vlm, "preprocess_cfg", {}).get("interpolation", "bicubic")
        with torch.no_grad():  # probe the feature width C and the grid once
            probe = vlm_dense_features(self.vlm, torch.zeros(1, 3, cfg.image_size, cfg.image_size), cfg.dense)
        c_vlm, self.grid = probe.shape[1], tuple(probe.shape[2:])
        self.vlm_width = c_vlm
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

    # -- the frozen VLM ------------------------------------------------------------------------

    def train(self, mode: bool = True):
        """The VLM stays in eval mode (frozen, no dropout / batch-norm updates)."""
        super().train(mode)
        if self.vlm is not None:
            self.vlm.eval()
        return self

    def release_vlm(self) -> None:
        """Free the frozen image tower (329 MiB for ViT-B/16, 1,161 MiB for ViT-L/14) when every
        image's features come from a feature cache: training and evaluation then never run it.
        The text embeddings stay (a classifier buffer); preprocess, cache_key, forward and
        checkpoints work as before; encode_images refuses. LINK.from_checkpoint rebuilds it."""
        self.vlm = None

    def preprocess(self, images) -> torch.Tensor:
        """list of PIL images -> [B, 3, S, S]: squash resize to S x S, VLM mean / std."""
        from PIL import Image
        S = self.cfg.image_size
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}.get(self.interpolation, Image.BICUBIC)
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB").resize((S, S), resample), dtype=np.float32) / 255.0
            out.append(torch.from_numpy(a).permute(2, 0, 1))
        x = torch.stack(out) if out else torch.zeros(0, 3, S, S)
        mean, std = torch.tensor(self.image_mean)[:, None, None], torch.tensor(self.image_std)[:, None, None]
        return (x - mean) / std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised -> dense VLM features [B, C, Gh, Gw] (float32, no grad)."""
        if self.vlm is None:
            raise RuntimeError("encode_images: the VLM image tower was released (release_vlm: features come "
                               "from the cache); LINK.from_checkpoint rebuilds a model with it")
        self.vlm.eval()
        dev = next(self.vlm.parameters()).device
        return vlm_dense_features(self.vlm, images.to(dev), self.cfg.dense).float()

    def cache_key(self) -> str:
        """Everything that changes what encode_images(preprocess(images)) gives, as
        'name=value' parts joined by '|': the VLM, its weights (a local file by the SHA-256 of
        its bytes), a carried architecture (vlm_config), activation, input size, pixel mean / std,
        resize filter and dense mode.
        Feature caches are keyed by it and checkpoints store it (from_checkpoint compares)."""
        c = self.cfg
        return "|".join([
            "features=v2", f"vlm={c.vlm}", *([f"arch={_config_id(c.vlm_config)}"] if c.vlm_config else []),
            f"weights={weights_id(c)}",
            f"act={'quick_gelu' if c.quick_gelu else 'gelu'}", f"size={c.image_size}",
            "mean=" + ",".join(f"{v:.6g}" for v in c.image_mean), "std=" + ",".join(f"{v:.6g}" for v in c.image_std),
            f"resize={self.interpolation}", f"dense={c.dense}"])

    def describe_vlm(self) -> str:
        """One line for the run's log: VLM, weights, activation, input size and token grid."""
        c, (gh, gw) = self.cfg, self.grid
        return (f"VLM {c.vlm} ({c.pretrained or f'random, seed {c.vlm_seed}'}; "
                f"{'QuickGELU' if c.quick_gelu else 'GELU'}; mean {c.image_mean} std {c.image_std}) "
                f"at {c.image_size} px: dense map '{c.dense}' of {gh} x {gw} tokens, width {self.vlm_width}")

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
    def from_checkpoint(cls, path, map_location="cpu") -> "LINK":
        """Rebuild a model from a train_teacher.py checkpoint (config, class_space, model)."""
        path = os.fspath(path)
        ck = load_checkpoint(path, map_location)   # runs.py: the one reader (missing, corrupt, foreign)
        known = {f.name for f in fields(LINKConfig)}
        unknown = set(ck["config"]) - known
        if unknown:
            raise ValueError(f"{path}: field 'config' has unknown keys {sorted(unknown)}")
        state = ck["model"]
        model = cls(LINKConfig(**ck["config"]), ck["class_space"],
                    text_embed=state.get("classifier.text_embed"))
        if ck.get("cache_key") not in (None, model.cache_key()):  # e.g. weights rewritten in place
            raise ValueError(f"{path}: the frozen VLM differs from the one this checkpoint was trained with "
                             f"({key_difference(ck['cache_key'], model.cache_key())})")
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.startswith("vlm.")]
        if missing or unexpected:
            raise ValueError(f"{path}: field 'model' does not match the config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model


__all__ = ["LINKConfig", "LINK", "register_tiny_vlm", "register_vlm_config", "build_vlm", "vlm_dense_features",
           "focal_loss", "associate", "sine_encoding", "box_encoding"]
