"""Tests of the shared training loop (trainer.py) and of the splits and views it trains on
(data.Split, data.Views).

Most tests use a tiny stand-in model that follows model.py's contract (encode_images,
preprocess, cache_key, forward -> pair outputs + loss, postprocess) on a tiny dataset of PNG
files, so that the loop is tested on its own; test_runs.py, test_cache.py, test_distill.py and
test_cli.py reuse these helpers. Subprocess tests run this file as a script
(``python tests/test_trainer.py child ...``) to kill -9 it or to run it under torchrun; the child
can slow one checkpoint write down (``--slow-ckpt-write``) so that it is killed mid-write.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import trainer  # noqa: E402
from cache import FeatureSource  # noqa: E402
from common import atomic_write  # noqa: E402
from data import Split, Views, view_boxes, view_of  # noqa: E402
from runs import CheckpointError, TrainInputError, load_checkpoint, trainable_state  # noqa: E402
from train_student import Distiller, KDConfig, Widths  # noqa: E402
from trainer import (  # noqa: E402
    Dist,
    LoopConfig,
    NonFiniteLossError,
    Trainer,
    WarmupSchedule,
    init_distributed,
)

# ----------------------------------------------------------------------------------------------
# stand-in model and data
# ----------------------------------------------------------------------------------------------

@dataclass
class TinyCfg:
    vlm: str = "standin"
    width: int = 8
    latent: int = 6
    dropout: float = 0.1
    nan_image: str = ""          # loss becomes NaN when this file is in the batch


@dataclass
class TinyCS:
    name: str = "tiny"
    prompts: list = field(default_factory=lambda: ["a", "b", "c"])
    unseen: list = field(default_factory=list)


class StandIn(torch.nn.Module):
    """Pairs = every detected human with every other box; features = box-pooled VLM map."""

    def __init__(self, cfg: TinyCfg, cs: TinyCS):
        super().__init__()
        self.cfg, self.class_space = cfg, cs
        g = torch.Generator().manual_seed(123)
        self.vlm = torch.nn.Conv2d(3, 4, 4, stride=4)                  # frozen "VLM": 16px -> 4x4
        with torch.no_grad():
            self.vlm.weight.copy_(torch.randn(4, 3, 4, 4, generator=g) * 0.3)
            self.vlm.bias.zero_()
        self.vlm.requires_grad_(False)
        self.proj = torch.nn.Linear(4 + 8, cfg.width)
        self.conn = torch.nn.Linear(4, cfg.latent)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(cfg.width, cfg.width) for _ in range(2)])
        self.cls = torch.nn.Linear(cfg.width, len(cs.prompts))
        self.drop = torch.nn.Dropout(cfg.dropout)

    def cache_key(self):
        return f"standin|{self.cfg.vlm}|16"

    def preprocess(self, images):
        arr = np.stack([np.asarray(im.convert("RGB").resize((16, 16)), dtype=np.float32) / 255 for im in images])
        return torch.from_numpy(arr).permute(0, 3, 1, 2)                # [B, 3, 16, 16]

    def encode_images(self, x):
        with torch.no_grad():
            return self.vlm(x)                                           # [B, 4, 4, 4]

    def forward(self, feats, detections, sizes, targets=None, outputs=None):
        latent = self.conn(feats.flatten(2).transpose(1, 2))             # [B, 16, latent]
        pimg, pidx, qs = [], [], []
        for b, (dt, (w, h)) in enumerate(zip(detections, sizes)):
            boxes = dt["boxes"] / torch.tensor([w, h, w, h], dtype=torch.float32)
            hum = (dt["labels"] == 0).nonzero().flatten().tolist()
            for i in hum:
                for j in range(len(boxes)):
                    if j != i:
                        pimg.append(b)
                        pidx.append([i, j])
                        qs.append(torch.cat([feats[b].mean((1, 2)), boxes[i], boxes[j]]))
        P = len(qs)
        q = self.proj(torch.stack(qs)) if P else feats.new_zeros(0, self.cfg.width)
        queries = []
        for lin in self.layers:
            q = torch.tanh(lin(self.drop(q)))
            queries.append(q)
        logits = self.cls(q)                                             # [P, K]
        out = {"pair_image": torch.tensor(pimg, dtype=torch.long),
               "pair_idx": torch.tensor(pidx, dtype=torch.long).reshape(-1, 2),
               "logits": logits, "prior": torch.full_like(logits, 0.5), "latent_map": latent,
               "queries": queries, "scores": torch.sigmoid(logits)}
        if targets is not None:
            # like the real model: a sum over pairs divided by the batch's positives, so the
            # 2-process test checks that the loop re-normalises by the global positive count
            per, num_pos = [], 0
            for b, t in enumerate(targets):
                m = out["pair_image"] == b
                lab = torch.zeros(int(m.sum()), logits.shape[1])
                if m.any():
                    lab[: 1 + int(t["hoi"][0]) % 2, int(t["hoi"][0])] = 1.0  # 1 or 2 positives
                    num_pos += int(lab.sum())
                    per.append(torch.nn.functional.binary_cross_entropy_with_logits(logits[m], lab, reduction="sum"))
                else:
                    per.append(logits.sum() * 0)
                if self.cfg.nan_image and t["filename"] == self.cfg.nan_image:
                    per[-1] = per[-1] * float("nan")
            out["loss"] = torch.stack(per).sum() / max(num_pos, 1)
            out["num_pos"] = torch.tensor(float(num_pos))
        if outputs is not None:   # like the real model: only the keys asked for (and the loss)
            out = {k: v for k, v in out.items() if k in outputs or k in ("loss", "num_pos")}
        return out

    def postprocess(self, out, detections, k=None):
        rows = []
        for b, dt in enumerate(detections):
            m = (out["pair_image"] == b).nonzero().flatten()
            r = []
            for p in m.tolist():
                i, j = out["pair_idx"][p].tolist()
                for c in range(out["scores"].shape[1]):
                    r.append([c, float(out["scores"][p, c])] + dt["boxes"][i].tolist() + dt["boxes"][j].tolist())
            rows.append(np.asarray(r, dtype=np.float64).reshape(-1, 10))
        return rows


class TinyDS:
    """n PNG images of 16x16 in root; one GT pair per image."""

    def __init__(self, root, n, seed=0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        rng = np.random.RandomState(seed)
        self.filenames = [f"img{i:03d}.png" for i in range(n)]
        self.targets = []
        for i, f in enumerate(self.filenames):
            p = self.root / f
            arr = rng.randint(0, 255, (16, 16, 3), dtype=np.uint8)   # drawn even if the file exists
            if not p.exists():
                Image.fromarray(arr).save(p)
            x = float(rng.randint(0, 6))
            self.targets.append({"filename": f, "index": i, "size": (16, 16),
                                 "boxes_h": torch.tensor([[x, 1.0, x + 6, 12.0]]),
                                 "boxes_o": torch.tensor([[8.0, 4.0, 15.0, 9.0]]),
                                 "object": torch.tensor([1]), "hoi": torch.tensor([i % 3]),
                                 "verb": torch.tensor([i % 3])})

    def __len__(self):
        return len(self.filenames)

    def image_path(self, i):
        return self.root / self.filenames[i]

    def target(self, i):
        return self.targets[i]

    def __getitem__(self, i):
        return Image.open(self.image_path(i)).convert("RGB"), self.targets[i]


def _gt(t):
    return {"boxes": torch.cat([t["boxes_h"], t["boxes_o"]]), "scores": torch.ones(2),
            "labels": torch.cat([torch.zeros(1, dtype=torch.long), t["object"]])}


def tiny_split(root, n, seed=0, vary=False, views=None, append_gt=False):
    """vary: image i gets i % 3 more object boxes, so that images have 6, 8 or 10 pairs."""
    ds = TinyDS(root, n, seed)
    dets = {}
    for i, f in enumerate(ds.filenames):
        extra = i % 3 if vary else 0
        boxes = [[2.0, 2.0, 9.0, 14.0], [1.0, 1.0, 5.0, 5.0]] + [[1.0 + k, 2.0, 6.0 + k, 7.0] for k in range(extra)]
        dets[f] = {"boxes": torch.tensor(boxes), "scores": torch.tensor([0.9, 0.8] + [0.7] * extra),
                   "labels": torch.tensor([0, 2] + [2] * extra)}
    return Split(ds, dets, root, {"n": n}, select=lambda d: d, gt_dets=_gt, name=str(root), views=views,
                 append_gt=append_gt)


def standin_widths(cfg: TinyCfg) -> Widths:
    return Widths(cfg.latent, cfg.width, 2)


def standin_distiller(feats, d: Dist, cfg: KDConfig = None) -> Distiller:
    """A StandIn teacher of other widths (query 10, latent 5) and its adapters; the adapters'
    seed depends on the rank, so only the loop's broadcast makes the ranks agree."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        t_cfg = TinyCfg(width=10, latent=5, dropout=0.0)
        teacher = StandIn(t_cfg, TinyCS())
    return Distiller([teacher], [feats], standin_widths(TinyCfg()), [standin_widths(t_cfg)],
                     cfg or KDConfig(temperature=2.0), seed=100 + d.rank)


def count_metric(anno, preds):
    return {"full": float(len(preds)), "rare": 0.0, "non_rare": 0.0}


def make_trainer(tmp, n=10, epochs=2, bs=4, dropout=0.1, nan_image="", n_test=0, dist=None,
                 ckpt_every=1, flip=False, seed=0, kd=False, crop_scales=()):
    """kd: images with varying pair counts and a distilling StandIn teacher of other widths."""
    torch.manual_seed(seed)
    model = StandIn(TinyCfg(dropout=dropout, nan_image=nan_image), TinyCS())
    tmp = Path(tmp)
    train = tiny_split(tmp / "data", n, vary=kd, views=Views(flip, crop_scales))
    d = dist or Dist()
    tf = FeatureSource(model, train, tmp / "cache", dtype="float32", d=d, progress=False)
    extra = standin_distiller(tf, d) if kd else None
    test = tf_test = None
    if n_test:
        test = tiny_split(tmp / "data_test", n_test, seed=1)
        tf_test = FeatureSource(model, test, tmp / "cache", 1, "float32", d, progress=False)
    cfg = LoopConfig(epochs=epochs, batch_size=bs, lr=1e-2, warmup_steps=2, clip=1.0, seed=seed,
                        ckpt_every=ckpt_every, deterministic=True, progress=False, flip=flip,
                        eval_every=1, crop_scales=list(crop_scales))
    return Trainer(model, cfg, train, tf, tmp / "run", d, test, tf_test, metric_fn=count_metric, extra_loss=extra)


def slow_checkpoint_write(seconds: float, nth: int) -> None:
    """Make the nth (1-based) checkpoint write of this process stop for ``seconds`` with half of
    its bytes in the temp file of the loop's atomic write, after printing "[slow-write]" to
    stderr, so that the test can kill -9 the process mid-write."""
    real, count = trainer.atomic_torch_save, [0]

    def save(obj, path):
        count[0] += 1
        if count[0] != nth:
            return real(obj, path)
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()

        def write(f):
            f.write(data[:len(data) // 2])
            f.flush()
            print(f"[slow-write] {Path(path).name}: {len(data) // 2}/{len(data)} bytes written, sleeping",
                  file=sys.stderr, flush=True)
            time.sleep(seconds)
            f.write(data[len(data) // 2:])
        atomic_write(path, write)
    trainer.atomic_torch_save = save


def child(argv):
    """Subprocess entry: train the stand-in; --resume resumes from run/last.pt."""
    p = argparse.ArgumentParser()
    p.add_argument("tmp")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--test-images", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kd", action="store_true", help="distil from a StandIn teacher of other widths")
    p.add_argument("--step-sleep", type=float, default=0)
    p.add_argument("--slow-ckpt-write", metavar="SECONDS@N", help="slow down the N-th checkpoint write")
    a = p.parse_args(argv)
    if a.slow_ckpt_write:
        sec, nth = a.slow_ckpt_write.split("@")
        slow_checkpoint_write(float(sec), int(nth))
    torch.set_num_threads(1)
    d = init_distributed("cpu")
    tr = make_trainer(a.tmp, a.images, a.epochs, a.bs, a.dropout, n_test=a.test_images, dist=d, kd=a.kd)
    if a.resume and tr.ckpt_path.exists():
        tr.resume(tr.ckpt_path)
    if a.step_sleep:
        orig = tr.train_step
        tr.train_step = lambda b: (time.sleep(a.step_sleep), orig(b))[1]
    if a.test_images:   # record which rank evaluated which image
        orig_get = tr.test_feats.get
        seen = []
        tr.test_feats.get = lambda idx, v: (seen.extend(idx), orig_get(idx, v))[1]
    tr.fit()
    if a.test_images:
        (Path(a.tmp) / f"evaluated_rank{d.rank}.json").write_text(json.dumps(seen))
    if d.main:
        torch.save(trainable_state(tr.model), Path(a.tmp) / "final_weights.pt")
        if a.kd:
            torch.save(trainable_state(tr.extra_module), Path(a.tmp) / "final_adapters.pt")
    d.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_child(tmp, *extra, env=None, wait=True):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", str(tmp), *extra]
    p = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    return p


def final_weights(tmp):
    return torch.load(Path(tmp) / "final_weights.pt")


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------
def test_schedule_warmup_cosine_and_step():
    s = WarmupSchedule(total=10, warmup=2, kind="cosine")
    assert [round(s(i), 6) for i in (0, 1)] == [0.5, 1.0]
    assert s(2) == pytest.approx(1.0) and s(10) == pytest.approx(0.0)
    assert s(6) == pytest.approx(0.5)               # half-way through the 8 decay steps
    st = WarmupSchedule(total=10, warmup=0, kind="step", milestones=[4, 8], gamma=0.1)
    assert [st(i) for i in (0, 3, 4, 7, 8)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def child_inprocess(tmp, *extra):
    """The same run as _run_child, in this process with one thread (as the children use)."""
    n = torch.get_num_threads()
    try:
        child([str(tmp), *extra])
    finally:
        torch.set_num_threads(n)


def test_kill_during_training_and_during_checkpoint_write_then_resume_exact(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    child_inprocess(ref, "--epochs", "2")            # uninterrupted: 2 epochs x 3 steps
    # 1) kill -9 in the middle of training (after 3 logged steps)
    p = run_child(killed, "--epochs", "2", "--step-sleep", "0.3", wait=False)
    log = killed / "run" / "log.jsonl"
    t0 = time.time()
    while time.time() - t0 < 60:
        if log.exists() and sum(1 for line in log.read_text().splitlines() if '"train"' in line) >= 3:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not (killed / "final_weights.pt").exists()
    # 2) resume, and kill -9 while its 2nd checkpoint is half written
    p = run_child(killed, "--epochs", "2", "--resume", "--slow-ckpt-write", "30@2", wait=False)
    t0 = time.time()
    buf = ""
    while "[slow-write]" not in buf and time.time() - t0 < 60:
        buf += p.stderr.readline()
    assert "[slow-write]" in buf, buf
    tmps = list((killed / "run").glob(".last.pt.*.tmp"))
    assert len(tmps) == 1 and tmps[0].stat().st_size > 0      # a half-written temp file
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    load_checkpoint(killed / "run" / "last.pt")          # the previous checkpoint is intact
    # 3) resume to the end: the same weights, bit for bit
    run_child(killed, "--epochs", "2", "--resume")
    assert not list((killed / "run").glob(".*.tmp"))        # the stale temp was cleaned up
    assert_same(final_weights(ref), final_weights(killed))
    # the resumed log has every step exactly once
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"train"' in line]
    assert steps == list(range(1, 7))


def test_two_process_gloo_matches_one_process_and_eval_covers_each_image_once(tmp_path):
    """Data parallel = one process, for the positive-normalised model loss AND the distillation
    terms (per-token map KD, per-pair query and logit KD from a teacher of other widths through
    adapters whose initialisation differs per rank): images carry 6, 8 or 10 pairs, so the ranks
    hold different pair counts and only the global-count normalisation gives one process's
    gradient (weighting them by the ranks' image shares instead: weights off by 2e-4, measured)."""
    one, two = tmp_path / "one", tmp_path / "two"
    TinyDS(two / "data", 9), TinyDS(two / "data_test", 5, seed=1)   # image files written once, here
    args = ["--dropout", "0", "--epochs", "2", "--images", "9", "--test-images", "5", "--kd"]
    child_inprocess(one, *args)
    e = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    import socket
    with socket.socket() as sk:                       # a free port (other runs may hold 29500)
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(port), str(Path(__file__).resolve()), "child", str(two), *args]
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=150)
    errors = [line for line in r.stderr.splitlines() if "Error" in line or "error" in line]
    assert r.returncode == 0, "\n".join(errors)[-3000:]
    # same global batch (4 images; the last batch of 9 has 1 image, so one rank idles):
    # the averaged gradients equal the 1-process gradient up to float summation order
    assert_same(final_weights(one), final_weights(two), atol=1e-6)
    adapters = [torch.load(Path(t) / "final_adapters.pt") for t in (one, two)]
    assert set(adapters[0]) == {"adapters.map.0.weight", "adapters.map.0.bias",
                                "adapters.query.0.weight", "adapters.query.0.bias"}
    assert_same(adapters[0], adapters[1], atol=1e-6)
    ev = [json.loads((two / f"evaluated_rank{r}.json").read_text()) for r in (0, 1)]
    # 2 evaluations (one per epoch) over 5 images: each image once per evaluation, split 3 + 2
    assert sorted(ev[0] + ev[1]) == sorted(list(range(5)) * 2)
    assert sorted(set(ev[0])) == [0, 2, 4] and sorted(set(ev[1])) == [1, 3]
    log1 = [json.loads(line) for line in (one / "run" / "log.jsonl").read_text().splitlines()]
    log2 = [json.loads(line) for line in (two / "run" / "log.jsonl").read_text().splitlines()]
    ev1 = [r["full"] for r in log1 if r["kind"] == "eval"]
    ev2 = [r["full"] for r in log2 if r["kind"] == "eval"]
    assert ev1 == ev2 == [5.0, 5.0]                   # predictions for all 5 images gathered
    # the logged distillation terms are the global batch's per-item means, as in one process
    keys = ("loss_kd_map", "loss_kd_query", "loss_kd_logit")
    tr1, tr2 = ([[r[k] for k in keys] for r in log if r["kind"] == "train"] for log in (log1, log2))
    assert len(tr1) == len(tr2) == 6 and min(min(r) for r in tr1) > 1e-3
    np.testing.assert_allclose(tr1, tr2, rtol=1e-5)


def test_eval_shard_odd():
    shards = [Dist(rank=r, world=3).shard(7) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))
    assert [len(s) for s in shards] == [3, 2, 2]


def test_nan_loss_names_step_and_images(tmp_path):
    tr = make_trainer(tmp_path, n=8, epochs=1, bs=4, nan_image="img005.png")
    with pytest.raises(NonFiniteLossError) as e:
        tr.fit()
    msg = str(e.value)
    assert "img005.png" in msg and "step" in msg and "epoch 0" in msg


def test_optimiser_decays_matrices_only(tmp_path):
    """The Trainer's AdamW: weight decay on the stand-in's weight matrices and the distillation
    adapters' (an nn.Module extra_loss), none on their biases (trainer.param_groups; LINK's own
    names are checked in tests/test_model.py)."""
    mats = ["proj", "conn", "layers.0", "layers.1", "cls"]
    for kd, adapters in ((False, []), (True, ["extra_loss.adapters.map.0", "extra_loss.adapters.query.0"])):
        tr = make_trainer(tmp_path / str(kd), n=4, epochs=1, bs=2, kd=kd)
        decay, rest = tr.opt.param_groups
        assert decay["weight_decay"] == LoopConfig().weight_decay and rest["weight_decay"] == 0.0
        assert sorted(decay["param_names"]) == sorted(f"{m}.weight" for m in mats + adapters)
        assert sorted(rest["param_names"]) == sorted(f"{m}.bias" for m in mats + adapters)


# ----------------------------------------------------------------------------------------------
# splits and views (data.py)
# ----------------------------------------------------------------------------------------------
def test_flip_augmentation_mirrors_boxes_and_gt_boxes_only_on_request(tmp_path):
    sp = tiny_split(tmp_path / "d", 2, views=Views(flip=True))
    dets0, size, t0 = sp.item(0, 0, train=True)
    dets1, _, t1 = sp.item(0, 1, train=True)
    w = size[0]
    torch.testing.assert_close(dets1["boxes"][:, 0], w - dets0["boxes"][:, 2])
    torch.testing.assert_close(t1["boxes_h"][:, 2], w - t0["boxes_h"][:, 0])
    # the detector's boxes alone by default (UPT); --append-gt adds the 2 GT boxes (SCG)
    assert len(dets0["boxes"]) == 2 and len(sp.item(0, 0, train=False)[0]["boxes"]) == 2
    sp_gt = tiny_split(tmp_path / "d", 2, views=Views(flip=True), append_gt=True)
    assert len(sp_gt.item(0, 0, train=True)[0]["boxes"]) == 4
    assert len(sp_gt.item(0, 0, train=False)[0]["boxes"]) == 2          # evaluation never


def test_view_boxes_hand_computed_in_both_frames():
    """Mirror: x -> w - x (continuous edges), x -> w + 1 - x (1-based inclusive pixel indices).
    Crop to the window x0 = 4, y0 = 2, 8 x 6 of a 16 x 12 image: shift by (x0, y0), clamp to
    [o, 8] x [o, 6], keep a box when its overlap has a positive size in the frame's convention;
    the window then spans pixel columns 5..12 (1-based), i.e. continuous x in [4, 12]."""
    size, win = (16, 12), (4, 2, 8, 6)
    b, keep = view_boxes(torch.tensor([[2.0, 3.0, 6.0, 9.0]]), size, (0, 0, 16, 12), True, 0)
    assert b.tolist() == [[10, 3, 14, 9]] and keep.tolist() == [True]
    b, keep = view_boxes(torch.tensor([[3.0, 4.0, 6.0, 9.0]]), size, (0, 0, 16, 12), True, 1)
    assert b.tolist() == [[11, 4, 14, 9]] and keep.tolist() == [True]
    boxes = torch.tensor([[2.0, 3.0, 6.0, 9.0],        # A: cut on the left and the bottom
                          [12.0, 3.0, 15.0, 5.0],      # B: continuous: touches x = 12 only
                          [11.5, 0.0, 20.0, 1.5],      # C: above the window
                          [5.0, 3.0, 7.0, 4.0],        # D: inside
                          [13.0, 3.0, 15.0, 5.0]])     # E: right of the window
    b, keep = view_boxes(boxes, size, win, False, 0)
    assert keep.tolist() == [True, False, False, True, False]
    assert b[keep].tolist() == [[0, 1, 2, 6], [1, 1, 3, 2]]
    b, keep = view_boxes(boxes, size, win, True, 0)                    # then mirrored: x -> 8 - x
    assert b[keep].tolist() == [[6, 1, 8, 6], [5, 1, 7, 2]]
    # 1-based inclusive: B covers pixel column 12, the window's last: kept, one column wide
    b, keep = view_boxes(boxes, size, win, False, 1)
    assert keep.tolist() == [True, True, False, True, False]
    assert b[keep].tolist() == [[1, 1, 2, 6], [8, 1, 8, 3], [1, 1, 3, 2]]
    b, keep = view_boxes(boxes, size, win, True, 1)                    # then x -> 9 - x
    assert b[keep].tolist() == [[7, 1, 8, 6], [1, 1, 1, 3], [6, 1, 8, 2]]


class RectDS:
    """Images of 20 x 14 px, black, with a red rectangle (the human: pixel columns 5..11, rows
    3..8, 0-based) and a green one (the object: columns 13..17, rows 9..12); the GT boxes cover
    exactly those pixels in the given frame; box_frame names it."""

    def __init__(self, root, frame, n=6):
        self.root, self.box_frame = Path(root), frame
        self.root.mkdir(parents=True, exist_ok=True)
        self.filenames = [f"rect{i}.png" for i in range(n)]
        arr = np.zeros((14, 20, 3), dtype=np.uint8)
        arr[3:9, 5:12, 0] = 255
        arr[9:13, 13:18, 1] = 255
        for f in self.filenames:
            Image.fromarray(arr).save(self.root / f)
        o = 1 if frame == "hico1" else 0   # a box over 0-based columns a..b is [a + o, b + 1]
        self.t = {"size": (20, 14), "boxes_h": torch.tensor([[5.0 + o, 3 + o, 12, 9]]),
                  "boxes_o": torch.tensor([[13.0 + o, 9 + o, 18, 13]]), "object": torch.tensor([1]),
                  "hoi": torch.tensor([0]), "verb": torch.tensor([0])}

    def __len__(self):
        return len(self.filenames)

    def target(self, i):
        return dict(self.t, filename=self.filenames[i], index=i)

    def image_path(self, i):
        return self.root / self.filenames[i]

    def __getitem__(self, i):
        return Image.open(self.image_path(i)).convert("RGB"), self.target(i)


def _covered(box, o, size):
    """Bool[h, w]: the pixels a box covers (0-based columns x1 - o .. x2 - 1)."""
    m = np.zeros((size[1], size[0]), dtype=bool)
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    m[y1 - o:y2, x1 - o:x2] = True
    return m


@pytest.mark.parametrize("frame", ["continuous", "hico1"])
def test_views_images_and_boxes_agree_pixel_for_pixel(tmp_path, frame):
    """Every view (whole image and crops at 0.6 and 0.45, each mirrored): the view's image has
    the view's size, and the red / green pixels it shows are exactly the pixels of the mapped
    human / object box; a pair whose box left the window is dropped with its rows."""
    ds = RectDS(tmp_path / "img", frame)
    views = Views(flip=True, crop_scales=(0.6, 0.45))
    sp = Split(ds, {}, tmp_path / "img", None, select=lambda d: d, gt_dets=_gt, views=views, append_gt=True)
    assert sp.frame == frame and views.count == 6
    o, cut, dropped = (1 if frame == "hico1" else 0), 0, 0
    for i in range(len(ds)):
        for v in range(views.count):
            img = np.asarray(sp.image(i, v))
            dets, size, t = sp.item(i, v, train=True)
            assert img.shape[:2] == (size[1], size[0]) == (t["size"][1], t["size"][0])
            k, _ = views.parts(v)
            assert size == ((20, 14) if k == 0 else (round(20 * views.crop_scales[k - 1]),
                                                     round(14 * views.crop_scales[k - 1])))
            red, green = img[..., 0] > 127, img[..., 1] > 127
            if len(t["hoi"]) == 0:
                assert not (red.any() and green.any())          # a box is out of the window
                dropped += 1
                continue
            assert t["hoi"].tolist() == [0] and t["object"].tolist() == [1]
            assert np.array_equal(_covered(t["boxes_h"][0].tolist(), o, size), red)
            assert np.array_equal(_covered(t["boxes_o"][0].tolist(), o, size), green)
            cut += int(red.sum() < 42 or green.sum() < 20)       # 7 x 6 and 5 x 4 when whole
            # the GT boxes appended as detections follow the same map
            assert dets["boxes"].tolist() == [t["boxes_h"][0].tolist(), t["boxes_o"][0].tolist()]
    assert cut > 0 and dropped > 0                               # both cases occur in these 6 images


def test_crop_window_and_view_of():
    from data import crop_window
    xs = []
    for j in range(2000):
        x0, y0, cw, ch = crop_window(f"f{j}.png", 1, 0.5, 16, 12)
        assert (cw, ch) == (8, 6) and 0 <= x0 <= 8 and 0 <= y0 <= 6
        xs.append(x0)
    assert sorted(set(xs)) == list(range(9)) and abs(np.mean(xs) - 4) < 0.2     # uniform over 0..8
    assert crop_window("a.png", 1, 0.75, 16, 12)[2:] == (12, 9)                  # floor(s * w + 0.5)
    assert crop_window("a.png", 1, 0.75, 15, 11)[2:] == (11, 8)                  # 11.25 -> 11, 8.25 -> 8
    assert crop_window("a.png", 1, 0.5, 16, 12) == crop_window("a.png", 1, 0.5, 16, 12)   # fixed per image
    assert len({crop_window("a.png", k, 0.5, 64, 64) for k in range(1, 6)}) > 1          # k-th crop differs
    # view_of: with 2 views the choice made before crop views existed (the first hash byte's
    # low bit), uniform over the views, pure
    import hashlib
    for i in range(50):
        h = hashlib.blake2b(f"3:5:{i}".encode(), digest_size=4).digest()
        assert view_of(3, 5, i, 2) == h[0] & 1
    counts = np.bincount([view_of(0, e, i, 6) for e in range(3) for i in range(2000)], minlength=6)
    assert counts.min() > 900 and counts.max() < 1100
    assert view_of(0, 1, 7, 1) == 0 and view_of(2, 1, 7, 6) == view_of(2, 1, 7, 6)
    with pytest.raises(TypeError):
        view_of(0, 0, 0, True)
    with pytest.raises(TrainInputError, match="crop scales"):
        Views(crop_scales=(1.0,))


def test_views_resume_exact_and_mismatches_refused(tmp_path):
    """Training on 6 views (flip x whole, 0.5 and 0.75 crops): a run stopped after 3 steps and
    resumed ends with the uninterrupted run's weights, bit for bit; a checkpoint of other views
    (runs.resume_differences; crops change with --override only at an epoch boundary), or a
    loop config whose views differ from the split's, is refused."""
    kw = dict(n=8, epochs=2, bs=4, flip=True, crop_scales=(0.5, 0.75))
    ref = make_trainer(tmp_path / "ref", **kw)
    ref.fit()
    assert {view_of(0, e, i, 6) for e in range(2) for i in range(8)} == {0, 2, 3, 4, 5}   # crops trained on
    stop = make_trainer(tmp_path / "stop", **kw)
    orig, n = stop.train_step, [0]

    def step(batch):
        n[0] += 1
        if n[0] == 4:
            raise KeyboardInterrupt
        return orig(batch)
    stop.train_step = step
    with pytest.raises(KeyboardInterrupt):
        stop.fit()
    other = make_trainer(tmp_path / "other", n=8, epochs=2, bs=4, flip=True)
    with pytest.raises(CheckpointError, match=r"--crop-scales: \[0.5, 0.75\] in the checkpoint, \[\] now"):
        other.resume(stop.ckpt_path)
    with pytest.raises(CheckpointError, match="middle of epoch 1: --crop-scales can change only"):
        other.resume(stop.ckpt_path, overrides=["crop_scales"])
    resumed = make_trainer(tmp_path / "stop", **kw)
    resumed.resume(resumed.ckpt_path)
    assert resumed.step == 3
    resumed.fit()
    assert_same(trainable_state(ref.model), trainable_state(resumed.model))
    with pytest.raises(TrainInputError, match="differ from the training split"):
        Trainer(other.model, LoopConfig(crop_scales=[0.5]), other.train, other.feats, tmp_path / "x")


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "child":
    child(sys.argv[2:])
