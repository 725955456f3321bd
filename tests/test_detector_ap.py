"""Tests of `eval.py detector`: COCO box AP (pycocotools COCOeval) of detection files against the
unique GT boxes of HOI annotation files, on hand-made detection sets whose AP is computed by
hand; the box frames (HICO-DET's 1-based inclusive one and the continuous ones); bad input.

COCOeval's AP by hand: per class and IoU threshold t in 0.50, 0.55, ..., 0.95, detections are
matched in score order (a detection with IoU >= t to an unmatched GT is a TP); precision is made
monotone (the max precision at any higher recall) and read at the 101 recall thresholds
r = 0, 0.01, ..., 1 (0 where the recall never reaches r); AP = the mean of those 101 values,
then over the 10 thresholds, then over the classes with GT.
"""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data
import detector_ap
import eval as hoi_eval
from common import data_root

ROOT = Path(__file__).resolve().parent.parent

SWIG_META = data_root() / "swig_hoi" / "derived" / "swig_v1_meta.json"
needs_swig = pytest.mark.skipif(not SWIG_META.exists(), reason="shared data not found")

CUP = data.COCO80_NAMES.index("cup")              # COCO-80 label 41, COCO category id 47
SWIG_OBJ, SWIG_ACT = 31, 169                   # SWiG-HOI interaction 0: injecting syringe
INCLUSIVE = {"hico": True, "synthetic": False, "vcoco": False, "swig": False}


# ---------------------------------------------------------------------------------------
# tiny annotation files: images = [(file_name, [(human box, object box), ...]), ...]
# ---------------------------------------------------------------------------------------

def hico_doc(images, name=None):
    """HICO-DET format (also the synthetic world's, with name 'synthetic'); one class per
    COCO-80 object (verb 'hold'), every object a cup."""
    doc = {"annotation": [{"boxes_h": [list(h) for h, _ in pairs], "boxes_o": [list(o) for _, o in pairs],
                           "hoi": [CUP] * len(pairs), "object": [CUP] * len(pairs), "verb": [0] * len(pairs)}
                          for _, pairs in images],
           "filenames": [f for f, _ in images], "objects": list(data.COCO80_NAMES), "verbs": ["hold"],
           "correspondence": [[k, k, 0] for k in range(80)]}
    if name:
        doc["name"] = name
    return doc


def vcoco_doc(images, ids):
    """fredzzhang's instances_vcoco format (object 1 = person after 'background', names with spaces)."""
    return {"annotations": [{"file_name": f, "boxes_h": [list(h) for h, _ in pairs],
                             "boxes_o": [list(o) for _, o in pairs], "actions": [0] * len(pairs),
                             "objects": [CUP + 1] * len(pairs)} for f, pairs in images],
            "classes": ["hold obj"], "objects": ["background"] + [n.replace("_", " ") for n in data.COCO80_NAMES],
            "images": list(ids)}


def swig_doc(images):
    """THID SWiG-HOI format: a pair's human (category 0) and object (syringe) index box_annotations."""
    out = []
    for f, pairs in images:
        boxes, hois = [], []
        for h, o in pairs:
            hois.append({"subject_id": len(boxes), "object_id": len(boxes) + 1, "action_id": SWIG_ACT})
            boxes += [{"bbox": list(h), "category_id": 0}, {"bbox": list(o), "category_id": SWIG_OBJ}]
        out.append({"file_name": f, "box_annotations": boxes, "hoi_annotations": hois})
    return out


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def make_anno(tmp_path, dataset, images, vcoco_ids=None):
    if dataset == "vcoco":
        doc = vcoco_doc(images, vcoco_ids or [1000 + i for i in range(len(images))])
    elif dataset == "swig":
        doc = swig_doc(images)
    else:
        doc = hico_doc(images, "synthetic" if dataset == "synthetic" else None)
    return write(tmp_path / f"anno_{dataset}.json", doc)


def obj_label(dataset):
    return SWIG_OBJ if dataset == "swig" else CUP


def per_image(dets):
    """{file: [(box, score, label), ...]} -> the project's per-image detection format."""
    return {f: {"boxes": [list(b) for b, _, _ in rows], "scores": [s for _, s, _ in rows],
                "labels": [lab for _, _, lab in rows]} for f, rows in dets.items()}


def gt_copies(images, dataset):
    """Every GT box once as a detection (score 1)."""
    out = {}
    for f, pairs in images:
        rows = []
        for h, o in pairs:
            for b, lab in ((h, 0), (o, obj_label(dataset))):
                if (b, lab) not in [(r[0], r[2]) for r in rows]:
                    rows.append((b, 1.0, lab))
        out[f] = rows
    return out


def evaluate(tmp_path, kind, images, dets, **kw):
    """Write a `kind` annotation file and the detections, evaluate (kw: evaluate_detector's)."""
    anno = make_anno(tmp_path, kind, images)
    det = write(tmp_path / "dets.json", per_image(dets))
    meta = SWIG_META if kind == "swig" else None
    return detector_ap.evaluate_detector(anno, det, meta=meta, **kw)


# images in the 1-based inclusive frame are also valid continuous boxes: the same numbers serve both
IMAGES = [("img_000001.jpg", [((1, 1, 40, 80), (30, 50, 45, 60)), ((60, 5, 99, 95), (30, 50, 45, 60))]),
          ("img_000002.jpg", [((10, 10, 60, 120), (70, 70, 110, 90))]),
          ("img_000003.jpg", [])]
DATASETS = ["hico", "synthetic", "vcoco", pytest.param("swig", marks=needs_swig)]


# ---------------------------------------------------------------------------------------
# known AP
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", DATASETS)
def test_exact_copies_of_the_gt_score_100(tmp_path, dataset):
    r = evaluate(tmp_path, dataset, IMAGES, gt_copies(IMAGES, dataset))
    for key in ("ap", "ap50", "ap75", "ar100"):
        assert r[key] == pytest.approx(100.0, abs=1e-9), key
    assert r["person"] == {"ap": pytest.approx(100.0), "num_gt": 3, "num_det": 3}
    name = "syringe" if dataset == "swig" else "cup"
    assert list(r["per_class"]) == [name]
    assert r["per_class"][name] == {"ap": pytest.approx(100.0), "num_gt": 2, "num_det": 2}
    assert r["counts"]["num_gt_boxes"] == 5 and r["counts"]["num_images"] == 3
    assert r["dataset"] == dataset and r["detections_format"] == "per-image"


@pytest.mark.parametrize("dataset", DATASETS)
def test_coco_results_of_the_gt_score_100(tmp_path, dataset):
    """A COCO results file in COCO's frame: HICO-DET's [x1, x2] becomes x = x1 - 1, w = x2 - x1 + 1;
    image ids: V-COCO's `images` list, else the last number of the file name."""
    vcoco_ids = [7, 3, 11]                      # deliberately not the numbers in the file names
    anno = make_anno(tmp_path, dataset, IMAGES, vcoco_ids)
    off = 1 if INCLUSIVE[dataset] else 0
    cats = {0: 0, SWIG_OBJ: SWIG_OBJ} if dataset == "swig" else {0: 1, CUP: 47}
    res = []
    for k, (f, rows) in enumerate(gt_copies(IMAGES, dataset).items()):
        iid = vcoco_ids[k] if dataset == "vcoco" else k + 1
        for (x1, y1, x2, y2), s, lab in rows:
            res.append({"image_id": iid, "category_id": cats[lab], "score": s,
                        "bbox": [x1 - off, y1 - off, x2 - x1 + off, y2 - y1 + off]})
    det = write(tmp_path / "coco.json", res)
    r = detector_ap.evaluate_detector(anno, det, meta=SWIG_META if dataset == "swig" else None)
    assert r["detections_format"] == "coco-results"
    assert (r["ap"], r["ap50"], r["ap75"], r["person"]["ap"]) == pytest.approx((100.0,) * 4, abs=1e-9)
    # the same file read in the wrong frame (continuous boxes for HICO-DET, shifted by one
    # pixel for the others) is no longer a perfect match at IoU 0.95
    for e in res:
        e["bbox"][0] += 1 - 2 * off
    write(det, res)
    r = detector_ap.evaluate_detector(anno, det, meta=SWIG_META if dataset == "swig" else None)
    assert r["ap50"] == pytest.approx(100.0) and r["ap"] < 100.0


def test_hico_frame_widths_are_inclusive(tmp_path):
    """The 1-based inclusive box [1, 1, 32, 32] covers 32 x 32 pixels: area 1024 = 32^2, which
    COCOeval counts as small AND medium (both ranges include 32^2); with w = x2 - x1 it would be
    31^2, small only.  Read as the synthetic (continuous) frame it is 31 x 31."""
    images = [("a_1.jpg", [((0.5, 0.5, 200, 200), (1, 1, 32, 32))])]
    dets = gt_copies(images, "hico")
    r = evaluate(tmp_path, "hico", images, dets)
    assert r["ap_small"] == pytest.approx(100.0) and r["ap_medium"] == pytest.approx(100.0)
    r = evaluate(tmp_path, "synthetic", images, dets)
    assert r["ap_small"] == pytest.approx(100.0) and r["ap_medium"] is None   # 961 < 1024: none medium
    assert r["ap_large"] == pytest.approx(100.0)                              # the 199.5^2 person


@pytest.mark.parametrize("dataset", ["hico", "synthetic"])
@pytest.mark.parametrize("fp", [False, True])
def test_half_the_boxes_missing(tmp_path, dataset, fp):
    """4 images with one person and one cup each; all persons found, 2 of the 4 cups.
    Cup: recall 0.5 with precision 1 (or 2/3 for every recall after a higher-scored false
    positive); the recall thresholds 0, 0.01, ..., 0.50 (51 of the 101; np.linspace's 0.50 is
    exactly 0.5 = 2/4) read that precision, the other 50 read 0, at every IoU threshold."""
    images = [(f"img_{i}.jpg", [((0, 0, 50, 100), (60, 60, 80, 80))]) for i in range(1, 5)]
    dets = {f: [((0, 0, 50, 100), 0.9, 0)] for f, _ in images}
    dets["img_1.jpg"].append(((60, 60, 80, 80), 0.8, CUP))
    dets["img_2.jpg"].append(((60, 60, 80, 80), 0.7, CUP))
    if fp:
        dets["img_3.jpg"].append(((5, 5, 25, 25), 0.95, CUP))   # IoU 0 with the cup
    assert np.linspace(0, 1, 101)[50] == 0.5
    cup = 51 / 101 * (2 / 3 if fp else 1.0) * 100
    r = evaluate(tmp_path, dataset, images, dets)
    assert r["per_class"]["cup"]["ap"] == pytest.approx(cup, rel=1e-12)
    assert r["person"]["ap"] == pytest.approx(100.0, rel=1e-12)
    for key in ("ap", "ap50", "ap75"):
        assert r[key] == pytest.approx((100.0 + cup) / 2, rel=1e-12), key
    assert r["ar100"] == pytest.approx((100 + 50) / 2, rel=1e-12)      # recall 1 and 0.5


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("dx, above", [(3.3, True), (3.4, False)])
def test_iou_just_above_and_below_half(tmp_path, dataset, dx, above):
    """Boxes of width and height 10 (HICO-DET: [1, 10] inclusive = 10 pixels; continuous:
    [0, 10]) shifted by dx along x: IoU = (10 - dx) / (10 + dx) = 0.5038 for 3.3, 0.4925 for 3.4.
    A wrong frame moves both: inclusive boxes read as continuous are 9 wide (0.463 for 3.3),
    continuous ones read as inclusive 11 wide (0.528 for 3.4).  Only the IoU-0.50 threshold of
    the ten can match: AP = AP50 / 10."""
    if INCLUSIVE[dataset]:
        h, o = (1, 1, 10, 10), (21, 1, 30, 10)
    else:
        h, o = (0, 0, 10, 10), (20, 0, 30, 10)
    images = [("img_1.jpg", [(h, o)])]
    shift = lambda b: (b[0] + dx, b[1], b[2] + dx, b[3])  # noqa: E731
    dets = {"img_1.jpg": [(shift(h), 0.9, 0), (shift(o), 0.8, obj_label(dataset))]}
    r = evaluate(tmp_path, dataset, images, dets)
    assert r["ap50"] == pytest.approx(100.0 if above else 0.0)
    assert r["ap"] == pytest.approx(10.0 if above else 0.0)
    assert r["ap75"] == 0.0


def test_dataset_switch_sets_the_frame(tmp_path):
    """The same HICO-format file and detections: hico reads [1, 10] as 10 pixels wide (IoU 0.5038
    after a 3.3 shift: a match), synthetic as 9 (IoU 0.463: none)."""
    images = [("img_1.jpg", [((1, 1, 10, 10), (21, 1, 30, 10))])]
    dets = {"img_1.jpg": [((4.3, 1, 13.3, 10), 0.9, 0), ((24.3, 1, 33.3, 10), 0.8, CUP)]}
    assert evaluate(tmp_path, "hico", images, dets)["ap50"] == pytest.approx(100.0)
    assert evaluate(tmp_path, "hico", images, dets, dataset="synthetic")["ap50"] == 0.0
    with pytest.raises(hoi_eval.EvalInputError, match="--dataset hico, but this is a synthetic world"):
        evaluate(tmp_path, "synthetic", images, dets, dataset="hico")
    with pytest.raises(hoi_eval.EvalInputError, match="--dataset swig, but this is a HICO-DET"):
        evaluate(tmp_path, "hico", images, dets, dataset="swig")


def test_duplicate_gt_boxes_counted_once(tmp_path):
    """Pairs share boxes: A holds cup X, B holds cup X, A holds B (B is then also an object
    labelled person), A holds cup Y.  Unique GT: persons A, B; cups X, Y.  One detection each
    scores 100; were duplicates kept, 3 of 5 person and 2 of 3 cup GT would be missed."""
    A, B, X, Y = (0, 0, 40, 90), (50, 0, 90, 90), (20, 40, 35, 55), (60, 40, 75, 55)
    doc = hico_doc([("img_1.jpg", [(A, X), (B, X), (A, Y)])], "synthetic")
    a = doc["annotation"][0]
    a["boxes_h"].append(list(A))
    a["boxes_o"].append(list(B))
    a["hoi"].append(0)
    a["object"].append(0)
    a["verb"].append(0)
    anno = write(tmp_path / "anno.json", doc)
    det = write(tmp_path / "dets.json", per_image({"img_1.jpg": [(A, 0.9, 0), (B, 0.8, 0), (X, 0.7, CUP),
                                                                 (Y, 0.6, CUP)]}))
    r = detector_ap.evaluate_detector(anno, det)
    assert r["counts"]["num_gt_boxes"] == 4
    assert r["person"]["num_gt"] == 2 and r["per_class"]["cup"]["num_gt"] == 2
    assert (r["ap"], r["person"]["ap"], r["ar100"]) == pytest.approx((100.0, 100.0, 100.0))


def test_empty_detection_file_scores_0_and_unscored_classes(tmp_path):
    anno = make_anno(tmp_path, "hico", IMAGES)
    r = detector_ap.evaluate_detector(anno, write(tmp_path / "d.json", {}))
    assert (r["ap"], r["ap50"], r["ar100"], r["counts"]["num_detections"]) == (0.0, 0.0, 0.0, 0)
    # a class without GT (a bicycle) is not scored, as in COCOeval; the rest is unchanged
    dets = gt_copies(IMAGES, "hico")
    dets["img_000003.jpg"] = [((1, 1, 9, 9), 0.99, 1)]
    r = detector_ap.evaluate_detector(anno, write(tmp_path / "d.json", per_image(dets)))
    assert r["ap"] == pytest.approx(100.0) and r["counts"]["num_detections_unscored"] == 1


# ---------------------------------------------------------------------------------------
# CLI and bad input
# ---------------------------------------------------------------------------------------

def test_cli_table_and_out(tmp_path, capsys):
    anno = make_anno(tmp_path, "hico", IMAGES)
    det = write(tmp_path / "dets.json", per_image(gt_copies(IMAGES, "hico")))
    out = tmp_path / "res" / "r.json"
    assert hoi_eval.main(["detector", "--anno", str(anno), "--detections", str(det), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "HICO-DET ground-truth boxes" in text
    lines = text.splitlines()
    assert [ln.split()[:2] for ln in lines if ln.strip().startswith(("AP50", "person", "cup"))] == [
        ["AP50", "100.00"], ["person", "100.00"], ["cup", "100.00"]]
    res = json.loads(out.read_text())
    assert res["ap"] == pytest.approx(100.0) and res["person"]["num_gt"] == 3
    assert res["box_frame"].startswith("1-based inclusive")


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "anno", "relative"])
def test_out_never_overwrites_an_input(tmp_path, capsys, how, monkeypatch):
    anno = make_anno(tmp_path, "hico", IMAGES)
    det = write(tmp_path / "dets.json", per_image(gt_copies(IMAGES, "hico")))
    before = (anno.read_bytes(), det.read_bytes())
    out = {"same": det, "anno": anno, "symlink": tmp_path / "link.json", "hardlink": tmp_path / "hard.json",
           "relative": Path("dets.json")}[how]
    if how == "symlink":
        out.symlink_to(det)
    if how == "hardlink":
        os.link(det, out)
    monkeypatch.chdir(tmp_path)
    assert hoi_eval.main(["detector", "--anno", str(anno), "--detections", str(det), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would overwrite the input" in err and "an input is never an output" in err
    assert (anno.read_bytes(), det.read_bytes()) == before


# the bad detection files (per image and COCO results): tests/test_formats.py


def test_bad_files_missing_gzip_and_annotation(tmp_path, capsys):
    anno = make_anno(tmp_path, "hico", IMAGES)
    good = write(tmp_path / "dets.json", per_image(gt_copies(IMAGES, "hico")))
    gz = tmp_path / "dets.json.gz"
    gz.write_bytes(gzip.compress(good.read_bytes()))
    bad_anno = hico_doc(IMAGES)
    bad_anno["annotation"][1]["boxes_o"][0] = [70, 70, 60, 90]
    cases = [
        (anno, tmp_path / "missing.json", "missing.json: detection file not found"),
        (anno, gz, "dets.json.gz: detection file is gzip-compressed"),
        (tmp_path / "none.json", good, "none.json: annotation file not found"),
        (gz, good, "dets.json.gz: annotation file is gzip-compressed"),
        (write(tmp_path / "weird.json", {"x": 1}), good, "weird.json: not a HICO-DET / synthetic"),
        (write(tmp_path / "bad.json", bad_anno), good,
         "bad.json: image 'img_000002.jpg' row 0: boxes_o: [70.0, 70.0, 60.0, 90.0]: has x2 < x1"),
    ]
    for a, d, needle in cases:
        assert hoi_eval.main(["detector", "--anno", str(a), "--detections", str(d)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (needle, err)


def test_coco_results_need_unique_numbers_in_file_names(tmp_path):
    images = [("a_7.jpg", []), ("b_7.jpg", [((0, 0, 5, 5), (6, 6, 9, 9))])]
    anno = make_anno(tmp_path, "synthetic", images)
    det = write(tmp_path / "c.json", [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}])
    with pytest.raises(hoi_eval.EvalInputError, match="images 'a_7.jpg' and 'b_7.jpg' both have image_id 7"):
        detector_ap.evaluate_detector(anno, det)


def test_cli_subprocess_exit_2_one_line(tmp_path):
    anno = make_anno(tmp_path, "hico", IMAGES)
    det = tmp_path / "d.json"
    det.write_text('{"img_000001.jpg": {"boxes": [[0, 0, 4, 10]], "scores": [0.5], "labels": [true]}}')
    p = subprocess.run([sys.executable, str(ROOT / "eval.py"), "detector", "--anno", str(anno),
                        "--detections", str(det)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == (f"error: {det}: detection file: field '[\"img_000001.jpg\"].labels[0]': true is a boolean; "
                        f"booleans are not numbers (use 0 / 1)\n")


@needs_swig
def test_swig_pairs_left_out_of_the_gt_are_told(tmp_path):
    """A SWiG-HOI pair without an object (object_id -1) is no GT pair: counted and told, not dropped silently."""
    doc = swig_doc(IMAGES[:1])
    doc[0]["hoi_annotations"].append({"subject_id": 0, "object_id": -1, "action_id": SWIG_ACT})
    det = write(tmp_path / "dets.json", per_image(gt_copies(IMAGES[:1], "swig")))
    res = detector_ap.evaluate_detector(write(tmp_path / "swig.json", doc), det, meta=SWIG_META)
    assert res["counts"]["num_pairs_left_out"] == 1 and res["ap"] == pytest.approx(100.0)
    assert "; 1 pairs without an object or of an unknown interaction left out of the GT" in \
        detector_ap.format_detector(res)
    assert evaluate(tmp_path, "hico", IMAGES, gt_copies(IMAGES, "hico"))["counts"]["num_pairs_left_out"] == 0
