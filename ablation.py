"""``python ablation.py``: the paper's ablation (../shared/LINK.md, "Ablation") re-run on the synthetic world.

Every row is one architecture / distillation setting, trained with several seeds (--seeds, default
0,1,2) on the demo's world and recipe (world/recipe.py): every row and seed is scored on the same
test set. Rows (on --vlm, default world-clip, unless said otherwise):
  A1 self-attention + plain cross-attention    geometric_encoder=false linking_decoder=false
  A2 + linking decoder                         geometric_encoder=false linking_decoder=true
  A3 geometric encoder + plain cross-attention geometric_encoder=true  linking_decoder=false
  A4 both (the teacher of the KD rows, same seed)
  A5 student, logit KD only (--w-map 0 --w-query 0 --w-logit 1), teacher A4
  A6 + query KD, A7 + map KD (the full student)
  A4-sig: an A4 teacher on --second-vlm (world-sig); A8 = A7 with teachers A4 + A4-sig
  A7-softmax: A7 with --kd-logit-form softmax (A7's is sigmoid, the default)
  A4-pe, A7-pe: A4 / A7 with box_guidance=pe (the default is mask); A7-pe's teacher is A4-pe
  ZS-T, ZS-S, ZS-rand: zero-shot nf-uc: teacher, student (A7's KD), teacher on the VLM's
      architecture with random weights (--pretrained random): Full / Seen / Unseen
  FS1, FS4, FS16: the A4 teacher with --few-shot 1 / 4 / 16 images per class
  chance: recipe.chance_level on the prediction rows of A4 (ZS-T for the zero-shot table)
The direction column compares each A-row's change against the row it changes (Row.base) with the
sign of the paper's change ("~": within twice its standard error over seeds, "?": one seed).
Each run is one train_teacher.py / train_student.py process with one thread, at most --jobs at
once, in OUT/<row>_s<seed>/ (a finished run is not run again, an interrupted one resumes); all
share one feature cache (OUT/cache). Outputs: a printed table, OUT/results.json, OUT/ablation.png.
Exit status 1 when a run failed (the other rows still print), 2 on bad input.
"""
from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from common import (
    OneLineParser,
    atomic_write,
    atomic_write_json,
    error_line,
    positive_int,
    print_error,
    release_notes,
    run_command,
)
from viz import plot_ablation
from world import synthetic, vlms
from world.recipe import (
    KD,
    LOOP,
    MODEL_OPTS,
    VLMS,
    WORLD,
    chance_level,
    check_vlm,
    claim_output_folder,
    output_layout,
    read_metrics,
    read_preds,
    run_child,
    stamp_doc,
    stop_children,
    vlm_args,
)

ROOT = Path(__file__).resolve().parent
ZERO_SHOT = "nf-uc"
STAMP = "ablation_recipe.json"     # marks an ablation output folder (--fresh deletes only those)

# LINK.md, "Ablation" (HICO-DET Full / Rare)
PAPER = {"A1": (36.10, 33.67), "A2": (39.23, 39.76), "A3": (38.30, 35.46), "A4": (41.20, 41.43),
         "A5": (41.89, 43.82), "A6": (42.34, 43.62), "A7": (42.92, 45.03), "A8": (43.54, 45.58)}


def kd_args(w_map: str, w_query: str, w_logit: str) -> tuple:
    """recipe.KD with the three level weights replaced (the temperature stays the demo's)."""
    out = list(KD)
    for flag, w in (("--w-map", w_map), ("--w-query", w_query), ("--w-logit", w_logit)):
        out[out.index(flag) + 1] = w
    return tuple(out)


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    table: str                  # main | kd_form | box | zero_shot | few_shot
    opts: tuple = ()            # --model-opt KEY=VALUE on top of recipe.MODEL_OPTS
    args: tuple = ()            # the run's other options (KD weights, --zero-shot, --few-shot, ...)
    teachers: tuple = ()        # rows whose same-seed runs teach this one (a student if any)
    vlm: str = "main"           # main (--vlm) | second (--second-vlm) | random (main's architecture, random weights)
    base: Optional[str] = None  # the row this one changes (the "change" and direction columns)


def _arch(geo: bool, link: bool) -> tuple:
    return (f"geometric_encoder={str(geo).lower()}", f"linking_decoder={str(link).lower()}")


BOTH, PE, ZS = _arch(True, True), ("box_guidance=pe",), ("--zero-shot", ZERO_SHOT)
FULL_KD = tuple(KD)
ROWS = [
    Row("A1", "self-attn + cross-attn", "main", _arch(False, False)),
    Row("A2", "+ linking decoder", "main", _arch(False, True), base="A1"),
    Row("A3", "geometric enc. + cross-attn", "main", _arch(True, False), base="A1"),
    Row("A4", "both (teacher)", "main", BOTH, base="A3"),
    Row("A5", "+ logit KD", "main", BOTH, kd_args("0", "0", "1.0"), ("A4",), base="A4"),
    Row("A6", "+ query KD", "main", BOTH, kd_args("0", "1.0", "1.0"), ("A4",), base="A5"),
    Row("A7", "+ map KD (student)", "main", BOTH, FULL_KD, ("A4",), base="A6"),
    Row("A4-sig", "A4 on the second VLM", "main", BOTH, vlm="second"),
    Row("A8", "+ second teacher (A4-sig)", "main", BOTH, FULL_KD, ("A4", "A4-sig"), base="A7"),
    Row("A7-softmax", "A7, softmax logit KD", "kd_form", BOTH, FULL_KD + ("--kd-logit-form", "softmax"),
        ("A4",), base="A7"),
    Row("A4-pe", "A4, box_guidance=pe", "box", BOTH + PE, base="A4"),
    Row("A7-pe", "A7, box_guidance=pe", "box", BOTH + PE, FULL_KD, ("A4-pe",), base="A7"),
    Row("ZS-T", "teacher", "zero_shot", BOTH, ZS),
    Row("ZS-S", "student (A7 KD)", "zero_shot", BOTH, ZS + FULL_KD, ("ZS-T",), base="ZS-T"),
    Row("ZS-S-softmax", "student, softmax logit KD", "zero_shot", BOTH,
        ZS + FULL_KD + ("--kd-logit-form", "softmax"), ("ZS-T",), base="ZS-S"),
    Row("ZS-rand", "teacher, random VLM", "zero_shot", BOTH, ZS, vlm="random", base="ZS-T"),
] + [Row(f"FS{k}", f"A4, {k} images/class", "few_shot", BOTH, ("--few-shot", str(k)), base="A4")
     for k in (1, 4, 16)]
BY_NAME = {r.name: r for r in ROWS}
# what the ablation writes in --out (STAMP, the runs <row>_s<seed>/ and their logs); --fresh deletes nothing else
LAYOUT = output_layout(STAMP, ("results.json", "ablation.png"), tuple(f"{r.name}_s[0-9]*" for r in ROWS))
TABLES = {"main": ("ablation (Full / Rare / Non-rare mAP)", ("full", "rare", "non_rare")),
          "kd_form": ("logit-KD form (A7 = sigmoid)", ("full", "rare", "non_rare")),
          "box": ("box guidance (A4, A7 = mask)", ("full", "rare", "non_rare")),
          "zero_shot": (f"zero-shot {ZERO_SHOT}", ("full", "seen", "unseen")),
          "few_shot": ("few-shot (A4 teacher)", ("full", "rare", "non_rare"))}


# ----------------------------------------------------------------------------------------------
# Rows -> runs -> command lines
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    out: Path
    world: Path
    vlm: str = "world-clip"             # a recipe.VLMS name
    second_vlm: str = "world-sig"
    epochs: str = LOOP[LOOP.index("--epochs") + 1]
    weights: Path = vlms.WEIGHTS   # the world VLMs' folder (--weights)


def run_name(row: str, seed: int) -> str:
    return f"{row}_s{seed}"


def _model_opts(extra: tuple) -> list:
    """recipe.MODEL_OPTS updated by the row's options (a key given twice: the row's value, in place)."""
    opts = dict(o.split("=", 1) for o in MODEL_OPTS)
    opts.update(dict(o.split("=", 1) for o in extra))
    return [a for k, v in opts.items() for a in ("--model-opt", f"{k}={v}")]


def _vlm_args(row: Row, s: Setup) -> list:
    """recipe.vlm_args of the row's VLM ('random': --vlm's architecture, random weights)."""
    if row.vlm == "second":
        return vlm_args(s.second_vlm, s.weights)
    return vlm_args(s.vlm, s.weights, random_weights=row.vlm == "random")


def command(row: Row, seed: int, s: Setup) -> list:
    """The argv (after the Python interpreter) of one run of ``row``."""
    loop = list(LOOP)
    loop[loop.index("--seed") + 1] = str(seed)
    loop[loop.index("--epochs") + 1] = str(s.epochs)
    script = "train_student.py" if row.teachers else "train_teacher.py"
    argv = [str(ROOT / script), "--dataset", "synthetic", "--world", str(s.world), "--runs", str(s.out),
            "--cache", str(s.out / "cache")] + _vlm_args(row, s)
    # a random-VLM row draws another random tower per seed, so its spread is over towers too
    opts = row.opts + ((f"vlm_seed={seed}",) if row.vlm == "random" else ())
    argv += ["--threads", "1", "--no-progress", "--resume", "--keep-empty"] + loop + _model_opts(opts)
    argv += list(row.args) + ["--name", run_name(row.name, seed)]
    for t in row.teachers:
        argv += ["--teacher", str(s.out / run_name(t, seed) / "last.pt")]
    return argv


def with_teachers(names: list) -> list:
    """The rows asked for plus every row they need as a teacher, in ROWS order."""
    need, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo += list(BY_NAME[n].teachers)
    return [r.name for r in ROWS if r.name in need]


@dataclass(frozen=True)
class Job:
    name: str
    argv: list
    deps: tuple = ()


def build_jobs(rows: list, seeds: list, s: Setup) -> list:
    """One Job per (row, seed); runs that others wait for come first (then ROWS order)."""
    jobs = [Job(run_name(n, sd), command(BY_NAME[n], sd, s), tuple(run_name(t, sd) for t in BY_NAME[n].teachers))
            for n in rows for sd in seeds]
    waiting = {j.name: sum(j.name in k.deps for k in jobs) for j in jobs}
    return sorted(jobs, key=lambda j: -waiting[j.name])   # stable: ROWS, then seed order


# ----------------------------------------------------------------------------------------------
# The scheduler
# ----------------------------------------------------------------------------------------------
def _skip_orphans(pending: list, state: dict, names: set) -> None:
    """Mark skipped (and drop from ``pending``) every job that needs a run that failed, was
    skipped or is not scheduled at all, down the whole chain."""
    changed = True
    while changed:
        changed = False
        for j in list(pending):
            bad = [d for d in j.deps if d not in names or state.get(d, "ok") != "ok"]
            if bad:
                state[j.name] = f"skipped ({bad[0]} did not finish)"
                pending.remove(j)
                changed = True


def schedule(jobs: list, run: Callable[[Job], int], max_jobs: int = 2) -> dict:
    """Run the jobs, at most ``max_jobs`` at once, each after its deps succeeded.

    run(job) -> exit status (0: success), called in a thread per job. Returns {name: "ok" |
    "failed (exit N)" | "skipped (DEP did not finish)"}; a job whose dependency failed or was
    skipped is skipped, and so on down the chain."""
    pending, state, running, done = list(jobs), {}, set(), queue.Queue()
    names = {j.name for j in jobs}

    def worker(job):
        try:
            rc = run(job)
        except Exception as e:           # a runner that cannot start the process: that run failed
            print_error(f"{job.name}: {e}")
            rc = -1
        done.put((job.name, rc))

    while pending or running:
        _skip_orphans(pending, state, names)
        for j in [j for j in pending if all(state.get(d) == "ok" for d in j.deps)][:max_jobs - len(running)]:
            pending.remove(j)
            running.add(j.name)
            threading.Thread(target=worker, args=(j,), daemon=True).start()
        if not running:                   # what is left waits on itself (a cycle): nothing can start
            state.update({j.name: "skipped (dependency cycle)" for j in pending})
            break
        name, rc = done.get()
        running.discard(name)
        state[name] = "ok" if rc == 0 else f"failed (exit {rc})"
    return state


def subprocess_runner(out: Path, wall: dict) -> Callable[[Job], int]:
    """run(job) for :func:`schedule`: one training process, one thread, log appended to
    OUT/<run>.out (a resumed run keeps its earlier log), its wall time into ``wall[name]``; a
    finished run (its checkpoint, metrics.json and predictions_test.json readable) is not run
    again; one whose metrics or predictions are damaged runs again (the trainer resumes from
    last.pt and writes them anew; a damaged last.pt makes the run fail, its line in the log)."""
    def run(job: Job) -> int:
        rd = out / job.name
        if (rd / "last.pt").is_file():
            try:
                read_metrics(rd), read_preds(rd)
                print(f"  {job.name:<16} finished before: not run again", flush=True)
                return 0
            except FileNotFoundError:
                pass                      # stopped before its outputs: it resumes
            except (OSError, ValueError) as e:
                print(f"  {job.name:<16} damaged output ({error_line(e)}): run again", flush=True)
        t0 = time.time()
        with open(out / f"{job.name}.out", "a") as log:
            rc = run_child(job.argv, log)
        print(f"  {job.name:<16} {'done' if rc == 0 else 'FAILED (exit %d)' % rc}"
              f" in {time.time() - t0:7.1f} s  (log: {out / (job.name + '.out')})", flush=True)
        wall[job.name] = round(time.time() - t0, 1)
        return rc
    return run


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------
def mean_std(values: list) -> tuple:
    """(mean, sample standard deviation (n - 1); None for one value) of the finite values, or (None, None)."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def summarise(per_seed: dict, keys: tuple) -> dict:
    """{seed: metrics or None (failed)} -> {"mean": {k}, "std": {k}, "n": seeds that finished}."""
    ok = [m for m in per_seed.values() if m is not None]
    stats = {k: mean_std([m.get(k) for m in ok]) for k in keys}
    return {"mean": {k: v[0] for k, v in stats.items()}, "std": {k: v[1] for k, v in stats.items()},
            "n": len(ok)}


def change(row: dict, base: dict, key: str) -> Optional[dict]:
    """Mean of ``row`` minus mean of ``base`` on ``key``, and whether it is within the noise."""
    a, b = row["mean"].get(key), base["mean"].get(key)
    if a is None or b is None:
        return None
    if row["std"].get(key) is None or base["std"].get(key) is None:   # one seed: the noise is unknown
        return {"delta": a - b, "se": None, "within_noise": None}
    se = math.sqrt(sum(s["std"][key] ** 2 / s["n"] for s in (row, base)))
    return {"delta": a - b, "se": se, "within_noise": bool(abs(a - b) < 2 * se)}


def direction(name: str, stats: dict) -> Optional[dict]:
    """Per key of the paper (full, rare): the measured change vs Row.base and whether its sign is
    the paper's; None for a row without paper figures (or whose base did not run)."""
    row = BY_NAME[name]
    if name not in PAPER or row.base not in PAPER or row.base not in stats:
        return None
    out = {}
    for i, key in enumerate(("full", "rare")):
        c = change(stats[name], stats[row.base], key)
        paper = PAPER[name][i] - PAPER[row.base][i]
        out[key] = c and dict(c, paper_delta=round(paper, 2), reproduced=bool(np.sign(c["delta"]) == np.sign(paper)))
    return out


NOISE_MARK = {True: "~", None: "?"}     # within 2 standard errors / noise unknown (one seed)


def direction_text(d: Optional[dict]) -> str:
    if not d:
        return "n/a"
    return ", ".join(f"{k.capitalize()} {'-' if v is None else ('yes' if v['reproduced'] else 'no')}"
                     f"{NOISE_MARK.get(v and v['within_noise'], '')}" for k, v in d.items())


def read_row(name: str, seeds: list, out: Path, state: dict) -> dict:
    """{seed: the run's metrics.json, or None} and {seed: its status} ("damaged (...)": it
    finished but its metrics.json cannot be read now)."""
    per, status = {}, {}
    for sd in seeds:
        rn = run_name(name, sd)
        status[sd], per[sd] = state.get(rn, "not run"), None
        try:
            per[sd] = read_metrics(out / rn) if status[sd] == "ok" else None
        except (OSError, ValueError) as e:
            status[sd] = f"damaged ({error_line(e)})"
    return {"per_seed": per, "status": status}


def chances(out: Path, world: Path, rows: list, seeds: list, state: dict) -> dict:
    """recipe.chance_level on the prediction rows of the first finished A4 run (full table) and ZS-T
    run (zero-shot table: Seen / Unseen over the split's classes)."""
    res = {}
    for table, row in (("full", "A4"), ("zero_shot", "ZS-T")):
        done = [run_name(row, sd) for sd in seeds if row in rows and state.get(run_name(row, sd)) == "ok"]
        if not done:
            continue
        anno = json.loads((world / "instances_test.json").read_text())
        split = anno["zero_shot"][ZERO_SHOT]
        unseen = None if table == "full" else sorted(split) if isinstance(split, list) else sorted(split["unseen"])
        try:
            res[table] = chance_level(anno, read_preds(out / done[0]), zero_shot=unseen)
        except (OSError, ValueError) as e:       # damaged since its run finished: no chance row
            print_error(f"ablation.py: no chance level for the {table} table: {e}")
    return res


def collect(out: Path, world: Path, rows: list, seeds: list, state: dict) -> dict:
    """results.json's body: per row its runs' metrics per seed, mean / std, paper, change, direction."""
    res = {}
    for n in rows:
        keys = TABLES[BY_NAME[n].table][1]
        r = read_row(n, seeds, out, state)
        res[n] = {"what": BY_NAME[n].what, "table": BY_NAME[n].table, "base": BY_NAME[n].base,
                  "per_seed": {str(k): v for k, v in r["per_seed"].items()},
                  "status": {str(k): v for k, v in r["status"].items()}, **summarise(r["per_seed"], keys)}
        if n in PAPER:
            res[n]["paper"] = dict(zip(("full", "rare"), PAPER[n]))
    for n in rows:
        b = BY_NAME[n].base
        res[n]["change"] = {k: change(res[n], res[b], k) for k in TABLES[BY_NAME[n].table][1]} \
            if b in res else None
        res[n]["direction"] = direction(n, res)
    return {"rows": res, "chance": chances(out, world, rows, seeds, state)}


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def _cell(m, s) -> str:
    if m is None:
        return f"{'-':>14}"
    return f"{m:7.2f} +-{s:5.2f}" if s is not None else f"{m:7.2f} +-  - "


def _row_line(n: str, r: dict, keys: tuple) -> str:
    line = f"{n:<11}{r['what']:<29}" + "".join(_cell(r["mean"][k], r["std"][k]) for k in keys)
    p = r.get("paper")
    line += f"  {p['full']:6.2f}/{p['rare']:6.2f}" if p else f"  {'':>13}"
    c = r.get("change") or {}
    line += "  " + "".join(f"{c[k]['delta']:+7.2f}" if c.get(k) else f"{'':>7}" for k in keys)
    line += f"  {direction_text(r['direction']) if n in PAPER else ''}"
    failed = [f"s{sd}: {st}" for sd, st in r["status"].items() if st != "ok"]
    return line + (f"  [{'; '.join(failed)}]" if failed else "")


def print_table(res: dict, seeds: list) -> None:
    rows, line = res["rows"], "-" * 150
    print(f"\nHICO-DET-protocol mAP (%) on the synthetic test set, mean +- std over seeds {seeds}; "
          "paper = LINK.md's HICO-DET Full/Rare; change = each column's mean minus the base row's (Row.base);\n"
          "direction reproduced? = sign of the change vs the paper's (Full, Rare); ~ = within 2 standard errors, "
          "? = one seed (noise unknown)")
    for table, (title, keys) in TABLES.items():
        names = [n for n, r in rows.items() if r["table"] == table]
        if not names:
            continue
        heads = "".join(f"{k.replace('_', '-').capitalize():>14}" for k in keys)
        print(f"{line}\n{title}\n{'row':<11}{'':<29}{heads}  {'paper F/R':>13}  {'change vs base':^21}"
              "  direction reproduced?")
        for n in names:
            print(_row_line(n, rows[n], keys))
        ch = res["chance"].get("zero_shot" if table == "zero_shot" else "full")
        if ch and table in ("main", "zero_shot", "few_shot"):
            print(f"{'chance':<11}{'(random scores)':<29}" + "".join(_cell(ch.get(k), None) for k in keys))
    print(line)


def draw(res: dict) -> bytes:
    panels = []
    for table, (title, keys) in TABLES.items():
        mine = [n for n, r in res["rows"].items() if r["table"] == table]
        bases = [BY_NAME[n].base for n in mine if BY_NAME[n].base in res["rows"]
                 and res["rows"][BY_NAME[n].base]["table"] != table]   # what a variant is read against
        bars = [(n, res["rows"][n]["mean"], res["rows"][n]["std"]) for n in dict.fromkeys(bases + mine)]
        if mine:
            panels.append((title, keys, bars))
    return plot_ablation(panels)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _names(text: str) -> list:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in BY_NAME]
    if bad or not names:
        raise ValueError(f"unknown row(s) {bad or text!r}; rows: {', '.join(BY_NAME)}")
    return names


def _seeds(text: str) -> list:
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--seeds: integers separated by commas, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: distinct integers >= 0, got {text!r}")
    return seeds


def parse(argv=None):
    p = OneLineParser(prog="ablation.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(BY_NAME), help="rows to run, comma-separated (their teachers "
                   "are added); default all: " + ",".join(BY_NAME))
    p.add_argument("--seeds", default="0,1,2", help="run seeds, comma-separated (default 0,1,2)")
    p.add_argument("--jobs", type=positive_int, default=2, help="runs at once, one thread each (default 2)")
    p.add_argument("--out", default="runs/ablation", help="output folder (default runs/ablation)")
    p.add_argument("--fresh", action="store_true", help="delete --out first (only an ablation output folder)")
    p.add_argument("--epochs", type=positive_int, default=int(Setup.epochs), help="epochs (default the demo's)")
    p.add_argument("--vlm", default="world-clip", choices=sorted(VLMS), help="the VLM of every row (default "
                   "world-clip; demo.py's choices)")
    p.add_argument("--second-vlm", default="world-sig", choices=sorted(VLMS),
                   help="A8's second teacher's VLM (default world-sig)")
    p.add_argument("--weights", default=str(vlms.WEIGHTS), metavar="DIR",
                   help="folder of the world VLMs' checkpoints and manifests (default: world/weights/)")
    p.add_argument("--n-train", type=positive_int, default=WORLD["n_train"], help="world's train images "
                   "(default the demo's; smaller for tests only)")
    p.add_argument("--n-test", type=positive_int, default=WORLD["n_test"], help="world's test images")
    a = p.parse_args(argv)
    try:
        a.rows, a.seeds = with_teachers(_names(a.rows)), _seeds(a.seeds)
    except ValueError as e:
        p.error(str(e))
    return a


def recipe(a) -> dict:
    """What the runs in --out are trained with (a folder of another recipe is refused): the
    world, loop, epochs, KD, the VLM names, and the checkpoint's sha256 of each world VLM the
    rows use (recipe.check_vlm: a missing or corrupt checkpoint is refused here, before any run)."""
    used = [a.vlm] + ([a.second_vlm] if any(BY_NAME[n].vlm == "second" for n in a.rows) else [])
    shas = {v: check_vlm(v, Path(a.weights)).get("sha256") for v in used}
    return {"world": dict(WORLD, n_train=a.n_train, n_test=a.n_test), "model_opts": MODEL_OPTS,
            "loop": LOOP, "epochs": a.epochs, "kd": KD, "vlm": a.vlm, "second_vlm": a.second_vlm,
            "vlm_sha256": shas, "zero_shot": ZERO_SHOT}


def _same_recipe(old: dict, new: dict) -> bool:
    """Equal but for the VLMs' sha256, which must agree only on the VLMs both used (a run of a
    subset of the rows, e.g. without A8, does not need the second VLM)."""
    strip = [{k: v for k, v in r.items() if k != "vlm_sha256"} for r in (old, new)]
    a, b = old.get("vlm_sha256", {}), new["vlm_sha256"]
    return strip[0] == strip[1] and all(a[v] == b[v] for v in set(a) & set(b))


def prepare_out(out: Path, rec: dict, fresh: bool) -> Optional[str]:
    """--fresh, then the recipe stamp (merged: the VLMs of every invocation); -> an error line or None."""
    try:
        old = claim_output_folder(out, STAMP, "an ablation", rec, fresh, same=_same_recipe, layout=LAYOUT,
                                  what_differs="world / loop / epochs / VLMs or their weights")
        shas = dict((old or {}).get("vlm_sha256", {}), **rec["vlm_sha256"])
        atomic_write_json(out / STAMP, stamp_doc("an ablation", dict(rec, vlm_sha256=shas)), indent=1)
    except (OSError, ValueError) as e:       # an unreadable or read-only folder: one line too
        return error_line(e)
    return None


def main(argv=None) -> int:
    """The command line (common.run_command: one line and 130 / 143 on an interrupt)."""
    return run_command(lambda: _ablation(argv), doing="running the ablation",
                       resume="re-run the command: finished runs are kept, interrupted ones resume")


def _ablation(argv) -> int:
    a = parse(argv)
    t_start = time.time()
    out = Path(os.path.abspath(a.out))       # links not resolved: --fresh must see a link as --out
    try:
        rec = recipe(a)
    except (ValueError, OSError) as e:     # a world VLM missing or corrupt
        print_error(f"ablation.py: {e}")
        return 2
    err = prepare_out(out, rec, a.fresh)
    if err:
        print_error(f"ablation.py: {err}")
        return 2
    release_notes()           # the input is valid: warnings as they come
    world = out / "world"
    if not (world / "instances_test.json").exists():
        synthetic.make_synthetic_world(world, **rec["world"])
    s = Setup(out, world, a.vlm, a.second_vlm, str(a.epochs), Path(a.weights).resolve())
    jobs = build_jobs(a.rows, a.seeds, s)
    print(f"ablation: {len(jobs)} runs ({len(a.rows)} rows x seeds {a.seeds}), {a.jobs} at a time -> {out}",
          flush=True)
    wall = {}
    try:
        state = schedule(jobs, subprocess_runner(out, wall), a.jobs)
    except KeyboardInterrupt:             # SIGINT / SIGTERM: the running runs end too
        stop_children()
        raise
    res = collect(out, world, a.rows, a.seeds, state)
    res.update(recipe=rec, seeds=a.seeds, runs=state, run_wall_s=wall, runtime_s=round(time.time() - t_start, 1))
    print_table(res, a.seeds)
    png = draw(res)
    atomic_write(out / "ablation.png", lambda f: f.write(png))
    atomic_write_json(out / "results.json", res, indent=1)
    failed = sorted(k for k, v in state.items() if v != "ok")
    print(f"results: {out / 'results.json'}, plot: {out / 'ablation.png'}; wall time {res['runtime_s']:.0f} s")
    if failed:
        print_error(f"ablation.py: run(s) {', '.join(failed)} did not finish; see {out}/<run>.out")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
