"""Stage 2 of LINK: a student trained from scratch on ground truth plus dense distillation from
one or several frozen teachers on ALL enumerated pairs.

The loop is trainer.Trainer and the run set-up train_teacher.py's; this file adds
:class:`Distiller` (the ``extra_loss`` hook, with its per-teacher :class:`Adapters`) and the CLI.
Every teacher gets the student's exact detections, in the same order, on its own frozen VLM's
features of the same images and views, so pairs align one to one (checked every step:
PairAlignmentError). KD(f_s, f_t) = T^2 * KL(sigma(f_t / T) || sigma(f_s / T)):

* map level:   latent maps [B, Gh*Gw, d], softmax over the channels of each token
               (--kd-map-axis positions: over the positions of each channel); a teacher on
               another grid is resized bilinearly to the student's.
* query level: every pair's query after the encoder and each decoder layer, softmax over the
               channels; layers matched by relative depth (:func:`query_layer_map`).
* logit level: on Psi(O) = logit(P * sigmoid(O)), P the detection prior, one Bernoulli KL per
               allowed class (kernels.kl_distill_sigmoid; --kd-logit-form softmax: the
               ablation); impossible classes and, zero-shot, the unseen ones (unless
               --kd-unseen) are masked out.

Several teachers: the logit level distils the mean of their probabilities; at the map and query
levels each teacher has its own KL through its own learned linear adapter (student channels ->
that teacher's, :class:`Adapters`), averaged over teachers. Each term is a per-item mean
(:class:`trainer.SumLoss`: tokens, pairs; normalised over all data-parallel ranks).
loss = loss_gt + w_map * KD_map + w_query * KD_query + w_logit * KD_logit.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cache import FeatureSource, release_unused_towers
from common import OneLineParser, file_digest, nonneg_float, positive_float
from kernels import kl_distill, kl_distill_sigmoid
from model import LINK
from runs import BUILD_ERRORS, CheckpointError, TrainInputError, build_error_reason, load_checkpoint, plain_dict
from train_teacher import add_common_args, build_model, fit_and_finish, make_sources, metric_for, setup_run
from trainer import SumLoss, Trainer, loop_config, run_cli, seed_everything


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


LOGIT_FORMS = ("sigmoid", "softmax")


@dataclass
class KDConfig:
    """The distillation options (CLI: --w-map, --w-query, --w-logit, --temperature,
    --kd-logit-form, --kd-adapter, --kd-map-axis, --kd-impl); checkpointed under ``distill``."""
    w_map: float = 1.0
    w_query: float = 1.0
    w_logit: float = 1.0
    temperature: float = 1.0
    logit_form: str = "sigmoid"  # sigmoid (per-class Bernoulli KL) | softmax (over a pair's classes: ablation)
    adapter: str = "linear"     # linear | none: student features -> each teacher's channel basis
    map_axis: str = "channels"  # map level's softmax: channels (per token) | positions (per channel)
    impl: str = "auto"          # kernels implementation: auto | triton | torch | reference

    def __post_init__(self):
        if self.map_axis not in ("channels", "positions"):
            raise ValueError(f"KDConfig.map_axis must be 'channels' or 'positions', got {self.map_axis!r}")
        if self.logit_form not in LOGIT_FORMS:
            raise ValueError(f"KDConfig.logit_form (--kd-logit-form) must be one of {LOGIT_FORMS}, "
                             f"got {self.logit_form!r}")


class Widths(NamedTuple):
    """What the map and query levels compare: latent map width (None: no linking decoder), pair
    query width, and the number of query tensors (encoder output + one per decoder layer)."""
    latent: Optional[int]
    query: int
    layers: int


def kd_widths(model) -> Widths:
    """The :class:`Widths` of a model.LINK (from its config)."""
    c = model.cfg
    return Widths(c.d_latent if c.linking_decoder else None, c.d_model, 1 + c.dec_layers)


def query_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher query tensor matched to each student query tensor: the same index when the
    counts agree; otherwise by relative depth (first to first, last to last, rounded between).
    Choice: LINK.md pairs layers "across encoder and decoder layers" and says nothing of teachers
    with another layer count."""
    if n_student == n_teacher:
        return list(range(n_student))
    if n_student == 1:              # the one tensor the student's classifier reads: the teacher's last
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def _adapter(d_student: int, d_teacher: int, kind: str, what: str) -> nn.Module:
    """One adapter: student channels -> a teacher's channel basis (token / pair wise)."""
    if kind == "none":
        if d_student != d_teacher:
            raise ValueError(f"{what}: width {d_teacher} vs the student's {d_student}; --kd-adapter none "
                             f"needs equal widths (use --kd-adapter linear)")
        return nn.Identity()
    lin = nn.Linear(d_student, d_teacher)
    if d_student == d_teacher:   # Choice: start as the identity, i.e. as the plain KL of equal bases
        with torch.no_grad():
            lin.weight.copy_(torch.eye(d_student))
            lin.bias.zero_()
    return lin


class Adapters(nn.Module):
    """Per teacher m, a learned linear map from the student's latent-map channels into teacher
    m's (``map[m]``) and one from the student's pair-query channels into teacher m's
    (``query[m]``, shared by the query layers: a network's layers write one residual basis).

    Why: channel c of one teacher (CLIP) has nothing to do with channel c of another (SigLIP),
    nor with channel c of a student that starts from its own initialisation; a KL over channels
    only means something in one basis. Trained with the student, stored in its checkpoint
    (``extra_state``), never used at inference. kind "none": identity maps (equal widths).
    """

    def __init__(self, student: Widths, teachers: list, kind: str = "linear", w_map=1.0, w_query=1.0,
                 seed: int = 0):
        super().__init__()
        if kind not in ("linear", "none"):
            raise ValueError(f"--kd-adapter must be linear or none, got {kind!r}")
        self.map, self.query = nn.ModuleList(), nn.ModuleList()
        with torch.random.fork_rng(devices=[]):    # the training RNG stream is left untouched
            torch.manual_seed(seed)
            for m, t in enumerate(teachers):
                if w_map:
                    if student.latent is None or t.latent is None:
                        who = "the student" if student.latent is None else f"teacher {m}"
                        raise ValueError(f"map-level KD needs latent maps and {who} has none (no linking "
                                         f"decoder): use --w-map 0")
                    self.map.append(_adapter(student.latent, t.latent, kind, f"teacher {m} latent map"))
                if w_query:
                    self.query.append(_adapter(student.query, t.query, kind, f"teacher {m} pair queries"))


def _map_kd(s_map, s_grid, t_outs, t_grids, adapters, T, impl, axis="channels") -> SumLoss:
    """Map level: per teacher, KL between the teacher's latent map (resized to the student's
    grid) and the adapted student map, mean over teachers. axis "channels": a softmax over the
    channels of each token, per token. "positions": a softmax over the tokens of each channel
    (channel-wise distillation: where each channel fires), mean over channels, per image."""
    B, n_tok, _ = s_map.shape
    total = s_map.new_zeros((), dtype=torch.float32)
    for m, (t, g) in enumerate(zip(t_outs, t_grids)):
        tm = resize_map(t["latent_map"].detach().float(), g, s_grid)               # [B, T, d_t]
        sm = adapters.map[m](s_map.float()) if adapters is not None else s_map.float()
        if tm.shape != sm.shape:
            raise ValueError(f"teacher {m}: latent map {tuple(tm.shape)} vs the student's adapted "
                             f"{tuple(sm.shape)}")
        if axis == "positions":   # rows = (image, channel) [B * d_t, T]; the mean over them, per image
            total = total + kl_distill(sm.transpose(1, 2).reshape(-1, n_tok), tm.transpose(1, 2).reshape(-1, n_tok),
                                       T, impl=impl) * B
        else:                     # rows = tokens [B * T, d_t]
            total = total + kl_distill(sm.reshape(-1, sm.shape[-1]), tm.reshape(-1, tm.shape[-1]), T,
                                       impl=impl) * (B * n_tok)
    return SumLoss(total / len(t_outs), B if axis == "positions" else B * n_tok)


def _query_kd(sq, t_outs, adapters, T, impl) -> SumLoss:
    """Query level: per teacher and matched layer, KL over channels pair by pair between the
    teacher's query and the adapted student query; mean over teachers and layers, per pair."""
    P = sq[0].shape[0] if len(sq) else 0
    total = sq[0].new_zeros((), dtype=torch.float32) if len(sq) else torch.zeros(())
    if P == 0:
        return SumLoss(total, 0)
    for m, t in enumerate(t_outs):
        for ls, lt in enumerate(query_layer_map(len(sq), len(t["queries"]))):
            q = adapters.query[m](sq[ls].float()) if adapters is not None else sq[ls].float()
            tq = t["queries"][lt].detach().float()
            if tq.shape != q.shape:
                raise ValueError(f"teacher {m}: query {tuple(tq.shape)} vs the student's adapted {tuple(q.shape)}")
            total = total + kl_distill(q, tq, T, impl=impl) * P
    return SumLoss(total / (len(t_outs) * len(sq)), P)


def _logit_kd(s_out, t_outs, exclude_classes, T, impl, form) -> SumLoss:
    """Logit level on Psi with the detection prior (impossible and excluded classes masked);
    several teachers: the mean of their probabilities; per pair. form "sigmoid": one Bernoulli
    KL per allowed class, summed over the pair's classes; "softmax": one KL over them."""
    logits = s_out["logits"]
    P = logits.shape[0]
    if P == 0:
        return SumLoss(logits.new_zeros((), dtype=torch.float32), 0)
    tl = torch.stack([t["logits"].detach().float() for t in t_outs])       # [M, P, K]
    prior = s_out["prior"].detach().float()                                # [P, K]
    if exclude_classes is not None and len(exclude_classes):
        prior = prior.clone()
        prior[:, list(exclude_classes)] = 0.0
    if form == "sigmoid":   # the sum over pairs of T^2 * sum over allowed classes
        return SumLoss(kl_distill_sigmoid(logits.float(), tl, T, prior=prior, impl=impl), P)
    return SumLoss(kl_distill(logits.float(), tl, T, prior=prior, impl=impl) * P, P)   # kl_distill: per-row mean


def distill_losses(s_out: dict, s_grid, t_outs: list, t_grids: list, cfg: Optional[KDConfig] = None,
                   adapters: Optional[Adapters] = None, exclude_classes=None) -> dict:
    """The weighted KD terms of a student output vs M teacher outputs: {name: SumLoss}, each a
    sum over its items (tokens for the map level, pairs for the others) with the item count;
    ``.mean()`` is the per-item loss, and the training loop divides by the global count.

    s_out / t_outs[m]: model outputs (latent_map [B, T, d], queries list of [P, D], logits
    [P, K], prior [P, K], pair_image [P], pair_idx [P, 2]); s_grid / t_grids[m]: (Gh, Gw) of
    the respective VLM feature maps. adapters: student -> teacher channel maps (None: identity).
    exclude_classes: class indices left out of the logit-level KD (masked like impossible
    classes). Alignment is checked first.
    """
    cfg = cfg or KDConfig()
    for m, t in enumerate(t_outs):
        check_alignment(s_out, t, f"teacher {m}")
    T, out = float(cfg.temperature), {}
    if cfg.w_map and s_out.get("latent_map") is None:
        raise ValueError("map-level KD needs latent maps (the model has no linking decoder): "
                         "use --w-map 0")
    # the logit level runs first: its [M, P, K] teacher stack and the op's working chunks are the
    # largest transient of the step, so it comes before the other levels keep their inputs for backward
    logit = _logit_kd(s_out, t_outs, exclude_classes, T, cfg.impl, cfg.logit_form) if cfg.w_logit else None
    if cfg.w_map:
        kd = _map_kd(s_out["latent_map"], s_grid, t_outs, t_grids, adapters, T, cfg.impl, cfg.map_axis)
        out["loss_kd_map"] = SumLoss(cfg.w_map * kd.total, kd.count)
    if cfg.w_query:
        kd = _query_kd(s_out["queries"], t_outs, adapters, T, cfg.impl)
        out["loss_kd_query"] = SumLoss(cfg.w_query * kd.total, kd.count)
    if logit is not None:
        out["loss_kd_logit"] = SumLoss(cfg.w_logit * logit.total, logit.count)
    return out


def teacher_keys(cfg: KDConfig) -> tuple:
    """The keys of a teacher's output that distill_losses reads under ``cfg``: the pairs (the
    alignment check), then one key per weighted level. A teacher asked for these only
    (model.LINK.forward's ``outputs``) builds nothing else: no prior, psi or scores [P, K]."""
    return (("pair_image", "pair_idx") + (("latent_map",) if cfg.w_map else ()) + (("queries",) if cfg.w_query else ())
            + (("logits",) if cfg.w_logit else ()))


class Distiller(nn.Module):
    """The ``extra_loss`` hook: runs the frozen teachers on the student's exact inputs.

    A module only for its :class:`Adapters` (trained with the student and checkpointed by the
    loop under ``extra_state``); the teachers are a plain list, neither trained nor saved.
    """

    def __init__(self, teachers: list, sources: list, student: Widths, teacher_widths: list,
                 cfg: Optional[KDConfig] = None, exclude_classes=None, seed: int = 0):
        super().__init__()
        cfg = cfg or KDConfig()
        self.teachers, self.sources, self.cfg = list(teachers), list(sources), cfg
        self.exclude = list(exclude_classes or [])
        self.adapters = Adapters(student, teacher_widths, cfg.adapter, cfg.w_map, cfg.w_query, seed)
        for t in self.teachers:
            t.eval()
            for p in t.parameters():
                p.requires_grad_(False)

    def teacher_outputs(self, ctx: dict) -> tuple[list, list]:
        """The one place that runs the teachers: -> (their outputs, their feature grids (Gh, Gw)).
        Each teacher is asked only for what distillation reads (teacher_keys)."""
        outs, grids = [], []
        for t, src in zip(self.teachers, self.sources):
            f = src.get(ctx["indices"], ctx["views"])                     # [b, C_t, Gh_t, Gw_t]
            with torch.no_grad():
                outs.append(t(f, ctx["dets"], ctx["sizes"], outputs=teacher_keys(self.cfg)))
            grids.append(tuple(f.shape[-2:]))
        return outs, grids

    def prepare(self, ctx: dict) -> None:
        """Run the teachers before the student's forward (the loop calls this first, ctx without
        "out"): their forward temporaries then never meet the student's saved activations."""
        ctx["teacher_outputs"] = self.teacher_outputs(ctx)

    def forward(self, ctx: dict) -> dict:
        t_outs, grids = ctx.pop("teacher_outputs", None) or self.teacher_outputs(ctx)
        return distill_losses(ctx["out"], tuple(ctx["feats"].shape[-2:]), t_outs, grids, self.cfg,
                              self.adapters, self.exclude)


def load_teacher(path, device):
    ck = load_checkpoint(path, map_location="cpu")      # clear errors before building anything
    try:                            # (the tiny VLM and a carried vlm_config register themselves)
        t = LINK.from_checkpoint(ck, device=device)
    except BUILD_ERRORS as e:       # a checkpoint that does not rebuild: one line naming it
        raise CheckpointError(f"teacher {path}: {build_error_reason(e)}") from None
    return t.to(device), ck


def teacher_init_seed(ck: dict) -> Optional[int]:
    """The seed a checkpoint's network was initialised from (a student stores ``init_seed``;
    a teacher is built right after seeding with its --seed), None when unknown."""
    if "init_seed" in ck:
        return int(ck["init_seed"])
    seed = (ck.get("loop") or {}).get("seed")
    return None if seed is None else int(seed)


def resolve_init_seed(init_seed: Optional[str], seed: int, teacher_seeds: list) -> int:
    """The student's initialisation seed: an integer as given; "same" = --seed (a teacher trained
    with that --seed starts from the same weights: the controlled run); by default the smallest
    integer above --seed that no teacher was initialised with, so the student starts from its
    own initialisation (LINK trains it "from scratch")."""
    if init_seed == "same":
        return int(seed)
    if init_seed is not None:
        return int(init_seed)
    out = int(seed) + 1
    while out in teacher_seeds:
        out += 1
    return out


def _init_seed_arg(v: str) -> str:
    if v != "same":
        try:
            int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer or 'same', got {v!r}") from None
    return v


def student_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="train_student.py",
                      description="Train a LINK student: GT + distillation from frozen teachers.")
    add_common_args(p)
    p.set_defaults(name="student")
    k = p.add_argument_group("distillation")
    k.add_argument("--teacher", action="append", required=True, metavar="CKPT",
                   help="teacher checkpoint (repeat for several teachers, possibly other VLMs)")
    k.add_argument("--init-seed", type=_init_seed_arg, metavar="N|same",
                   help="seed of the student's initial weights (and its dropout stream; --seed keeps the "
                        "data order and flips). Default: the smallest integer above --seed that no teacher "
                        "was initialised with; 'same': --seed, i.e. a teacher's initial weights")
    k.add_argument("--w-map", type=nonneg_float, default=1.0)
    k.add_argument("--w-query", type=nonneg_float, default=1.0)
    k.add_argument("--w-logit", type=nonneg_float, default=1.0)
    k.add_argument("--temperature", type=positive_float, default=1.0)
    k.add_argument("--kd-logit-form", default="sigmoid", choices=list(LOGIT_FORMS),
                   help="logit-level KD: a Bernoulli KL per allowed class (sigmoid, LINK's: keeps 'this pair "
                        "interacts'), or one KL over a pair's classes (softmax: blind to the pair's common "
                        "shift and to the prior, kept for the ablation)")
    k.add_argument("--kd-adapter", default="linear", choices=["linear", "none"],
                   help="map/query KD: a learned linear map per teacher from the student's channels into "
                        "the teacher's (linear), or none (equal widths, channel c = channel c)")
    k.add_argument("--kd-map-axis", default="channels", choices=["channels", "positions"],
                   help="map-level softmax: over the channels of each token (default), or over the "
                        "positions of each channel (channel-wise distillation)")
    k.add_argument("--kd-impl", default="auto", choices=["auto", "triton", "torch", "reference"])
    k.add_argument("--kd-unseen", action="store_true",
                   help="zero-shot: also distil the unseen classes' logits (default: left out)")
    return p


def load_teachers(args, cs, device) -> tuple[list, list, list]:
    """-> (frozen teachers, their info for the checkpoint, their init seeds); draws no RNG."""
    teachers, info, seeds = [], [], []
    cs_plain = plain_dict(cs)
    for path in args.teacher:
        with torch.random.fork_rng(devices=[]):     # building a teacher draws no training RNG
            t, ck = load_teacher(path, device)
        if ck["class_space"] != cs_plain:
            diff = sorted(k for k in cs_plain if cs_plain.get(k) != ck["class_space"].get(k))
            raise CheckpointError(f"teacher {path}: class space differs from the student's data "
                                  f"(fields: {diff[:6]})")
        teachers.append(t)
        info.append({"path": str(path), "sha1": file_digest(path), "cache_key": t.cache_key()})
        seeds.append(teacher_init_seed(ck))
    return teachers, info, seeds


def kd_config(args) -> KDConfig:
    return KDConfig(w_map=args.w_map, w_query=args.w_query, w_logit=args.w_logit,
                    temperature=args.temperature, logit_form=args.kd_logit_form, adapter=args.kd_adapter,
                    impl=args.kd_impl, map_axis=args.kd_map_axis)


def main(argv=None) -> dict:
    args = student_parser().parse_args(argv)
    d, train, test, cs, cache, run = setup_run(args, "student")
    with run:
        return _train_student(args, d, train, test, cs, cache, run)


def _train_student(args, d, train, test, cs, cache, run) -> dict:
    out = run.path
    teachers, info, t_seeds = load_teachers(args, cs, d.device)
    # the student's weights come from their own seed (a teacher's with --init-seed same: then,
    # with all KD weights 0, the student reproduces that teacher exactly)
    init_seed = resolve_init_seed(args.init_seed, args.seed, t_seeds)
    seed_everything(init_seed + d.rank)
    model = build_model(args, cs, d.device)
    views = train.views.count
    sources = [FeatureSource(t, train, cache, views, args.cache_dtype, d, progress=not args.no_progress and d.main)
               for t in teachers]
    tf, ef = make_sources(model, args, d, train, test, cache)
    release_unused_towers([tf, ef] + sources)
    kd = kd_config(args)
    try:
        dist = Distiller(teachers, sources, kd_widths(model), [kd_widths(t) for t in teachers], kd,
                         exclude_classes=[] if args.kd_unseen else list(cs.unseen), seed=init_seed).to(d.device)
    except ValueError as e:
        raise TrainInputError(f"--teacher: {e}") from None
    metric_fn, mkw = metric_for(args, cs)
    tr = Trainer(model, loop_config(args), train, tf, out, d, test, ef, extra_loss=dist,
                 metric_fn=metric_fn, eval_kwargs=mkw, class_space=cs,
                 ckpt_extra={"role": "student", "teachers": info, "init_seed": init_seed,
                             "distill": asdict(kd)})
    return fit_and_finish(tr, args, run)


if __name__ == "__main__":
    run_cli(main)
