"""The demo's recipe, shared by demo.py and ablation.py: the world, the model options, the
training loop, the distillation weights, the VLM choices, and the helpers both commands use
(the VLM arguments of the training CLIs, the shipped-checkpoint check, the output-folder guard:
the stamp and the layout of what each command writes, which bound what --fresh deletes; the
readers of a run's metrics and predictions; the chance level of a run's predictions; the training
runs as child processes, which an interrupt of the command ends: run_child, stop_children).
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np

import eval as hoi_eval
from common import error_line, file_kind, read_json
from runs import RUN_OUTPUTS
from world import vlms

# The recipe (tuned on this 2-core machine to keep the whole demo well under 15 minutes).
# train_label_drop: the fraction of train (pair, class) labels removed (sparse annotation,
# as in HICO-DET; the pixels still show those interactions), see synthetic.make_synthetic_world.
LABEL_DROP = 0.4
WORLD = dict(n_train=600, n_test=200, image_size=128, seed=0, train_label_drop=LABEL_DROP)
MODEL_OPTS = ["d_model=64", "d_latent=32", "heads=4", "ffn_mult=2", "impl=reference"]
LOOP = ["--epochs", "8", "--batch-size", "8", "--lr", "5e-4", "--warmup-steps", "20",
        "--schedule", "cosine", "--clip", "1.0", "--weight-decay", "1e-4", "--seed", "0"]
KD = ["--w-map", "1.0", "--w-query", "1.0", "--w-logit", "1.0", "--temperature", "2.0"]

# --vlm -> (the shipped world VLM it needs, pretrained?): 'random' is world-clip's architecture
# with random weights; 'tiny' the tiny random VLM of vlm.register_tiny_vlm (needs no file)
VLMS = {"world-clip": ("world-clip", True), "world-sig": ("world-sig", True),
        "random": ("world-clip", False), "tiny": (None, False)}


def vlm_args(vlm: str, weights: Path, random_weights: bool = False) -> list:
    """The training CLIs' VLM arguments for the demo's --vlm (random_weights: the control)."""
    shipped, pretrained = VLMS[vlm]
    if shipped is None:
        return ["--vlm", "tiny"]
    random_weights = random_weights or not pretrained
    return ["--vlm", shipped, "--weights", str(weights)] + ["--pretrained", "random"] * random_weights


def check_vlm(vlm: str, weights: Path) -> dict:
    """What recipe.json and results.json say about the VLM, after checking the shipped
    checkpoint (vlms.world_vlm: present, SHA-256 as in its manifest). Raises OSError /
    ValueError naming the file."""
    shipped, pretrained = VLMS[vlm]
    if shipped is None:
        return {"name": vlm, "pretrained": False}
    vlms.world_vlm(shipped, weights)
    doc = vlms.shipped(weights)[shipped]
    return {"name": vlm, "pretrained": pretrained, "architecture": shipped,
            "checkpoint": Path(doc["checkpoint"]).name, "sha256": doc["sha256"]}


# What demo.py / ablation.py write in their output folder, as {glob: None (a regular file) | the
# same for a sub-folder}: --fresh deletes a folder only when it holds the command's stamp and
# nothing else (recursively), so a user's file or link anywhere in it stops the deletion.
TEMP = ".*.[0-9]*.????????.tmp"   # a write killed mid-way: common.atomic_write's .NAME.PID.RAND.tmp
RUN_FOLDER = dict.fromkeys(RUN_OUTPUTS + (TEMP,))
CACHE_FOLDER = {"?" * 16: dict.fromkeys(("index.json", "feats-*.bin", ".feats-*.bin.tmp", ".lock", TEMP))}
WORLD_FOLDER = dict(dict.fromkeys([f"{k}_{s}.json" for k in ("instances", "detections", "scenes")
                                   for s in ("train", "test")] + [TEMP]),
                    images={s: dict.fromkeys((f"synth_{s}_*.png", TEMP)) for s in ("train", "test")})


def output_layout(stamp: str, files: tuple, runs: tuple) -> dict:
    """The layout of an output folder: its stamp and ``files``, world/, cache/, and per run
    pattern a run folder and its log ``<run>.out``."""
    layout = dict(dict.fromkeys((stamp, TEMP) + files), world=WORLD_FOLDER, cache=CACHE_FOLDER)
    for r in runs:
        layout.update({r: RUN_FOLDER, f"{r}.out": None})
    return layout


def foreign_entry(folder: Path, layout: dict) -> str | None:
    """The first entry under ``folder`` that the layout does not name (a name no pattern
    matches, a file where a folder belongs or the reverse, a link, a FIFO, an unreadable
    folder), in words; None when everything there is the project's."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        return f"{folder} (cannot list it: {e.strerror})"
    for p in entries:
        mode = os.lstat(p).st_mode
        kinds = [sub for pat, sub in layout.items() if fnmatch.fnmatchcase(p.name, pat)
                 and (stat.S_ISREG(mode) if sub is None else stat.S_ISDIR(mode))]
        if not kinds:
            return f"{p}, a {file_kind(mode)} this command does not write"
        if kinds[0] is not None and (bad := foreign_entry(p, kinds[0])):
            return bad
    return None


def read_stamp(out: Path, stamp: str, kind: str) -> tuple[dict | None, str]:
    """(the recipe in ``out/stamp``, "") when the stamp is this command's (a JSON object whose
    "written_by" is ``kind``'s mark), else (None, why not)."""
    path = out / stamp
    if not os.path.lexists(path):
        return None, f"it has no {stamp}"
    try:
        doc = read_json(path, f"{kind} stamp", allow_bool=True)
    except (OSError, ValueError) as e:
        return None, error_line(e)
    if not isinstance(doc, dict) or doc.get("written_by") != written_by(kind) or not isinstance(
            doc.get("recipe"), dict):
        return None, f"{path} is not the stamp {written_by(kind)!r} writes"
    return doc["recipe"], ""


def written_by(kind: str) -> str:
    return f"LINK {kind.split()[-1]}.py"


def stamp_doc(kind: str, recipe: dict) -> dict:
    """The stamp's content: {"written_by": "LINK demo.py" | "LINK ablation.py", "recipe": ...}."""
    return {"written_by": written_by(kind), "recipe": recipe}


def claim_output_folder(out: Path, stamp: str, kind: str, recipe: dict, fresh: bool, what_differs: str,
                        layout: dict, same=lambda old, new: old == new) -> dict | None:
    """The output folder of a demo / ablation run (``kind``: "a demo" / "an ablation"), made ready
    for ``recipe``. --fresh deletes it only when it provably is one of ours: a real folder (not a
    link) holding this command's stamp (:func:`read_stamp`) and nothing the layout does not name
    (:func:`foreign_entry`); then it deletes just those entries. Without --fresh, a folder with
    runs of another recipe (not ``same(old, new)``) or without our stamp is refused. Returns the
    recipe found there (None for a new folder); the caller writes the stamp. Raises ValueError,
    one line, naming the folder and what is wrong; nothing is deleted then."""
    if os.path.lexists(out) and not out.is_dir():
        raise ValueError(f"{out}: --out names a {file_kind(os.lstat(out).st_mode)}, not a folder; choose another --out")
    old, why = read_stamp(out, stamp, kind) if out.is_dir() else (None, "")
    if fresh and os.path.lexists(out):
        if out.is_symlink():
            why = f"it is a symbolic link to {os.path.realpath(out)}"
        elif not why:
            bad = foreign_entry(out, layout)
            why = bad and f"it holds {bad}"
        if why and (out.is_symlink() or any(out.iterdir())):   # never through a link, even to nothing
            raise ValueError(f"{out}: not {kind} output folder ({why}), and --fresh deletes only those; "
                             f"nothing was deleted: choose another --out or remove what is yours")
        for p in out.iterdir():         # only the layout's entries are left (checked above)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        old = None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{out}: cannot create the output folder ({e.strerror})") from None
    if any(out.iterdir()) and (old is None or not same(old, recipe)):
        raise ValueError(f"{out} holds " + (f"runs of another recipe ({what_differs})" if old is not None
                         else f"files but is not {kind} output folder ({why})") +
                         "; rerun with --fresh or another --out")
    return old


def chance_level(anno: dict, preds: dict, zero_shot=None, draws: int = 5) -> dict:
    """mAP of the same prediction rows with uniformly random scores (mean over draws)."""
    acc = {}
    for s in range(draws):
        rng = np.random.default_rng(1000 + s)
        rnd = {}
        for f, rows in preds.items():
            r = np.array(rows, dtype=np.float64).reshape(-1, 10)
            r[:, 1] = rng.random(len(r))
            rnd[f] = r
        m = hoi_eval.evaluate_hico(anno, rnd, zero_shot=zero_shot)
        for k in ("full", "rare", "non_rare", "unseen", "seen"):
            if m.get(k) is not None:
                acc.setdefault(k, []).append(m[k])
    return {k: float(np.mean(v)) for k, v in acc.items()}


def read_preds(run_dir: Path) -> dict:
    """A run's test prediction rows: {file name: [rows, 10] float64} (predictions_test.json)."""
    path = run_dir / "predictions_test.json"
    doc = read_json(path, "run's predictions file")
    try:
        return {f: np.asarray(r, dtype=np.float64).reshape(-1, 10) for f, r in doc.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{path}: run's predictions file is not {{image: [rows of 10 numbers]}}") from None


MAP_KEYS = ("full", "rare", "non_rare", "seen", "unseen")


def read_metrics(run_dir: Path) -> dict:
    """A run's metrics.json: an object whose mAP keys (MAP_KEYS) are numbers or null. Raises
    ValueError / OSError, one line naming the file and what is wrong."""
    path = run_dir / "metrics.json"
    m = read_json(path, "run's metrics file", allow_bool=True)
    bad = [k for k in MAP_KEYS if isinstance(m, dict) and not isinstance(m.get(k, 0.0), (int, float, type(None)))]
    if not isinstance(m, dict) or bad:
        raise ValueError(f"{path}: run's metrics file " + (f"field '{bad[0]}' is not a number" if bad
                                                            else "is not a JSON object"))
    return m


#: the training runs of run_child still running: an interrupt of the demo / ablation ends them (stop_children)
CHILDREN: set = set()


def run_child(argv: list, log) -> int:
    """``python argv`` (a training run) from the repository, one thread, stdout and stderr into the file
    ``log`` -> its exit status. An interrupt while waiting here ends it too: it writes its own
    'interrupted' line into ``log`` and resumes on the next run of the demo / ablation."""
    p = subprocess.Popen([sys.executable] + argv, stdout=log, stderr=subprocess.STDOUT,
                         cwd=str(Path(__file__).resolve().parent.parent), env=dict(os.environ, OMP_NUM_THREADS="1"))
    CHILDREN.add(p)
    try:
        return p.wait()
    except BaseException:               # an interrupt in this thread (sequential runs)
        stop_children()
        raise
    finally:
        CHILDREN.discard(p)


def stop_children(timeout: float = 60) -> None:
    """SIGTERM to every running child of run_child, then wait for each (at most ``timeout`` s): the
    interrupt of the main thread, while other threads wait on children, leaves none running."""
    for p in list(CHILDREN):
        with contextlib.suppress(OSError):
            p.terminate()
    for p in list(CHILDREN):
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout)
