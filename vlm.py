"""The frozen vision-language model under LINK, as DETR's backbone.py is under DETR.

VLMConfig (LINKConfig's VLM fields); register_vlm_config / register_tiny_vlm (architectures
open_clip does not ship: checkpoints carry them); resolve_vlm_config, the ONE rule for
image_size, quick_gelu and pixel mean / std; weights_id; dense_features (an image tower ->
F [B, C, Gh, Gw], per tower kind); FrozenVLM, built from a config it resolves: preprocess, dense
map, text encoding, tokenizer, width / grid, cache key, release. The weights come from
open_clip (a tag, a local file, or random); model.py never says which.
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
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
import torch.nn as nn
from einops import rearrange
from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

from common import file_sha256


@dataclass
class VLMConfig:
    # any open_clip model name; pretrained = tag, local checkpoint path, or None (random). None
    # below = "what the weights were trained with", filled in by resolve_vlm_config.
    vlm: str = "ViT-B-16"
    pretrained: str | None = "openai"
    image_size: int | None = None  # VLM input S (position embedding interpolated); None = the tower's own
    quick_gelu: bool | None = None  # activation; None = the tag's (OpenAI: QuickGELU), the config's, ...
    image_mean: tuple | None = None  # pixel mean / std; None = the tag's (open_clip's preprocess config), ...
    image_std: tuple | None = None
    dense: str = "tokens"          # dense map F: "tokens" | "maskclip" (dense_features)
    tokenizer: str | None = None   # Hugging Face tokenizer folder (SigLIP offline); None = open_clip's
    vlm_seed: int = 0              # seeds a randomly initialised VLM (pretrained=None), so a
                                   # checkpoint without VLM weights rebuilds the same network
    vlm_config: dict | None = None  # an open_clip model config registered under `vlm` (an architecture
                                   # open_clip does not ship, e.g. the world's VLMs): checkpoints carry it


_REGISTERED: set = set()  # names register_vlm_config gave open_clip (never one of open_clip's own)


@functools.lru_cache(maxsize=1)
def _config_dir() -> str:
    """This process's folder of registered configs (one file per name), removed at exit."""
    path = tempfile.mkdtemp(prefix="link_vlm_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def register_vlm_config(name: str, config: dict) -> str:
    """Register the open_clip model config ``config`` under ``name``; returns name.

    The config a checkpoint carries wins: a name registered here before with another config is
    registered again (a model, once built, does not read the registry). Refused (ValueError):
    one of open_clip's own names with another config (a checkpoint never shadows ViT-B-16), a
    name containing "siglip" (open_clip would pick the Hugging Face SigLIP tokenizer for it)."""
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
    TINY_VLM: ViT width 64, 2 layers, patch 8, 64 px (8 x 8 tokens); text width 64, 2 layers;
    3.3 M parameters, most of them the text token table. vision_cfg replaces the image tower."""
    if name in open_clip.list_models():
        return name
    return register_vlm_config(name, dict(TINY_VLM, vision_cfg=vision_cfg or TINY_VLM["vision_cfg"]))


def _weights_source(cfg: VLMConfig) -> tuple[str, str | None]:
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


def _pixel_stats_given(cfg: VLMConfig) -> tuple | None:
    """The user's (mean, std), each 3 floats (from one number, 3 numbers or "a,b,c"); None if unset."""
    if cfg.image_mean is None and cfg.image_std is None:
        return None
    if cfg.image_mean is None or cfg.image_std is None:
        raise ValueError("LINKConfig: set both image_mean and image_std, or neither")
    out = []
    for name, v in (("image_mean", cfg.image_mean), ("image_std", cfg.image_std)):
        try:
            t = tuple(float(x) for x in (v.split(",") if isinstance(v, str) else v if isinstance(v, (list, tuple))
                                         else [v]))
        except (TypeError, ValueError):
            t = ()
        t = t * 3 if len(t) == 1 else t
        if len(t) != 3 or not all(math.isfinite(x) for x in t) or (name == "image_std" and min(t) <= 0):
            raise ValueError(f"LINKConfig.{name} must be 3 finite numbers{' > 0' * (name == 'image_std')}, got {v!r}")
        out.append(t)
    return tuple(out)


def resolve_vlm_config(cfg: VLMConfig) -> VLMConfig:
    """cfg with image_size, quick_gelu, image_mean / image_std filled in where None, so that a
    checkpoint states what the weights were trained with. One rule for each, the first that says:

      1. the field as given (LINKConfig, --model-opt: the user's);
      2. the tag's open_clip pretrained config (pretrained is a tag; OpenAI's: QuickGELU);
      3. the architecture's config: its image size; its quick_gelu where it names one, and
         always for a config LINK registered (carried vlm_config, tiny VLMs: no key = GELU);
      4. without a tag: the value every open_clip tag of the architecture shares (SigLIP: 0.5, GELU);
      5. open_clip's default (GELU, OpenAI's statistics) for a tag or random weights; for a local
         file, a one-line error naming the --model-opt to set (e.g. ViT-B-16: its tags disagree).
    A file's contents are never read to guess (a renamed OpenAI file on ViT-B-16 is refused).
    """
    if cfg.vlm_config is not None:  # on demand: a checkpoint's VLM rebuilds in a fresh process
        register_vlm_config(cfg.vlm, cfg.vlm_config)
    elif cfg.vlm == "link-tiny":
        register_tiny_vlm()
    if ":" in cfg.vlm:
        raise ValueError(f"LINKConfig.vlm: {cfg.vlm!r}: 'hf-hub:' / 'local-dir:' names are not supported; use an "
                         f"open_clip model name and pretrained = a tag or a weights file")
    model_cfg = open_clip.get_model_config(cfg.vlm)
    if model_cfg is None:
        raise ValueError(f"LINKConfig.vlm: {cfg.vlm!r} is not an open_clip model name "
                         f"(open_clip.list_models() lists the {len(open_clip.list_models())} known ones)")
    source, where = _weights_source(cfg)
    tag_cfg = get_pretrained_cfg(cfg.vlm, where) if source == "tag" else None
    every_tag = [get_pretrained_cfg(cfg.vlm, t) for t in list_pretrained_tags_by_model(cfg.vlm)]
    ours = cfg.vlm_config is not None or cfg.vlm in _REGISTERED

    def rule(what: str, user, of_tag, of_config, default, flag: str):
        """of_tag(t): what open_clip's pretrained config t says, None where it is silent."""
        for said in (user, of_tag(tag_cfg) if tag_cfg else None, of_config):
            if said is not None:
                return said
        if source == "tag":                 # a tag silent on it: what open_clip builds for the tag
            return default
        shared = {default if of_tag(t) is None else of_tag(t) for t in every_tag}
        if len(shared) == 1:
            return shared.pop()
        if source == "random":
            return default
        raise ValueError(f"{cfg.pretrained}: its {what} unknown (the open_clip tags of {cfg.vlm} "
                         f"{'disagree' if shared else 'are none'}): set {flag}")

    size = rule("input size is", cfg.image_size or None, lambda t: None, model_cfg["vision_cfg"].get("image_size", 224),
                224, "LINKConfig.image_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"LINKConfig.image_size: {cfg.vlm} takes {tuple(size)} inputs; set a square image_size")
        size = size[0]
    if not (isinstance(size, int) and size > 0):
        raise ValueError(f"LINKConfig.image_size must be a positive integer, got {size!r}")
    openai = (tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD))
    mean, std = rule("pixel mean/std are", _pixel_stats_given(cfg),
                     lambda t: (tuple(t.get("mean", openai[0])), tuple(t.get("std", openai[1]))), None, openai,
                     "LINKConfig.image_mean and image_std (e.g. --model-opt image_mean=0.5,0.5,0.5 "
                     "--model-opt image_std=0.5,0.5,0.5)")
    quick = rule("activation (GELU or QuickGELU) is", cfg.quick_gelu, lambda t: t.get("quick_gelu"),
                 model_cfg.get("quick_gelu", False if ours else None), False,
                 "LINKConfig.quick_gelu (--model-opt quick_gelu=true or quick_gelu=false)")
    return dataclasses.replace(cfg, image_size=int(size), quick_gelu=bool(quick), image_mean=mean, image_std=std)


def weights_id(cfg: VLMConfig) -> str:
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


def dense_features(visual: nn.Module, images: torch.Tensor, dense: str = "tokens") -> torch.Tensor:
    """The dense map F of an open_clip image tower: images [B, 3, S, S] -> [B, C, Gh, Gw].
    open_clip ViT (CLIP): the last layer's patch tokens after ln_post, @ proj. timm ViT with an
    attention-pool head (SigLIP): each normed trunk token through the pool head on its own (a
    one-token attention is the identity). Other timm towers (EVA, ConvNeXt): the normed trunk
    tokens / map, per-token head and open_clip's projection (an attention-pool one skipped).
    dense="maskclip" (ViT towers): the last block's attention is each token's own value path."""
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


class FrozenVLM(nn.Module):
    """The frozen open_clip model of a config's VLM fields, resolved here (self.cfg).

    vlm = FrozenVLM(cfg)
    feats = vlm(vlm.preprocess(pil_images))   # dense map F [B, C, Gh, Gw], C = vlm.width, vlm.grid
    text = vlm.encode_text(prompts)           # [K, E]; vlm.clip (both towers) until release_text
    """

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg = resolve_vlm_config(cfg)
        pretrained = os.path.expanduser(cfg.pretrained) if cfg.pretrained else None
        with torch.random.fork_rng(devices=[]):    # open_clip interpolates the position embedding on load
            torch.manual_seed(cfg.vlm_seed)
            clip = open_clip.create_model(cfg.vlm, pretrained=pretrained, force_image_size=cfg.image_size,
                                          force_quick_gelu=bool(cfg.quick_gelu))
        self.clip = clip.requires_grad_(False).eval()
        self.visual = clip.visual
        self.interpolation = getattr(self.visual, "preprocess_cfg", {}).get("interpolation", "bicubic")
        with torch.no_grad():  # probe the feature width C and the grid once
            probe = dense_features(self.visual, torch.zeros(1, 3, cfg.image_size, cfg.image_size), cfg.dense)
        self.width, self.grid = probe.shape[1], tuple(probe.shape[2:])

    def train(self, mode: bool = True):
        """Always in eval mode (frozen: no dropout, no batch-norm updates)."""
        return super().train(False)

    def release_text(self) -> None:
        """Free the text tower (its job ends with the prompt embeddings): vlm.clip -> None."""
        self.clip = None

    def release(self) -> None:
        """Free both towers (features come from a cache); preprocess and cache_key still work."""
        self.clip = self.visual = None

    def preprocess(self, images) -> torch.Tensor:
        """list of PIL images -> [B, 3, S, S]: squash resize to S x S, the VLM's mean / std."""
        from PIL import Image
        S = self.cfg.image_size
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}.get(self.interpolation, Image.BICUBIC)
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB").resize((S, S), resample), dtype=np.float32) / 255.0
            out.append(torch.from_numpy(a).permute(2, 0, 1))
        x = torch.stack(out) if out else torch.zeros(0, 3, S, S)
        mean, std = torch.tensor(self.cfg.image_mean)[:, None, None], torch.tensor(self.cfg.image_std)[:, None, None]
        return (x - mean) / std

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised -> dense map F [B, C, Gh, Gw] (float32, no grad)."""
        if self.visual is None:
            raise RuntimeError("encode_images: the VLM image tower was released (release_vlm: features come "
                               "from the cache); LINK.from_checkpoint rebuilds a model with it")
        self.visual.eval()
        dev = next(self.visual.parameters()).device
        return dense_features(self.visual, images.to(dev), self.cfg.dense).float()

    def tokenizer(self):
        """open_clip's tokenizer of cfg.vlm; with cfg.tokenizer, the Hugging Face tokenizer in that
        folder (or hub name) in place of the config's (SigLIP's, offline); one-line errors."""
        c = self.cfg
        text_cfg = (open_clip.get_model_config(c.vlm) or {}).get("text_cfg", {})
        source = c.tokenizer or text_cfg.get("hf_tokenizer_name")
        if c.tokenizer and not text_cfg.get("hf_tokenizer_name"):
            raise ValueError(f"LINKConfig.tokenizer: {c.vlm} uses open_clip's own BPE tokenizer; leave it unset")
        try:
            if not c.tokenizer:
                return open_clip.get_tokenizer(c.vlm)
            return open_clip.tokenizer.HFTokenizer(
                c.tokenizer, context_length=text_cfg.get("context_length", 77),
                tokenizer_mode=text_cfg.get("tokenizer_mode"), **text_cfg.get("tokenizer_kwargs", {}))
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds; one line for all
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise ValueError(f"VLM {c.vlm}: its tokenizer {source!r} could not be loaded ({type(e).__name__}: "
                             f"{msg}); set LINKConfig.tokenizer to a local folder holding its files") from None

    @torch.no_grad()
    def encode_text(self, prompts: list[str], chunk: int = 256) -> torch.Tensor:
        """Text embeddings of the K prompts -> [K, E] float32 on the CPU, L2-normalised; on a GPU
        if there is one (minutes for 600 prompts on a CPU)."""
        if self.clip is None:
            raise RuntimeError("encode_text: the VLM text tower was released")
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        clip, tokenizer = self.clip.to(dev), self.tokenizer()
        out = [clip.encode_text(tokenizer(prompts[i:i + chunk]).to(dev), normalize=True)
               for i in range(0, len(prompts), chunk)]
        clip.cpu()
        return torch.cat(out).float().cpu()

    def cache_key(self) -> str:
        """Everything that changes self(self.preprocess(images)), 'name=value' parts joined by '|':
        VLM, weights (a local file by its bytes' SHA-256), carried architecture, activation, input
        size, pixel mean / std, resize filter, dense mode. Feature caches and checkpoints keep it."""
        c = self.cfg  # a carried architecture by the SHA-256 of its canonical JSON (16 hex digits)
        arch = c.vlm_config and hashlib.sha256(json.dumps(c.vlm_config, sort_keys=True).encode()).hexdigest()[:16]
        return "|".join([
            "features=v2", f"vlm={c.vlm}", *([f"arch={arch}"] if arch else []), f"weights={weights_id(c)}",
            f"act={'quick_gelu' if c.quick_gelu else 'gelu'}", f"size={c.image_size}",
            "mean=" + ",".join(f"{v:.6g}" for v in c.image_mean), "std=" + ",".join(f"{v:.6g}" for v in c.image_std),
            f"resize={self.interpolation}", f"dense={c.dense}"])

    def describe(self) -> str:
        """One line for the run's log: VLM, weights, activation, input size and token grid."""
        c, (gh, gw) = self.cfg, self.grid
        return (f"VLM {c.vlm} ({c.pretrained or f'random, seed {c.vlm_seed}'}; "
                f"{'QuickGELU' if c.quick_gelu else 'GELU'}; mean {c.image_mean} std {c.image_std}) "
                f"at {c.image_size} px: dense map '{c.dense}' of {gh} x {gw} tokens, width {self.width}")
