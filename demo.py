"""The README's first command: ``python demo.py`` (CPU, a fresh machine, no download).

1. generates the synthetic HOI world (runs/demo/world: images, HICO-DET-format annotation, a
   simulated detector's boxes; --label-drop 0.4 of the train labels removed, as real HOI data
   labels sparsely);
2. trains a LINK teacher on ground truth (train_teacher.py), then a student on ground truth +
   map/query/logit distillation from that frozen teacher (train_student.py);
3. zero-shot: a teacher and a student trained on the world's zero-shot split (default nf-uc)
   and evaluated on the full test set (Unseen / Seen / Full);
4. the control: both teachers again on the VLM's architecture with RANDOM weights, so that the
   table shows what the VLM's pretraining adds;
5. evaluates everything (eval.evaluate_hico) beside the chance level and the simulated
   detector's box AP, prints a table, writes runs/demo/results.json and runs/demo/detections.png.
The six runs go as two chains of three, in parallel. The recipe (world, model, loop, KD, VLM
choices) is world/recipe.py, shared with ablation.py.

--vlm: world-clip (default: a small open_clip model pretrained on the world's captions by
world/pretrain_vlm.py, shipped in world/weights/ and loaded as a user's local CLIP checkpoint is,
its SHA-256 checked before any training), world-sig (the SigLIP-loss one), random (world-clip's
architecture, random weights), tiny (vlm.register_tiny_vlm's random ViT at 64 px).
Re-running resumes every run (finished runs are skipped), --fresh starts over (it deletes only a
folder the demo wrote: recipe.LAYOUT); the folder's recipe.json stamp keeps runs of another recipe
or VLM apart. Logs: runs/demo/<run>.out,
runs/demo/<run>/log.jsonl, curves.png.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import (
    ZERO_SHOT_SPLITS,
    OneLineParser,
    atomic_write,
    atomic_write_json,
    error_line,
    nonneg_int,
    number,
    release_notes,
    run_command,
)
from detector_ap import evaluate_detector
from runs import load_checkpoint
from viz import draw_interactions, hoi_class_names
from world import recipe, synthetic, vlms

ROOT = Path(__file__).resolve().parent

RUNS = ("teacher", "student", "zs_teacher", "zs_student")
CONTROL_RUNS = ("random_teacher", "random_zs_teacher")     # the teachers again on a random VLM
# what the demo writes in its folder (recipe.json: the stamp); --fresh deletes nothing else
LAYOUT = recipe.output_layout("recipe.json", ("results.json", "detections.png"), RUNS + CONTROL_RUNS)


def _common(out: Path, world: Path, threads: int, loop: list, vlm: list) -> list:
    # --keep-empty: the world lists as "empty" the training images whose every label the label
    # drop removed; they still show (unlabelled) interactions, the case dense distillation is
    # for, unlike HICO-DET's empty images (no visible pair), which training leaves out
    args = ["--dataset", "synthetic", "--world", str(world), "--runs", str(out),
            "--cache", str(out / "cache")] + vlm + ["--threads", str(threads),
                                                    "--no-progress", "--resume", "--keep-empty"] + loop
    for o in recipe.MODEL_OPTS:
        args += ["--model-opt", o]
    return args


def _chain(runs: list, out: Path, status: dict) -> None:
    """Run the (name, argv) list one after the other; stop at the first failure."""
    for name, argv in runs:
        t0 = time.time()
        with open(out / f"{name}.out", "w") as log:
            rc = recipe.run_child(argv, log)
        status[name] = (rc, time.time() - t0)
        print(f"  {name:<16} {'done' if rc == 0 else 'FAILED (exit %d)' % rc}"
              f" in {time.time() - t0:6.1f} s  (log: {out / (name + '.out')})", flush=True)
        if rc != 0:
            return


def draw_picture(out: Path, world_paths: dict, student_dir: Path) -> str:
    """The student's top interactions on the test image with the most GT pairs among the first 50."""
    anno = json.loads(Path(world_paths["test_anno"]).read_text())
    ck = load_checkpoint(student_dir / "last.pt")
    names = hoi_class_names(ck["class_space"])
    npairs = [len(a["hoi"]) for a in anno["annotation"][:50]]
    j = int(np.argmax(npairs))
    fn = anno["filenames"][j]
    rows = recipe.read_preds(student_dir).get(fn, np.zeros((0, 10)))
    img = Image.open(Path(world_paths["test_images"]) / fn).convert("RGB")
    gt = ", ".join(names[h] for h in sorted(set(anno["annotation"][j]["hoi"])))
    pic = draw_interactions(img, rows, names, top_k=4, title=f"student, {fn}", note=f"GT: {gt}")
    dst = out / "detections.png"
    atomic_write(dst, lambda f: pic.save(f, format="PNG"))
    return str(dst)


def train_all(out: Path, world: Path, loop: list, zero_shot: str, sequential: bool, vlm: str,
              weights: Path) -> list:
    """Teacher -> student on the full labels and on the zero-shot split, and with a pretrained
    VLM the two teachers again on its random-weight control: two chains, in parallel unless
    sequential. Returns the names of the runs that failed."""
    com = _common(out, world, 1, loop, recipe.vlm_args(vlm, weights))
    tt, ts = str(ROOT / "train_teacher.py"), str(ROOT / "train_student.py")
    zs = ["--zero-shot", zero_shot]
    full = [("teacher", [tt] + com + ["--name", "teacher"]),
            ("student", [ts] + com + recipe.KD + ["--name", "student", "--teacher", str(out / "teacher" / "last.pt")])]
    zero = [("zs_teacher", [tt] + com + zs + ["--name", "zs_teacher"]),
            ("zs_student", [ts] + com + zs + recipe.KD + ["--name", "zs_student",
                                                   "--teacher", str(out / "zs_teacher" / "last.pt")])]
    if recipe.VLMS[vlm][1]:
        ctl = _common(out, world, 1, loop, recipe.vlm_args(vlm, weights, random_weights=True))
        # the control runs last in one chain and first in the other: each chain builds one
        # VLM's feature cache at its start, and neither waits for the other's (a cache lock)
        full.append(("random_teacher", [tt] + ctl + ["--name", "random_teacher"]))
        zero.insert(0, ("random_zs_teacher", [tt] + ctl + zs + ["--name", "random_zs_teacher"]))
    chains = [full, zero]
    status = {}
    parallel = not sequential and (os.cpu_count() or 1) >= 2
    print(f"training {len(full) + len(zero)} runs ({'2 chains in parallel' if parallel else 'sequentially'}) ...",
          flush=True)
    if parallel:
        threads = [threading.Thread(target=_chain, args=(c, out, status)) for c in chains]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for c in chains:
            _chain(c, out, status)
    return [n for n, _ in full + zero if status.get(n, (1,))[0] != 0]


def detector_ap(world: Path) -> dict:
    """Box AP (%) of the world's simulated test detections on the test GT boxes (detector_ap.evaluate_detector):
    the ceiling every HOI row below sits under. The GT holds only the boxes of annotated pairs, so a
    person or object the detector finds that takes part in no labelled interaction is a false positive."""
    r = evaluate_detector(world / "instances_test.json", world / "detections_test.json",
                          dataset="synthetic")
    return {k: round(float(r[k]), 2) for k in ("ap", "ap50", "ar100")}


def detector_line(det: dict) -> str:
    return (f"simulated detector: box AP {det['ap']:.2f}, AP50 {det['ap50']:.2f}, AR@100 {det['ar100']:.2f}\n"
            "  (COCOeval against the boxes of annotated pairs only: idle people/objects are false positives)")


KEYS = ("full", "rare", "non_rare")       # the table's columns, full supervision
ZS_KEYS = ("full", "seen", "unseen")      # ... and zero-shot


def collect_results(out: Path, anno: dict, zero_shot: str, control: bool = True) -> dict:
    """mAP of the runs, the chance levels and the detector's box AP, rounded to 2 decimals.
    control: the random-VLM teachers ran (random_teacher, random_zs_teacher); their mAP is
    "random_vlm_teacher" beside "teacher" (None without them)."""
    split = anno["zero_shot"][zero_shot]
    unseen = sorted(split) if isinstance(split, list) else sorted(split["unseen"])
    res = {k: recipe.read_metrics(out / k) for k in RUNS + (CONTROL_RUNS if control else ())}
    chance = recipe.chance_level(anno, recipe.read_preds(out / "teacher"))
    chance_zs = recipe.chance_level(anno, recipe.read_preds(out / "zs_teacher"), zero_shot=unseen)

    def pick(run, ks):
        return {k: round(float(res[run][k]), 2) for k in ks} if run in res else None

    return {
        "teacher": pick("teacher", KEYS), "student": pick("student", KEYS),
        "random_vlm_teacher": pick("random_teacher", KEYS),
        "chance": {k: round(float(chance[k]), 2) for k in KEYS}, "detector": detector_ap(out / "world"),
        "zero_shot": {"split": zero_shot, "unseen_classes": unseen,
                      "teacher": pick("zs_teacher", ZS_KEYS), "student": pick("zs_student", ZS_KEYS),
                      "random_vlm_teacher": pick("random_zs_teacher", ZS_KEYS),
                      "chance": {k: round(float(chance_zs[k]), 2) for k in ZS_KEYS}},
    }


def print_table(results: dict) -> None:
    """The two blocks (full labels, zero-shot): chance, random-VLM teacher (when it ran),
    teacher, student, student - teacher."""
    line = "-" * 56
    vlm = results.get("vlm", {}).get("name", "?")
    print("\nHICO-DET-protocol mAP (%) on the synthetic test set "
          f"({recipe.WORLD['n_test']} images, 16 classes), VLM {vlm}\n{line}")
    z = results["zero_shot"]
    for title, r, keys, header in (
            (None, results, KEYS, ("Full", "Rare", "Non-rare")),
            (f"zero-shot {z['split']} (classes {z['unseen_classes']} never labelled in training)", z, ZS_KEYS,
             ("Full", "Seen", "Unseen"))):
        if title:
            print(f"{line}\n{title}")
        print(f"{'':<26}" + "".join(f"{h:>10}" for h in header))
        for label, m in (("chance (random scores)", r["chance"]), ("teacher, random VLM", r["random_vlm_teacher"]),
                         ("teacher", r["teacher"]), ("student", r["student"])):
            if m is not None:
                print(f"{label:<26}" + "".join(f"{m[k]:10.2f}" for k in keys))
        print(f"{'student - teacher':<26}" + "".join(f"{r['student'][k] - r['teacher'][k]:+10.2f}" for k in keys))
    print(f"{line}\n{detector_line(results['detector'])}\n{line}")


def main(argv=None) -> int:
    """The command line (common.run_command: one line and 130 / 143 on an interrupt)."""
    return run_command(lambda: _demo(argv), doing="running the demo",
                       resume="re-run the command: finished runs are kept, interrupted ones resume")


def _demo(argv) -> int:
    p = OneLineParser(prog="demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None,
                   help="output folder (default runs/demo, runs/demo_seed<N> for --seed N != 0)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the world and of every run")
    p.add_argument("--label-drop", type=number(float, lo=0, hi=1, hi_open=True, what="in [0, 1)"),
                   default=recipe.LABEL_DROP, help="fraction of train interaction labels removed (sparse annotation)")
    p.add_argument("--zero-shot", default="nf-uc", choices=sorted(ZERO_SHOT_SPLITS),
                   help="zero-shot split of the synthetic world")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first (only a demo output "
                   "folder: its recipe.json stamp and nothing the demo does not write)")
    p.add_argument("--sequential", action="store_true", help="run the two chains one after the other")
    p.add_argument("--vlm", default="world-clip", choices=list(recipe.VLMS),
                   help="world-clip (default) / world-sig: the world VLMs pretrained by world/pretrain_vlm.py, shipped "
                        "in --weights (the two teachers also run on the same architecture with random weights); "
                        "random: world-clip's architecture, random weights; tiny: the tiny random VLM")
    p.add_argument("--weights", type=Path, default=vlms.WEIGHTS, metavar="DIR",
                   help="folder of the world VLMs' checkpoints and manifests (default: world/weights/)")
    a = p.parse_args(argv)
    t_start = time.time()
    try:     # before anything is deleted or trained
        vlm = recipe.check_vlm(a.vlm, a.weights.resolve())
    except (OSError, ValueError) as e:
        print(f"error: demo.py --vlm {a.vlm}: {error_line(e)}", file=sys.stderr)
        return 2
    world_cfg = dict(recipe.WORLD, seed=a.seed, train_label_drop=a.label_drop)
    loop = list(recipe.LOOP)
    loop[loop.index("--seed") + 1] = str(a.seed)
    # absolute, links not resolved: --fresh must see a link named as the folder
    out = Path(os.path.abspath(a.out or ("runs/demo" if a.seed == 0 else f"runs/demo_seed{a.seed}")))
    plan = {"world": world_cfg, "vlm": vlm, "model_opts": recipe.MODEL_OPTS, "loop": loop, "kd": recipe.KD}
    try:      # an unreadable folder, a read-only one: one line too
        recipe.claim_output_folder(out, "recipe.json", "a demo", plan, a.fresh,
                            what_differs="world/seed/label drop/VLM and its weights/loop/KD", layout=LAYOUT)
        atomic_write_json(out / "recipe.json", recipe.stamp_doc("a demo", plan), indent=1)
    except (OSError, ValueError) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    release_notes()           # the input is valid: warnings as they come

    # 1. the world
    world = out / "world"
    if not (world / "instances_test.json").exists():
        t0 = time.time()
        synthetic.make_synthetic_world(world, **world_cfg)
        print(f"synthetic world (seed {a.seed}): {recipe.WORLD['n_train']} train / {recipe.WORLD['n_test']} test "
              f"images ({recipe.WORLD['image_size']} px), {a.label_drop:.0%} of the train labels dropped, "
              f"in {time.time() - t0:.1f} s -> {world}", flush=True)
    wp = {"test_anno": world / "instances_test.json", "test_images": world / "images" / "test"}

    # 2-4. two chains (full supervision, zero-shot; the random-VLM teachers), in parallel
    try:
        failed = train_all(out, world, loop, a.zero_shot, a.sequential, a.vlm, a.weights.resolve())
    except KeyboardInterrupt:             # SIGINT / SIGTERM: the runs of the other chain end too
        recipe.stop_children()
        raise
    if failed:
        print(f"error: run(s) {failed} failed; see {out}/<run>.out", file=sys.stderr)
        return 1

    # 5. results
    try:      # a run's outputs damaged after it finished: one line naming the file
        results = collect_results(out, json.loads(wp["test_anno"].read_text()), a.zero_shot,
                                  control=recipe.VLMS[a.vlm][1])
    except (OSError, ValueError) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    results.update({"vlm": vlm, "world": world_cfg, "model_opts": recipe.MODEL_OPTS, "loop": loop, "kd": recipe.KD,
                    "runtime_s": None})
    print_table(results)
    pic = draw_picture(out, wp, out / "student")
    print(f"picture of the student's top interactions: {pic}")
    results["runtime_s"] = round(time.time() - t_start, 1)
    atomic_write_json(out / "results.json", results, indent=1)
    print(f"results: {out / 'results.json'}; demo wall time {results['runtime_s']:.0f} s")
    return 0

if __name__ == "__main__":
    sys.exit(main())
