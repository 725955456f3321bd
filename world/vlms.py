"""The synthetic world's own VLMs: their open_clip configs and the checkpoints that ship in world/weights/.

No weights can be downloaded here, so the synthetic HOI world has small CLIP-style models of
its own, pretrained on image-level captions of the world by `python -m world.pretrain_vlm`. Each ships as an
ordinary open_clip checkpoint (an fp16 state dict) with a JSON manifest beside it:

    world/weights/<file>.pt   torch.save(state_dict), floats in fp16: open_clip.load_checkpoint reads it
    world/weights/<file>.json   {"name", "open_clip_config", "checkpoint", "sha256", "bytes", "image_size",
                                 "image_mean", "image_std", "loss", "command", "seed", "heldout", ...}

A user's real CLIP reaches LINK as LINKConfig(vlm=NAME, pretrained=FILE); so do these, with the
architecture carried in the config (vlm_config), so a checkpoint trained on them rebuilds in any
process without registering anything first (the checkpoint file must still be where
`pretrained` points, as for any local VLM checkpoint):

    LINK(LINKConfig(**world_vlm("world-clip")), class_space)   # checks the sha256 first
    python train_teacher.py --vlm world-clip ...               # the same, from the command line

Names must not contain "siglip" (open_clip would pick the Hugging Face SigLIP tokenizer); these
models use open_clip's own CLIP tokenizer, which needs no download.
"""
import os
from pathlib import Path

from common import file_sha256, read_json

WEIGHTS = Path(__file__).resolve().parent / "weights"

# The text towers keep CLIP's 49,408-token table (open_clip's tokenizer emits those ids), which
# dominates the file size: 49,408 x 64 x 2 bytes = 6.3 MB in fp16. Hence text width 64 (the
# world's language has ~50 words), so that a checkpoint stays near 7 MB.
_TEXT = {"context_length": 64, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3}


def _vit(width: int, layers: int, pool: str) -> dict:
    """A ViT reading the world's 128-px images in 16-px patches: an 8 x 8 token map."""
    return {"embed_dim": 128, "text_cfg": dict(_TEXT),
            "vision_cfg": {"image_size": 128, "patch_size": 16, "width": width, "layers": layers,
                           "head_width": 32, "pool_type": pool}}


#: open_clip configs world.pretrain_vlm can train (--arch).
ARCHS = {
    # average-pooled patch tokens: every token is pulled into the joint image-text space
    "vit-avg": _vit(96, 4, "avg"),
    # CLIP's class-token pooling
    "vit-tok": _vit(96, 4, "tok"),
}


def _manifest(path: Path, doc: dict) -> dict:
    """The manifest ``doc`` read from ``path``, its fields checked (ValueError naming file and field)."""
    def bad(field, want):
        raise ValueError(f"{path}: field '{field}' {want}")
    for key in ("name", "checkpoint", "sha256"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            bad(key, "missing or not a non-empty string")
    cfg = doc["open_clip_config"]
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), dict) for k in ("vision_cfg", "text_cfg")):
        bad("open_clip_config", "must be an open_clip model config (with 'vision_cfg' and 'text_cfg')")
    size = doc.get("image_size")
    if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        bad("image_size", "must be a positive integer")
    for key in ("image_mean", "image_std"):
        v = doc.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                            for x in v)):
            bad(key, "must be a list of 3 numbers")
    return doc


def shipped(folder=WEIGHTS) -> dict:
    """{name: manifest} of the world VLMs in ``folder``: its *.json files that hold an
    "open_clip_config" (other JSON files there are not manifests), "checkpoint" made absolute."""
    out = {}
    for path in sorted(Path(folder).glob("*.json")):
        doc = read_json(path, "world VLM manifest", allow_bool=True)
        if not isinstance(doc, dict) or "open_clip_config" not in doc:
            continue
        doc = _manifest(path, doc)
        doc["checkpoint"] = str(path.parent / doc["checkpoint"])
        out[doc["name"]] = doc
    return out


def world_vlm(name: str = "world-clip", folder=WEIGHTS, verify: bool = True) -> dict:
    """The LINKConfig fields of a shipped world VLM: vlm, vlm_config, pretrained (the checkpoint
    file), image_size, image_mean, image_std, quick_gelu (the config's; the shipped ones: GELU).

    verify: check the checkpoint's sha256 against its manifest. Raises ValueError naming the
    file on a mismatch or an unknown name, FileNotFoundError when the checkpoint is missing.
    """
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder}: world VLM weights folder not found")
    have = shipped(folder)
    if name not in have:
        raise ValueError(f"world VLM {name!r}: not in {folder} (have: {', '.join(sorted(have)) or 'none'})")
    doc = have[name]
    ckpt = doc["checkpoint"]
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"{ckpt}: world VLM checkpoint not found")
    if verify and file_sha256(ckpt) != doc["sha256"]:
        raise ValueError(f"{ckpt}: sha256 differs from its manifest's (a corrupt or replaced file)")
    return {"vlm": name, "vlm_config": doc["open_clip_config"], "pretrained": ckpt,
            "image_size": int(doc["image_size"]), "image_mean": tuple(doc["image_mean"]),
            "image_std": tuple(doc["image_std"]), "quick_gelu": bool(doc["open_clip_config"].get("quick_gelu", False))}
