"""Tests of eval.py: official HICO-DET / V-COCO / SWiG-HOI rules, hand-computed numbers,
an independent slow reference (a straight transcription of the official loops) compared with
the vectorised code on random data, bad-input errors and the CLI.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import eval as hoi_eval
import formats
from common import data_root

ROOT = Path(__file__).resolve().parent.parent
DATA = data_root()
HICO_TEST = DATA / "hicodet" / "instances_test2015.json"
SWIG_META = DATA / "swig_hoi" / "derived" / "swig_v1_meta.json"

needs_hico = pytest.mark.skipif(not HICO_TEST.exists(), reason="shared data not found")
needs_swig = pytest.mark.skipif(not SWIG_META.exists(), reason="shared data not found")


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

def ap11(ps, thresholds=None):
    """Accumulate like the official code: ap = ap + p/11 in order of t."""
    ap = 0.0
    for p in ps:
        ap = ap + p / 11
    return ap


def ap_from_curve(rec, prec, thresholds):
    ps = []
    for t in thresholds:
        sel = [p for r, p in zip(rec, prec) if r >= t]
        ps.append(max(sel) if sel else 0.0)
    return ap11(ps)


def make_anno(images, num_classes=3, objects=None, rare=None, **extra):
    """images: list of lists of (hoi, hbox, obox). Object of class k: objects[k] (default k)."""
    objects = objects if objects is not None else list(range(num_classes))
    anno = {
        "filenames": [f"img_{i}.jpg" for i in range(len(images))],
        "annotation": [{"boxes_h": [list(map(float, h)) for _, h, _ in im],
                        "boxes_o": [list(map(float, o)) for _, _, o in im],
                        "hoi": [k for k, _, _ in im],
                        "object": [objects[k] for k, _, _ in im],
                        "verb": [0 for _ in im]} for im in images],
        "correspondence": [[k, objects[k], 0] for k in range(num_classes)],
        "empty": [i for i, im in enumerate(images) if not im],
        "rare": rare if rare is not None else [0],
        "non_rare": [k for k in range(num_classes) if k not in (rare if rare is not None else [0])],
    }
    anno.update(extra)
    return anno


def row(k, s, h, o):
    return [k, s] + list(map(float, h)) + list(map(float, o))


H = [0, 0, 9, 9]          # a 10x10 inclusive box
O = [20, 0, 29, 9]


@pytest.fixture(scope="module")
def hico():
    with open(HICO_TEST) as f:
        return json.load(f)


def gt_as_preds(anno, classes=None):
    preds = {}
    for fn, a in zip(anno["filenames"], anno["annotation"]):
        rows = [[k, 1.0] + h + o for k, h, o in zip(a["hoi"], a["boxes_h"], a["boxes_o"])
                if classes is None or k in classes]
        if rows:
            preds[fn] = np.array(rows, dtype=np.float64)
    return preds


# ---------------------------------------------------------------------------------------
# HICO-DET: the real ground truth
# ---------------------------------------------------------------------------------------

@needs_hico
def test_real_gt_fed_back_scores_100(hico):
    res = hoi_eval.evaluate_hico(hico, gt_as_preds(hico))
    for key in ("full", "rare", "non_rare"):
        assert res[key] == pytest.approx(100.0, abs=1e-9)
    assert len(res["per_class"]) == 600
    assert np.allclose(res["per_class"], 100.0, atol=1e-9)
    c = res["counts"]
    assert (c["num_images"], c["num_gt_pairs"], c["num_detections"]) == (9658, 33405, 33405)
    assert (c["num_rare"], c["num_non_rare"], c["num_empty_images"]) == (138, 462, 112)
    assert c["num_true_positives"] == 33405 and c["classes_without_gt"] == []
    assert sum(c["gt_pairs_per_class"]) == 33405


@needs_hico
@pytest.mark.parametrize("split,size", [("rf-uc", 120), ("nf-uc", 120), ("uo", 100), ("uv", 84)])
def test_zero_shot_splits(hico, split, size):
    gt = formats.parse_hico_anno(hico)
    name, unseen = formats.zero_shot_unseen(split, gt.zero_shot, gt.num_classes, gt.name)
    assert name == split and len(unseen) == size and len(set(unseen)) == size
    # predictions = GT of the unseen classes only -> Unseen 100, Seen 0, Full = size / 6
    res = hoi_eval.evaluate_hico(gt, gt_as_preds(hico, set(unseen)), zero_shot=split)
    assert res["unseen"] == pytest.approx(100.0, abs=1e-9)
    assert res["seen"] == 0.0
    assert res["full"] == pytest.approx(100.0 * size / 600, abs=1e-9)
    assert res["counts"]["num_unseen"] == size and res["counts"]["num_seen"] == 600 - size
    if split == "rf-uc":
        assert set(unseen) <= set(hico["rare"])
    if split == "nf-uc":
        assert set(unseen) <= set(hico["non_rare"])


def test_zero_shot_from_anno_field():
    anno = make_anno([[(0, H, O), (1, H, O), (2, H, O)]], zero_shot={"rf-uc": [1], "uv": {"unseen": [2]}})
    preds = {"img_0.jpg": [row(1, 0.9, H, O)]}
    res = hoi_eval.evaluate_hico(anno, preds, zero_shot="rf-uc")
    assert (res["unseen"], res["seen"]) == (pytest.approx(100.0), 0.0)
    assert res["full"] == pytest.approx(100.0 / 3)
    res = hoi_eval.evaluate_hico(anno, preds, zero_shot="unseen_verb")
    assert (res["unseen"], res["seen"]) == (0.0, pytest.approx(50.0))
    with pytest.raises(hoi_eval.EvalInputError, match="no split 'uo'"):
        hoi_eval.evaluate_hico(anno, preds, zero_shot="uo")
    with pytest.raises(hoi_eval.EvalInputError, match="unknown split"):
        hoi_eval.evaluate_hico(anno, preds, zero_shot="xx")


# ---------------------------------------------------------------------------------------
# HICO-DET: hand-computed rules
# ---------------------------------------------------------------------------------------

def hico_arrays(anno, rows_per_image):
    gt = formats.parse_hico_anno(anno)
    rows, img = [], []
    for i, rs in rows_per_image:
        for r in rs:
            rows.append(r)
            img.append(i)
    rows = np.array(rows, dtype=np.float64).reshape(-1, 10)
    return hoi_eval.hico_ap_arrays(rows[:, 0].astype(int), rows[:, 1], np.array(img, dtype=int), rows[:, 2:],
                            gt.gt_class, gt.gt_image, gt.gt_boxes, gt.num_classes, len(gt.filenames))


def test_duplicate_detection_is_fp():
    anno = make_anno([[(0, H, O)], [(0, H, O)]])
    preds = {"img_0.jpg": [row(0, 0.9, H, O), row(0, 0.8, H, O)], "img_1.jpg": [row(0, 0.7, H, O)]}
    r = hico_arrays(anno, [(0, preds["img_0.jpg"]), (1, preds["img_1.jpg"])])
    assert r["tp"].tolist() == [True, False, True]
    # rec .5 .5 1, prec 1 .5 2/3 -> p = 1 for t <= .5 (6 values), 2/3 after (5 values)
    expected = ap11([1.0] * 6 + [2 / 3] * 5)
    assert r["ap"][0] == pytest.approx(expected, abs=1e-15)
    res = hoi_eval.evaluate_hico(anno, preds)
    assert res["per_class"][0] == pytest.approx(expected * 100, abs=1e-12)
    assert res["per_class"][1:] == [0.0, 0.0]          # classes without detections: AP 0
    assert res["full"] == pytest.approx(expected * 100 / 3)
    assert res["rare"] == pytest.approx(expected * 100) and res["non_rare"] == 0.0


def test_tied_scores_keep_image_order_then_row_order():
    anno = make_anno([[(0, H, O)], [(0, H, O)]])
    wrong = [50, 50, 59, 59]
    # equal scores: img_0's duplicate FP comes before img_1's TP (image order) -> 28/33
    preds = {"img_1.jpg": [row(0, 0.5, H, O)],            # file order must not matter
             "img_0.jpg": [row(0, 0.9, H, O), row(0, 0.5, H, O)]}
    res = hoi_eval.evaluate_hico(anno, preds)
    assert res["per_class"][0] == pytest.approx(ap11([1.0] * 6 + [2 / 3] * 5) * 100, abs=1e-12)
    # the same detections with the annotation's image order swapped: TP first -> 100
    swapped = dict(anno, filenames=anno["filenames"][::-1], annotation=anno["annotation"][::-1])
    res = hoi_eval.evaluate_hico(swapped, preds)
    assert res["per_class"][0] == pytest.approx(100.0, abs=1e-12)
    # row order inside one image: an FP row before the TP row with the same score
    anno1 = make_anno([[(0, H, O)]])
    fp_first = hoi_eval.evaluate_hico(anno1, {"img_0.jpg": [row(0, 0.5, wrong, O), row(0, 0.5, H, O)]})
    tp_first = hoi_eval.evaluate_hico(anno1, {"img_0.jpg": [row(0, 0.5, H, O), row(0, 0.5, wrong, O)]})
    assert fp_first["per_class"][0] == pytest.approx(50.0, abs=1e-12)
    assert tp_first["per_class"][0] == pytest.approx(100.0, abs=1e-12)


def test_inclusive_iou_touching_boxes_and_exact_half():
    a = np.array([[0, 0, 9, 9]], float)
    # boxes sharing one pixel column overlap under the +1 convention; adjacent ones do not
    assert formats.iou_inclusive(a, np.array([[9, 0, 18, 9]], float))[0] == pytest.approx(10 / 190)
    assert formats.iou_inclusive(a, np.array([[10, 0, 19, 9]], float))[0] == 0.0
    assert formats.iou_continuous(a, np.array([[9, 0, 18, 9]], float))[0] == 0.0
    # a one-pixel-wide box on the edge of a two-pixel-wide GT: exactly 0.5 -> TP
    anno = make_anno([[(0, [0, 0, 1, 9], O)]])
    res = hoi_eval.evaluate_hico(anno, {"img_0.jpg": [row(0, 0.9, [1, 0, 1, 9], O)]})
    assert res["per_class"][0] == pytest.approx(100.0, abs=1e-12)
    # exactly 0.5 (50 / 100 pixels) -> TP; 0.4 -> FP
    anno = make_anno([[(0, H, O)]])
    assert hoi_eval.evaluate_hico(anno, {"img_0.jpg": [row(0, 0.9, [0, 0, 9, 4], O)]})["per_class"][0] \
        == pytest.approx(100.0, abs=1e-12)
    assert hoi_eval.evaluate_hico(anno, {"img_0.jpg": [row(0, 0.9, [0, 0, 9, 3], O)]})["per_class"][0] == 0.0
    # overlap is the minimum of the two IoUs
    assert hoi_eval.evaluate_hico(anno, {"img_0.jpg": [row(0, 0.9, H, [20, 0, 29, 3])]})["per_class"][0] == 0.0


def test_empty_image_detections_are_false_positives():
    anno = make_anno([[(0, H, O)], []])
    assert anno["empty"] == [1]
    res = hoi_eval.evaluate_hico(anno, {"img_1.jpg": [row(0, 0.9, H, O)], "img_0.jpg": [row(0, 0.8, H, O)]})
    assert res["per_class"][0] == pytest.approx(50.0, abs=1e-12)   # rec 0,1 prec 0,.5
    assert res["counts"]["num_empty_images"] == 1


def test_no_detections_gives_zero_everywhere():
    anno = make_anno([[(0, H, O)], []])
    res = hoi_eval.evaluate_hico(anno, {})
    assert res["full"] == 0.0 and res["per_class"] == [0.0, 0.0, 0.0]
    assert res["counts"]["num_detections"] == 0


@pytest.mark.parametrize("npos,ntp_first,official,decimal", [
    # recall exactly 0.6 = 3/5 < 0.6000000000000001: t = 0.6 is NOT reached by rec .6
    (5, 3, ap11([1.0] * 6 + [5 / 9] * 5), ap11([1.0] * 7 + [5 / 9] * 4)),
    # recall exactly 0.7 = 7/10 < 0.7000000000000001
    (10, 7, ap11([1.0] * 7 + [10 / 17] * 4), ap11([1.0] * 8 + [10 / 17] * 3)),
])
def test_recall_exactly_at_decimal_thresholds(npos, ntp_first, official, decimal):
    assert official != decimal
    gts = []
    for i in range(npos):
        gts.append([(0, H, O)])
    # ntp_first TPs (score 1 - k/100), then ntp_first+1 FPs... then the remaining TPs
    s = 1.0
    seq = ["T"] * ntp_first + ["F"] * (4 if npos == 5 else 7) + ["T"] * (npos - ntp_first)
    preds, t_used = {}, 0
    for k, kind in enumerate(seq):
        s = 1.0 - k / 100
        if kind == "T":
            preds.setdefault(f"img_{t_used}.jpg", []).append(row(0, s, H, O))
            t_used += 1
        else:
            preds.setdefault("img_0.jpg", []).append(row(0, s, [50, 50, 59, 59], O))
    res = hoi_eval.evaluate_hico(make_anno(gts), preds)
    assert res["per_class"][0] / 100 == pytest.approx(official, abs=1e-15)
    assert abs(res["per_class"][0] / 100 - decimal) > 1e-3
    assert hoi_eval.HICO_THRESHOLDS[6] == 0.6000000000000001 and hoi_eval.HICO_THRESHOLDS[7] == 0.7000000000000001
    assert hoi_eval.HICO_THRESHOLDS[3] == 0.30000000000000004


def test_no_fallback_to_second_best_gt_and_first_maximum():
    big, small = [0, 0, 99, 9], [0, 0, 59, 9]
    anno = make_anno([[(0, H, big), (0, H, small)]])
    # det 2 overlaps GT0 (0.9) and GT1 (0.667); GT0 already used -> FP, no fall-back to GT1
    r = hico_arrays(anno, [(0, [row(0, 0.9, H, big), row(0, 0.8, H, [0, 0, 89, 9])])])
    assert r["tp"].tolist() == [True, False]
    assert r["ap"][0] == pytest.approx(ap11([1.0] * 6 + [0.5] * 0 + [0.0] * 5), abs=1e-15)
    # two identical GT pairs: the second identical detection picks the FIRST maximum (used) -> FP
    anno = make_anno([[(0, H, O), (0, H, O)]])
    r = hico_arrays(anno, [(0, [row(0, 0.9, H, O), row(0, 0.8, H, O)])])
    assert r["tp"].tolist() == [True, False]


def test_known_object_filtering():
    # classes 0, 1 share object 7; class 2 has object 3.  img_0: GT of class 0; img_1: class 2
    anno = make_anno([[(0, H, O)], [(2, H, O)]], objects=[7, 7, 3])
    preds = {"img_1.jpg": [row(0, 0.9, H, O)], "img_0.jpg": [row(0, 0.8, H, O)]}
    default = hoi_eval.evaluate_hico(anno, preds)
    assert default["per_class"][0] == pytest.approx(50.0) and "known_object_approximation" not in default
    ko = hoi_eval.evaluate_hico(anno, preds, known_object=True)           # img_1 has no object-7 GT
    assert ko["per_class"][0] == pytest.approx(100.0)
    assert ko["known_object_approximation"] is True and "approximation" in ko["note"]
    assert ko["counts"]["num_detections_evaluated"] == 1 and ko["setting"] == "known_object"
    assert "NOTE" in hoi_eval.format_hico(ko) and "can only raise" in hoi_eval.format_hico(ko)
    # official-style labels: img_1 is labelled with class 1 (object 7) -> the detection stays
    for labels in ({"img_0.jpg": [0], "img_1.jpg": [2, 1]}, [[0], [2, 1]]):
        r = hoi_eval.evaluate_hico(anno, preds, known_object=True, image_labels=labels)
        assert r["per_class"][0] == pytest.approx(50.0)
        assert r["known_object_approximation"] is False
    # labels without object 7 anywhere in img_1 -> filtered as with the GT fallback
    r = hoi_eval.evaluate_hico(anno, preds, known_object=True, image_labels={"img_0.jpg": [1], "img_1.jpg": [2]})
    assert r["per_class"][0] == pytest.approx(100.0)
    with pytest.raises(hoi_eval.EvalInputError, match="unknown image name"):
        hoi_eval.evaluate_hico(anno, preds, known_object=True, image_labels={"nope.jpg": [1]})
    with pytest.raises(hoi_eval.EvalInputError, match="has 1 entries"):
        hoi_eval.evaluate_hico(anno, preds, known_object=True, image_labels=[[1]])


# ---------------------------------------------------------------------------------------
# Independent slow reference: straight transcription of VOCevaldet_bboxpair.m / eval_one.m
# ---------------------------------------------------------------------------------------

def ref_hico(anno, preds, keep_images_of_object=None):
    fns = anno["filenames"]
    K = len(anno["correspondence"])
    obj = [c[1] for c in anno["correspondence"]]
    aps = []
    for c in range(K):
        gt = {}
        npos = 0
        for i, a in enumerate(anno["annotation"]):
            bb = [list(h) + list(o) for k, h, o in zip(a["hoi"], a["boxes_h"], a["boxes_o"]) if k == c]
            if bb:
                gt[i] = {"bb": bb, "det": [False] * len(bb)}
                npos += len(bb)
        det_id, det_bb, det_conf = [], [], []
        for i, fn in enumerate(fns):                       # det{j}, j = 1..num_image
            for r in preds.get(fn, []):
                if int(r[0]) == c:
                    if keep_images_of_object is not None and i not in keep_images_of_object[obj[c]]:
                        continue
                    det_id.append(i)
                    det_bb.append([float(v) for v in r[2:10]])
                    det_conf.append(float(r[1]))
        si = sorted(range(len(det_conf)), key=lambda d: -det_conf[d])   # stable, like MATLAB
        tp, fp = [], []
        for d in si:
            i = det_id[d]
            bb1, bb2 = det_bb[d][:4], det_bb[d][4:]
            ov_max, j_max = -float("inf"), None
            for j, g in enumerate(gt.get(i, {"bb": []})["bb"]):
                ovs = []
                for b, q in ((bb1, g[:4]), (bb2, g[4:])):
                    bi = [max(b[0], q[0]), max(b[1], q[1]), min(b[2], q[2]), min(b[3], q[3])]
                    iw = bi[2] - bi[0] + 1
                    ih = bi[3] - bi[1] + 1
                    if iw > 0 and ih > 0:
                        ua = (b[2] - b[0] + 1) * (b[3] - b[1] + 1) + (q[2] - q[0] + 1) * (q[3] - q[1] + 1) - iw * ih
                        ovs.append(iw * ih / ua)
                    else:
                        ovs.append(0)
                m = min(ovs)
                if m > ov_max:
                    ov_max, j_max = m, j
            if ov_max >= 0.5:
                if not gt[i]["det"][j_max]:
                    tp.append(1)
                    fp.append(0)
                    gt[i]["det"][j_max] = True
                else:
                    tp.append(0)
                    fp.append(1)
            else:
                tp.append(0)
                fp.append(1)
        ctp = np.cumsum(tp).astype(float)
        cfp = np.cumsum(fp).astype(float)
        rec = ctp / npos if npos else np.full(len(tp), np.nan)
        prec = ctp / (cfp + ctp)
        ap = 0.0
        for k in range(11):
            t = 0 + k * 0.1                                # MATLAB 0:0.1:1 as computed by Octave
            sel = prec[rec >= t]
            p = sel.max() if sel.size else 0
            ap = ap + p / 11
        aps.append(ap)
    return np.array(aps)


def random_case(seed, n_img=8, K=4, grid=6):
    rng = np.random.default_rng(seed)
    den = 4.0 if seed % 2 else 3.0            # scores k/4: float32 fast path; k/3: general path

    def box():
        x1, y1 = rng.integers(0, grid, 2)
        return [float(x1), float(y1), float(x1 + rng.integers(0, grid)), float(y1 + rng.integers(0, grid))]

    images = []
    for i in range(n_img):
        images.append([(int(rng.integers(0, K)), box(), box()) for _ in range(rng.integers(0, 5))])
    anno = make_anno(images, num_classes=K, objects=[k % 2 for k in range(K)], rare=[0, 1])
    preds = {}
    order = rng.permutation(n_img)                          # file order != image order
    for i in order:
        rows = []
        for k, h, o in images[i]:
            for _ in range(rng.integers(0, 3)):             # duplicates of GT, possibly jittered
                j = rng.integers(-1, 2, 8) * (rng.random() < 0.5)
                rows.append([k, float(rng.integers(1, 4)) / den] + list(np.add(h + o, j)))
        for _ in range(rng.integers(0, 6)):                 # random detections
            rows.append([int(rng.integers(0, K)), float(rng.integers(1, 4)) / den] + box() + box())
        for r in rows:                                      # keep boxes valid
            for a in (2, 6):
                r[a], r[a + 2] = min(r[a], r[a + 2]), max(r[a], r[a + 2])
                r[a + 1], r[a + 3] = min(r[a + 1], r[a + 3]), max(r[a + 1], r[a + 3])
        if rows:
            preds[f"img_{i}.jpg"] = rows
    return anno, preds


@pytest.mark.parametrize("seed", range(40))
def test_vectorised_matches_reference_loop(seed):
    anno, preds = random_case(seed)
    res = hoi_eval.evaluate_hico(anno, preds)
    ref = ref_hico(anno, preds)
    assert np.allclose(np.array(res["per_class"]) / 100, ref, rtol=0, atol=1e-14), (res["per_class"], ref)
    # Known-Object with GT-derived labels
    keep = {}
    for i, a in enumerate(anno["annotation"]):
        for k in a["hoi"]:
            keep.setdefault(anno["correspondence"][k][1], set()).add(i)
    for o in (0, 1):
        keep.setdefault(o, set())
    ko = hoi_eval.evaluate_hico(anno, preds, known_object=True)
    assert np.allclose(np.array(ko["per_class"]) / 100, ref_hico(anno, preds, keep), rtol=0, atol=1e-14)


def test_vectorised_matches_reference_many_detections():
    anno, preds = random_case(123, n_img=30, K=3, grid=4)
    # many more duplicates with all-equal scores
    for fn, rows in list(preds.items()):
        preds[fn] = [[r[0], 0.5] + r[2:] for r in rows] * 3
    res = hoi_eval.evaluate_hico(anno, preds)
    assert np.allclose(np.array(res["per_class"]) / 100, ref_hico(anno, preds), rtol=0, atol=1e-14)


@pytest.mark.parametrize("denominator", [3.0, 4.0])   # 1/3: general path; 1/4: float32 fast path
def test_hico_order_equals_lexsort(denominator):
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 5000):
        cls = rng.integers(0, 5, n)
        sc = rng.integers(-2, 4, n) / denominator
        sc[rng.random(n) < 0.2] *= -0.0                     # -0.0 ties with 0.0
        img = rng.integers(0, 40, n)
        ref = np.lexsort((np.arange(n), img, -sc, cls))
        assert np.array_equal(hoi_eval._hico_order(cls, sc, img), ref)
        srt = np.sort(img, kind="stable")
        assert np.array_equal(hoi_eval._hico_order(cls, sc, srt), np.lexsort((np.arange(n), srt, -sc, cls)))


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------

@pytest.fixture()
def small(tmp_path):
    anno = make_anno([[(0, H, O)], []])
    ap = tmp_path / "anno.json"
    ap.write_text(json.dumps(anno))
    return anno, ap, tmp_path


# the bad-input cases of the readers: tests/test_formats.py


def test_in_process_accepts_arrays_lists_and_tensors():
    torch = pytest.importorskip("torch")
    anno = make_anno([[(0, H, O)], []])
    rows = [row(0, 0.5, H, O), row(1, 0.25, H, O)]
    want = hoi_eval.evaluate_hico(anno, {"img_0.jpg": rows, "img_1.jpg": []})
    assert want["per_class"] == pytest.approx([100.0, 0.0, 0.0])
    for v in (np.array(rows, dtype=np.float32), torch.tensor(rows)):
        got = hoi_eval.evaluate_hico(anno, {"img_0.jpg": v, "img_1.jpg": np.zeros((0, 10))})
        assert got["per_class"] == want["per_class"] and got["counts"] == want["counts"]


def test_load_predictions_roundtrip(small):
    anno, _, tmp = small
    p = tmp / "p.json"
    p.write_text(json.dumps({"img_0.jpg": [row(0, 0.5, H, O)], "img_1.jpg": []}))
    out = formats.load_predictions(p, anno)
    assert list(out) == ["img_0.jpg", "img_1.jpg"]
    assert out["img_0.jpg"].shape == (1, 10) and out["img_1.jpg"].shape == (0, 10)


def test_cli_errors_exit_2(small, capsys):
    anno, ap, tmp = small
    p = tmp / "PRED.json"
    p.write_text('{"img_0.jpg": [[0, 0.5, 5, 0, 4, 9, 20, 0, 29, 9]]}')
    assert hoi_eval.main(["hico", "--anno", str(ap), "--pred", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "image 'img_0.jpg' row 0: human box: [5.0, 0.0, 4.0, 9.0]: has x2 < x1" in err
    assert hoi_eval.main(["hico", "--anno", str(tmp / "missing.json"), "--pred", str(p)]) == 2
    assert "not found" in capsys.readouterr().err
    assert hoi_eval.main(["hico", "--anno", str(ap), "--pred", str(p), "--image-labels", "x.json"]) == 2
    assert "--known-object" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# CLI round trip
# ---------------------------------------------------------------------------------------

@needs_hico
def test_cli_round_trip_real_gt(hico, tmp_path):
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps({fn: v.tolist() for fn, v in gt_as_preds(hico).items()}))
    out = tmp_path / "res" / "result.json"
    p = subprocess.run([sys.executable, str(ROOT / "eval.py"), "hico", "--anno", str(HICO_TEST),
                        "--pred", str(pred), "--zero-shot", "uv", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Unseen" in p.stdout and "100.00" in p.stdout and "zero-shot UV" in p.stdout
    res = json.loads(out.read_text())
    assert res["unseen"] == pytest.approx(100) and res["seen"] == pytest.approx(100)
    assert res["full"] == pytest.approx(100) and len(res["per_class"]) == 600
    assert res["counts"]["num_unseen"] == 84 and res["counts"]["num_gt_pairs"] == 33405
    assert sorted(os.listdir(out.parent)) == ["result.json"]      # no temp file left


def test_cli_known_object_note(small, tmp_path, capsys):
    anno, ap, tmp = small
    p = tmp / "p.json"
    p.write_text(json.dumps({"img_0.jpg": [row(0, 0.5, H, O)]}))
    out = tmp / "r.json"
    assert hoi_eval.main(["hico", "--anno", str(ap), "--pred", str(p), "--known-object", "--out", str(out)]) == 0
    assert "approximation that can only raise the number" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["known_object_approximation"] is True and "note" in res
    lab = tmp / "labels.json"
    lab.write_text(json.dumps({"img_0.jpg": [0]}))
    assert hoi_eval.main(["hico", "--anno", str(ap), "--pred", str(p), "--known-object", "--image-labels",
                   str(lab), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["known_object_approximation"] is False


# ---------------------------------------------------------------------------------------
# V-COCO
# ---------------------------------------------------------------------------------------

def vcoco_world():
    """Two images.  img 1: person 11 holds object 21; person 12 is not in V-COCO (ignored).
    img 2: person 31 holds something invisible (role object id 0) and points (no detections)."""
    coco = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 21, "image_id": 1, "category_id": 2, "bbox": [20, 0, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 31, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "cup"}],
    }
    ids = dict(image_id=[1, 2], ann_id=[11, 31])
    vsrl = [
        dict(action_name="hold", role_name=["agent", "obj"], label=[1, 1],
             role_object_id=[11, 31, 21, 0], include=[[], []], **ids),
        dict(action_name="stand", role_name=["agent"], label=[1, 0], role_object_id=[11, 31],
             include=[[]], **ids),
        dict(action_name="point", role_name=["agent", "instr"], label=[0, 1],
             role_object_id=[11, 31, 0, 0], include=[[], []], **ids),
    ]
    P1, P2, P3, O1 = [0, 0, 9, 9], [50, 50, 59, 59], [0, 0, 9, 9], [20, 0, 29, 9]
    dets = [
        {"image_id": 1, "person_box": P1, "hold_agent": 0.9, "hold_obj": O1 + [0.9], "stand_agent": 0.8},
        {"image_id": 1, "person_box": P1, "hold_obj": O1 + [0.7]},                # second hit -> FP
        {"image_id": 1, "person_box": P2, "hold_agent": 0.99, "hold_obj": O1 + [0.95]},  # ignored
        {"image_id": 2, "person_box": P3, "hold_agent": 0.5, "hold_obj": [1, 1, 5, 5, 0.6]},
    ]
    return vsrl, coco, dets


def test_vcoco_hand_case():
    vsrl, coco, dets = vcoco_world()
    gt = hoi_eval.parse_vcoco_gt(vsrl, coco)
    assert gt.boxes[1].tolist() == [[0, 0, 9, 9], [50, 50, 59, 59], [20, 0, 29, 9]]
    d, unknown, n = formats.load_vcoco_dets(dets, gt, "DETS.json")
    res = hoi_eval.evaluate_vcoco(gt, d)
    roles = {(p["action"], p["role"]): p for p in res["per_role"]}
    hold = roles[("hold", "obj")]
    # hold-obj, scores .95 (ignored person: skipped), .9 TP, .7 second hit FP, .6 missing GT role:
    # scenario 1: predicted a role box -> FP -> rec .5 .5 .5, prec 1 .5 .33 -> AP .5
    # scenario 2: TP -> rec .5 .5 1, prec 1 .5 .667 -> AP .5 + .5 * 2/3
    assert hold["npos"] == 2
    assert hold["ap_scenario_1"] == pytest.approx(50.0, abs=1e-5)
    assert hold["ap_scenario_2"] == pytest.approx(100 * (0.5 + 0.5 * 2 / 3), abs=1e-5)
    assert roles[("point", "instr")]["ap_scenario_1"] == 0.0        # positives, no detections
    assert res["num_roles"] == 1                                    # point-instr left out
    assert res["role_ap_scenario_1"] == pytest.approx(50.0, abs=1e-5)
    assert res["role_ap_scenario_1_all_roles"] == pytest.approx(25.0, abs=1e-5)
    agent = {a["action"]: a["ap"] for a in res["per_action_agent"]}
    # hold agent: .99 ignored, .9 TP, .5 TP -> 100; stand: .8 TP -> 100; point: no detections -> 0
    assert agent == pytest.approx({"hold": 100.0, "stand": 100.0, "point": 0.0})
    assert res["agent_ap"] == pytest.approx(200 / 3)
    assert res["counts"]["num_skipped_ignored_person"] >= 2
    text = hoi_eval.format_vcoco(res)
    assert "hold-obj" in text and "Role AP scenario 1" in text


def test_vcoco_empty_role_box_scenario_1_and_no_positive_nan():
    vsrl, coco, dets = vcoco_world()
    dets[3]["hold_obj"] = [0, 0, 0, 0, 0.6]                         # "no role object" predicted
    gt = hoi_eval.parse_vcoco_gt(vsrl, coco)
    res = hoi_eval.evaluate_vcoco(gt, formats.load_vcoco_dets(dets, gt, "D")[0])
    hold = [p for p in res["per_role"] if p["action"] == "hold"][0]
    assert hold["ap_scenario_1"] == pytest.approx(hold["ap_scenario_2"], abs=1e-6)
    assert hold["ap_scenario_1"] == pytest.approx(100 * (0.5 + 0.5 * 2 / 3), abs=1e-5)
    # an action without positives: NaN, left out of the agent mean
    vsrl[1]["label"] = [0, 0]
    gt = hoi_eval.parse_vcoco_gt(vsrl, coco)
    res = hoi_eval.evaluate_vcoco(gt, formats.load_vcoco_dets(dets, gt, "D")[0])
    agent = {a["action"]: a["ap"] for a in res["per_action_agent"]}
    assert np.isnan(agent["stand"]) and res["agent_ap"] == pytest.approx(50.0)


def test_vcoco_cli(tmp_path, capsys):
    vsrl, coco, dets = vcoco_world()
    # CLI round trip + exit code 2
    for name, obj in (("v.json", vsrl), ("c.json", coco), ("d.json", dets)):
        (tmp_path / name).write_text(json.dumps(obj))
    out = tmp_path / "r.json"
    assert hoi_eval.main(["vcoco", "--vsrl", str(tmp_path / "v.json"), "--coco", str(tmp_path / "c.json"),
                   "--pred", str(tmp_path / "d.json"), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["role_ap_scenario_1"] == pytest.approx(50.0, abs=1e-5)
    assert r["per_role"][-1]["ap_scenario_1"] == 0.0
    (tmp_path / "d.json").write_text("")
    assert hoi_eval.main(["vcoco", "--vsrl", str(tmp_path / "v.json"), "--coco", str(tmp_path / "c.json"),
                   "--pred", str(tmp_path / "d.json")]) == 2
    assert "d.json: detection file is empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# SWiG-HOI
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def swig_meta():
    return formats.load_swig_meta(SWIG_META)


def _pick(meta, freq):
    return next(x for x in meta["SWIG_INTERACTIONS"] if x["evaluation"] == 1 and x["frequency"] == freq)


def swig_world(meta, n_img=10):
    """One GT pair of a non-rare, a rare and an unseen interaction in every image."""
    picks = [_pick(meta, 2), _pick(meta, 1), _pick(meta, 0)]
    anno = []
    for i in range(n_img):
        boxes = [{"bbox": [0, 0, 10, 10], "category_id": 0}]
        hois = []
        for x in picks:
            boxes.append({"bbox": [20, 0, 30, 10], "category_id": x["object_id"]})
            hois.append({"subject_id": 0, "object_id": len(boxes) - 1, "action_id": x["action_id"]})
        anno.append({"file_name": f"s_{i}.jpg", "box_annotations": boxes, "hoi_annotations": hois})
    return anno, [x["id"] for x in picks]


def ref_swig_ap(scores, boxes, keys, gts):
    """Transcription of THID calc_ap (gts: {key: [[8 floats], ...]})."""
    if not keys:
        return 0.0
    scores, boxes = np.array(scores), np.array(boxes)
    idx = np.argsort(scores)[::-1]
    npos = sum(len(v) for v in gts.values())
    used = {k: set() for k in gts}
    hit = []

    def iou(a, b):
        wa, ha = max(a[2] - a[0], 0), max(a[3] - a[1], 0)
        wb, hb = max(b[2] - b[0], 0), max(b[3] - b[1], 0)
        xi = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
        yi = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
        return 0 if xi * yi <= 0 else xi * yi / (wa * ha + wb * hb - xi * yi)

    for i in range(min(len(idx), 19999)):
        d = idx[i]
        key = keys[d]
        if key in gts:
            maxi, k = 0.0, -1
            for j, g in enumerate(gts[key]):
                t = min(iou(boxes[d][:4], g[:4]), iou(boxes[d][4:], g[4:]))
                if maxi < t:
                    maxi, k = t, j
            if k in used[key] or maxi < 0.5:
                hit.append(0)
            else:
                hit.append(1)
                used[key].add(k)
        else:
            hit.append(0)
    hit = np.cumsum(hit)
    rec = hit / npos
    prec = hit / (np.arange(len(hit)) + 1)
    ap = 0.0
    for i in range(11):
        m = rec >= i / 10.0
        if m.sum() > 0:
            ap += np.max(prec[m]) / 11.0
    return ap


def ref_swig_class_ap(preds, gt, c):
    """ref_swig_ap of class c, its detections and GT gathered from preds and a parsed GT."""
    sc, bx, ky = [], [], []
    for fn, rows in preds.items():
        for r in rows:
            if r[0] == c:
                sc.append(r[1])
                bx.append(r[2:])
                ky.append(gt.index[fn])
    gts = {}
    for k, i, b in zip(gt.gt_class, gt.gt_image, gt.gt_boxes):
        if k == c:
            gts.setdefault(int(i), []).append(list(b))
    return ref_swig_ap(sc, bx, ky, gts)


@needs_swig
def test_swig_meta_counts(swig_meta):
    ev = [x for x in swig_meta["SWIG_INTERACTIONS"] if x["evaluation"] == 1]
    assert len(ev) == 5539
    assert [sum(x["frequency"] == f for x in ev) for f in (0, 1, 2)] == [1391, 2841, 1307]


@needs_swig
def test_swig_hand_case(swig_meta):
    anno, (nr, ra, un) = swig_world(swig_meta)
    h, o = [0, 0, 10, 10], [20, 0, 30, 10]
    preds = {f"s_{i}.jpg": [] for i in range(10)}
    # non-rare: all 10 GT found + 1 duplicate FP at the lowest score -> 100
    for i in range(10):
        preds[f"s_{i}.jpg"].append(row(nr, 0.9 - i / 100, h, o))
    preds["s_0.jpg"].append(row(nr, 0.1, h, o))
    # rare: plain IoU 0.49 (an inclusive +1 IoU would be 0.536 -> TP): FP; then 3 TPs (rec .3)
    preds["s_0.jpg"].append(row(ra, 0.95, [0, 0, 10, 4.9], o))
    for i in range(1, 4):
        preds[f"s_{i}.jpg"].append(row(ra, 0.9, h, o))
    # unseen: 3 TPs then 3 FPs then 7 TPs: rec exactly .3 reaches t = 3/10 (unlike HICO's arange)
    for i in range(3):
        preds[f"s_{i}.jpg"].append(row(un, 0.9, h, o))
    for i in range(3):
        preds[f"s_{i}.jpg"].append(row(un, 0.8, [50, 50, 60, 60], o))
    for i in range(3, 10):
        preds[f"s_{i}.jpg"].append(row(un, 0.7, h, o))
    res = hoi_eval.evaluate_swig(anno, preds, swig_meta)
    per = dict(zip(res["class_ids"], res["per_class"]))
    assert per[nr] == pytest.approx(100.0)
    # rare: rec 0 .1 .2 .3, prec 0 .5 .667 .75 -> t=0..0.3: .75, later 0
    assert per[ra] == pytest.approx(100 * ap11([0.75] * 4), abs=1e-12)
    # unseen: t <= .3 -> 1; t = .4 .. 1 -> 10/13 (the final TP)
    assert per[un] == pytest.approx(100 * ap11([1.0] * 4 + [10 / 13] * 7), abs=1e-12)
    assert res["non_rare"] == pytest.approx(per[nr] / 1307)
    assert res["rare"] == pytest.approx(per[ra] / 2841)
    assert res["unseen"] == pytest.approx(per[un] / 1391)
    assert res["full"] == pytest.approx((per[nr] + per[ra] + per[un]) / 5539)
    assert res["counts"]["num_classes_evaluated"] == 5539
    # same numbers as the THID loop
    gt = formats.parse_swig_gt(anno, swig_meta)
    for c in (nr, ra, un):
        assert per[c] / 100 == pytest.approx(ref_swig_class_ap(preds, gt, c), abs=1e-14)
    assert "Unseen" in hoi_eval.format_swig(res)


@needs_swig
def test_swig_top_19999(swig_meta):
    anno, (nr, _, _) = swig_world(swig_meta, n_img=1)
    gt = formats.parse_swig_gt(anno, swig_meta)
    n = 20000
    det_boxes = np.tile(np.array([[50, 50, 60, 60, 20, 0, 30, 10]], float), (n, 1))
    det_boxes[-1] = [0, 0, 10, 10, 20, 0, 30, 10]                    # the only TP, lowest score
    score = np.linspace(1, 0.5, n)
    args = (np.full(n, nr), score, np.zeros(n, int), det_boxes, gt.gt_class, gt.gt_image, gt.gt_boxes,
            gt.num_classes, gt.eval_ids, 1)
    assert hoi_eval.swig_ap_arrays(*args)["ap"][nr] == 0.0                 # cut at 19,999
    r = hoi_eval.swig_ap_arrays(*[a[1:] if isinstance(a, np.ndarray) and a.shape[:1] == (n,) else a for a in args])
    assert r["ap"][nr] == pytest.approx(ap11([1 / 19999] * 11))
    assert r["num_det"][nr] == 19999


@needs_swig
def test_swig_random_vs_thid_loop(swig_meta):
    rng = np.random.default_rng(5)
    anno, ids = swig_world(swig_meta, n_img=6)
    gt = formats.parse_swig_gt(anno, swig_meta)
    preds = {}
    for i in range(6):
        rows = []
        for _ in range(25):
            c = int(rng.choice(ids))
            b = [float(v) for v in rng.integers(0, 4, 8)] + np.array([0, 0, 10, 10, 20, 0, 30, 10])
            rows.append([c, float(rng.integers(1, 4)) / 4] + b.tolist())
        preds[f"s_{i}.jpg"] = rows
    res = hoi_eval.evaluate_swig(gt, preds)
    per = dict(zip(res["class_ids"], res["per_class"]))
    for c in ids:
        assert per[c] / 100 == pytest.approx(ref_swig_class_ap(preds, gt, c), abs=1e-14)


@needs_swig
def test_swig_cli(swig_meta, tmp_path, capsys):
    anno, (nr, _, _) = swig_world(swig_meta, n_img=2)
    (tmp_path / "a.json").write_text(json.dumps(anno))
    (tmp_path / "p.json").write_text(json.dumps({"s_0.jpg": [row(nr, 0.5, [0, 0, 10, 10], [20, 0, 30, 10])]}))
    out = tmp_path / "r.json"
    assert hoi_eval.main(["swig", "--anno", str(tmp_path / "a.json"), "--pred", str(tmp_path / "p.json"),
                   "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r) >= {"full", "rare", "non_rare", "unseen", "per_class", "class_ids", "counts"}
    assert r["per_class"][r["class_ids"].index(nr)] == pytest.approx(100 * ap11([1.0] * 6))
    (tmp_path / "p.json").write_text(json.dumps({"s_0.jpg": [[14130, 0.5] + [0] * 8]}))
    assert hoi_eval.main(["swig", "--anno", str(tmp_path / "a.json"), "--pred", str(tmp_path / "p.json")]) == 2
    assert "image 's_0.jpg' row 0: hoi: index 14130 out of range [0, 14130)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# V-COCO: independent per-image loop (transcription of vsrl_eval's _do_role_eval /
# _do_agent_eval) against the vectorised evaluator on random worlds with ties
# ---------------------------------------------------------------------------------------

def _ov32(gt_boxes, ref):
    one = np.float32(1)
    ixmin = np.maximum(gt_boxes[:, 0], ref[0])
    iymin = np.maximum(gt_boxes[:, 1], ref[1])
    ixmax = np.minimum(gt_boxes[:, 2], ref[2])
    iymax = np.minimum(gt_boxes[:, 3], ref[3])
    iw = np.maximum(ixmax - ixmin + one, np.float32(0))
    ih = np.maximum(iymax - iymin + one, np.float32(0))
    inter = iw * ih
    uni = (ref[2] - ref[0] + one) * (ref[3] - ref[1] + one) + \
        (gt_boxes[:, 2] - gt_boxes[:, 0] + one) * (gt_boxes[:, 3] - gt_boxes[:, 1] + one) - inter
    return inter / uni


def ref_vcoco(gt, dets):
    A = len(gt.actions)
    out = {}
    npos = np.zeros(A)
    lists = {}
    for i in gt.image_ids:
        boxes, pid = gt.boxes[i], gt.person[i]
        gt_boxes, gt_act = boxes[pid], gt.actions_gt[i]
        ignore = np.any(gt_act == -1, axis=1)
        npos += (gt_act == 1).sum(0)
        mine = [d for d in dets if d["image_id"] == i]
        agents = np.zeros((len(mine), 4 + A), np.float32)
        roles = np.zeros((len(mine), 5 * A, 2), np.float32)
        for n, d in enumerate(mine):
            agents[n, :4] = d["person_box"]
            for a in range(A):
                for j, r in enumerate(gt.roles[a]):
                    v = d.get(f"{gt.actions[a]}_{r}")
                    if r == "agent":
                        agents[n, 4 + a] = np.nan if v is None else v
                    else:
                        roles[n, 5 * a:5 * a + 5, j - 1] = [np.nan] * 5 if v is None else v
        for kind in ("agent", "scenario_1", "scenario_2"):
            for a in range(A):
                nroles = 1 if kind == "agent" else len(gt.roles[a]) - 1
                for r in range(nroles):
                    covered = np.zeros(len(pid), bool)
                    gt_roles = -np.ones_like(gt_boxes)
                    if kind != "agent":
                        for j in range(len(pid)):
                            if gt.role_gt[i][j, a, r] > -1:
                                gt_roles[j] = boxes[gt.role_gt[i][j, a, r]]
                        scores, role_boxes = roles[:, 5 * a + 4, r], roles[:, 5 * a:5 * a + 4, r]
                    else:
                        scores, role_boxes = agents[:, 4 + a], None
                    valid = np.where(~np.isnan(scores))[0]
                    sc, ab = scores[valid], agents[valid, :4]
                    rb = role_boxes[valid] if role_boxes is not None else None
                    tp, fp, ss = lists.setdefault((kind, a, r), ([], [], []))
                    for j in sc.argsort()[::-1]:
                        ov = _ov32(gt_boxes, ab[j])
                        jmax, ovmax = ov.argmax(), ov.max()
                        if ignore[jmax]:
                            continue
                        ov_role = 1.0
                        if kind != "agent":
                            if np.all(gt_roles[jmax] == -1):
                                if kind == "scenario_1":
                                    ov_role = 1.0 if (np.all(rb[j] == 0) or np.all(np.isnan(rb[j]))) else 0.0
                            else:
                                ov_role = _ov32(gt_roles[jmax][None], rb[j])[0]
                        ss.append(sc[j])
                        if gt_act[jmax, a] == 1 and ovmax >= 0.5 and ov_role >= 0.5 and not covered[jmax]:
                            tp.append(1)
                            fp.append(0)
                            covered[jmax] = True
                        else:
                            tp.append(0)
                            fp.append(1)
    for key, (tp, fp, ss) in lists.items():
        n = npos[key[1]]
        if n == 0:
            out[key] = np.nan
            continue
        if not ss:
            out[key] = 0.0
            continue
        a_sc = np.array(ss, np.float32)
        idx = a_sc.argsort()[::-1]
        a_tp = np.cumsum(np.array(tp, np.float32)[idx])
        a_fp = np.cumsum(np.array(fp, np.float32)[idx])
        rec = a_tp / float(n)
        prec = a_tp / np.maximum(a_tp + a_fp, np.finfo(np.float64).eps)
        mrec = np.concatenate(([0.], rec, [1.]))
        mpre = np.concatenate(([0.], prec, [0.]))
        for k in range(mpre.size - 1, 0, -1):
            mpre[k - 1] = max(mpre[k - 1], mpre[k])
        k = np.where(mrec[1:] != mrec[:-1])[0]
        out[key] = float(np.float32(np.sum((mrec[k + 1] - mrec[k]) * mpre[k + 1])))
    return out


def random_vcoco(seed):
    rng = np.random.default_rng(seed)
    acts = [("hold", ["agent", "obj"]), ("hit", ["agent", "instr", "obj"]), ("stand", ["agent"])]
    images, anns, vcoco_persons = [], [], []
    nid = 1
    rows = {a: [] for a, _ in acts}
    for im in range(1, 5):
        images.append({"id": im, "width": 60, "height": 60})
        objs = []
        for _ in range(rng.integers(1, 4)):                  # persons
            x, y = rng.integers(0, 6, 2) * 3
            anns.append({"id": nid, "image_id": im, "category_id": 1, "bbox": [float(x), float(y), 12.0, 15.0],
                         "area": 180, "iscrowd": 0})
            if rng.random() < 0.8:
                vcoco_persons.append((nid, im))
            nid += 1
        for _ in range(2):                                    # objects
            x, y = rng.integers(0, 6, 2) * 3
            anns.append({"id": nid, "image_id": im, "category_id": 2, "bbox": [float(x), float(y), 9.0, 9.0],
                         "area": 81, "iscrowd": 0})
            objs.append(nid)
            nid += 1
        for p, pim in vcoco_persons:
            if pim != im:
                continue
            for a, rn in acts:
                lab = int(rng.random() < 0.6)
                rids = [int(rng.choice(objs)) if (lab and rng.random() < 0.7) else 0 for _ in rn[1:]]
                rows[a].append((p, im, lab, rids))
    vsrl = []
    for a, rn in acts:
        r = rows[a]
        flat = [p for p, _, _, _ in r] + [x[3][k] for k in range(len(rn) - 1) for x in r]
        vsrl.append({"action_name": a, "role_name": rn, "image_id": [x[1] for x in r],
                     "ann_id": [x[0] for x in r], "label": [x[2] for x in r], "role_object_id": flat})
    coco = {"images": images, "annotations": anns}
    boxes = {an["id"]: an for an in anns}
    dets = []
    for an in anns:
        if an["category_id"] != 1:
            continue
        for _ in range(rng.integers(1, 4)):
            x, y, w, h = an["bbox"]
            j = rng.integers(-2, 3, 2)
            d = {"image_id": an["image_id"], "person_box": [x + j[0], y + j[1], x + w - 1 + j[0], y + h - 1]}
            for a, rn in acts:
                if rng.random() < 0.9:
                    d[f"{a}_agent"] = float(rng.integers(0, 4)) / 4
                for r in rn[1:]:
                    u = rng.random()
                    ob = boxes[int(rng.choice([o["id"] for o in anns if o["image_id"] == an["image_id"]
                                               and o["category_id"] == 2]))]["bbox"]
                    box = [ob[0], ob[1], ob[0] + ob[2] - 1, ob[1] + ob[3] - 1] if u < 0.6 else \
                        ([0, 0, 0, 0] if u < 0.8 else [1.0, 1.0, 5.0, 5.0])
                    if rng.random() < 0.9:
                        d[f"{a}_{r}"] = box + [float(rng.integers(0, 4)) / 4]
            dets.append(d)
    in_gt = {im for _, im in vcoco_persons}
    dets = [d for d in dets if d["image_id"] in in_gt]
    order = rng.permutation(len(dets))
    return vsrl, coco, [dets[k] for k in order]


@pytest.mark.parametrize("seed", range(12))
def test_vcoco_vectorised_matches_reference_loop(seed):
    vsrl, coco, dets = random_vcoco(seed)
    gt = hoi_eval.parse_vcoco_gt(vsrl, coco)
    res = hoi_eval.evaluate_vcoco(gt, formats.load_vcoco_dets(dets, gt, "D")[0])
    ref = ref_vcoco(gt, dets)
    got = {("agent", k, 0): a["ap"] for k, a in enumerate(res["per_action_agent"])}
    for p in res["per_role"]:
        a = gt.actions.index(p["action"])
        r = gt.roles[a].index(p["role"]) - 1
        got[("scenario_1", a, r)] = p["ap_scenario_1"]
        got[("scenario_2", a, r)] = p["ap_scenario_2"]
    assert set(got) == set(ref)
    for key, v in ref.items():
        if np.isnan(v):
            assert np.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(v * 100, abs=1e-9), key
