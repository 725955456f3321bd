"""Every bad-input case of the readers (formats.py) that the evaluators, the datasets and the box
AP read through, as data tables. One helper, :func:`refused`, pins the message shape
``FILE: image 'NAME' row R: field: problem`` (parts that do not apply are left out)."""
import copy
import json

import clicheck
import numpy as np
import pytest

import data
import detector_ap
import eval as hoi_eval
import formats
from common import data_root
from formats import FormatError

SWIG_META = data_root() / "swig_hoi" / "derived" / "swig_v1_meta.json"
need_swig = pytest.mark.skipif(not SWIG_META.is_file(), reason="shared SWiG-HOI meta absent")


def refused(call, file, image=None, row=None, field=None, problem=""):
    """call() raises FormatError with ONE line ``FILE: image 'NAME' row R: field: problem``;
    ``problem`` is a part of the problem text."""
    with pytest.raises(FormatError) as e:
        call()
    msg = str(e.value)
    head = formats.where(file, image, row, field) + ": "
    assert "\n" not in msg and msg.startswith(head), (head, msg)
    assert problem in msg[len(head):], (problem, msg)


def test_message_shape():
    assert formats.where("A.json", "a.jpg", 3, "hoi") == "A.json: image 'a.jpg' row 3: hoi"
    assert formats.where("A.json", row=2, field_="bbox") == "A.json: row 2: bbox"
    assert str(formats.fail("A.json", "missing key", field_="objects")) == "A.json: objects: missing key"
    assert hoi_eval.EvalInputError is FormatError and data.DataError is FormatError


# ----------------------------------------------------------------------------------------------
# HICO-DET-format annotation: one reader (formats.parse_hico_anno) for the evaluator and HICODet
# ----------------------------------------------------------------------------------------------
def hico_doc():
    """3 images. Classes: 0 hold cup, 1 kick ball, 2 hold ball, 3 hug person."""
    return {
        "annotation": [
            {"boxes_h": [[1, 1, 10, 20], [1, 1, 10, 20]], "boxes_o": [[8, 5, 14, 9], [8, 5, 14, 9]],
             "hoi": [0, 0], "object": [1, 1], "verb": [0, 0]},
            {"boxes_h": [[2, 2, 12, 22], [2, 2, 12, 22], [20, 2, 30, 22]],
             "boxes_o": [[11, 15, 15, 19], [11, 15, 15, 19], [2, 2, 12, 22]],
             "hoi": [1, 2, 3], "object": [2, 2, 0], "verb": [1, 0, 2]},
            {"boxes_h": [], "boxes_o": [], "hoi": [], "object": [], "verb": []},
        ],
        "filenames": ["a.png", "b.png", "c.png"], "empty": [2],
        "objects": ["person", "cup", "ball"], "verbs": ["hold", "kick", "hug"],
        "correspondence": [[0, 1, 0], [1, 2, 1], [2, 2, 0], [3, 0, 2]],
        "size": [[32, 24], [32, 24], [32, 24]], "rare": [1, 3], "non_rare": [0, 2],
    }


def _ann(i, key, value):
    return lambda d: d["annotation"][i].__setitem__(key, value)


# (mutation, readers: "both" = the evaluator and the dataset, "dataset" = HICODet only,
#  image, row, field, problem)
HICO_CASES = [
    (lambda d: d.pop("filenames"), "both", None, None, "filenames", "missing key"),
    (lambda d: d.pop("correspondence"), "both", None, None, "correspondence", "missing key"),
    (lambda d: d.pop("objects"), "dataset", None, None, "objects", "missing key"),
    (lambda d: d["annotation"].pop(), "both", None, None, "filenames", "3 file names for 2 annotations"),
    (lambda d: d.__setitem__("filenames", ["a.png", "a.png", "c.png"]), "both", None, None, "filenames",
     "'a.png' listed twice"),
    (lambda d: d["annotation"][1].pop("verb"), "dataset", "b.png", None, "verb", "missing key"),
    (lambda d: d["annotation"][0].pop("boxes_o"), "both", "a.png", None, "boxes_o", "missing key"),
    (lambda d: d["annotation"][1]["hoi"].pop(), "both", "b.png", None, "boxes_h", "has 3 entries, 'hoi' has 2"),
    (lambda d: d["annotation"][0]["boxes_h"].append([1, 2, 3, 4]), "both", "a.png", None, "boxes_h",
     "has 3 entries, 'hoi' has 2"),
    (lambda d: d["annotation"][1]["boxes_o"].__setitem__(1, [15, 15, 11, 19]), "both", "b.png", 1, "boxes_o",
     "[15.0, 15.0, 11.0, 19.0]: has x2 < x1 or y2 < y1"),
    (lambda d: d["annotation"][0]["boxes_h"].__setitem__(0, [0, 0, 1e39, 9]), "both", "a.png", 0, "boxes_h",
     "[0.0, 0.0, 1e+39, 9.0]: is non-finite in float32"),
    (lambda d: d["annotation"][0]["boxes_h"].__setitem__(1, [1, 2, 3]), "both", "a.png", 1, "boxes_h",
     "expected [x1, y1, x2, y2], got [1, 2, 3]"),
    (lambda d: d["annotation"][0]["hoi"].__setitem__(1, 7), "both", "a.png", 1, "hoi",
     "7: is not an integer in [0, 4)"),
    (lambda d: d["annotation"][0]["object"].__setitem__(0, 2), "both", "a.png", 0, "hoi",
     "class 0 is (object 1, verb 0) but the row says (object 2, verb 0)"),
    (_ann(0, "object", [-1, 1]), "both", "a.png", 0, "object", "-1: is not an integer in [0, 3)"),
    (_ann(1, "hoi", [1, 2, -1]), "both", "b.png", 2, "hoi", "-1: is not an integer in [0, 4)"),
    (_ann(1, "hoi", [1, 0.5, 3]), "both", "b.png", 1, "hoi", "0.5: is not an integer in [0, 4)"),
    (_ann(0, "boxes_o", [[8, 5, 14, 9], [8, 5, 14, float("nan")]]), "both", "a.png", 1, "boxes_o",
     "is non-finite"),
    (lambda d: d.__setitem__("correspondence", [[0, 1, 0], [0, 2, 1], [2, 2, 0], [3, 0, 2]]), "both", None,
     None, "correspondence[1]", "class 0 listed twice"),
    (lambda d: d.__setitem__("correspondence", [[0, -1, 0], [1, 2, 1], [2, 2, 0], [3, 0, 2]]), "both", None,
     None, "correspondence[0]", "index -1 out of range [0, 3)"),
    (lambda d: d.__setitem__("correspondence", [[0, 1, 0], [1, 2, 1], [2, 2, 7], [3, 0, 2]]), "both", None,
     None, "correspondence[2]", "index 7 out of range [0, 3)"),
    (lambda d: d.__setitem__("rare", [1, 1]), "both", None, None, "rare", "index 1 listed twice"),
    (lambda d: d.__setitem__("rare", [-1]), "both", None, None, "rare", "index -1 out of range"),
    (lambda d: d.__setitem__("empty", 1), "both", None, None, "empty", "expected a list of integer indices"),
    (lambda d: d.__setitem__("correspondence", [[0, 1, 0], [1, 2, 1], [2, 2.5, 0], [3, 0, 2]]), "both", None,
     None, "correspondence[2]", "2.5 is not an integer index"),
    (lambda d: d.__setitem__("rare", [9]), "both", None, None, "rare", "index 9 out of range [0, 4)"),
    (lambda d: d.__setitem__("rare", ["x"]), "both", None, None, "rare", "'x' is not an integer index"),
    (lambda d: d.__setitem__("non_rare", [1]), "both", None, None, "non_rare", "class 1 is both rare and non-rare"),
    (lambda d: d.__setitem__("empty", [7]), "both", None, None, "empty", "entry 0: index 7 out of range [0, 3)"),
    (lambda d: d.__setitem__("size", 3), "both", None, None, "size", "expected a list of 3 [w, h]"),
    (lambda d: d["size"].__setitem__(2, [0, 5]), "both", "c.png", None, "size", "expected [w, h] (positive"),
    (lambda d: d["size"].__setitem__(1, [64.5, 64]), "both", "b.png", None, "size", "got [64.5, 64]"),
    (lambda d: d.__setitem__("box_frame", "pixels"), "both", None, None, "box_frame", "'pixels' is not one of"),
    (lambda d: d.__setitem__("prompts", ["a"]), "both", None, None, "prompts", "expected 4 strings"),
    (lambda d: d.__setitem__("zero_shot", [1]), "both", None, None, "zero_shot", "expected an object"),
]


@pytest.mark.parametrize("mutate, readers, image, row, field, problem", HICO_CASES,
                         ids=[f"{c[4]}-{c[5]}" for c in HICO_CASES])
def test_hico_annotation(tmp_path, mutate, readers, image, row, field, problem):
    doc = hico_doc()
    formats.parse_hico_anno(copy.deepcopy(doc), "ANNO.json", names=True)     # the valid file reads
    mutate(doc)
    f = tmp_path / "anno.json"
    f.write_text(json.dumps(doc))
    refused(lambda: data.HICODet(tmp_path, f), str(f), image, row, field, problem)
    if readers == "both":
        refused(lambda: formats.parse_hico_anno(doc, "ANNO.json"), "ANNO.json", image, row, field, problem)
        pred = tmp_path / "pred.json"
        pred.write_text("{}")
        refused(lambda: hoi_eval.evaluate_hico_files(f, pred), str(f), image, row, field, problem)


def test_hico_zero_shot_split_checked(tmp_path):
    doc = hico_doc()
    doc["zero_shot"] = {"rf-uc": [0.5]}
    f, pred = tmp_path / "anno.json", tmp_path / "pred.json"
    f.write_text(json.dumps(doc))
    pred.write_text("{}")
    for call in (lambda: hoi_eval.evaluate_hico_files(f, pred, zero_shot="rf-uc"),
                 lambda: data.HICODet(tmp_path, f, zero_shot="rf-uc")):
        refused(call, str(f), field="zero_shot", problem="split 'rf-uc' must be a list of class indices in [0, 4)")


def test_hico_annotation_top_level():
    refused(lambda: formats.parse_hico_anno([], "ANNO.json"), "ANNO.json", problem="expected a JSON object")
    # the evaluator needs no names: a file without objects / verbs / per-row object and verb reads
    doc = hico_doc()
    for k in ("objects", "verbs"):
        doc.pop(k)
    for a in doc["annotation"]:
        a.pop("verb")
    gt = formats.parse_hico_anno(doc, "ANNO.json")
    assert gt.gt_object is None and gt.num_classes == 4 and gt.gt_class.tolist() == [0, 0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------
# Prediction rows {file_name: [[hoi, score, hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2], ...]}
# ----------------------------------------------------------------------------------------------
R = "[0, 0.5, 0, 0, 9, 9, 20, 0, 29, 9]"
PREDICTION_CASES = [   # (file content, image, row, field, problem)
    ("", None, None, None, "prediction file is empty"),
    ("{", None, None, None, "prediction file is not valid JSON"),
    ("[]", None, None, None, "expected a JSON object"),
    ('{"nope.jpg": []}', "nope.jpg", None, None, "unknown image name"),
    ('{"img_0.jpg": 3}', "img_0.jpg", None, None, "expected a list of rows"),
    ('{"img_0.jpg": [[0, 0.5, 0, 0, 9, 9, 20, 0, 29]]}', "img_0.jpg", 0, None, "expected 10 values"),
    ('{"img_0.jpg": [%s, [0, "x", 0, 0, 9, 9, 20, 0, 29, 9]]}' % R, "img_0.jpg", 1, "score", "not a number"),
    ('{"img_0.jpg": [[3, 0.5, 0, 0, 9, 9, 20, 0, 29, 9]]}', "img_0.jpg", 0, "hoi", "3 out of range [0, 3)"),
    ('{"img_0.jpg": [[-1, 0.5, 0, 0, 9, 9, 20, 0, 29, 9]]}', "img_0.jpg", 0, "hoi", "-1 out of range"),
    ('{"img_0.jpg": [[1.5, 0.5, 0, 0, 9, 9, 20, 0, 29, 9]]}', "img_0.jpg", 0, "hoi", "1.5 is not an integer"),
    ('{"img_1.jpg": [], "img_0.jpg": [%s, [0, NaN, 0, 0, 9, 9, 20, 0, 29, 9]]}' % R, "img_0.jpg", 1, "score",
     "nan: is non-finite in float64"),
    ('{"img_0.jpg": [[0, 0.5, 0, 0, Infinity, 9, 20, 0, 29, 9]]}', "img_0.jpg", 0, "human box",
     "is non-finite in float64"),
    ('{"img_0.jpg": [%s, %s, %s, [0, 0.5, 5, 0, 4, 9, 20, 0, 29, 9]]}' % (R, R, R), "img_0.jpg", 3, "human box",
     "x2 < x1"),
    ('{"img_0.jpg": [[0, 0.5, 0, 0, 9, 9, 20, 9, 29, 0]]}', "img_0.jpg", 0, "object box", "y2 < y1"),
    ('{"img_0.jpg": [[0, 0.5, 0, 0, 9, 9, 20, 0, 29, null]]}', "img_0.jpg", 0, "oy2", "not a number (None)"),
]


def small_hico():
    """2 images, 3 classes (objects 0, 1, 2), one GT pair of class 0 in img_0.jpg."""
    return {"filenames": ["img_0.jpg", "img_1.jpg"],
            "annotation": [{"boxes_h": [[0, 0, 9, 9]], "boxes_o": [[20, 0, 29, 9]], "hoi": [0]},
                           {"boxes_h": [], "boxes_o": [], "hoi": []}],
            "correspondence": [[0, 0, 0], [1, 1, 0], [2, 2, 0]], "empty": [1], "rare": [0], "non_rare": [1, 2]}


@pytest.mark.parametrize("content, image, row, field, problem", PREDICTION_CASES,
                         ids=[c[4] for c in PREDICTION_CASES])
def test_prediction_rows(tmp_path, content, image, row, field, problem):
    p = tmp_path / "PRED.json"
    p.write_text(content)
    refused(lambda: formats.load_predictions(p, small_hico()), str(p), image, row, field, problem)


def test_prediction_rows_in_process():
    anno = small_hico()
    bad = np.array([[0, 0.5, 0, 0, 9, 9, 29, 0, 20, 9]])
    refused(lambda: hoi_eval.evaluate_hico(anno, {"img_0.jpg": bad}), "<predictions>", "img_0.jpg", 0,
            "object box", "x2 < x1")
    refused(lambda: hoi_eval.evaluate_hico(anno, {"img_0.jpg": np.zeros((2, 9))}), "<predictions>",
            "img_0.jpg", problem="expected an array [N, 10]")


# ----------------------------------------------------------------------------------------------
# SWiG-HOI: one reader (formats.parse_swig_gt) for the evaluator and SWiGHOI, and its meta tables
# ----------------------------------------------------------------------------------------------
def swig_doc(meta):
    x = next(i for i in meta["SWIG_INTERACTIONS"] if i["evaluation"] == 1)
    return [{"file_name": "a.jpg", "box_annotations": [{"bbox": [0, 0, 10, 10], "category_id": 0},
                                                       {"bbox": [20, 0, 30, 10], "category_id": x["object_id"]}],
             "hoi_annotations": [{"subject_id": 0, "object_id": 1, "action_id": x["action_id"]}]}]


def _hoi(key, value):
    return lambda a, m: a[0]["hoi_annotations"][0].__setitem__(key, value)


def _unknown_interaction(a, m):
    known = {(x["action_id"], x["object_id"]) for x in m["SWIG_INTERACTIONS"]}
    a[0]["hoi_annotations"][0]["action_id"] = next(v for v in range(407) if (v, 0) not in known)
    a[0]["box_annotations"][1]["category_id"] = 0


SWIG_CASES = [   # (mutation of (annotation, meta), image, row, field, problem); the evaluator and SWiGHOI
    (_hoi("subject_id", -1), "a.jpg", None, "hoi_annotations[0].subject_id", "index -1 out of range"),
    (_hoi("subject_id", 5), "a.jpg", None, "hoi_annotations[0].subject_id", "index 5 out of range [0, 2)"),
    (_hoi("object_id", -2), "a.jpg", None, "hoi_annotations[0].object_id", "index -2 out of range"),
    (_hoi("object_id", 1.5), "a.jpg", None, "hoi_annotations[0].object_id", "1.5 is not an integer"),
    (_hoi("action_id", 3.5), "a.jpg", None, "hoi_annotations[0].action_id", "3.5 is not an integer"),
    (_hoi("action_id", 10 ** 6), "a.jpg", None, "hoi_annotations[0].action_id", "index 1000000 out of range"),
    (lambda a, m: a[0]["hoi_annotations"][0].pop("action_id"), "a.jpg", None, "hoi_annotations[0]",
     "needs subject_id, object_id, action_id"),
    (lambda a, m: a[0]["box_annotations"][1].__setitem__("bbox", [30, 0, 20, 10]), "a.jpg", 1,
     "box_annotations.bbox", "has x2 < x1"),
    (lambda a, m: a[0]["box_annotations"][1].__setitem__("category_id", 1.5), "a.jpg", 1,
     "box_annotations.category_id", "1.5 is not an integer"),
    (lambda a, m: a[0]["box_annotations"][1].pop("bbox"), "a.jpg", None, "box_annotations[1]", "needs 'bbox'"),
    (lambda a, m: a[0].pop("hoi_annotations"), "a.jpg", None, "hoi_annotations", "missing key"),
    (lambda a, m: a[0].__setitem__("width", -3), "a.jpg", None, "size", "positive integers"),
    (lambda a, m: a.append(dict(a[0])), "a.jpg", None, "file_name", "listed twice"),
    (lambda a, m: a[0].pop("file_name"), None, None, "[0].file_name", "missing key"),
]
SWIG_META_CASES = [   # (mutation of the meta, problem)
    (lambda m: m["SWIG_INTERACTIONS"][0].pop("action_id"), "field 'SWIG_INTERACTIONS[0]'"),
    (lambda m: m["SWIG_INTERACTIONS"].__setitem__(1, dict(m["SWIG_INTERACTIONS"][0], id=1)),
     "field 'SWIG_INTERACTIONS[1]': id must be 1 and each (action_id, object_id) listed once"),
    (lambda m: m.__setitem__("SWIG_ACTIONS", {}), "field 'SWIG_ACTIONS'"),
]


@pytest.fixture(scope="module")
def swig_meta():
    return json.loads(SWIG_META.read_text())


def _swig_files(tmp_path, anno, meta):
    (tmp_path / "anno.json").write_text(json.dumps(anno))
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path / "anno.json", tmp_path / "meta.json"


@need_swig
@pytest.mark.parametrize("mutate, image, row, field, problem", SWIG_CASES, ids=[c[4] for c in SWIG_CASES])
def test_swig_annotation(tmp_path, swig_meta, mutate, image, row, field, problem):
    anno, meta = swig_doc(swig_meta), copy.deepcopy(swig_meta)
    mutate(anno, meta)
    a, m = _swig_files(tmp_path, anno, meta)
    refused(lambda: data.SWiGHOI(tmp_path, a, m), str(a), image, row, field, problem)
    refused(lambda: formats.parse_swig_gt(anno, meta, "A.json"), "A.json", image, row, field, problem)


@need_swig
def test_swig_unknown_interaction_refused_by_the_evaluator_skipped_by_the_dataset(tmp_path, swig_meta, capsys):
    anno = swig_doc(swig_meta)
    _unknown_interaction(anno, swig_meta)
    refused(lambda: formats.parse_swig_gt(anno, swig_meta, "A.json"), "A.json", "a.jpg", None,
            "hoi_annotations[0]", "is not a SWiG-HOI interaction")
    a, m = _swig_files(tmp_path, anno, swig_meta)
    ds = data.SWiGHOI(tmp_path, a, m)
    assert "left out 1 unknown-interaction pairs" in capsys.readouterr().err     # told, in one note
    assert ds.skipped == {"no_object": 0, "unknown_interaction": 1} and ds.num_pairs() == 0


@need_swig
def test_swig_no_object_pairs_are_left_out_and_counted_not_wrapped_around(swig_meta):
    a = swig_doc(swig_meta)
    a[0]["hoi_annotations"].append({"subject_id": 0, "object_id": -1, "action_id": 0})
    gt = formats.parse_swig_gt(a, swig_meta, "A")
    assert gt.gt_class.size == 1 and gt.num_no_object == 1


@need_swig
@pytest.mark.parametrize("mutate, problem", SWIG_META_CASES, ids=[c[1] for c in SWIG_META_CASES])
def test_swig_meta(tmp_path, swig_meta, mutate, problem):
    meta = copy.deepcopy(swig_meta)
    mutate(meta)
    a, m = _swig_files(tmp_path, swig_doc(swig_meta), meta)
    for call in (lambda: formats.load_swig_meta(m), lambda: data.SWiGHOI(tmp_path, a, m),
                 lambda: hoi_eval.evaluate_swig_files(a, a, m)):
        refused(call, str(m), problem="SWiG meta file: " + problem)


# ----------------------------------------------------------------------------------------------
# V-COCO: the official VSRL file + COCO instances (the evaluator), vsrl_eval detections
# ----------------------------------------------------------------------------------------------
def vcoco_docs():
    coco = {"images": [{"id": 1, "width": 100, "height": 100}],
            "annotations": [{"id": 11, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100,
                             "iscrowd": 0},
                            {"id": 21, "image_id": 1, "category_id": 2, "bbox": [20, 0, 10, 10], "area": 100,
                             "iscrowd": 0}],
            "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "cup"}]}
    vsrl = [dict(action_name="hold", role_name=["agent", "obj"], label=[1], role_object_id=[11, 21],
                 include=[[], []], image_id=[1], ann_id=[11])]
    dets = [{"image_id": 1, "person_box": [0, 0, 9, 9], "hold_agent": 0.9, "hold_obj": [20, 0, 29, 9, 0.9]}]
    return vsrl, coco, dets


VCOCO_GT_CASES = [   # (mutation of (vsrl, coco), file "V" / "C", image, field, problem)
    (lambda v, c: v[0].__setitem__("label", [2]), "V", None, "hold.label", "must hold 0 or 1, got 2"),
    (lambda v, c: v[0].pop("label"), "V", None, "[0]", "missing key 'label'"),
    (lambda v, c: v[0].__setitem__("ann_id", [11.5]), "V", None, "hold.ann_id", "expected integers, got 11.5"),
    (lambda v, c: v[0].__setitem__("role_object_id", [11, 21.5]), "V", None, "hold.role_object_id",
     "expected integers, got 21.5"),
    (lambda v, c: v.append(dict(v[0])), "V", None, "[1].action_name", "naming each action once"),
    (lambda v, c: v[0].__setitem__("role_name", ["agent", "obj", "obj"]), "V", None, "hold.role_name",
     "distinct roles"),
    (lambda v, c: v[0].__setitem__("role_object_id", [11, 99]), "V", 1, "hold.role_object_id",
     "role object 99 is not a valid annotation of that image in"),
    (lambda v, c: v[0].update(ann_id=[12], role_object_id=[12, 21]), "V", 1, None,
     "ann_id 12 is not an annotation of that image"),
    (lambda v, c: v[0].__setitem__("role_object_id", [12, 21]), "V", None, "hold.role_object_id",
     "role_object_id[:, 0] must equal ann_id"),
    (lambda v, c: c["annotations"][1].__setitem__("bbox", [20, 0, float("nan"), 10]), "C", 1, "annotation 21.bbox",
     "is non-finite in float32"),
    (lambda v, c: c["annotations"][1].__setitem__("bbox", [20, 0, "x", 10]), "C", 1, None,
     "annotation 21: missing or malformed field"),
    (lambda v, c: c["images"][0].__setitem__("width", -5), "C", 1, "width/height", "must be positive numbers"),
    (lambda v, c: c["images"].append(dict(c["images"][0])), "C", 1, None, "listed twice in 'images'"),
    (lambda v, c: c["annotations"][1].__setitem__("image_id", [1]), "C", None, "annotations[1].image_id",
     "is not an integer index"),
    (lambda v, c: c.__setitem__("annotations", 7), "C", None, None, "'annotations' (lists)"),
]
VCOCO_DET_CASES = [   # (mutation of the first detection, image, field, problem)
    (lambda d: d.__setitem__("image_id", 7), 7, "image_id", "image not in the V-COCO ground truth"),
    (lambda d: d.__setitem__("image_id", 1.5), None, "image_id", "expected an object with an integer image_id"),
    (lambda d: d.__setitem__("person_box", [9, 0, 0, 9]), 1, "person_box", "x2 < x1"),
    (lambda d: d.__setitem__("person_box", [0, 0, 9]), 1, "person_box", "expected 4 numbers"),
    (lambda d: d.__setitem__("hold_obj", [1, 2]), 1, "hold_obj", "expected [x1, y1, x2, y2, score]"),
    (lambda d: d.__setitem__("hold_agent", float("inf")), 1, "hold_agent", "inf: is non-finite in float32"),
    (lambda d: d.__setitem__("hold_agent", "0.5"), 1, "hold_agent", "expected a score"),
]


@pytest.mark.parametrize("mutate, which, image, field, problem", VCOCO_GT_CASES, ids=[c[4] for c in VCOCO_GT_CASES])
def test_vcoco_ground_truth(tmp_path, mutate, which, image, field, problem):
    vsrl, coco, dets = vcoco_docs()
    mutate(vsrl, coco)
    refused(lambda: hoi_eval.parse_vcoco_gt(vsrl, coco, "V.json", "C.json"), f"{which}.json", image, None, field,
            problem)
    files = {}
    for name, obj in (("V", vsrl), ("C", coco), ("D", dets)):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(obj))
    refused(lambda: hoi_eval.evaluate_vcoco_files(files["V"], files["C"], files["D"]), str(files[which]),
            image, None, field, problem)


@pytest.mark.parametrize("mutate, image, field, problem", VCOCO_DET_CASES, ids=[c[3] for c in VCOCO_DET_CASES])
def test_vcoco_detections(mutate, image, field, problem):
    vsrl, coco, dets = vcoco_docs()
    gt = hoi_eval.parse_vcoco_gt(vsrl, coco)
    mutate(dets[0])
    refused(lambda: formats.load_vcoco_dets(dets, gt, "DETS.json"), "DETS.json", image, 0, field, problem)


# ----------------------------------------------------------------------------------------------
# fredzzhang's V-COCO (instances_vcoco_*.json): data.VCOCO and the box AP read it
# ----------------------------------------------------------------------------------------------
def vcoco_pairs_doc():
    return {"annotations": [{"file_name": "a.jpg", "boxes_h": [[0, 0, 9, 9]], "boxes_o": [[20, 0, 29, 9]],
                             "actions": [0], "objects": [2]}], "classes": ["hold obj", "look obj"],
            "objects": ["background", "person", "cup"], "images": [1]}


VCOCO_PAIRS_CASES = [   # (mutation, image, row, field, problem)
    (lambda a: a.__setitem__("classes", ["hold obj", "hold obj"]), None, None, "classes", "'hold obj' listed twice"),
    (lambda a: a.__setitem__("images", [1.5]), None, None, "images", "entry 0: 1.5 is not an integer index"),
    (lambda a: a.__setitem__("action_to_object", [[99], [1]]), None, None, "action_to_object[0]",
     "index 99 out of range"),
    (lambda a: a["annotations"][0].__setitem__("actions", [-1]), "a.jpg", 0, "actions", "index -1 out of range"),
    (lambda a: a["annotations"][0].__setitem__("objects", [0]), "a.jpg", 0, "objects", "index 0 out of range [1, 3)"),
    (lambda a: a["annotations"][0].pop("boxes_o"), "a.jpg", None, "boxes_o", "missing key"),
    (lambda a: a["annotations"][0].__setitem__("boxes_o", []), "a.jpg", None, "boxes_o",
     "0 object boxes for 1 human boxes"),
    (lambda a: a.pop("classes"), None, None, "classes", "missing key or not a list"),
]


@pytest.mark.parametrize("mutate, image, row, field, problem", VCOCO_PAIRS_CASES,
                         ids=[c[4] for c in VCOCO_PAIRS_CASES])
def test_vcoco_pairs(tmp_path, mutate, image, row, field, problem):
    doc = vcoco_pairs_doc()
    mutate(doc)
    f = tmp_path / "anno.json"
    f.write_text(json.dumps(doc))
    refused(lambda: data.VCOCO(tmp_path, f), str(f), image, row, field, problem)
    refused(lambda: detector_ap.load_detector_gt(f), str(f), image, row, field, problem)


# ----------------------------------------------------------------------------------------------
# Detection files: per image {file_name: {boxes, scores, labels}} and COCO results; read by
# data.load_detections (training, infer.py) and by the box AP
# ----------------------------------------------------------------------------------------------
I = "img_000001.jpg"
PER_IMAGE_CASES = [   # (file content, image, row, field, problem)
    ("{", None, None, None, "detection file is not valid JSON"),
    ("", None, None, None, "detection file is empty"),
    ("3", None, None, None, "expected a JSON object"),
    ('{"%s": [[1, 2, 3, 4]]}' % I, I, None, None, "expected {boxes, scores, labels}"),
    ('{"%s": {"boxes": [], "scores": []}}' % I, I, None, "labels", "missing key"),
    ('{"%s": 3}' % I, I, None, None, "expected {boxes, scores, labels}"),
    ('{"%s": {"boxes": [[5, 0, 4, 10]], "scores": [0.5], "labels": [0]}}' % I, I, 0, "boxes", "has x2 < x1"),
    ('{"%s": {"boxes": [[0, 0, 4]], "scores": [0.5], "labels": [0]}}' % I, I, 0, "boxes",
     "expected [x1, y1, x2, y2] (4 numbers), got [0, 0, 4]"),
    ('{"%s": {"boxes": [[NaN, 0, 4, 10]], "scores": [0.5], "labels": [0]}}' % I, I, 0, "boxes", "is non-finite"),
    ('{"%s": {"boxes": [[0, 0, 1e39, 10]], "scores": [0.5], "labels": [0]}}' % I, I, 0, "boxes",
     "is non-finite in float32"),
    ('{"%s": {"boxes": [[0, 0, 4, 10]], "scores": [Infinity], "labels": [0]}}' % I, I, 0, "scores",
     "inf: is non-finite in float32"),
    ('{"%s": {"boxes": [[0, 0, 4, 10]], "scores": [1e39], "labels": [0]}}' % I, I, 0, "scores",
     "1e+39: is non-finite in float32"),
    ('{"%s": {"boxes": [[0, 0, 4, 10]], "scores": [0.5, 0.2], "labels": [0]}}' % I, I, None, "scores",
     "expected 1 numbers"),
    ('{"%s": {"boxes": [[0, 0, 4, 10]], "scores": [0.5], "labels": [80]}}' % I, I, 0, "labels",
     "index 80 out of range [0, 80)"),
    ('{"%s": {"boxes": [[0, 0, 4, 10]], "scores": [0.5], "labels": [0.5]}}' % I, I, 0, "labels",
     "0.5 is not an integer index"),
    ('{"%s": {"boxes": [[true, 0, 4, 10]], "scores": [0.5], "labels": [0]}}' % I, None, None, None,
     "boxes[0][0]': true is a boolean; booleans are not numbers"),
    ('{"%s": {"boxes": [[0, 0, 4, 10]], "scores": [false], "labels": [0]}}' % I, None, None, None,
     "scores[0]': false is a boolean"),
    ('{"%s": {"boxes": [[0, 0, 4, 10], [0, 0, 4, 10]], "scores": [0.5, 0.5], "labels": [0, true]}}' % I, None,
     None, None, "labels[1]': true is a boolean"),
]
COCO_CASES = [   # (file content, image, row, field, problem)
    ('[3]', None, 0, None, "expected an object"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]}]', None, 0, "score", "missing key"),
    ('[{"image_id": 9, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 1}]', None, 0, "image_id",
     "unknown image id 9"),
    ('[{"image_id": true, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 1}]', None, None, None,
     "[0].image_id': true is a boolean"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, true, 4], "score": 1}]', None, None, None,
     "[0].bbox[2]': true is a boolean"),
    ('[{"image_id": 1, "category_id": 12, "bbox": [0, 0, 4, 4], "score": 1}]', I, 0, "category_id",
     "12 is not a category id"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4], "score": 1}]', I, 0, "bbox", "expected [x, y, w, h]"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 4], "score": 1}]', I, 0, "bbox", "negative width"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, NaN, 1, 4], "score": 1}]', I, 0, "bbox", "non-finite"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 4], "score": "1"}]', I, 0, "score",
     "'1' is not a finite number"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 4], "score": false}]', None, None, None,
     "field '[0].score': false is a boolean"),
]


def box_ap_world(tmp_path):
    """A synthetic-world-style (continuous frame) annotation of two images, one pair each."""
    doc = {"name": "synthetic", "filenames": [I, "img_000002.jpg"],
           "annotation": [{"boxes_h": [[0, 0, 10, 10]], "boxes_o": [[20, 0, 30, 10]], "hoi": [0], "object": [1],
                           "verb": [0]}] * 2,
           "objects": data.COCO80_NAMES, "verbs": ["hold"], "correspondence": [[0, 1, 0]]}
    f = tmp_path / "anno.json"
    f.write_text(json.dumps(doc))
    return f


@pytest.mark.parametrize("content, image, row, field, problem", PER_IMAGE_CASES + COCO_CASES,
                         ids=[c[4] for c in PER_IMAGE_CASES + COCO_CASES])
def test_detection_files(tmp_path, capsys, content, image, row, field, problem):
    d = tmp_path / "dets.json"
    d.write_text(content)
    refused(lambda: data.load_detections(d, num_labels=80, image_ids={1: I}), str(d), image, row, field, problem)
    anno = box_ap_world(tmp_path)
    refused(lambda: detector_ap.evaluate_detector(anno, d), str(d), image, row, field, problem)
    # the command line: that one line, exit status 2, no output and no temp file left
    before = (anno.read_bytes(), d.read_bytes())
    out = tmp_path / "r.json"
    assert hoi_eval.main(["detector", "--anno", str(anno), "--detections", str(d), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {d}: ") and err.count("\n") == 1 and problem in err, err
    assert not out.exists() and (anno.read_bytes(), d.read_bytes()) == before
    assert {p.name for p in tmp_path.iterdir()} == {"anno.json", "dets.json"}


def test_detection_files_whole_file(tmp_path):
    d = tmp_path / "dets.json"
    d.write_text(json.dumps({"a.png": {"boxes": [[1, 2, 3, 4]], "scores": [1], "labels": [0]}}))
    refused(lambda: data.load_detections(d, filenames=["q.png"]), str(d), problem="none of the 1 requested")
    refused(lambda: data.load_detections(d, frame="coco", into="hico1"), str(d), problem="box frame 'coco'")
    refused(lambda: detector_ap.evaluate_detector(box_ap_world(tmp_path), d), str(d), "a.png",
            problem="unknown image name (not in the annotation file)")
    d.write_text("[]")
    refused(lambda: data.load_detections(d), str(d), problem="COCO results format needs image_ids")


# ----------------------------------------------------------------------------------------------
# Numbers that are not numbers (issue 24 hole 4): every numeric field of every format, one table.
# Floats are checked in the dtype the evaluator computes in (1e39 is inf in float32, a number in
# float64); boxes for order; integer fields refuse every non-integer; V-COCO's NaN = not predicted.
# ----------------------------------------------------------------------------------------------
def _number_formats(meta):
    """{format: (docs, reader(docs))}; docs are mutated by the table's setters."""
    fns = ["img_0.jpg", "img_1.jpg"]
    vsrl, coco, dets = vcoco_docs()
    out = {
        "hico": (hico_doc(), lambda d: formats.parse_hico_anno(d, "ANNO.json", names=True)),
        "vcoco_gt": ((vsrl, coco), lambda d: hoi_eval.parse_vcoco_gt(*d, "V.json", "C.json")),
        "vcoco_dets": (dets, lambda d: formats.load_vcoco_dets(d, hoi_eval.parse_vcoco_gt(vsrl, coco), "DETS.json")),
        "pred": ({"img_0.jpg": [[0, 0.5, 0, 0, 9, 9, 20, 0, 29, 9]]},
                 lambda d: formats.prediction_rows(d, fns, {f: i for i, f in enumerate(fns)}, 3, "PRED.json")),
        "vcoco_pairs": (vcoco_pairs_doc(), lambda d: formats.parse_vcoco_pairs(d, "P.json")),
        "per_image": ({I: {"boxes": [[0, 0, 4, 10]], "scores": [0.5], "labels": [0]}},
                      lambda d: formats.image_detections(d[I], "D.json", I, 80)),
        "coco_results": ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 1}],
                         lambda d: formats.coco_result(d[0], 0, "D.json", {1: I}, {1: 0})),
    }
    if meta is not None:
        out["swig"] = (swig_doc(meta), lambda d: formats.parse_swig_gt(d, meta, "A.json"))
    return out


def _at(*path):
    """A setter docs[path[0]][path[1]]... = value."""
    def set_(d, v):
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = v
    return set_


NOT_INT = "is not an integer index"
# (format, setter, (file, image, row, field), kind, good box (box kinds) / problem (int kind))
# kinds: f32 / f64 (a float), box32 / box64 (a box), int, nan32 / nanbox32 (V-COCO: NaN = not predicted)
NUMBER_FIELDS = [
    ("hico", _at("annotation", 0, "boxes_h", 0), ("ANNO.json", "a.png", 0, "boxes_h"), "box32", [1, 1, 10, 20]),
    ("hico", _at("annotation", 0, "boxes_o", 0), ("ANNO.json", "a.png", 0, "boxes_o"), "box32", [8, 5, 14, 9]),
    ("hico", _at("annotation", 0, "hoi", 0), ("ANNO.json", "a.png", 0, "hoi"), "int", "is not an integer in [0, 4)"),
    ("hico", _at("annotation", 0, "object", 0), ("ANNO.json", "a.png", 0, "object"), "int", "not an integer in [0, 3)"),
    ("hico", _at("annotation", 0, "verb", 0), ("ANNO.json", "a.png", 0, "verb"), "int", "not an integer in [0, 3)"),
    ("hico", _at("size", 0, 0), ("ANNO.json", "a.png", None, "size"), "int", "positive integers"),
    ("swig", _at(0, "box_annotations", 1, "bbox"), ("A.json", "a.jpg", 1, "box_annotations.bbox"), "box32",
     [20, 0, 30, 10]),
    ("swig", _at(0, "box_annotations", 1, "category_id"), ("A.json", "a.jpg", 1, "box_annotations.category_id"),
     "int", NOT_INT),
    *[("swig", _at(0, "hoi_annotations", 0, k), ("A.json", "a.jpg", None, f"hoi_annotations[0].{k}"), "int", NOT_INT)
      for k in ("subject_id", "object_id", "action_id")],
    ("swig", _at(0, "width"), ("A.json", "a.jpg", None, "size"), "int", "positive integers"),
    *[("vcoco_gt", _at(0, 0, k, i), ("V.json", None, None, f"hold.{k}"), "int", "expected integers, got")
      for k, i in (("image_id", 0), ("ann_id", 0), ("label", 0), ("role_object_id", 1))],
    ("vcoco_gt", _at(1, "images", 0, "width"), ("C.json", 1, None, "width/height"), "f32", None),
    ("vcoco_gt", _at(1, "images", 0, "height"), ("C.json", 1, None, "width/height"), "f32", None),
    ("vcoco_gt", _at(1, "annotations", 1, "bbox", 2), ("C.json", 1, None, "annotation 21.bbox"), "f32", None),
    ("vcoco_gt", _at(1, "annotations", 1, "area"), ("C.json", 1, None, "annotation 21.area"), "f64", None),
    ("vcoco_gt", _at(1, "annotations", 1, "image_id"), ("C.json", None, None, "annotations[1].image_id"), "int",
     NOT_INT),
    ("vcoco_gt", _at(1, "annotations", 1, "id"), ("C.json", 1, None, None), "int", "missing or malformed field"),
    ("vcoco_dets", _at(0, "image_id"), ("DETS.json", None, 0, "image_id"), "int",
     {"nan": "with an integer image_id", "-inf": "with an integer image_id"}),     # 1e39: an unknown image
    ("vcoco_dets", _at(0, "person_box"), ("DETS.json", 1, 0, "person_box"), "box32", [0, 0, 9, 9]),
    ("vcoco_dets", _at(0, "hold_agent"), ("DETS.json", 1, 0, "hold_agent"), "nan32", None),
    ("vcoco_dets", _at(0, "hold_obj", 4), ("DETS.json", 1, 0, "hold_obj"), "nan32", None),
    ("vcoco_dets", lambda d, b: d[0].__setitem__("hold_obj", b + [0.9]), ("DETS.json", 1, 0, "hold_obj"), "nanbox32",
     [20, 0, 29, 9]),
    ("pred", _at("img_0.jpg", 0, 0), ("PRED.json", "img_0.jpg", 0, "hoi"), "int",
     {"1e39": "out of range [0, 3)", "nan": "is non-finite in float64", "-inf": "is non-finite in float64"}),
    ("pred", _at("img_0.jpg", 0, 1), ("PRED.json", "img_0.jpg", 0, "score"), "f64", None),
    ("pred", lambda d, b: d["img_0.jpg"][0].__setitem__(slice(2, 6), b), ("PRED.json", "img_0.jpg", 0, "human box"),
     "box64", [0, 0, 9, 9]),
    ("pred", lambda d, b: d["img_0.jpg"][0].__setitem__(slice(6, 10), b), ("PRED.json", "img_0.jpg", 0,
                                                                           "object box"), "box64", [20, 0, 29, 9]),
    ("vcoco_pairs", _at("annotations", 0, "boxes_h", 0), ("P.json", "a.jpg", 0, "boxes_h"), "box32", [0, 0, 9, 9]),
    ("vcoco_pairs", _at("annotations", 0, "boxes_o", 0), ("P.json", "a.jpg", 0, "boxes_o"), "box32", [20, 0, 29, 9]),
    ("vcoco_pairs", _at("annotations", 0, "actions", 0), ("P.json", "a.jpg", 0, "actions"), "int", NOT_INT),
    ("vcoco_pairs", _at("annotations", 0, "objects", 0), ("P.json", "a.jpg", 0, "objects"), "int", NOT_INT),
    ("vcoco_pairs", _at("images", 0), ("P.json", None, None, "images"), "int", NOT_INT),
    ("per_image", _at(I, "boxes", 0), ("D.json", I, 0, "boxes"), "box32", [0, 0, 4, 10]),
    ("per_image", _at(I, "scores", 0), ("D.json", I, 0, "scores"), "f32", None),
    ("per_image", _at(I, "labels", 0), ("D.json", I, 0, "labels"), "int", NOT_INT),
    ("coco_results", _at(0, "bbox"), ("D.json", I, 0, "bbox"), "box32", [0, 0, 4, 4]),
    ("coco_results", _at(0, "score"), ("D.json", I, 0, "score"), "f32", None),
    ("coco_results", _at(0, "image_id"), ("D.json", None, 0, "image_id"), "int", "unknown image id"),
    ("coco_results", _at(0, "category_id"), ("D.json", I, 0, "category_id"), "int", "is not a category id"),
]
VALUES = {"1e39": 1e39, "nan": float("nan"), "-inf": -float("inf"), "inf": float("inf")}


def _number_cases():
    """(format, setter, where, value or box, expected problem, None = accepted) for each field x value."""
    for fmt, set_, at, kind, extra in NUMBER_FIELDS:
        dtype = "float64" if kind[-2:] == "64" else "float32"
        for label, v in VALUES.items():
            if label == "inf" and kind not in ("f64", "box64"):
                continue                    # +inf: where 1e39 is not already infinite
            problem = f"is non-finite in {dtype}"
            if kind == "int":               # an integral 1e39 is out of range; extra: one problem or {value: problem}
                problem = extra.get(label) if isinstance(extra, dict) else \
                    "out of range" if label == "1e39" and extra == NOT_INT else extra
                if problem is None:
                    continue
            if kind in ("f64", "box64") and label == "1e39" or kind == "nan32" and label == "nan":
                problem = None              # a float64 number / V-COCO's "not predicted"
            value = v if "box" not in kind else [extra[0], extra[1], v, extra[3]]
            yield fmt, set_, at, value, problem, f"{fmt}-{at[3]}-{label}"
            if kind == "nanbox32" and label == "nan":
                yield fmt, set_, at, [v] * 4, None, f"{fmt}-{at[3]}-all-nan"     # no role object: legal
        if "box" in kind:
            x1, y1, x2, y2 = extra
            bad = [x2, y1, x1, y2] if fmt != "coco_results" else [x1, y1, -1, y2]
            yield fmt, set_, at, bad, "negative width" if fmt == "coco_results" else "has x2 < x1 or y2 < y1", \
                f"{fmt}-{at[3]}-x2<x1"


NUMBER_CASES = list(_number_cases())


@pytest.mark.parametrize("fmt, set_, at, value, problem", [c[:5] for c in NUMBER_CASES],
                         ids=[c[5] for c in NUMBER_CASES])
def test_numbers_that_are_not_numbers(fmt, set_, at, value, problem):
    if fmt == "swig" and not SWIG_META.is_file():
        pytest.skip("shared SWiG-HOI meta absent")
    docs, read = _number_formats(json.loads(SWIG_META.read_text()) if fmt == "swig" else None)[fmt]
    set_(docs, value)
    if problem is None:
        read(docs)                          # accepted
    else:
        refused(lambda: read(docs), *at, problem=problem)


def test_numbers_cli_one_line_exit_2(tmp_path):
    """Two of the table's cases through the command line: exit 2, one line, no traceback, nothing written."""
    vsrl, coco, dets = vcoco_docs()
    dets[0]["person_box"] = [0, 0, 1e39, 9]
    files = {}
    for name, obj in (("V", vsrl), ("C", coco), ("D", dets)):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(obj))
    clicheck.refused(hoi_eval.main, ["vcoco", "--vsrl", str(files["V"]), "--coco", str(files["C"]), "--pred",
                                     str(files["D"])], [tmp_path],
                     [f"{files['D']}: image '1' row 0: person_box: [0.0, 0.0, 1e+39, 9.0]: is non-finite in float32"])
    dets[0]["person_box"], dets[0]["hold_obj"] = [0, 0, 9, 9], [20, float("nan"), 29, 9, 0.9]
    files["D"].write_text(json.dumps(dets))
    clicheck.refused(clicheck.python("eval.py", "vcoco", "--vsrl", str(files["V"]), "--coco", str(files["C"]),
                                     "--pred", str(files["D"])), folders=[tmp_path],
                     needles=[f"{files['D']}: image '1' row 0: hold_obj: [20.0, nan, 29.0, 9.0]: is non-finite"])
