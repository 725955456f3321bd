"""Tests of world/synthetic.py: the synthetic HOI world (quotas, files, detections, determinism,
sparse labels, the PNG writer, the interaction cues in the pixels, 100 mAP for its ground truth).
"""
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import eval as hoi_eval
from data import COCO80_NAMES, ClassSpace, HICODet, gt_detections, load_detections
from world import synthetic

HICO_KEYS = {"annotation", "filenames", "empty", "objects", "verbs", "correspondence", "size",
             "rare", "non_rare"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    t = time.time()
    paths = synthetic.make_synthetic_world(root, n_train=300, n_test=80, image_size=128, seed=0)
    dt = time.time() - t
    print(f"\nsynthetic world 300 + 80 images 128x128: {dt:.2f} s ({dt / 380 * 1e3:.1f} ms/image)")
    return paths


def test_default_quotas_long_tail():
    """Default world (2000 train / 500 test images): exact pair quotas per class."""
    q_train, q_test = synthetic._quotas(2000, "train"), synthetic._quotas(500, "test")
    rare = [k for k, q in enumerate(q_train) if q < 10]
    assert rare == [3, 7, 12, 13] and max(q_train) == 520
    assert min(q_test) >= 10
    assert set(synthetic.SYN_ZERO_SHOT["rf-uc"]) <= set(rare)
    assert not set(synthetic.SYN_ZERO_SHOT["nf-uc"]) & set(rare)
    ev = synthetic._assign_events(np.random.default_rng(0), 2000, q_train)
    flat = np.bincount(np.concatenate([np.array(e, dtype=int) for e in ev if e]), minlength=16)
    shake = synthetic.SYN_CLASSES.index(("shake_hand", "person", 100, 80))
    flat[shake] *= 2  # a handshake event makes two pairs
    assert flat.tolist() == q_train
    assert sum(1 for e in ev if not e) == 60 and max(len(e) for e in ev) <= 3


def test_world_files(world):
    for split, n in (("train", 300), ("test", 80)):
        doc = json.loads(Path(world[f"{split}_anno"]).read_text())
        assert HICO_KEYS | {"prompts", "zero_shot", "name"} == set(doc)
        assert len(doc["filenames"]) == n and len(doc["annotation"]) == n
        assert doc["objects"] == COCO80_NAMES and doc["verbs"] == synthetic.SYN_VERBS
        assert doc["prompts"][0] == "a photo of a person riding a bicycle"
        assert doc["prompts"][15] == "a photo of a person shaking hands with a person"
        assert doc["empty"] == [i for i, a in enumerate(doc["annotation"]) if not a["hoi"]]
        assert all(s == [128, 128] for s in doc["size"])
        counts = np.zeros(16, dtype=int)
        for a in doc["annotation"]:
            b = np.array(a["boxes_h"] + a["boxes_o"]).reshape(-1, 4)
            assert (b[:, :2] >= 0).all() and (b[:, 2:] <= 128).all() and (b[:, 2:] > b[:, :2]).all()
            np.add.at(counts, a["hoi"], 1)
        assert counts.tolist() == synthetic._quotas(n, split)
        if split == "train":
            train_counts = counts
    for split in ("train", "test"):  # rare = classes with < 10 TRAIN pairs, in both files
        doc = json.loads(Path(world[f"{split}_anno"]).read_text())
        assert doc["rare"] == [k for k in range(16) if train_counts[k] < 10]
        assert sorted(doc["rare"] + doc["non_rare"]) == list(range(16))
    ds = HICODet(world["train_images"], world["train_anno"])
    img, t = ds[0]
    assert img.size == (128, 128) and t["size"] == (128, 128)
    cs = ds.class_space()
    assert cs.name == "synthetic" and cs.prompts == synthetic._syn_prompts()
    assert ClassSpace.from_dict(cs.asdict()) == cs
    assert cs.hoi_object[0] == [COCO80_NAMES.index("bicycle")]
    zs = HICODet(world["train_images"], world["train_anno"], zero_shot="uv")
    assert zs.class_space().unseen == [0, 1] and zs.class_counts()[[0, 1]].sum() == 0


def test_world_detections(world):
    ds = HICODet(world["test_images"], world["test_anno"])
    dets = load_detections(world["test_detections"], filenames=ds.filenames, num_labels=80)
    ious, scores_true, n_gt = [], [], 0
    from torchvision.ops import box_iou
    for i in range(len(ds)):
        g = gt_detections(ds.target(i))
        d = dets[ds.filenames[i]]
        n_gt += len(g["boxes"])
        if len(g["boxes"]) and len(d["boxes"]):
            iou = box_iou(g["boxes"], d["boxes"])  # [G, D]
            best, j = iou.max(1)
            ious += best.tolist()
            scores_true += d["scores"][j[best > 0.5]].tolist()
    ious = np.array(ious)
    assert np.mean(ious > 0.7) > 0.8  # most GT boxes found with IoU > 0.7
    assert np.mean(ious < 0.3) < 0.1  # few misses
    assert np.mean(scores_true) > 0.7


def test_world_deterministic(tmp_path, world):
    a = synthetic.make_synthetic_world(tmp_path / "a", n_train=20, n_test=6, seed=5, workers=1)
    b = synthetic.make_synthetic_world(tmp_path / "b", n_train=20, n_test=6, seed=5, workers=2)
    c = synthetic.make_synthetic_world(tmp_path / "c", n_train=20, n_test=6, seed=6, workers=1)
    h = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    for key in ("train_anno", "test_anno", "train_detections", "test_detections"):
        assert h(a[key]) == h(b[key])
        assert h(a[key]) != h(c[key])
    png = "synth_train_000003.png"
    assert h(Path(a["train_images"]) / png) == h(Path(b["train_images"]) / png)
    assert h(Path(a["train_images"]) / png) != h(Path(c["train_images"]) / png)


def test_world_train_label_drop(tmp_path, world):
    """train_label_drop removes ~that fraction of the TRAIN rows (exactly round(f * n_k) per
    class), keeps the rest and the test annotations identical to the drop=0 world."""
    d = synthetic.make_synthetic_world(tmp_path / "d", n_train=300, n_test=80, image_size=128, seed=0,
                                  train_label_drop=0.4)
    full, sparse = (json.loads(Path(w["train_anno"]).read_text()) for w in (world, d))
    counts = lambda doc: np.bincount(  # noqa: E731  rows per class [16]
        np.concatenate([np.array(a["hoi"], dtype=int) for a in doc["annotation"]]), minlength=16)
    n_full, n_sparse = counts(full), counts(sparse)
    assert n_sparse.tolist() == [n - int(round(0.4 * n)) for n in n_full.tolist()]
    assert 1 - n_sparse.sum() / n_full.sum() == pytest.approx(0.4, abs=0.02)
    assert full["filenames"] == sparse["filenames"]
    for a, b in zip(full["annotation"], sparse["annotation"]):  # kept rows: a sub-list of a's
        rows_a = list(zip(*(a[k] for k in ("hoi", "object", "verb", "boxes_h", "boxes_o"))))
        rows_b = list(zip(*(b[k] for k in ("hoi", "object", "verb", "boxes_h", "boxes_o"))))
        it = iter(rows_a)
        assert all(r in it for r in rows_b)
    assert sparse["empty"] == [i for i, a in enumerate(sparse["annotation"]) if not a["hoi"]]
    assert sparse["rare"] == [k for k in range(16) if n_sparse[k] < 10]
    t_full, t_sparse = (json.loads(Path(w["test_anno"]).read_text()) for w in (world, d))
    assert t_sparse["annotation"] == t_full["annotation"] and t_sparse["filenames"] == t_full["filenames"]
    assert t_sparse["rare"] == sparse["rare"]
    h = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    for key in ("train_detections", "test_detections"):  # the detector still sees everything
        assert h(world[key]) == h(d[key])
    with pytest.raises(ValueError, match="train_label_drop"):
        synthetic.make_synthetic_world(tmp_path / "e", n_train=20, n_test=6, train_label_drop=1.0)


def test_png_writer_round_trip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    synthetic._write_png(tmp_path / "x.png", img)
    back = np.asarray(Image.open(tmp_path / "x.png"))
    assert back.shape == (70, 90, 3) and (back == img).all()


def _near(px, colour, tol=30):
    return np.abs(px.astype(int) - np.array(colour)).max() <= tol


def _near_any(img, pt, colour, tol):
    """Some pixel of the 3x3 block around pt is within tol of colour."""
    x, y = int(pt[0]), int(pt[1])
    block = img[max(0, y - 1):y + 2, max(0, x - 1):x + 2].reshape(-1, 3).astype(int)
    return bool((np.abs(block - np.array(colour)).max(1) <= tol).any())


def test_interaction_cues_in_pixels():
    """Render 3 images per class (one interaction each) and check each cue on the boxes,
    the keypoints and the pixels."""
    S = 128
    K = len(synthetic.SYN_CLASSES)
    states = synthetic._layout_chunk(np.random.default_rng(7), [[c] for c in range(K)] * 3, S)
    seen = set()
    for i, st in enumerate(states):
        img, boxes = synthetic._render(st, S, np.random.default_rng(i))
        for b in boxes:
            if b is not None:
                assert 0 <= b[0] < b[2] <= S and 0 <= b[1] < b[3] <= S
        for ih, io, c in st["pairs"]:
            verb, name = synthetic.SYN_CLASSES[c][:2]
            seen.add(c)
            p, o = st["entities"][ih], st["entities"][io]
            bh, bo = np.array(boxes[ih]), np.array(boxes[io])
            k, H = p["pts"], p["H"]

            def inside(pt, b, pad=0.0):
                return b[0] - pad <= pt[0] <= b[2] + pad and b[1] - pad <= pt[1] <= b[3] + pad

            def pix(pt):
                return img[int(pt[1]), int(pt[0])]

            if verb == "ride":  # hip on the object, rider above it
                assert inside(k["hip"], bo) and bh[1] < bo[1] and (bh[1] + bh[3]) < (bo[1] + bo[3])
            elif verb == "sit_on":  # hip on the seat, thigh horizontal, feet on the floor
                assert bo[0] <= k["hip"][0] <= bo[2] and bo[1] - 0.1 * H <= k["hip"][1] <= bo[3]
                assert abs(k["knee_a"][1] - k["hip"][1]) < 0.05 * H
                assert abs(k["foot_a"][1] - bo[3]) < 0.1 * H
            elif verb == "hold":  # the hand pixel is in the object's box and shows skin
                assert inside(k["hand_a"], bo) and _near(pix(k["hand_a"]), p["skin"])
            elif verb == "kick":  # the stretched foot is in the ball's box
                assert inside(k["foot_a"], bo) and _near(pix(k["foot_a"]), p["shoe"])
                assert abs(k["foot_a"][0] - k["hip"][0]) > 0.25 * H
            elif verb == "look_at":  # head turned towards the object, which does not touch
                side = 1 if p["facing"] == "right" else -1
                assert p["facing"] in ("left", "right")
                assert (bo[0] >= bh[2]) if side > 0 else (bo[2] <= bh[0])
                hr = max(2.5, 0.11 * H)  # head radius as drawn
                eye = k["head"] + np.array([side * 0.45 * hr, -0.05 * hr])
                other = k["head"] + np.array([-side * 0.45 * hr, -0.05 * hr])
                assert _near_any(img, eye, (20, 20, 20), 45)  # one eye on the facing side
                assert not _near_any(img, other, (20, 20, 20), 45)  # none on the other
                # no other object between the person and the target
                for e, b in zip(st["entities"], boxes):
                    if e["kind"] == "object" and e is not o:
                        between = (bh[2] <= b[0] < bo[0]) if side > 0 else (bo[2] < b[2] <= bh[0])
                        assert not (between and b[1] < max(bh[3], bo[3]) and b[3] > min(bh[1], bo[1]))
            elif verb == "fly":  # hand raised, kite above the hand, string drawn between
                assert k["hand_a"][1] < k["shoulder"][1] and bo[3] < k["hand_a"][1]
                tail = synthetic._obj_point(o, 0.5, 0.7)
                for f in (0.3, 0.5, 0.7):  # the string's pixels
                    assert _near_any(img, k["hand_a"] * (1 - f) + tail * f, (50, 50, 50), 45)
            elif verb == "shake_hand":  # reaching hands touch, each inside the other's box
                q = o["pts"]
                assert np.linalg.norm(k["hand_a"] - q["hand_a"]) < 0.05 * H
                assert inside(k["hand_a"], bo) and inside(q["hand_a"], bh)
            else:
                raise AssertionError(verb)
            # frontal faces for everything but look_at (the gaze cue stays unambiguous)
            assert (p["facing"] != "front") == (verb == "look_at")
    assert seen == set(range(K))


def test_ground_truth_scores_100_map(world):
    """The synthetic test GT fed back as predictions scores 100 mAP in eval.py."""
    anno = json.loads(Path(world["test_anno"]).read_text())
    preds = {}
    for fname, a in zip(anno["filenames"], anno["annotation"]):
        rows = [[h, 1.0, *bh, *bo] for h, bh, bo in zip(a["hoi"], a["boxes_h"], a["boxes_o"])]
        preds[fname] = np.array(rows, dtype=np.float64).reshape(-1, 10)
    res = hoi_eval.evaluate_hico(anno, preds)
    assert res["full"] == pytest.approx(100.0, abs=1e-6)
    assert res["rare"] == pytest.approx(100.0, abs=1e-6)
    assert res["non_rare"] == pytest.approx(100.0, abs=1e-6)
