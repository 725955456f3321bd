"""Stage 2 of LINK: a student trained from scratch on ground truth plus dense distillation from
one or several frozen teachers on ALL enumerated pairs.

The training loop is trainer.Trainer and the run set-up train_teacher.py's; this file only adds
:class:`Distiller`, the ``extra_loss`` hook, and the CLI.

Each step, every teacher is fed the exact same detections, in the same order, as the student
(the loop builds them once and passes the same list), on its own frozen VLM's features of the
same images and views (its own feature cache, shared with the teacher's own training when the
cache key matches). Because the boxes are identical, pairs align one to one; this is checked
every step (same pair_image and pair_idx), a mismatch raises PairAlignmentError.

KD(f_s, f_t) = T^2 * KL(softmax(f_t / T) || softmax(f_s / T)), rows = tokens / pairs
(kernels.kl_distill; several teachers: the target is the mean of their probabilities):

* map level:   student latent_map [B, Gh*Gw, d] vs each teacher's, token-wise over the d
               channels. A teacher whose VLM has another grid is bilinearly resized to the
               student's grid first. The latent widths d must agree.
* query level: every pair's query after each encoder and decoder layer, token-wise over the
               D channels, averaged over layers (same number of layers needed).
* logit level: on Psi(O) = logit(P * sigmoid(O)) with P the student's detection prior [P, K]
               (equal to the teachers' since the boxes are the same); impossible classes
               (P == 0) are masked out. Zero-shot: the unseen classes are masked out too
               (PROTOCOLS.md: unseen classifier rows are never supervised; the teacher's
               unseen outputs were never trained either), unless --kd-unseen.

loss = loss_gt + w_map * KD_map + w_query * KD_query + w_logit * KD_logit.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import kl_distill
from model import LINK, register_tiny_vlm
from train_teacher import (
    add_common_args,
    build_model,
    fit_and_finish,
    loop_config,
    make_sources,
    metric_for,
    run_cli,
    setup_run,
)
from trainer import CheckpointError, FeatureSource, Trainer, load_checkpoint, plain_dict


class PairAlignmentError(AssertionError):
    """Student and teacher pairs differ (they must see identical boxes in identical order)."""


def check_alignment(s_out: dict, t_out: dict, which: str = "teacher") -> None:
    """Raise PairAlignmentError unless pair_image and pair_idx agree exactly."""
    for k in ("pair_image", "pair_idx"):
        a, b = s_out[k], t_out[k]
        if a.shape != b.shape or not torch.equal(a.to(b.device), b):
            raise PairAlignmentError(
                f"{which}: {k} differs from the student's (shapes {tuple(a.shape)} vs "
                f"{tuple(b.shape)}); teacher and student must be fed identical detections")


def resize_map(m: torch.Tensor, grid_from, grid_to) -> torch.Tensor:
    """Latent map [B, Gh*Gw, d] on grid_from -> [B, Gh'*Gw', d] on grid_to (bilinear)."""
    gh, gw = (int(x) for x in grid_from)
    th, tw = (int(x) for x in grid_to)
    if (gh, gw) == (th, tw):
        return m
    B, T, d = m.shape
    if T != gh * gw:
        raise ValueError(f"latent map has {T} tokens, grid {gh}x{gw} expects {gh * gw}")
    x = m.transpose(1, 2).reshape(B, d, gh, gw)                            # [B, d, Gh, Gw]
    x = F.interpolate(x.float(), size=(th, tw), mode="bilinear", align_corners=False)
    return x.reshape(B, d, th * tw).transpose(1, 2).to(m.dtype)            # [B, Gh'*Gw', d]


def distill_losses(s_out: dict, s_grid, t_outs: list, t_grids: list, w_map=1.0, w_query=1.0,
                   w_logit=1.0, temperature=1.0, impl="auto", exclude_classes=None) -> dict:
    """The three weighted KD terms (0-dim tensors) of a student output vs M teacher outputs.

    s_out / t_outs[m]: model outputs (latent_map [B, T, d], queries list of [P, D], logits
    [P, K], prior [P, K], pair_image [P], pair_idx [P, 2]); s_grid / t_grids[m]: (Gh, Gw) of
    the respective VLM feature maps. exclude_classes: class indices left out of the
    logit-level KD (masked like impossible classes). Alignment is checked first.
    """
    for m, t in enumerate(t_outs):
        check_alignment(s_out, t, f"teacher {m}")
    T = float(temperature)
    zero = s_out["logits"].new_zeros(()).float()
    out = {}
    if w_map and s_out.get("latent_map") is None:
        raise ValueError("map-level KD needs latent maps (the model has no linking decoder): "
                         "use --w-map 0")
    if w_map:
        s = s_out["latent_map"].float()                                    # [B, T, d]
        ts = []
        for m, (t, g) in enumerate(zip(t_outs, t_grids)):
            tm = resize_map(t["latent_map"].detach().float(), g, s_grid)   # [B, T, d']
            if tm.shape != s.shape:
                raise ValueError(f"teacher {m}: latent map {tuple(tm.shape)} vs student "
                                 f"{tuple(s.shape)}: map-level KD needs the same latent width")
            ts.append(tm)
        d = s.shape[-1]
        out["loss_kd_map"] = w_map * kl_distill(s.reshape(-1, d),
                                                torch.stack(ts).reshape(len(ts), -1, d), T, impl=impl)
    if w_query:
        sq = s_out["queries"]
        for m, t in enumerate(t_outs):
            if len(t["queries"]) != len(sq):
                raise ValueError(f"teacher {m} has {len(t['queries'])} query layers, the student "
                                 f"{len(sq)}: query-level KD pairs them layer by layer")
        if len(sq) and sq[0].shape[0] > 0:
            per = [kl_distill(q.float(), torch.stack([t["queries"][layer].detach().float() for t in t_outs]),
                              T, impl=impl) for layer, q in enumerate(sq)]
            out["loss_kd_query"] = w_query * torch.stack(per).mean()
        else:
            out["loss_kd_query"] = zero
    if w_logit:
        if s_out["logits"].shape[0] > 0:
            tl = torch.stack([t["logits"].detach().float() for t in t_outs])  # [M, P, K]
            prior = s_out["prior"].detach().float()                            # [P, K]
            if exclude_classes is not None and len(exclude_classes):
                prior = prior.clone()
                prior[:, list(exclude_classes)] = 0.0
            out["loss_kd_logit"] = w_logit * kl_distill(s_out["logits"].float(), tl, T,
                                                        prior=prior, impl=impl)
        else:
            out["loss_kd_logit"] = zero
    return out


class Distiller:
    """The ``extra_loss`` hook: runs the frozen teachers on the student's exact inputs."""

    def __init__(self, teachers: list, sources: list, w_map=1.0, w_query=1.0, w_logit=1.0,
                 temperature=1.0, impl="auto", exclude_classes=None):
        self.teachers, self.sources = teachers, sources
        self.exclude = list(exclude_classes or [])
        self.w = dict(w_map=w_map, w_query=w_query, w_logit=w_logit)
        self.temperature, self.impl = temperature, impl
        for t in teachers:
            t.eval()
            for p in t.parameters():
                p.requires_grad_(False)

    def __call__(self, ctx: dict) -> dict:
        t_outs, grids = [], []
        for t, src in zip(self.teachers, self.sources):
            f = src.get(ctx["indices"], ctx["views"])                     # [b, C_t, Gh_t, Gw_t]
            with torch.no_grad():
                t_outs.append(t(f, ctx["dets"], ctx["sizes"]))
            grids.append(tuple(f.shape[-2:]))
        return distill_losses(ctx["out"], tuple(ctx["feats"].shape[-2:]), t_outs, grids,
                              temperature=self.temperature, impl=self.impl,
                              exclude_classes=self.exclude, **self.w)


def load_teacher(path, device):
    ck = load_checkpoint(path, map_location="cpu")      # clear errors before building anything
    if ck["config"].get("vlm") == "link-tiny":
        register_tiny_vlm()
    t = LINK.from_checkpoint(str(path), map_location=device)
    return t.to(device), ck


def student_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a LINK student: GT + distillation from frozen teachers.")
    add_common_args(p)
    p.set_defaults(name="student")
    k = p.add_argument_group("distillation")
    k.add_argument("--teacher", action="append", required=True, metavar="CKPT",
                   help="teacher checkpoint (repeat for several teachers, possibly other VLMs)")
    k.add_argument("--w-map", type=float, default=1.0)
    k.add_argument("--w-query", type=float, default=1.0)
    k.add_argument("--w-logit", type=float, default=1.0)
    k.add_argument("--temperature", type=float, default=1.0)
    k.add_argument("--kd-impl", default="auto", choices=["auto", "triton", "torch", "reference"])
    k.add_argument("--kd-unseen", action="store_true",
                   help="zero-shot: also distil the unseen classes' logits (default: left out)")
    return p


def _file_hash(path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def main(argv=None) -> dict:
    args = student_parser().parse_args(argv)
    d, train, test, cs, cache = setup_run(args)
    # the student is built first, right after seeding: with the teacher's --seed it starts from
    # the teacher's initial weights, so a comparison isolates the effect of distillation
    # (with all KD weights 0 the student reproduces the teacher exactly)
    model = build_model(args, cs, d.device)
    teachers, sources, info = [], [], []
    cs_plain = plain_dict(cs)
    for path in args.teacher:
        with torch.random.fork_rng(devices=[]):     # building a teacher draws no training RNG
            t, ck = load_teacher(path, d.device)
        if ck["class_space"] != cs_plain:
            diff = sorted(k for k in cs_plain if cs_plain.get(k) != ck["class_space"].get(k))
            raise CheckpointError(f"teacher {path}: class space differs from the student's data "
                                     f"(fields: {diff[:6]})")
        teachers.append(t)
        sources.append(FeatureSource(t, train, cache, 2 if args.flip else 1, args.cache_dtype, d,
                                     progress=not args.no_progress and d.main))
        info.append({"path": str(path), "sha1": _file_hash(path), "cache_key": t.cache_key()})
    tf, ef = make_sources(model, args, d, train, test, cache)
    dist = Distiller(teachers, sources, args.w_map, args.w_query, args.w_logit, args.temperature,
                     args.kd_impl, exclude_classes=[] if args.kd_unseen else list(cs.unseen))
    out = Path(args.runs) / args.name
    metric_fn, mkw = metric_for(args, cs)
    tr = Trainer(model, loop_config(args), train, tf, out, d, test, ef, extra_loss=dist,
                 metric_fn=metric_fn, eval_kwargs=mkw, class_space=cs,
                 ckpt_extra={"role": "student", "teachers": info,
                             "distill": {"w_map": args.w_map, "w_query": args.w_query,
                                         "w_logit": args.w_logit, "temperature": args.temperature}})
    return fit_and_finish(tr, args.resume, args.name)


if __name__ == "__main__":
    run_cli(main)
