"""Tests of data.py: datasets, detections, pair bounding, synthetic world.

Expected numbers are hand-computed from the small hand-made inputs below, or counted from
the real annotation files in shared/data (tests needing those skip when they are absent).
"""
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import (ClassSpace, DataError, HICODet, ImageError, SWiGHOI, VCOCO, collate,
                  gt_detections, load_detections, save_detections, select_boxes)

SHARED = data.data_root()
HICO_TEST = SHARED / "hicodet" / "instances_test2015.json"
VCOCO_TEST = SHARED / "vcoco" / "instances_vcoco_test.json"
SWIG_META = SHARED / "swig_hoi" / "derived" / "swig_v1_meta.json"
need_hico = pytest.mark.skipif(not HICO_TEST.is_file(), reason="shared HICO-DET data absent")
need_vcoco = pytest.mark.skipif(not VCOCO_TEST.is_file(), reason="shared V-COCO data absent")
need_swig = pytest.mark.skipif(not SWIG_META.is_file(), reason="shared SWiG-HOI meta absent")


# ------------------------------------------------------------------------------------------
# a tiny hand-made HICO-DET style world: 4 classes over objects [person, cup, ball]
# ------------------------------------------------------------------------------------------

def tiny_hico(tmp_path, mutate=None, with_images=True):
    """3 images. Classes: 0 hold cup, 1 kick ball, 2 hold ball, 3 hug person."""
    doc = {
        "annotation": [
            {"boxes_h": [[1, 1, 10, 20], [1, 1, 10, 20]], "boxes_o": [[8, 5, 14, 9], [8, 5, 14, 9]],
             "hoi": [0, 0], "object": [1, 1], "verb": [0, 0]},
            {"boxes_h": [[2, 2, 12, 22], [2, 2, 12, 22], [20, 2, 30, 22]],
             "boxes_o": [[11, 15, 15, 19], [11, 15, 15, 19], [2, 2, 12, 22]],
             "hoi": [1, 2, 3], "object": [2, 2, 0], "verb": [1, 0, 2]},
            {"boxes_h": [], "boxes_o": [], "hoi": [], "object": [], "verb": []},
        ],
        "filenames": ["a.png", "b.png", "c.png"],
        "empty": [2],
        "objects": ["person", "cup", "ball"],
        "verbs": ["hold", "kick", "hug"],
        "correspondence": [[0, 1, 0], [1, 2, 1], [2, 2, 0], [3, 0, 2]],
        "size": [[32, 24], [32, 24], [32, 24]],
        "rare": [1, 3],
        "non_rare": [0, 2],
    }
    # image a lists the same pair twice with class 0 (duplicate rows are allowed)
    if mutate:
        mutate(doc)
    f = tmp_path / "anno.json"
    f.write_text(json.dumps(doc))
    if with_images:
        (tmp_path / "img").mkdir(exist_ok=True)
        for i, name in enumerate(doc["filenames"]):
            Image.new("RGB", (32, 24), (i * 50, 10, 10)).save(tmp_path / "img" / name)
    return tmp_path / "img", f


def test_class_space_round_trip_and_mask():
    cs = ClassSpace(name="t", prompts=["p0", "p1", "p2"], object_names=["person", "cup", "ball"],
                    hoi_object=[[1], [2], [0, 2]], hoi_verb=[0, 1, -1], verb_names=["hold", "kick"],
                    person_label=0, rare=[2], unseen=[1])
    d = dataclasses.asdict(cs)
    assert d == cs.asdict()
    assert ClassSpace.from_dict(json.loads(json.dumps(d))) == cs
    m = cs.object_mask()
    assert m.dtype == torch.bool and m.shape == (3, 3)
    assert m.tolist() == [[False, True, False], [False, False, True], [True, False, True]]
    with pytest.raises(ValueError, match="hoi_object"):
        ClassSpace(name="t", prompts=["a"], object_names=["x"], hoi_object=[[3]], hoi_verb=[0],
                   verb_names=["v"])
    with pytest.raises(ValueError, match="unknown keys"):
        ClassSpace.from_dict({**d, "bogus": 1})


def test_hicodet_items(tmp_path):
    root, f = tiny_hico(tmp_path)
    ds = HICODet(root, f)
    assert len(ds) == 3 and ds.filenames == ["a.png", "b.png", "c.png"]
    img, t = ds[1]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (32, 24)
    assert t["filename"] == "b.png" and t["index"] == 1 and t["size"] == (32, 24)
    assert t["boxes_h"].dtype == torch.float32 and t["boxes_h"].shape == (3, 4)
    assert t["boxes_o"][2].tolist() == [2, 2, 12, 22]
    assert t["hoi"].tolist() == [1, 2, 3] and t["object"].tolist() == [2, 2, 0]
    assert t["verb"].tolist() == [1, 0, 2] and t["hoi"].dtype == torch.long
    _, t2 = ds[2]
    assert t2["boxes_h"].shape == (0, 4) and t2["hoi"].shape == (0,)
    cs = ds.class_space()
    assert cs.name == "hicodet" and cs.num_classes == 4 and cs.person_label == 0
    assert cs.hoi_object == [[1], [2], [2], [0]] and cs.hoi_verb == [0, 1, 0, 2]
    assert cs.prompts[0] == "a photo of a person hold a cup"  # built from names (no prompts key)
    assert cs.rare == [1, 3] and cs.unseen == []
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == 2 and [t["index"] for t in targets] == [0, 1]
    assert HICODet(root, f, skip_empty=True).filenames == ["a.png", "b.png"]
    with pytest.raises(IndexError):
        ds[3]


def test_hicodet_images_lazy_and_errors(tmp_path):
    root, f = tiny_hico(tmp_path, with_images=False)
    ds = HICODet(tmp_path / "nowhere", f)  # constructing does not touch images
    assert ds.target(0, size=(32, 24))["hoi"].tolist() == [0, 0]
    with pytest.raises(ImageError, match=r"a\.png.*dataset index 0") as e:
        ds[0]
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "b.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match=r"cannot read image .*b\.png.*dataset index 1"):
        HICODet(tmp_path / "img", f)[1]


@pytest.mark.parametrize("mutate, pattern", [
    (lambda d: d["annotation"][1].pop("verb"), r"image 'b.png': field 'verb': missing key"),
    (lambda d: d["annotation"][1]["boxes_o"].__setitem__(1, [15, 15, 11, 19]),
     r"image 'b.png': field 'boxes_o\[1\]'.*x2<x1"),
    (lambda d: d["annotation"][0]["hoi"].__setitem__(1, 7),
     r"image 'a.png': field 'hoi\[1\]': index 7 out of range \[0, 4\)"),
    (lambda d: d["annotation"][0]["object"].__setitem__(0, 2),
     r"image 'a.png': field 'hoi\[0\]': class 0 is \(object 1, verb 0\)"),
    (lambda d: d["annotation"][1]["hoi"].pop(), r"image 'b.png': field 'hoi': has 2 entries, expected 3"),
    (lambda d: d.pop("correspondence"), r"field 'correspondence': missing key"),
    (lambda d: d["size"].__setitem__(2, [0, 5]), r"image 'c.png': field 'size'"),
])
def test_hicodet_malformed(tmp_path, mutate, pattern):
    root, f = tiny_hico(tmp_path, mutate=mutate, with_images=False)
    with pytest.raises(DataError, match=pattern) as e:
        HICODet(root, f)
    assert str(f) in str(e.value)


def test_zero_shot_filter(tmp_path):
    root, f = tiny_hico(tmp_path)
    # unseen = {2}: image b keeps rows 1 and 3 (its pair with classes 1 and 2 keeps class 1)
    ds = HICODet(root, f, zero_shot=[2])
    assert ds.filenames == ["a.png", "b.png"]  # c (no label) dropped
    t = ds[1][1]
    assert t["hoi"].tolist() == [1, 3] and t["boxes_o"].tolist() == [[11, 15, 15, 19], [2, 2, 12, 22]]
    assert ds.class_space().unseen == [2]
    # unseen = {0}: image a has only class 0 -> dropped
    assert HICODet(root, f, zero_shot=[0]).filenames == ["b.png"]
    # split name looked up in the file's zero_shot dict, short or long name
    root, f = tiny_hico(tmp_path, mutate=lambda d: d.update(zero_shot={"rf-uc": [1, 3], "uv": [1]}))
    assert HICODet(root, f, zero_shot="rf-uc").class_space().unseen == [1, 3]
    assert HICODet(root, f, zero_shot="unseen_verb").class_space().unseen == [1]
    with pytest.raises(DataError, match="no split 'nf-uc'"):
        HICODet(root, f, zero_shot="nf-uc")
    with pytest.raises(DataError, match="out of range"):
        HICODet(root, f, zero_shot=[9])


def test_few_shot_rule_exact():
    # I0: [0], I1: [1, 2], I2: [2]; k=1: class 0 -> I0, class 1 -> I1 (brings class 2) -> done
    labels = [np.array([0]), np.array([1, 2]), np.array([2])]
    for seed in range(5):
        assert data._few_shot_indices(labels, 3, 1, seed) == [0, 1]
        assert data._few_shot_indices(labels, 3, 2, seed) == [0, 1, 2]  # class 2 needs I2 too
    # properties on a random long-tailed set
    rng = np.random.default_rng(0)
    labels = [rng.choice(6, size=rng.integers(1, 4), p=[.4, .3, .15, .1, .04, .01]) for _ in range(300)]
    total = np.bincount(np.concatenate(labels), minlength=6)
    for k in (1, 4, 16):
        keep = data._few_shot_indices(labels, 6, k, seed=3)
        got = np.bincount(np.concatenate([labels[i] for i in keep]), minlength=6)
        assert (got >= np.minimum(total, k)).all()
        for c in np.nonzero(total < k)[0]:  # rarer than k: keeps every image with c
            assert all(i in keep for i, lab in enumerate(labels) if c in lab)
        assert keep == data._few_shot_indices(labels, 6, k, seed=3)
    assert data._few_shot_indices(labels, 6, 4, 3) != data._few_shot_indices(labels, 6, 4, 4)


@need_hico
def test_real_hico_test_file():
    raw = json.loads(HICO_TEST.read_text())
    ds = HICODet("/nonexistent", HICO_TEST)
    assert len(ds) == 9658 and ds.num_pairs() == 33405
    cs = ds.class_space()
    assert cs.num_classes == 600 and cs.num_objects == 80 and cs.person_label == 0
    assert cs.prompts[0] == "a photo of a person boarding an airplane"
    assert len(cs.rare) == 138 and cs.object_mask().sum() == 600
    t = ds.target(0, size=(640, 427))
    assert t["boxes_h"][0].tolist() == [320, 306, 359, 349] and t["hoi"].tolist() == [245, 245]
    # RF-UC from the shared split file: expected counts computed here from the raw JSON
    unseen = set(json.loads((SHARED / "hicodet/derived/zero_shot_unseen_hoi_indices.json")
                            .read_text())["splits"]["rare_first"]["unseen"])
    zs = HICODet("/nonexistent", HICO_TEST, zero_shot="rf-uc")
    keep_rows = [sum(h not in unseen for h in a["hoi"]) for a in raw["annotation"]]
    assert len(zs) == sum(r > 0 for r in keep_rows)
    assert zs.num_pairs() == sum(keep_rows)
    assert set(zs.class_space().unseen) == unseen and zs.class_counts()[sorted(unseen)].sum() == 0


@need_vcoco
def test_real_vcoco_file():
    ds = VCOCO("/nonexistent", VCOCO_TEST)
    assert len(ds) == 4946 and ds.num_pairs() == 12402
    cs = ds.class_space()
    assert cs.num_classes == 24 and cs.num_objects == 80 and cs.person_label == 0
    assert cs.object_names[0] == "person" and cs.prompts[0] == "a photo of a person holding something"
    j = ds.filenames.index("COCO_val2014_000000000328.jpg")
    t = ds.target(j, size=(640, 480))
    # the file says actions [0,0,1,1,1,3,22], objects (81-index) [74,68,14,14,14,74,74]
    assert t["hoi"].tolist() == [0, 0, 1, 1, 1, 3, 22]
    assert t["object"].tolist() == [73, 67, 13, 13, 13, 73, 73]  # book, cell phone, bench
    assert cs.object_names[73] == "book" and ds.image_ids[j] == 328
    assert cs.object_mask()[1, 13]  # sit instr may take a bench
    with pytest.raises(ImageError, match="COCO_val2014_000000000328.jpg"):
        ds[j]


@need_swig
def test_swig_format(tmp_path):
    meta = json.loads(SWIG_META.read_text())
    inter = meta["SWIG_INTERACTIONS"][2]  # pedaling bicycle
    act, obj = inter["action_id"], inter["object_id"]
    doc = [{"file_name": "x.jpg", "img_id": 1, "height": 20, "width": 30,
            "box_annotations": [{"bbox": [1, 1, 10, 18], "category_id": 0, "aux_category_id": []},
                                {"bbox": [5, 8, 25, 19], "category_id": obj, "aux_category_id": []}],
            "hoi_annotations": [{"subject_id": 0, "object_id": 1, "action_id": act},
                                {"subject_id": 0, "object_id": -1, "action_id": act}]}]
    f = tmp_path / "swig.json"
    f.write_text(json.dumps(doc))
    ds = SWiGHOI(tmp_path, f)
    t = ds.target(0)
    assert t["size"] == (30, 20) and t["hoi"].tolist() == [2] and t["verb"].tolist() == [act]
    assert t["object"].tolist() == [obj] and t["boxes_o"].tolist() == [[5, 8, 25, 19]]
    assert ds.skipped["no_object"] == 1
    cs = ds.class_space()
    assert cs.num_classes == 14130 and cs.prompts[2] == "a photo of a person pedaling a bicycle"
    assert len(cs.unseen) == 1391 and cs.hoi_object[2] == [obj]
    doc[0]["hoi_annotations"][0]["subject_id"] = 5
    f.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"image 'x.jpg': field 'hoi_annotations\[0\].subject_id'"):
        SWiGHOI(tmp_path, f)


# ------------------------------------------------------------------------------------------
# detections
# ------------------------------------------------------------------------------------------

def test_load_save_detections(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps({"a.png": {"boxes": [[1, 2, 3, 4]], "scores": [0.5], "labels": [3]},
                             "b.png": {"boxes": [], "scores": [], "labels": []}}))
    d = load_detections(f)
    assert d["a.png"]["boxes"].tolist() == [[1, 2, 3, 4]] and d["a.png"]["labels"].dtype == torch.long
    assert d["b.png"]["boxes"].shape == (0, 4)
    got = load_detections(f, filenames=["a.png", "z.png"])
    assert list(got) == ["a.png", "z.png"] and got["z.png"]["scores"].shape == (0,)
    with pytest.raises(DataError, match="none of the 1 requested"):
        load_detections(f, filenames=["q.png"])
    save_detections(tmp_path / "e.json", {"a.png": {"boxes": torch.tensor([[1.234, 2, 3, 4]]),
                                                     "scores": torch.tensor([0.987]),
                                                     "labels": torch.tensor([3])}})
    e = load_detections(tmp_path / "e.json")
    assert e["a.png"]["boxes"][0, 0].item() == pytest.approx(1.23)
    assert e["a.png"]["scores"].item() == pytest.approx(0.99)
    for bad, pat in [({"a.png": {"boxes": [[3, 2, 1, 4]], "scores": [1], "labels": [0]}},
                      r"image 'a.png': field 'boxes\[0\]'"),
                     ({"a.png": {"boxes": [[1, 2, 3, 4]], "scores": [], "labels": [0]}},
                      r"image 'a.png': field 'scores'"),
                     ({"a.png": {"boxes": [[1, 2, 3, 4]], "scores": [1]}},
                      r"image 'a.png': field 'labels': missing key")]:
        f.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=pat):
            load_detections(f)
    f.write_text(json.dumps({"a.png": {"boxes": [[1, 2, 3, 4]], "scores": [1], "labels": [80]}}))
    with pytest.raises(DataError, match=r"labels\[0\]': index 80 out of range"):
        load_detections(f, num_labels=80)


def test_coco_results_detections(tmp_path):
    f = tmp_path / "coco.json"
    f.write_text(json.dumps([
        {"image_id": 7, "category_id": 1, "bbox": [10, 20, 30, 40], "score": 0.9},
        {"image_id": 7, "category_id": 90, "bbox": [0, 0, 5, 5], "score": 0.1},
        {"image_id": 9, "category_id": 44, "bbox": [1, 1, 2, 2], "score": 0.5},
    ]))
    d = load_detections(f, image_ids={7: "a.jpg", 9: "b.jpg"})
    assert d["a.jpg"]["boxes"].tolist() == [[10, 20, 40, 60], [0, 0, 5, 5]]
    assert d["a.jpg"]["labels"].tolist() == [0, 79]  # person, toothbrush
    assert d["b.jpg"]["labels"].tolist() == [39]  # COCO id 44 = bottle = COCO-80 index 39
    assert data.COCO80_NAMES[39] == "bottle" and data.COCO80_NAMES[79] == "toothbrush"
    with pytest.raises(DataError, match="needs image_ids"):
        load_detections(f)
    f.write_text(json.dumps([{"image_id": 7, "category_id": 12, "bbox": [0, 0, 1, 1], "score": 1}]))
    with pytest.raises(DataError, match=r"a.jpg \(entry 0\)'?: field 'category_id'"):
        load_detections(f, image_ids={7: "a.jpg"})


@need_hico
def test_coco80_table_matches_shared_files():
    hl = json.loads((SHARED / "hicodet/derived/hoi_list.json").read_text())
    assert hl["coco80_to_coco91_category_id"] == data.COCO80_TO_COCO91
    assert hl["objects_coco80_order"] == data.COCO80_NAMES


def test_gt_detections():
    t = {"boxes_h": torch.tensor([[0., 0, 10, 10], [0, 0, 10, 10], [20, 0, 30, 10]]),
         "boxes_o": torch.tensor([[5., 5, 8, 8], [20, 0, 30, 10], [5, 5, 8, 8]]),
         "object": torch.tensor([41, 0, 41])}
    d, ih, io = gt_detections(t, return_index=True)
    assert d["boxes"].tolist() == [[0, 0, 10, 10], [20, 0, 30, 10], [5, 5, 8, 8]]
    assert d["labels"].tolist() == [0, 0, 41] and d["scores"].tolist() == [1, 1, 1]
    assert ih.tolist() == [0, 0, 1] and io.tolist() == [2, 1, 2]


def test_select_boxes_exact():
    P = 0
    boxes = torch.tensor([
        [0, 0, 10, 10],    # 0 human .90
        [1, 1, 11, 11],    # 1 human .80  IoU(0,1)=81/119 -> suppressed by 0
        [0, 0, 10, 10],    # 2 cup   .70  same box as 0 but other class -> kept
        [50, 50, 60, 60],  # 3 human .10  under threshold
        [70, 70, 80, 80],  # 4 human .15  under threshold
        [90, 90, 99, 99],  # 5 human .05  under threshold
        [30, 30, 40, 40],  # 6 ball  .30
        [31, 30, 41, 40],  # 7 ball  .25  IoU(6,7)=90/110 -> suppressed
        [60, 0, 70, 10],   # 8 cup   .19  under threshold
        [80, 0, 90, 10],   # 9 cup   .18  under threshold
    ], dtype=torch.float32)
    scores = torch.tensor([.9, .8, .7, .1, .15, .05, .3, .25, .19, .18])
    labels = torch.tensor([P, P, 41, P, P, P, 32, 32, 41, 41])
    dets = {"boxes": boxes, "scores": scores, "labels": labels}
    out, idx = select_boxes(dets, return_index=True)
    # humans: survivors 0, 3, 4, 5; one above 0.2 < 3 -> top-3 by score: 0, 4, 3
    # objects: survivors 2, 6, 8, 9; two above 0.2 < 3 -> top-3: 2, 6, 8
    assert idx.tolist() == [0, 4, 3, 2, 6, 8]
    assert out["boxes"].tolist() == boxes[idx].tolist() and out["labels"].tolist() == labels[idx].tolist()
    # bounds 1..2: humans (1 above) -> [0]; objects (2 above) -> [2, 6]
    assert select_boxes(dets, min_h=1, max_h=2, min_o=1, max_o=2, return_index=True)[1].tolist() == [0, 2, 6]
    # max: threshold 0 -> 4 human survivors, max 2 -> the top 2
    assert select_boxes(dets, score_thresh=0.0, max_h=2, max_o=2, return_index=True)[1].tolist() == [0, 4, 2, 6]
    # no NMS at IoU 0.9: box 1 survives (IoU 0.68)
    assert select_boxes(dets, nms=0.9, return_index=True)[1].tolist()[:2] == [0, 1]
    # ties keep input order
    tie = {"boxes": torch.tensor([[0., 0, 1, 1], [5, 5, 6, 6], [9, 9, 10, 10]]),
           "scores": torch.tensor([.5, .5, .5]), "labels": torch.tensor([P, P, P])}
    assert select_boxes(tie, return_index=True)[1].tolist() == [0, 1, 2]
    empty = select_boxes({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                          "labels": torch.zeros(0, dtype=torch.long)})
    assert empty["boxes"].shape == (0, 4)


# ------------------------------------------------------------------------------------------
# synthetic world
# ------------------------------------------------------------------------------------------

HICO_KEYS = {"annotation", "filenames", "empty", "objects", "verbs", "correspondence", "size",
             "rare", "non_rare"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    t = time.time()
    paths = data.make_synthetic_world(root, n_train=300, n_test=80, image_size=128, seed=0)
    dt = time.time() - t
    print(f"\nsynthetic world 300 + 80 images 128x128: {dt:.2f} s ({dt / 380 * 1e3:.1f} ms/image)")
    return paths


def test_default_quotas_long_tail():
    """Default world (2000 train / 500 test images): exact pair quotas per class."""
    q_train, q_test = data._quotas(2000, "train"), data._quotas(500, "test")
    rare = [k for k, q in enumerate(q_train) if q < 10]
    assert rare == [3, 7, 12, 13] and max(q_train) == 520
    assert min(q_test) >= 10
    assert set(data.SYN_ZERO_SHOT["rf-uc"]) <= set(rare)
    assert not set(data.SYN_ZERO_SHOT["nf-uc"]) & set(rare)
    ev = data._assign_events(np.random.default_rng(0), 2000, q_train)
    flat = np.bincount(np.concatenate([np.array(e, dtype=int) for e in ev if e]), minlength=16)
    shake = data.SYN_CLASSES.index(("shake_hand", "person", 100, 80))
    flat[shake] *= 2  # a handshake event makes two pairs
    assert flat.tolist() == q_train
    assert sum(1 for e in ev if not e) == 60 and max(len(e) for e in ev) <= 3


def test_world_files(world):
    for split, n in (("train", 300), ("test", 80)):
        doc = json.loads(Path(world[f"{split}_anno"]).read_text())
        assert HICO_KEYS | {"prompts", "zero_shot", "name"} == set(doc)
        assert len(doc["filenames"]) == n and len(doc["annotation"]) == n
        assert doc["objects"] == data.COCO80_NAMES and doc["verbs"] == data.SYN_VERBS
        assert doc["prompts"][0] == "a photo of a person riding a bicycle"
        assert doc["prompts"][15] == "a photo of a person shaking hands with a person"
        assert doc["empty"] == [i for i, a in enumerate(doc["annotation"]) if not a["hoi"]]
        assert all(s == [128, 128] for s in doc["size"])
        counts = np.zeros(16, dtype=int)
        for a in doc["annotation"]:
            b = np.array(a["boxes_h"] + a["boxes_o"]).reshape(-1, 4)
            assert (b[:, :2] >= 0).all() and (b[:, 2:] <= 128).all() and (b[:, 2:] > b[:, :2]).all()
            np.add.at(counts, a["hoi"], 1)
        assert counts.tolist() == data._quotas(n, split)
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
    assert cs.name == "synthetic" and cs.prompts == data._syn_prompts()
    assert ClassSpace.from_dict(cs.asdict()) == cs
    assert cs.hoi_object[0] == [data.COCO80_NAMES.index("bicycle")]
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
    a = data.make_synthetic_world(tmp_path / "a", n_train=20, n_test=6, seed=5, workers=1)
    b = data.make_synthetic_world(tmp_path / "b", n_train=20, n_test=6, seed=5, workers=2)
    c = data.make_synthetic_world(tmp_path / "c", n_train=20, n_test=6, seed=6, workers=1)
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
    d = data.make_synthetic_world(tmp_path / "d", n_train=300, n_test=80, image_size=128, seed=0,
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
        data.make_synthetic_world(tmp_path / "e", n_train=20, n_test=6, train_label_drop=1.0)


def test_png_writer_round_trip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    data._write_png(tmp_path / "x.png", img)
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
    K = len(data.SYN_CLASSES)
    states = data._layout_chunk(np.random.default_rng(7), [[c] for c in range(K)] * 3, S)
    seen = set()
    for i, st in enumerate(states):
        img, boxes = data._render(st, S, np.random.default_rng(i))
        for b in boxes:
            if b is not None:
                assert 0 <= b[0] < b[2] <= S and 0 <= b[1] < b[3] <= S
        for ih, io, c in st["pairs"]:
            verb, name = data.SYN_CLASSES[c][:2]
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
                tail = data._obj_point(o, 0.5, 0.7)
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
    ev = pytest.importorskip("eval", reason="eval.py not in the repo yet")
    anno = json.loads(Path(world["test_anno"]).read_text())
    preds = {}
    for fname, a in zip(anno["filenames"], anno["annotation"]):
        rows = [[h, 1.0, *bh, *bo] for h, bh, bo in zip(a["hoi"], a["boxes_h"], a["boxes_o"])]
        preds[fname] = np.array(rows, dtype=np.float64).reshape(-1, 10)
    res = ev.evaluate_hico(anno, preds)
    assert res["full"] == pytest.approx(100.0, abs=1e-6)
    assert res["rare"] == pytest.approx(100.0, abs=1e-6)
    assert res["non_rare"] == pytest.approx(100.0, abs=1e-6)
