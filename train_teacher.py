"""Stage 1 of LINK: the teacher, trained on ground truth only; and the run set-up the teacher
and the student share (arguments, model, dataset splits, metric, resuming and finishing a run).

The loop is trainer.py's; train_student.py reuses this set-up and adds the distillation terms
through the ``extra_loss`` hook of trainer.Trainer. Usage (see docs/training.md):

    python train_teacher.py --dataset synthetic --world runs/demo/world --name teacher
    python train_teacher.py --dataset hicodet --image-root IMG/train2015 --anno instances_train2015.json \
        --detections dets_train.json --test-image-root IMG/test2015 --test-anno instances_test2015.json \
        --test-detections dets_test.json --vlm ViT-B-16 --pretrained openai [--zero-shot rf-uc] [--few-shot 8]
    torchrun --nproc_per_node 2 train_teacher.py ...        # data parallel (gloo on CPU, nccl on GPU)
    python train_teacher.py ... --resume                     # continue runs/NAME/last.pt exactly

``--flip`` / ``--crop-scales S ...`` add cached views of each image (data.Views); any other image
augmentation must bypass the cache (``--no-cache``). The training-set rules (``--zero-shot-rule``,
``--keep-empty``, ``--det-frame``, ``--append-gt``) are data.py's.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from cache import FeatureSource, release_unused_towers
from common import (
    OneLineParser,
    file_digest,
    nonneg_int,
    note,
    number,
    positive_int,
    read_json,
    refuse_outputs_over_inputs,
    release_notes,
    unit_float,
)
from data import VCOCO, HICODet, Split, SWiGHOI, Views, gt_detections, load_detections, select_boxes
from eval import evaluate_hico, evaluate_swig
from model import LINK, LINKConfig
from runs import (
    BUILD_ERRORS,
    RUN_OUTPUTS,
    RunFolder,
    TrainInputError,
    build_error_reason,
    claim_run_folder,
    load_checkpoint,
    resume_differences,
    resume_path,
)
from trainer import Dist, LoopConfig, Trainer, add_loop_args, init_distributed, loop_config, run_cli, seed_everything
from vlm import register_tiny_vlm
from world import vlms as world_vlm
from world.synthetic import make_synthetic_world


# ----------------------------------------------------------------------------------------------
# Arguments (shared with train_student.py)
# ----------------------------------------------------------------------------------------------
def add_common_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["hicodet", "vcoco", "swig", "synthetic"], default="synthetic")
    g.add_argument("--image-root", help="folder of the training images")
    g.add_argument("--anno", help="training annotation file")
    g.add_argument("--detections", help="training detections (per-image JSON or COCO results)")
    g.add_argument("--test-image-root")
    g.add_argument("--test-anno")
    g.add_argument("--test-detections")
    g.add_argument("--world", default="runs/demo/world",
                   help="synthetic world folder (generated if absent)")
    g.add_argument("--world-train", type=positive_int, default=600)
    g.add_argument("--world-test", type=positive_int, default=200)
    g.add_argument("--world-size", type=number(int, lo=64, what=">= 64"), default=128, help="synthetic image size")
    g.add_argument("--zero-shot", help="zero-shot split name (rf-uc, nf-uc, uo, uv, or the world's)")
    g.add_argument("--zero-shot-rule", default="pair", choices=["pair", "label"],
                   help="zero-shot training filter: remove every pair carrying an unseen label with all its "
                        "labels (pair: GEN-VLKT / HOICLIP, default) or only the unseen labels (label)")
    g.add_argument("--keep-empty", action="store_true",
                   help="keep training images without any labelled pair (default: left out, as UPT does)")
    g.add_argument("--det-frame", choices=["hico1", "continuous"],
                   help="box frame of the detection files (hico1: 1-based inclusive pixel indices as in "
                        "HICO-DET's annotations; continuous: 0-based pixel edges, as DETR-style detectors "
                        "output); converted to the annotation's frame when read. Default: the annotation's")
    g.add_argument("--append-gt", action="store_true",
                   help="add the GT boxes to the detector's in training (SCG; default off, as UPT)")
    g.add_argument("--few-shot", type=positive_int, help="k images per class")
    g.add_argument("--score-thresh", type=unit_float, default=0.2)
    m = p.add_argument_group("model")
    m.add_argument("--vlm", default="tiny",
                   help="open_clip model name (e.g. ViT-B-16); 'tiny': the small random VLM "
                        "vlm.register_tiny_vlm() registers (tests); 'world-clip' / 'world-sig': the "
                        "synthetic world's pretrained VLMs shipped in world/weights/ (world/vlms.py, the demo's)")
    m.add_argument("--pretrained", default="",
                   help="open_clip pretrained tag (e.g. openai) or a weights file; empty = random init "
                        "(for world-clip / world-sig: empty = the shipped weights, 'random' = random init)")
    m.add_argument("--weights", default=str(world_vlm.WEIGHTS), metavar="DIR",
                   help="folder of the world VLMs' checkpoints and manifests (default: world/weights/)")
    m.add_argument("--image-size", type=positive_int,
                   help="VLM input resolution (default: the VLM's own, e.g. 224 for ViT-B-16, 336 for ViT-L-14-336)")
    m.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE", type=model_opt,
                   help="any other LINKConfig field (repeatable), typed and range-checked by its field")
    t = add_loop_args(p)
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--name", default="teacher", type=run_name, help="run folder runs/NAME")
    t.add_argument("--runs", default="runs")
    t.add_argument("--resume", nargs="?", const="auto",
                   help="resume from runs/NAME/last.pt (or the given checkpoint)")
    t.add_argument("--override", action="append", default=[], metavar="SETTING",
                   help="with --resume: let this setting (e.g. lr, epochs, w_logit, anno) differ from "
                        "the checkpoint's; it takes effect from the resume step and is logged (repeatable)")
    t.add_argument("--move-aside", action="store_true",
                   help="runs/NAME holds a run: move it to runs/NAME.old-<time> and start a new one "
                        "(without this or --resume, a run name in use is refused)")
    t.add_argument("--cache", default="runs/cache", help="feature cache folder")
    t.add_argument("--no-cache", action="store_true", help="encode images on the fly every step")
    t.add_argument("--cache-dtype", default="float16", choices=["float16", "float32"])
    t.add_argument("--threads", type=nonneg_int, default=0, help="torch CPU threads (0: default)")


# ----------------------------------------------------------------------------------------------
# Model, splits, metric
# ----------------------------------------------------------------------------------------------
#: LINKConfig fields that take a count or a size (>= 1) or a fraction, for --model-opt
_OPT_RANGES = {"image_size": (1, None), "d_model": (8, None), "d_latent": (1, None), "heads": (1, None),
               "enc_layers": (0, None), "dec_layers": (0, None), "ffn_mult": (1, None), "roi_size": (1, None),
               "vlm_seed": (0, None), "dropout": (0, 1), "focal_alpha": (0, 1), "fg_iou": (0, 1),
               "lam": (0, None), "lam_train": (0, None), "focal_gamma": (0, None)}


def run_name(text: str) -> str:
    """argparse type of --name: a folder name inside --runs (not empty, no '/', not '.' or '..')."""
    if not text or "/" in text or text in (".", "..") or text.startswith("."):
        raise argparse.ArgumentTypeError(f"expected a plain folder name inside --runs, got {text!r}")
    return text


def model_opt(text: str) -> tuple:
    """argparse type of --model-opt KEY=VALUE -> (key, value) typed by LINKConfig's annotation of
    that field (int, float, bool, str, a tuple of numbers "a,b,c", or none for an optional one)
    and range-checked (_OPT_RANGES)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, v = text.split("=", 1)
    hints = typing.get_type_hints(LINKConfig)
    if key not in hints:
        raise argparse.ArgumentTypeError(f"LINKConfig has no field {key!r} (fields: {', '.join(hints)})")
    kinds = typing.get_args(hints[key]) or (hints[key],)
    if type(None) in kinds and v.strip().lower() in ("none", "null"):
        return key, None
    kind = next(k for k in kinds if k is not type(None))
    try:
        value = _typed(kind, v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key}={v!r}: {key} takes {getattr(kind, '__name__', kind)}"
                                         + (" or none" if type(None) in kinds else "")) from None
    lo, hi = _OPT_RANGES.get(key, (None, None))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and \
            ((lo is not None and value < lo) or (hi is not None and value > hi)):
        raise argparse.ArgumentTypeError(f"{key}={v!r}: must be " + (f">= {lo}" if hi is None else f"in [{lo}, {hi}]"))
    return key, value


def _typed(kind, v: str):
    if kind is bool:
        if v.strip().lower() not in ("true", "false", "1", "0"):
            raise ValueError(v)
        return v.strip().lower() in ("true", "1")
    if kind is int:
        return int(v)
    if kind in (float, tuple):
        xs = tuple(float(x) for x in v.split(",")) if kind is tuple else (float(v),)
        if not all(math.isfinite(x) for x in xs):
            raise ValueError(v)
        return xs if kind is tuple else xs[0]
    return v


def _world_names(folder) -> dict:
    """The world VLMs a --weights folder ships (world_vlm.shipped), a bad manifest in one line."""
    try:
        return world_vlm.shipped(folder)
    except ValueError as e:
        raise TrainInputError(f"--weights: {e}") from None


def build_model(args, class_space, device):
    """A fresh LINK from the CLI (--vlm/--pretrained/--image-size/--model-opt)."""
    if args.vlm == "tiny":   # the registered tiny random VLM (demo, tests): 64 px, 8x8 tokens
        kw = {"vlm": register_tiny_vlm(), "pretrained": args.pretrained or None, "image_size": 64}
    elif args.vlm.startswith("world-") or args.vlm in _world_names(args.weights):   # the world's VLMs
        try:
            kw = world_vlm.world_vlm(args.vlm, args.weights)
        except (OSError, ValueError) as e:
            raise TrainInputError(f"--vlm {args.vlm}: {e}") from None
        if args.pretrained:     # "random": this architecture with random weights (the control)
            kw["pretrained"] = None if args.pretrained == "random" else args.pretrained
    else:
        kw = {"vlm": args.vlm, "pretrained": args.pretrained or None}
    if args.image_size:
        kw["image_size"] = args.image_size
    for k, v in args.model_opt:              # (key, value) pairs, typed by model_opt
        kw[k] = v
    try:
        model = LINK(LINKConfig(**kw), class_space).to(device)
    except BUILD_ERRORS as e:        # options the network cannot be built with, an unreadable --pretrained
        what = f"--pretrained {args.pretrained}" if args.pretrained and Path(args.pretrained).is_file() else \
            "--vlm / --model-opt"
        raise TrainInputError(f"{what}: {build_error_reason(e)}") from None
    note(model.describe_vlm())      # input size and token grid, as resolved (held: see run_cli)
    return model


def _synthetic_paths(args, d: Optional[Dist] = None) -> dict:
    """The world's files; generated once (by rank 0 under torchrun) when absent."""
    d = d or Dist()
    root = Path(args.world)
    anno = root / "instances_train.json"
    if d.main and not (root / "instances_test.json").exists():
        note(f"note: generating the synthetic world in {root}")
        make_synthetic_world(root, n_train=args.world_train, n_test=args.world_test,
                             image_size=args.world_size, seed=args.seed)
    d.barrier()
    return {"root": root, "train_images": root / "images" / "train", "test_images": root / "images" / "test",
            "train_anno": anno, "test_anno": root / "instances_test.json",
            "train_detections": root / "detections_train.json",
            "test_detections": root / "detections_test.json"}


def _paths(args, d: Optional[Dist] = None) -> dict:
    """Resolve (image_root, anno, detections) for train and test."""
    if args.dataset == "synthetic" and not args.anno:
        p = _synthetic_paths(args, d)
        return {"train": (p["train_images"], p["train_anno"], p["train_detections"]),
                "test": (p["test_images"], p["test_anno"], p["test_detections"])}
    if not (args.image_root and args.anno):
        raise TrainInputError("--image-root and --anno are required for --dataset " + args.dataset)
    test = None
    if args.test_anno:
        test = (Path(args.test_image_root or args.image_root), Path(args.test_anno),
                Path(args.test_detections) if args.test_detections else None)
    return {"train": (Path(args.image_root), Path(args.anno),
                      Path(args.detections) if args.detections else None), "test": test}


def _dataset(args, image_root, anno, train: bool):
    if args.dataset in ("hicodet", "synthetic"):
        kw = dict(seed=args.seed)
        if train:
            kw.update(zero_shot=args.zero_shot, few_shot=args.few_shot, zero_shot_rule=args.zero_shot_rule,
                      skip_empty=not args.keep_empty)
        return HICODet(str(image_root), str(anno), **kw)
    if args.zero_shot or args.few_shot:
        raise TrainInputError(f"--zero-shot/--few-shot are implemented for HICO-DET-format data "
                              f"only (data.py), not for --dataset {args.dataset}")
    return (VCOCO if args.dataset == "vcoco" else SWiGHOI)(str(image_root), str(anno))


def build_splits(args, d: Optional[Dist] = None):
    """-> (train Split, test Split or None, class space of the training data)."""
    paths = _paths(args, d)
    train, cs = _build_split(args, "train", *paths["train"], cs=None)
    test = None
    if paths["test"] is not None:
        test, _ = _build_split(args, "test", *paths["test"], cs=cs)
    return train, test, cs


def _build_split(args, which: str, image_root, anno, dets_path, cs):
    """-> (Split, class space); boxes are selected with ``cs`` (None: the dataset's own)."""
    for pth, fld in ((image_root, "image root"), (anno, "annotation file")):
        if not Path(pth).exists():
            raise FileNotFoundError(f"{fld} {pth} not found")
    ds = _dataset(args, image_root, anno, train=(which == "train"))
    if cs is None:
        cs = ds.class_space()
    frame = getattr(ds, "box_frame", "continuous")
    if dets_path is not None:
        # labels checked against the class space's objects here, naming the file and image
        dets = load_detections(str(dets_path), filenames=list(ds.filenames), num_labels=cs.num_objects,
                               frame=args.det_frame, into=frame)
        n_miss = sum(1 for f in ds.filenames if f not in dets)
        if n_miss:
            note(f"note: {n_miss} of {len(ds)} {which} images have no detections in {dets_path}"
                 + (" (GT boxes only in training)" if which == "train" and args.append_gt else ""))
    elif which == "test":
        raise TrainInputError("--test-detections is required for evaluation")
    else:
        dets = {}
    raw = None
    if which == "test":
        raw = getattr(ds, "raw", None)
        if raw is None:
            raw = read_json(anno, "annotation file", TrainInputError)
    select = partial(select_boxes, person_label=cs.person_label, score_thresh=args.score_thresh)
    gt = partial(gt_detections, person_label=cs.person_label)
    train = which == "train"
    views = Views(args.flip, tuple(args.crop_scales)) if train else Views()
    return Split(ds, dets, image_root, raw, select, gt, name=which, views=views, frame=frame,
                 append_gt=train and args.append_gt), cs


def metric_for(args, cs):
    """(metric_fn, kwargs) of the dataset: HICO-DET's protocol (hicodet, synthetic), SWiG-HOI's
    (swig), none for V-COCO (its evaluator needs role-format predictions and COCO annotations:
    V-COCO runs write predictions_test.json, scored afterwards with eval.py's V-COCO CLI)."""
    if args.dataset == "swig":
        return (lambda anno, preds: evaluate_swig(anno, preds)), {}
    if args.dataset == "vcoco":
        return (lambda anno, preds: {}), {}
    return evaluate_hico, ({"zero_shot": list(cs.unseen)} if getattr(cs, "unseen", None) else {})


# ----------------------------------------------------------------------------------------------
# Running (shared with train_student.py)
# ----------------------------------------------------------------------------------------------
def setup_run(args, role: str = "teacher"):
    """Common set-up of the teacher and student CLIs -> (dist, train, test, class space, caches
    root, the claimed RunFolder: release it, or use it as a context manager)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    d = init_distributed(args.device)
    seed_everything(args.seed + d.rank)
    # claimed first: a run name in use, or a resume that would not continue the same run, is
    # refused before any data is read or cache built
    run = claim_run_folder(Path(args.runs) / args.name, args.resume, args.move_aside, d)
    outputs = [(f"the run's {n}", run.path / n) for n in RUN_OUTPUTS]
    try:
        refuse_outputs_over_inputs(outputs, run_inputs(args), TrainInputError)
        check_resume(args, run.path, role)
        train, test, cs = build_splits(args, d)
        if len(train) == 0:
            raise TrainInputError(f"no training image left in {args.anno or args.world} "
                                  f"(zero-shot/few-shot filtering?)")
        refuse_outputs_over_inputs(outputs, run_inputs(args, train, test), TrainInputError)
    except BaseException:
        run.release()
        raise
    cache = None if args.no_cache else Path(args.cache)
    return d, train, test, cs, cache, run


def run_inputs(args, train: Optional[Split] = None, test: Optional[Split] = None) -> list:
    """(label, path) of every file a run reads: annotation and detection files, teacher
    checkpoints, a --resume checkpoint from elsewhere, and the images of the splits given."""
    out = [(f"--{k.replace('_', '-')}", getattr(args, k)) for k in
           ("anno", "detections", "test_anno", "test_detections") if getattr(args, k, None)]
    out += [("--teacher", t) for t in getattr(args, "teacher", None) or []]
    if args.resume and args.resume != "auto":
        out.append(("--resume", args.resume))
    for sp in (train, test):
        if sp is not None:
            out += [(f"{sp.name} image", p) for p in sp.image_paths]
    return out


def make_sources(model, args, d, train, test, cache):
    views = train.views.count
    prog = not args.no_progress and d.main
    tf = FeatureSource(model, train, cache, views, args.cache_dtype, d, progress=prog)
    ef = FeatureSource(model, test, cache, 1, args.cache_dtype, d, progress=prog) if test is not None else None
    return tf, ef


#: options that may change on --resume: where things are and how the process runs, not what is
#: trained (data and teacher files are compared by content, see run_settings; LoopConfig by runs.py)
FREE_OPTIONS = {"runs", "name", "resume", "move_aside", "override", "cache", "threads", "device",
                "no_progress", "kd_impl", "image_root", "test_image_root", "world", "world_train",
                "world_test", "world_size", "anno", "detections", "test_anno", "test_detections", "teacher",
                "weights"}   # --weights: the world VLM itself is compared through the cache key


def run_settings(args) -> dict:
    """What a resume must find unchanged (runs.resume_differences): every option of the
    command line that is neither free (FREE_OPTIONS) nor a LoopConfig field (compared by the
    loop), and under "files" the content hashes of the data files and teacher checkpoints."""
    loop = {f.name for f in dataclasses.fields(LoopConfig)}
    out = {k: v for k, v in sorted(vars(args).items()) if k not in FREE_OPTIONS and k not in loop}
    tr_paths = _paths(args)
    files = {"anno": tr_paths["train"][1], "detections": tr_paths["train"][2]}
    if tr_paths["test"] is not None:
        files.update(test_anno=tr_paths["test"][1], test_detections=tr_paths["test"][2])
    out["files"] = {k: file_digest(v) for k, v in files.items() if v is not None and Path(v).is_file()}
    if getattr(args, "teacher", None):
        out["files"]["teacher"] = [file_digest(t) for t in args.teacher]
    return out


def check_resume(args, folder: Path, role: str) -> None:
    """Refuse early (before data and caches) a resume that would not continue the same run
    (runs.resume_differences on the checkpoint, this command's loop and settings)."""
    if args.override and not args.resume:
        raise TrainInputError("--override changes a resumed run's settings: it needs --resume")
    path = resume_path(args.resume, folder)
    if path is not None:
        resume_differences(load_checkpoint(path), path, dataclasses.asdict(loop_config(args)),
                           {"role": role, "settings": run_settings(args)}, args.override)


def fit_and_finish(trainer: Trainer, args, run: Optional[RunFolder] = None) -> dict:
    """Resume if asked (``--resume`` alone = runs/NAME/last.pt when it exists; the settings
    compared, ``--override`` applied), show the held notes, prepare the run folder (see
    RunFolder.prepare), train, finish."""
    trainer.ckpt_extra["settings"] = run_settings(args)
    path = resume_path(args.resume, trainer.out)
    if path is not None:
        trainer.resume(path, args.override)
    elif args.resume:
        note(f"no checkpoint at {trainer.out / 'last.pt'}: starting fresh")
    if trainer.epoch < trainer.cfg.epochs:
        release_notes()                 # the command's input is valid: training starts
        if run is not None and trainer.d.main:
            run.prepare()
        trainer.d.barrier()
        trainer.fit()
    metrics = trainer.finish(args.name)   # (nothing to train: evaluated here, notes still held)
    release_notes()
    return metrics


# ----------------------------------------------------------------------------------------------
# The teacher's CLI
# ----------------------------------------------------------------------------------------------
def teacher_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="train_teacher.py", description="Train a LINK teacher on ground truth (stage 1).")
    add_common_args(p)
    return p


def main(argv=None) -> dict:
    args = teacher_parser().parse_args(argv)
    d, train, test, cs, cache, run = setup_run(args)
    with run:
        model = build_model(args, cs, d.device)
        tf, ef = make_sources(model, args, d, train, test, cache)
        release_unused_towers([tf, ef])
        metric_fn, mkw = metric_for(args, cs)
        tr = Trainer(model, loop_config(args), train, tf, run.path, d, test, ef, metric_fn=metric_fn,
                     eval_kwargs=mkw, ckpt_extra={"role": "teacher"}, class_space=cs)
        return fit_and_finish(tr, args, run)


if __name__ == "__main__":
    run_cli(main)
