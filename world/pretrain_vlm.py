"""Pretrain a small open_clip model on image-level captions of the synthetic world, as CLIP is.

    python -m world.pretrain_vlm [--arch vit-tok|vit-avg] [--loss clip|siglip] [--out FILE] [--seed S]
                                 [--images N] [--epochs E] [--force]

1. draws its own caption-pretraining images with make_synthetic_world (world seed 1,000,000 +
   S, folder runs/vlm_world/...: never the HOI train/test worlds, whose seeds are small) and
   their captions (captions.py); the last --heldout images are held out;
2. trains both towers contrastively: CLIP's InfoNCE (--loss clip) or SigLIP's pairwise
   sigmoid loss (--loss siglip); images whose captions are the same text are positives of
   each other (not false negatives); a new caption is drawn per image and epoch, images are
   flipped left-right at random; deterministic from --seed (same machine, same --threads);
3. writes FILE (default world/weights/world_clip.pt): the fp16 open_clip state dict, loadable by
   open_clip.load_checkpoint, i.e. by LINKConfig(vlm=NAME, pretrained=FILE); FILE.json beside it
   (open_clip config, sha256, command, seed, time, held-out retrieval, loss curve) and a
   loss-curve plot FILE_curve.png. The held-out numbers are measured on the saved fp16 file,
   loaded back through vlm.FrozenVLM.

Held-out retrieval: each held-out image ranks the distinct canonical captions of the held-out
set (chance top-k = k / their number); an image scores if its own caption is in the top k.
Also: image-level AP of the 16 HOI prompts (LINK's classifier prompts) over held-out images,
chance = the class's share of images, separately for the classes the zero-shot splits hide.
"""
import contextlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from common import (
    OneLineParser,
    atomic_write,
    file_sha256,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    print_error,
    release_notes,
    run_command,
    unit_float,
)
from viz import plot_pretraining
from vlm import FrozenVLM, VLMConfig, register_vlm_config
from world import vlms
from world.captions import SYN_ZERO_SHOT, caption, caption_world, class_phrases

WORLD_SEED = 1_000_000  # + --seed: far from the HOI worlds' seeds (demo: 0, 1, 2, ...)
NAMES = {"clip": "world-clip", "siglip": "world-sig"}  # no "siglip" in a name: see world/vlms.py


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------

def load_images(paths: list) -> torch.Tensor:
    """PNG files -> uint8 [N, 3, S, S] (the whole set stays in memory: 49 KB per 128-px image)."""
    from PIL import Image
    return torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                        for p in paths])


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float, normalised by the mean / std the manifest records (OpenAI CLIP's)."""
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]   # the manifest's image_mean / std
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    return (x.float() / 255.0 - mean) / std


class CachedTokenizer:
    """open_clip's tokenizer with a memo: the world's captions repeat, and BPE-tokenising 128
    captions costs about as much as a training step of the text tower. texts -> int [B, L]."""

    def __init__(self, tokenizer):
        self.tokenizer, self.rows = tokenizer, {}

    def __call__(self, texts: list) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self.rows]
        if new:
            self.rows.update(zip(new, self.tokenizer(new)))
        return torch.stack([self.rows[t] for t in texts])


def batch_captions(gts: list, idx: torch.Tensor, seed: int, epoch: int) -> list:
    """This epoch's caption of each image in the batch (its own stream per seed, epoch, image)."""
    return [caption(gts[i], np.random.SeedSequence([seed, epoch, int(i)])) for i in idx.tolist()]


# ----------------------------------------------------------------------------------------------
# losses: logits [B, B] = image i vs caption j; pos [B, B] bool, True where caption j describes
# image i (its own caption, or another image's identical text)
# ----------------------------------------------------------------------------------------------

def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """CLIP InfoNCE, both directions; targets spread evenly over each row's positives.
    img, txt [B, E] L2-normalised, scale = exp(logit_scale) (a scalar)."""
    logits = scale * img @ txt.t()                                  # [B, B]
    target = pos.float() / pos.sum(1, keepdim=True)                 # pos is symmetric
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def siglip_loss(img, txt, scale, bias, pos) -> torch.Tensor:
    """SigLIP: an independent binary decision per (image, caption), summed over captions,
    averaged over images: -mean_i sum_j log sigmoid(z_ij * (scale * <img_i, txt_j> + bias))."""
    logits = scale * img @ txt.t() + bias                           # [B, B]
    z = pos.float() * 2 - 1
    return -F.logsigmoid(z * logits).sum() / img.shape[0]


def contrastive_loss(clip, images: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor, kind: str,
                     lock_text: bool = False):
    """One forward of both towers -> the loss. images [B, 3, S, S] normalised, tokens [B, L].
    lock_text: the text tower runs without a graph (it is not trained by this loss)."""
    img = clip.encode_image(images, normalize=True)                 # [B, E]
    with torch.no_grad() if lock_text else contextlib.nullcontext():
        txt = clip.encode_text(tokens, normalize=True)              # [B, E]
    scale = clip.logit_scale.exp().clamp(max=100)
    if kind == "clip":
        return clip_loss(img, txt, scale, pos)
    return siglip_loss(img, txt, scale, clip.logit_bias, pos)


def same_text(texts: list) -> torch.Tensor:
    """[B, B] bool: caption i and caption j are the same string."""
    ids = {t: k for k, t in enumerate(dict.fromkeys(texts))}
    v = torch.tensor([ids[t] for t in texts])
    return v[:, None] == v[None, :]


# ----------------------------------------------------------------------------------------------
# model and optimiser
# ----------------------------------------------------------------------------------------------

def model_config(arch, loss: str) -> dict:
    """open_clip config: the architecture (a vlms.ARCHS name or a config dict) plus the
    loss's initial temperature / bias (CLIP: scale 1 / 0.07, no bias; SigLIP: scale 10, bias
    -10, as in the SigLIP paper; open_clip then gives the model a logit_bias)."""
    cfg = json.loads(json.dumps(vlms.ARCHS[arch] if isinstance(arch, str) else arch))
    if loss == "siglip":
        cfg.update(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    return cfg


def build(name: str, config: dict, seed: int):
    """Register the config and build the model, randomly initialised from seed."""
    register_vlm_config(name, config)
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None)


def optimiser(clip, lr: float, wd: float) -> torch.optim.Optimizer:
    """AdamW as open_clip trains CLIP: no weight decay on gains, biases, embeddings' scalars
    (tensors with < 2 dims) and the temperature / bias."""
    decay, no_decay = [], []
    for n, p in clip.named_parameters():
        (no_decay if p.ndim < 2 or "logit_" in n else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_steps(clip, tokenizer, images, gts, idx_batches, kind, opt, lr_fn, seed, epoch, step0, gen,
                log_every=0, lock_text_until=0):
    """Train on the given batches of image indices; returns the per-step losses. Steps before
    lock_text_until train the image tower (and the temperature) against the locked text tower."""
    losses = []
    clip.train()
    for k, idx in enumerate(idx_batches):
        for g in opt.param_groups:
            g["lr"] = lr_fn(step0 + k)
        x = images[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5            # captions have no left / right
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        texts = batch_captions(gts, idx, seed, epoch)
        loss = contrastive_loss(clip, normalise(x), tokenizer(texts), same_text(texts), kind,
                                lock_text=step0 + k < lock_text_until)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_every and (k + 1) % log_every == 0:
            print(f"  step {step0 + k + 1}  loss {np.mean(losses[-log_every:]):.4f}  lr {lr_fn(step0 + k):.2e}  "
                  f"{time.strftime('%H:%M:%S')}", flush=True)
    return losses


def text_warmup(clip, tokenizer, gts: list, steps: int, batch: int, lr: float, seed: int, log_every=0) -> list:
    """Stage 1: the text tower alone learns which captions say the same thing. Two captions of
    one image (another template, phrase order and dropped phrases: caption(gt, seed)) are
    positives, as are captions of images showing the same (equal canonical captions); CLIP's
    loss between the two sets at a fixed scale of 10. Why: from random init the text tower
    gives nearly one embedding for every caption (cosine ~0.97), and joint contrastive training
    then collapses it completely (every text the same) before the image tower has learnt
    anything, a state it does not leave. Returns the per-step losses."""
    params = [p for n, p in clip.named_parameters() if not n.startswith("visual") and "logit_" not in n]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 7)
    canon = [caption(g) for g in gts]
    losses = []
    for step in range(steps):
        idx = torch.randperm(len(gts), generator=gen)[:batch].tolist()
        two = [[caption(gts[i], np.random.SeedSequence([seed, 10 ** 6 + step, v, i])) for i in idx] for v in (0, 1)]
        a, b = (clip.encode_text(tokenizer(t), normalize=True) for t in two)
        loss = clip_loss(a, b, torch.tensor(10.0), same_text([canon[i] for i in idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"  text warm-up step {step + 1}  loss {np.mean(losses[-log_every:]):.4f}", flush=True)
    return losses


# ----------------------------------------------------------------------------------------------
# held-out evaluation
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def embed(clip, tokenizer, images: torch.Tensor, texts: list, chunk: int = 256):
    """-> image embeddings [N, E], text embeddings [M, E], L2-normalised."""
    clip.eval()
    img = torch.cat([clip.encode_image(normalise(images[i:i + chunk]), normalize=True)
                     for i in range(0, len(images), chunk)])
    txt = torch.cat([clip.encode_text(tokenizer(texts[i:i + chunk]), normalize=True)
                     for i in range(0, len(texts), chunk)])
    return img, txt


def retrieval(sim: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> dict:
    """sim [N, M] image-caption similarities, target [N] the column of image i's caption ->
    {"top1", "top5"}: share of images whose caption ranks in the top k (ties count against)."""
    own = sim.gather(1, target[:, None])                            # [N, 1]
    rank = (sim > own).sum(1) + (sim == own).sum(1) - 1             # 0 = ranked first
    return {f"top{k}": float((rank < k).float().mean()) for k in ks}


def class_ap(sim: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """Image-level AP of each class prompt: sim [N, K] image-prompt similarities, labels [N, K]
    bool -> AP [K] (VOC all-point, eval.py's; NaN for a class no image shows)."""
    from eval import vcoco_ap
    s = sim.numpy()
    return np.array([vcoco_ap([s[:, k]], [labels[:, k].astype(np.float32)], int(labels[:, k].sum()))
                     for k in range(labels.shape[1])])


def evaluate(clip, tokenizer, images: torch.Tensor, gts: list) -> dict:
    """Held-out retrieval (distinct canonical captions) and image-level HOI prompt AP."""
    texts = [caption(g) for g in gts]
    distinct = list(dict.fromkeys(texts))
    col = {t: j for j, t in enumerate(distinct)}
    prompts = ["a photo of " + p for p in class_phrases()]
    img, txt = embed(clip, tokenizer, images, distinct + prompts)
    sim = img @ txt.t()
    M = len(distinct)
    out = retrieval(sim[:, :M], torch.tensor([col[t] for t in texts]))
    labels = np.zeros((len(gts), len(prompts)), dtype=bool)
    for i, g in enumerate(gts):
        labels[i, g["interactions"]] = True
    ap = class_ap(sim[:, M:], labels)
    hidden = sorted({c for v in SYN_ZERO_SHOT.values() for c in v})
    out.update(captions=M, chance_top1=1 / M, chance_top5=min(1.0, 5 / M),
               class_map=float(np.nanmean(ap)), class_map_chance=float(np.nanmean(labels.mean(0))),
               zero_shot_classes=hidden, zero_shot_map=float(np.nanmean(ap[hidden])),
               zero_shot_map_chance=float(labels[:, hidden].mean(0).mean()), class_ap=ap.tolist())
    return out


# ----------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------

def save_fp16(clip, path: Path) -> None:
    """The open_clip state dict with floating tensors in fp16, written atomically."""
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in clip.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f))


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------

def parse_args(argv):
    p = OneLineParser(prog="python -m world.pretrain_vlm", description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=sorted(vlms.ARCHS), default="vit-avg", help="open_clip config (world/vlms.py)")
    p.add_argument("--loss", choices=["clip", "siglip"], default="clip")
    p.add_argument("--out", help="checkpoint file (default world/weights/world_clip.pt, world/weights/world_sig.pt for "
                                 "--loss siglip); its stem, '_' -> '-', names the model (world-clip)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="model init, data order, captions; world seed 1e6 + S")
    p.add_argument("--images", type=positive_int, default=12000, help="pretraining images drawn (incl. --heldout)")
    p.add_argument("--heldout", type=positive_int, default=500, help="last images of the set, for evaluation only")
    p.add_argument("--epochs", type=positive_int, default=18)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--weight-decay", type=nonneg_float, default=0.1)
    p.add_argument("--warmup", type=nonneg_int, default=100, help="warm-up steps")
    p.add_argument("--text-warmup", type=nonneg_int, default=200,
                   help="stage 1: steps of the text tower alone (two captions of one image are positives)")
    p.add_argument("--locked-text", type=unit_float, default=0.15,
                   help="stage 2: fraction of the contrastive steps with the text tower locked")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--world", help="folder of the drawn images (default runs/vlm_world/seed<W>_n<N>); an "
                                   "existing folder must be one this script drew (caption_world.json)")
    p.add_argument("--redraw", action="store_true", help="draw the world again even if --world holds it")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out and its JSON")
    a = p.parse_args(argv)
    a.out = Path(a.out or f"world/weights/{NAMES[a.loss].replace('-', '_')}.pt")
    a.name = a.out.stem.replace("_", "-")
    problems = [(a.images - a.heldout < a.batch_size, f"--images minus --heldout must be >= --batch-size "
                 f"({a.batch_size})"), (a.heldout < 2, "--heldout must be >= 2"),
                (a.out.suffix != ".pt", f"--out {a.out}: must end in .pt"),
                ("siglip" in a.name.lower(), f"--out {a.out}: no 'siglip' in the name (open_clip's tokenizer pick)"),
                (a.name in open_clip.list_models(), f"--out {a.out}: '{a.name}' is one of open_clip's own models"),
                (not a.force and (a.out.exists() or a.out.with_suffix(".json").exists()),
                 f"{a.out}: exists (and/or its .json); pass --force to overwrite")]
    for bad, msg in problems:
        if bad:
            p.error(msg)
    return a


def main(argv=None) -> int:
    """The command line (common.run_command: one line and 130 / 143 on an interrupt; --out is replaced last)."""
    return run_command(lambda: _pretrain(sys.argv[1:] if argv is None else argv), doing="pretraining the world VLM")


def _pretrain(argv) -> int:
    a = parse_args(argv)
    release_notes()
    torch.set_num_threads(a.threads)
    t0, c0 = time.time(), time.process_time()
    world_seed = WORLD_SEED + a.seed
    root = Path(a.world or f"runs/vlm_world/seed{world_seed}_n{a.images}")
    try:
        paths, gts = caption_world(root, a.images, world_seed, reuse=not a.redraw)
    except ValueError as e:
        print_error(f"world.pretrain_vlm: --world {e}")
        return 2
    images = load_images(paths)                                     # [N, 3, S, S] uint8
    world_s = time.time() - t0
    S = images.shape[-1]
    n_train = a.images - a.heldout
    print(f"world: {a.images} images of {S} px ({world_s:.0f} s) -> {root}; "
          f"{n_train} train, {a.heldout} held out", flush=True)

    config = model_config(a.arch, a.loss)
    clip = build(a.name, config, a.seed)
    tokenizer = CachedTokenizer(open_clip.get_tokenizer(a.name))
    opt = optimiser(clip, a.lr, a.weight_decay)
    spe = n_train // a.batch_size
    total = spe * a.epochs
    gen = torch.Generator().manual_seed(a.seed)
    curve = {"loss": [], "heldout": [], "text_warmup": []}
    held_img, held_gt = images[n_train:], gts[n_train:]
    curve["text_warmup"] = text_warmup(clip, tokenizer, gts[:n_train], a.text_warmup, a.batch_size, a.lr,
                                       a.seed, log_every=50)
    locked = int(round(a.locked_text * total))
    for epoch in range(a.epochs):
        perm = torch.randperm(n_train, generator=gen)
        batches = [perm[i * a.batch_size:(i + 1) * a.batch_size] for i in range(spe)]
        curve["loss"] += train_steps(clip, tokenizer, images, gts, batches, a.loss, opt,
                                     lambda s: lr_at(s, total, a.warmup, a.lr), a.seed, epoch, epoch * spe, gen, 30,
                                     lock_text_until=locked)
        ev = evaluate(clip, tokenizer, held_img, held_gt)
        curve["heldout"].append({"epoch": epoch + 1, **{k: v for k, v in ev.items() if k != "class_ap"}})
        print(f"epoch {epoch + 1}/{a.epochs}  loss {np.mean(curve['loss'][-spe:]):.4f}  held-out top1 "
              f"{ev['top1']:.3f} top5 {ev['top5']:.3f} (chance {ev['chance_top1']:.4f}) prompt mAP "
              f"{ev['class_map']:.3f}  {time.time() - t0:.0f} s", flush=True)
    wall, cpu = time.time() - t0, time.process_time() - c0

    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_name("." + a.out.name + ".new")   # --out (and its .json) replaced only at the end
    try:       # an interrupt or an error leaves no half-written temp
        save_fp16(clip, tmp)
        # the path a user's local CLIP checkpoint takes (with the manifest's mean / std)
        shipped = FrozenVLM(VLMConfig(vlm=a.name, vlm_config=config, pretrained=str(tmp), image_size=S,
                                      image_mean=open_clip.OPENAI_DATASET_MEAN,
                                      image_std=open_clip.OPENAI_DATASET_STD)).clip
        final = evaluate(shipped, tokenizer, held_img, held_gt)
        manifest = {
            "name": a.name, "checkpoint": a.out.name, "sha256": file_sha256(tmp),
            "bytes": tmp.stat().st_size, "open_clip_config": config, "image_size": S,
            "image_mean": list(open_clip.OPENAI_DATASET_MEAN), "image_std": list(open_clip.OPENAI_DATASET_STD),
            "arch": a.arch, "loss": a.loss, "seed": a.seed,
            "command": "python -m world.pretrain_vlm " + shlex.join(argv),
            "world": {"seed": world_seed, "images": a.images, "heldout": a.heldout, "image_size": S},
            "train": {"epochs": a.epochs, "steps": total, "batch_size": a.batch_size, "lr": a.lr,
                      "weight_decay": a.weight_decay, "warmup": a.warmup, "threads": a.threads,
                      "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "world_wall_s": round(world_s, 1)},
            "heldout": final, "curve": curve,
            "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        }
        from eval import write_json_atomic
        os.replace(tmp, a.out)
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic(manifest, a.out.with_suffix(".json"))
    png = plot_pretraining(curve, f"{a.name} ({a.arch}, {a.loss} loss)")
    atomic_write(a.out.with_name(a.out.stem + "_curve.png"), lambda f: f.write(png))
    print(f"{a.out}: {manifest['bytes'] / 1e6:.2f} MB, sha256 {manifest['sha256'][:16]}...; training "
          f"{wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU; held-out (fp16 file) top1 {final['top1']:.3f} "
          f"top5 {final['top5']:.3f} among {final['captions']} captions (chance {final['chance_top1']:.4f} / "
          f"{final['chance_top5']:.4f}); HOI prompt mAP {final['class_map']:.3f} (chance "
          f"{final['class_map_chance']:.3f}), zero-shot classes {final['zero_shot_map']:.3f} "
          f"(chance {final['zero_shot_map_chance']:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
