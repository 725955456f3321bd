"""Benchmark of the HICO-DET evaluator on ~1.5 M detections over the real test set.

    python -m bench.eval_speed [--per-image 155] [--seed 0] [--repeats 3] [--keep DIR]

Builds a seeded synthetic prediction set over data/hicodet/instances_test2015.json (every GT
pair jittered a few times, the rest random boxes and classes, random scores), writes it as a
prediction JSON in a temp folder (boxes rounded to 2 decimals, scores to 6), then measures

1. the in-process array entry point ``eval.hico_ap_arrays`` (matching + AP only; target < 1 s),
2. ``eval.evaluate_hico`` from a {filename: ndarray} dict (validation + concatenation too),
3. ``python eval.py hico --anno ... --pred ... --out ...`` end to end, JSON parsing included
   (target < 10 s), once with the default parser (orjson if installed) and once with the
   stdlib json parser (LINK_EVAL_JSON=stdlib),

and prints wall times and peak memory (tracemalloc for the in-process call, ru_maxrss of the
child process for the CLI).  All three must report the same mAP.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

import common
import eval as hoi_eval

ROOT = Path(__file__).resolve().parent.parent   # the repository (eval.py)


def make_predictions(anno: dict, per_image: int, seed: int, scores: str = "float32") -> dict:
    """{filename: float64[n, 10]} with ~per_image rows per image (seeded).

    scores: "float32" (float32 values, as a model writes them with tensor.tolist()) or
    "round6" (rounded to 6 decimals: many ties, not float32-exact -> general sort path).
    Boxes are rounded to 2 decimals.
    """
    rng = np.random.default_rng(seed)
    corr = np.asarray(anno["correspondence"])
    K = corr.shape[0]
    by_obj = {}
    for k, o in enumerate(corr[:, 1]):
        by_obj.setdefault(int(o), []).append(k)
    preds = {}
    for fn, a, (w, h) in zip(anno["filenames"], anno["annotation"], anno["size"]):
        parts = []
        n_gt = len(a["hoi"])
        if n_gt:
            gt = np.concatenate([np.asarray(a["boxes_h"], float), np.asarray(a["boxes_o"], float)], 1)
            cls = np.asarray(a["hoi"])
            rep = 3
            g = np.repeat(gt, rep, 0)
            c = np.repeat(cls, rep)
            size = np.repeat(np.stack([gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1],
                                       gt[:, 6] - gt[:, 4], gt[:, 7] - gt[:, 5]], 1), rep, 0)
            jit = rng.normal(0, 0.08, g.shape) * np.concatenate([size[:, [0, 1]], size[:, [0, 1]],
                                                                  size[:, [2, 3]], size[:, [2, 3]]], 1)
            g = g + jit
            # a third of the copies get another class of the same object (wrong verb)
            swap = rng.random(c.size) < 0.33
            for j in np.flatnonzero(swap):
                c[j] = rng.choice(by_obj[int(corr[c[j], 1])])
            parts.append(np.concatenate([c[:, None], rng.random((c.size, 1)), g], 1))
        n_rand = max(per_image - 3 * n_gt, 0)
        xy = rng.random((n_rand, 8)) * np.array([w, h, w, h, w, h, w, h])
        rb = np.concatenate([np.minimum(xy[:, 0:2], xy[:, 2:4]), np.maximum(xy[:, 0:2], xy[:, 2:4]),
                             np.minimum(xy[:, 4:6], xy[:, 6:8]), np.maximum(xy[:, 4:6], xy[:, 6:8])], 1)
        parts.append(np.concatenate([rng.integers(0, K, (n_rand, 1)), rng.random((n_rand, 1)), rb], 1))
        rows = np.concatenate(parts, 0)
        # valid boxes after jitter: x2 >= x1, y2 >= y1
        for o in (2, 6):
            lo = np.minimum(rows[:, o:o + 2], rows[:, o + 2:o + 4])
            hi = np.maximum(rows[:, o:o + 2], rows[:, o + 2:o + 4])
            rows[:, o:o + 2], rows[:, o + 2:o + 4] = lo, hi
        rows[:, 2:] = np.round(rows[:, 2:], 2)
        if scores == "float32":
            rows[:, 1] = rows[:, 1].astype(np.float32)
        else:
            rows[:, 1] = np.round(rows[:, 1], 6)
        preds[fn] = rows
    return preds


def write_predictions(preds: dict, path: Path) -> None:
    with open(path, "w") as f:
        f.write("{")
        first = True
        for fn, rows in preds.items():
            lst = rows.tolist()
            for r in lst:
                r[0] = int(r[0])
            f.write(("" if first else ",") + json.dumps(fn) + ":" + json.dumps(lst, separators=(",", ":")))
            first = False
        f.write("}")


def run_cli(anno_path: Path, pred_path: Path, out: Path, env_extra: dict):
    """Run the CLI once; returns (wall s, child CPU s, peak RSS MiB, result dict)."""
    env = dict(os.environ, **env_extra)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    before = ru0.ru_maxrss
    t = time.perf_counter()
    p = subprocess.run([sys.executable, str(ROOT / "eval.py"), "hico", "--anno", str(anno_path),
                        "--pred", str(pred_path), "--out", str(out)], env=env,
                       capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"eval.py failed: {p.stderr}")
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    # ru_maxrss of children is the max over all waited-for children (kB on Linux)
    return dt, cpu, max(ru1.ru_maxrss, before) / 1024, json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.eval_speed", description=__doc__.split("\n")[0])
    ap.add_argument("--per-image", type=int, default=155, help="detections per image (~1.5 M total)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scores", choices=["float32", "round6"], default="float32",
                    help="score values: float32 (model output) or rounded to 6 decimals")
    ap.add_argument("--anno", default=str(common.data_root() / "hicodet" / "instances_test2015.json"))
    ap.add_argument("--keep", default=None, help="write the prediction JSON here and keep it")
    args = ap.parse_args(argv)

    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, cpus {os.cpu_count()}, "
          f"orjson {'yes' if common.orjson is not None else 'no'}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}, scores {args.scores}")
    anno = json.load(open(args.anno))
    gt = hoi_eval.parse_hico_anno(anno, args.anno)
    t = time.perf_counter()
    preds = make_predictions(anno, args.per_image, args.seed, args.scores)
    n = sum(v.shape[0] for v in preds.values())
    print(f"built {n} detections over {len(preds)} images in {time.perf_counter() - t:.1f} s")

    rows = np.concatenate(list(preds.values()))
    img = np.repeat(np.arange(len(gt.filenames)), [preds[f].shape[0] for f in gt.filenames])
    cls = rows[:, 0].astype(np.int64)
    score = np.ascontiguousarray(rows[:, 1])
    boxes = np.ascontiguousarray(rows[:, 2:])

    def call():
        return hoi_eval.hico_ap_arrays(cls, score, img, boxes, gt.gt_class, gt.gt_image, gt.gt_boxes,
                                gt.num_classes, len(gt.filenames))

    times, cpu = [], []
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        r = call()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    full_arr = float(r["ap"].mean() * 100)
    tracemalloc.start()
    call()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"[in-process] hico_ap_arrays: wall best {min(times):.3f} s, median {np.median(times):.3f} s, "
          f"CPU best {min(cpu):.3f} s over {args.repeats} runs; peak extra memory "
          f"{peak / 2**20:.0f} MiB (tracemalloc); Full mAP {full_arr:.4f}")

    t, c = time.perf_counter(), time.process_time()
    res = hoi_eval.evaluate_hico(gt, preds)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    print(f"[in-process] evaluate_hico (dict of arrays, validation included): {dt:.3f} s wall, "
          f"{dc:.3f} s CPU; "
          f"Full {res['full']:.4f} Rare {res['rare']:.4f} Non-rare {res['non_rare']:.4f}")
    assert abs(res["full"] - full_arr) < 1e-9

    with tempfile.TemporaryDirectory() as tmp:
        pred_path = Path(args.keep) if args.keep else Path(tmp) / "pred.json"
        t = time.perf_counter()
        write_predictions(preds, pred_path)
        size = pred_path.stat().st_size
        print(f"wrote {pred_path} ({size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s")
        del preds, rows
        for label, env in (("default parser" + (" (orjson)" if common.orjson else " (json)"), {}),
                           ("stdlib json", {"LINK_EVAL_JSON": "stdlib"})):
            dt, cpu, rss, out = run_cli(Path(args.anno), pred_path, Path(tmp) / "res.json", env)
            print(f"[CLI] python eval.py hico ... ({label}): {dt:.2f} s wall, {cpu:.2f} s CPU, "
                  f"peak RSS {rss:.0f} MiB; Full {out['full']:.4f}")
            assert abs(out["full"] - full_arr) < 1e-9, (out["full"], full_arr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
