"""One realistic LINK training step: the peak memory it adds and its time, teacher and student.

    python -m bench.train_step                             # every figure, one process each
    python -m bench.train_step --vlms ViT-B-16@448 --roles teacher,student2 --impls torch
    python -m bench.train_step --measure time --threads 1           # times only (a CPU shared with others)
    python -m bench.train_step --table BEFORE.jsonl AFTER.jsonl     # the before -> after table of saved lines
    python -m bench.train_step --one ViT-B-16@448 student2 torch --measure memory   # one figure (internal)

Prints one JSON object per figure ({"vlm", "image_size", "grid", "C", "role", "impl", "pairs",
"classes", "peak_mb", "ms", "cpu_ms", "models_mb", "towers_mb", "loss", "grad_norm", "device"}),
then a table. The step is trainer.Trainer.train_step (forward, focal loss, the Distiller's extra
loss for a student, backward, clipping, AdamW) on a HICO-DET-sized batch (make_batch: 8 images of
640 x 480, 15 humans and 15 objects each, the 600 HICO-DET classes), the default LINKConfig and
the student CLI's default distillation. Roles: "teacher", "student1" / "student2" (one / two
frozen teachers). Seeded random feature maps of the VLM's real width and grid (VLMS) replace the
VLM, as a feature cache does (towers built with random weights, then released).

Every figure runs in a fresh process (bench/measure.py): one warm-up step (its loss and gradient
norm printed, to compare two versions of the code number for number; AdamW's state allocated),
then peak_mb of one more step (VmHWM on CPU, max_memory_allocated on CUDA), ms / cpu_ms the
median wall-clock and CPU time of --repeat steps in a second process with the default allocator;
models_mb the parameters and buffers held during the step, towers_mb those of the VLM towers.
"""
import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from bench.measure import MIB, child_envs, cpu_peak_mb, cuda_peak_mb, run_child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
VLMS = ("ViT-B-16@224", "ViT-B-16@448", "ViT-L-14@336")
ROLES = ("teacher", "student1", "student2")
ANNO = os.path.join("hicodet", "instances_test2015.json")


# ----------------------------------------------------------------------------- the batch

def make_batch(class_space, images=8, humans=15, objects=15, gt_pairs=4, size=(640, 480), seed=0):
    """-> (detections, sizes, targets) of a seeded random HICO-DET-like batch (image frame)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    w, h = size
    classes_of = {}                                        # object label -> classes allowing it
    for k, objs in enumerate(class_space.hoi_object):
        for o in objs:
            classes_of.setdefault(o, []).append(k)
    labels_ok = sorted(o for o in classes_of if o != class_space.person_label)
    dets, targets = [], []
    for _ in range(images):
        n = humans + objects
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 8
        boxes = torch.cat([xy, xy + wh], 1)
        obj = torch.tensor(labels_ok)[torch.randint(len(labels_ok), (objects,), generator=g)]
        labels = torch.cat([torch.full((humans,), class_space.person_label), obj])
        dets.append({"boxes": boxes, "scores": 0.2 + 0.8 * torch.rand(n, generator=g), "labels": labels})
        hi = torch.randperm(humans, generator=g)[:gt_pairs]
        oi = humans + torch.randperm(objects, generator=g)[:gt_pairs]
        hoi = [classes_of[int(labels[j])][int(torch.randint(len(classes_of[int(labels[j])]), (1,),
                                                                generator=g))] for j in oi]
        targets.append({"boxes_h": boxes[hi], "boxes_o": boxes[oi], "hoi": torch.tensor(hoi)})
    return dets, [size] * images, targets


class FixedBatch:
    """The part of data.Split that Trainer.train_step reads, over one fixed batch."""

    def __init__(self, dets, sizes, targets, views):
        self.dets, self.sizes, self.targets, self.views = dets, sizes, targets, views
        self.filenames = [f"bench_{i}.jpg" for i in range(len(dets))]

    def __len__(self):
        return len(self.dets)

    def item(self, i, view, train):
        return self.dets[i], self.sizes[i], self.targets[i]

    def fingerprint(self):
        return "bench"


class FixedFeatures:
    """A cached cache.FeatureSource of ``model``: fixed feature maps [N, C, Gh, Gw]."""

    def __init__(self, model, feats):
        self.model, self.feats = model, feats
        self.cache = "seeded random features"          # every feature comes from the "cache"

    def get(self, indices, views):
        return self.feats[list(indices)]


# ----------------------------------------------------------------------------- one figure

def _module_bytes(modules):
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total / MIB


def build_step(vlm_at, role, impl):
    """-> (record, step()): the models, the batch and one Trainer.train_step over it."""
    import open_clip
    import torch

    from cache import release_unused_towers
    from common import data_root
    from data import HICODet, Views
    from model import LINK, LINKConfig
    from train_student import Distiller, kd_config, kd_widths, student_parser
    from trainer import Dist, LoopConfig, Trainer

    vlm, size = vlm_at.split("@")
    size = int(size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cs = HICODet(tempfile.gettempdir(), os.path.join(data_root(), ANNO)).class_space()
    vcfg = open_clip.get_model_config(vlm)
    K, C = len(cs.prompts), vcfg["embed_dim"]             # ViT towers: tokens after proj are C wide
    gh = gw = size // vcfg["vision_cfg"]["patch_size"]
    text = torch.randn(K, C, generator=torch.Generator().manual_seed(1))   # the prompts' embeddings

    def link(seed):
        torch.manual_seed(seed)
        return LINK(LINKConfig(vlm=vlm, pretrained=None, image_size=size, impl=impl), cs, text_embed=text).to(device)

    model = link(0)
    n_teachers = {"teacher": 0, "student1": 1, "student2": 2}[role]
    teachers = [link(1 + m) for m in range(n_teachers)]
    dets, sizes, targets = make_batch(cs)
    feats = torch.randn(len(dets), C, gh, gw, generator=torch.Generator().manual_seed(2)).to(device)
    src, t_srcs = FixedFeatures(model, feats), [FixedFeatures(t, feats) for t in teachers]
    release_unused_towers([src] + t_srcs)           # as train_teacher / train_student do with a cache
    extra = None
    if teachers:   # the student CLI's default distillation (kd_config of its parser's defaults)
        kd = kd_config(student_parser().parse_args(["--teacher", "-", "--kd-impl", impl]))
        extra = Distiller(teachers, t_srcs, kd_widths(model), [kd_widths(t) for t in teachers], kd,
                          seed=1).to(device)
    out_dir = tempfile.mkdtemp(prefix="bench_train_")     # the Trainer's run folder: nothing is saved
    atexit.register(shutil.rmtree, out_dir, True)
    loop = LoopConfig(epochs=1, batch_size=len(dets), progress=False)
    trainer = Trainer(model, loop, FixedBatch(dets, sizes, targets, Views.of(loop)), src, out_dir, Dist(device=device),
                      extra_loss=extra)
    models = [model] + teachers
    rec = {"vlm": vlm, "image_size": size, "grid": [int(gh), int(gw)], "C": int(C), "role": role, "impl": impl,
           "pairs": sum(int((d["labels"] == cs.person_label).sum()) * (len(d["labels"]) - 1) for d in dets),
           "classes": K, "models_mb": round(_module_bytes(models), 1),
           "towers_mb": round(_module_bytes([m.vlm for m in models if getattr(m, "vlm", None) is not None]), 1)}
    batch = list(range(len(dets)))
    return rec, lambda: trainer.train_step(batch)


def measure_one(vlm_at, role, impl, measure, repeat=3):
    import torch

    rec, step = build_step(vlm_at, role, impl)
    first = step()                                                     # warm-up: AdamW state
    rec["loss"], rec["grad_norm"] = first.get("loss"), first.get("grad_norm")
    rec.update({k: v for k, v in first.items() if k.startswith("loss_")})
    cuda = torch.cuda.is_available()
    if cuda:
        rec["peak_mb"], rec["mem_method"] = round(cuda_peak_mb(step), 1), "cuda-max-allocated"
    elif measure == "memory":
        peak, method = cpu_peak_mb(step)
        rec["peak_mb"], rec["mem_method"] = round(peak, 1), method
    if cuda or measure == "time":
        wall, cpu = [], []
        for _ in range(repeat):
            if cuda:
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            step()
            if cuda:
                torch.cuda.synchronize()
            wall.append((time.perf_counter() - t) * 1000)
            cpu.append((time.process_time() - c) * 1000)
        rec["ms"], rec["cpu_ms"] = round(statistics.median(wall), 1), round(statistics.median(cpu), 1)
        rec["device"] = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()} threads"
    return rec


# ----------------------------------------------------------------------------- driver

def _child(args, env, timeout):
    return run_child([sys.executable, "-m", "bench.train_step"] + args, env, timeout, cwd=ROOT)


def _key(r):
    return r["vlm"], r["image_size"], r["role"], r["impl"]


def _cells(r):
    """(peak, wall / CPU time, models held) of one record as table cells."""
    if r is None or "error" in r:
        return ((r or {}).get("error", "not measured"), "", "")
    return (f"{r.get('peak_mb')} MiB", f"{r.get('ms')} / {r.get('cpu_ms')} ms",
            f"{r['models_mb']} MiB ({r['towers_mb']} towers)")


def table(recs, before=None):
    """A markdown table of the records; with ``before`` (records of another version of the code,
    matched by VLM, size, role and impl), the before -> after values side by side."""
    arrow = "" if before is None else " (before -> after)"
    head = (f"| VLM at size | role | impl | peak added by the step{arrow} | time / step, wall / CPU{arrow} | "
            f"models held{arrow} |")
    old = {_key(r): r for r in before or []}
    rows = [head, "|---|---|---|---|---|---|"]
    for r in recs:
        cells = _cells(r)
        if before is not None:
            cells = [f"{a} -> {b}" for a, b in zip(_cells(old.get(_key(r))), cells)]
        rows.append(f"| {r['vlm']} at {r['image_size']} | {r['role']} | {r['impl']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _merged(recs):
    """Records of one version of the code, one per figure: later records fill in and override."""
    out = {}
    for r in recs:
        out.setdefault(_key(r), {}).update({k: v for k, v in r.items() if v is not None})
    return list(out.values())


def _cuda_available():
    import torch
    return torch.cuda.is_available()


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def _figure(base, measure, cuda, timeout):
    """One figure: memory and / or time, each in its own process (CUDA: both in one)."""
    env_time, env_mem = child_envs()
    if cuda:
        return _child(base, env_time, timeout)
    rec = {}
    if measure in ("both", "memory"):
        rec = _child(base + ["--measure", "memory"], env_mem, timeout)
    if measure in ("both", "time") and "error" not in rec:
        t = _child(base + ["--measure", "time"], env_time, timeout)
        if not rec or "error" in t:
            return t
        rec.update({k: t.get(k) for k in ("ms", "cpu_ms", "device")})
        if t.get("loss") != rec.get("loss"):
            rec["note"] = f"time process loss {t.get('loss')} differs"
    return rec


def _run_all(args):
    import torch
    cuda = torch.cuda.is_available()
    impls = args.impls.split(",") if args.impls else ["reference", "torch"] + (["triton"] if cuda else [])
    recs = []
    for vlm_at in args.vlms.split(","):
        for role in args.roles.split(","):
            for impl in impls:
                base = ["--one", vlm_at, role, impl, "--repeat", str(args.repeat), "--threads", str(args.threads)]
                rec = _figure(base, args.measure, cuda, args.timeout)
                vlm, size = vlm_at.split("@")
                rec = {"vlm": vlm, "image_size": int(size), "role": role, "impl": impl,
                       **{k: v for k, v in rec.items() if k not in ("vlm", "image_size", "role", "impl")}}
                recs.append(rec)
                print(json.dumps(rec), flush=True)
    print(table(recs))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n")[0])
    ap.add_argument("--vlms", default=",".join(VLMS), help="comma-separated NAME@SIZE (default: %(default)s)")
    ap.add_argument("--roles", default=",".join(ROLES), help="comma-separated subset of %(default)s")
    ap.add_argument("--impls", default=None, help="comma-separated impls (default: reference,torch and, "
                    "with CUDA, triton)")
    ap.add_argument("--repeat", type=int, default=3, help="timed steps (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per measurement process")
    ap.add_argument("--measure", choices=("both", "memory", "time"), default="both",
                    help="what to measure on CPU (each in its own process per figure)")
    ap.add_argument("--table", nargs="+", metavar="JSONL[,JSONL...]", help="print the table of saved JSON lines "
                    "and exit; one argument per version of the code (comma-joined files are merged figure by "
                    "figure, e.g. a memory run and a time run); two versions (before, after) side by side")
    ap.add_argument("--one", nargs=3, metavar=("VLM@SIZE", "ROLE", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bad = [r for r in args.roles.split(",") if r not in ROLES]
    bad += [v for v in args.vlms.split(",") if "@" not in v or not v.split("@")[1].isdigit()]
    if bad:
        print(f"error: bad --roles / --vlms entries {bad} (roles: {list(ROLES)}; VLMs as NAME@SIZE)", file=sys.stderr)
        return 2
    if args.table:
        versions = [_merged([r for p in arg.split(",") for r in _read_jsonl(p)]) for arg in args.table[:2]]
        print(table(versions[-1], versions[0] if len(versions) == 2 else None))
        return 0
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.one:
        if args.measure == "both" and not _cuda_available():
            print("error: --one measures memory or time on CPU (--measure memory|time)", file=sys.stderr)
            return 2
        print(json.dumps(measure_one(*args.one, args.measure, args.repeat)), flush=True)
        return 0
    _run_all(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
