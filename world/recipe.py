"""The demo's recipe, shared by demo.py and ablation.py: the world, the model options, the
training loop, the distillation weights, the VLM choices, and the helpers both commands use
(the VLM arguments of the training CLIs, the shipped-checkpoint check, the output-folder guard,
the chance level of a run's predictions).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

import eval as hoi_eval
from common import read_json
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


def claim_output_folder(out: Path, stamp: str, kind: str, recipe: dict, fresh: bool, what_differs: str,
                        same=lambda old, new: old == new) -> dict | None:
    """The output folder of a demo / ablation run, made ready for ``recipe``: --fresh deletes it,
    but only if it is one of ours (it holds ``stamp``, the recipe file); a folder with runs of
    another recipe (not ``same(old, new)``) is refused. Returns the recipe found there (None for
    a new folder); the caller writes the stamp. Raises ValueError, one line, naming the folder."""
    if fresh and out.exists():
        if any(out.iterdir()) and not (out / stamp).is_file():   # never delete a folder of yours
            raise ValueError(f"{out}: --fresh deletes this folder, which is not {kind} output folder (it has "
                             f"no {stamp}); choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    old = read_json(out / stamp, f"{kind} recipe", allow_bool=True) if (out / stamp).is_file() else None
    if any(out.iterdir()) and (old is None or not same(old, recipe)):
        raise ValueError(f"{out} holds runs of another recipe ({what_differs}); rerun with --fresh or another --out")
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
    return {f: np.asarray(r, dtype=np.float64).reshape(-1, 10)
            for f, r in json.loads((run_dir / "predictions_test.json").read_text()).items()}
