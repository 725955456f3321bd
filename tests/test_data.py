"""Tests of data.py: datasets, class spaces, detections, pair bounding.

Expected numbers are hand-computed from the small hand-made inputs below, or counted from
the real annotation files in shared/data (tests needing those skip when they are absent).
"""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_formats import hico_doc

import common
import data
from data import (
    VCOCO,
    ClassSpace,
    DataError,
    HICODet,
    ImageError,
    SWiGHOI,
    collate,
    convert_box_frame,
    gt_detections,
    load_detections,
    save_detections,
    select_boxes,
)

SHARED = common.data_root()
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
    doc = hico_doc()
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


# the bad-input cases of the datasets and detection files: tests/test_formats.py


def test_zero_shot_filter(tmp_path):
    root, f = tiny_hico(tmp_path)
    # unseen = {2}: image b's first pair carries classes 1 and 2 -> removed with both labels
    # (default rule "pair", GEN-VLKT / HOICLIP); its pair with class 3 stays
    ds = HICODet(root, f, zero_shot=[2])
    assert ds.filenames == ["a.png", "b.png"]  # c (no label) dropped
    t = ds[1][1]
    assert t["hoi"].tolist() == [3] and t["boxes_o"].tolist() == [[2, 2, 12, 22]]
    assert ds.class_space().unseen == [2]
    # rule "label" (the weaker variant): only the unseen row goes, the pair keeps class 1
    t = HICODet(root, f, zero_shot=[2], zero_shot_rule="label")[1][1]
    assert t["hoi"].tolist() == [1, 3] and t["boxes_o"].tolist() == [[11, 15, 15, 19], [2, 2, 12, 22]]
    with pytest.raises(ValueError, match="zero_shot_rule"):
        HICODet(root, f, zero_shot=[2], zero_shot_rule="rows")
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


def _add_pair_rule_image(d):
    """Image d.png: rows r0..r5 (classes 1 kick ball, 2 hold ball, 3 hug person). r1 is the
    unseen class 2 on H1 = [2, 2, 12, 21], O1 = [11, 15, 15, 19]; the others, against it:
    r0 class 1, human [2, 2, 12, 22] (inclusive IoU 11*20 / (11*21) = 0.952), same object box;
    r2 class 1, same human, another ball [20, 15, 24, 19] (IoU 0);
    r3 class 3, object a person (another label);
    r4 class 1, object [11, 15, 15, 24]: inclusive IoU 25 / 50 = 0.5 exactly (continuous IoU
       16 / 36 = 0.444);
    r5 class 1, object [13, 15, 17, 19]: inclusive IoU 15 / 35 = 0.429."""
    d["annotation"].append({
        "boxes_h": [[2, 2, 12, 22], [2, 2, 12, 21], [2, 2, 12, 22], [20, 2, 30, 22], [2, 2, 12, 22],
                    [2, 2, 12, 22]],
        "boxes_o": [[11, 15, 15, 19], [11, 15, 15, 19], [20, 15, 24, 19], [2, 2, 12, 22], [11, 15, 15, 24],
                    [13, 15, 17, 19]],
        "hoi": [1, 2, 1, 3, 1, 1], "object": [2, 2, 2, 0, 2, 2], "verb": [1, 0, 1, 2, 1, 1]})
    d["filenames"].append("d.png")
    d["size"].append([32, 24])


def test_zero_shot_pair_rule_same_pair_by_overlap(tmp_path):
    """A pair is the same (human, object) when the objects share a label and min(IoU_h, IoU_o)
    >= 0.5, with the IoU of the file's frame (hand values in _add_pair_rule_image)."""
    root, f = tiny_hico(tmp_path, mutate=_add_pair_rule_image)
    assert HICODet(root, f).box_frame == "hico1"
    hoi = {rule: HICODet(root, f, zero_shot=[2], zero_shot_rule=rule)[2][1]["hoi"].tolist()
           for rule in ("pair", "label")}
    assert hoi["pair"] == [1, 3, 1]             # hico1: r0, r1 and r4 (IoU exactly 0.5) removed
    assert hoi["label"] == [1, 1, 3, 1, 1]      # only r1
    t = HICODet(root, f, zero_shot=[2], frame="continuous")[2][1]
    assert t["hoi"].tolist() == [1, 3, 1, 1]    # continuous IoU of r4 is 0.444: kept
    assert t["boxes_o"][2].tolist() == [11, 15, 15, 24]


def test_empty_images_left_out_of_training(tmp_path):
    """skip_empty drops the images the file lists in ``empty`` (UPT) and images without rows;
    the training CLI does so by default (--keep-empty keeps them), the test split never."""
    root, f = tiny_hico(tmp_path, mutate=lambda d: d.update(empty=[0, 2]))   # a.png listed, with rows
    assert HICODet(root, f).filenames == ["a.png", "b.png", "c.png"]
    assert HICODet(root, f, skip_empty=True).filenames == ["b.png"]
    root, f = tiny_hico(tmp_path, mutate=lambda d: d.update(empty=[]))       # c.png: no rows
    assert HICODet(root, f, skip_empty=True).filenames == ["a.png", "b.png"]
    import train_teacher
    base = ["--dataset", "hicodet", "--image-root", str(root), "--anno", str(f)]
    for extra, want in (([], ["a.png", "b.png"]), (["--keep-empty"], ["a.png", "b.png", "c.png"])):
        args = train_teacher.teacher_parser().parse_args(base + extra)
        assert train_teacher._dataset(args, root, f, train=True).filenames == want
        assert train_teacher._dataset(args, root, f, train=False).filenames == ["a.png", "b.png", "c.png"]


def test_what_a_dataset_or_detection_file_leaves_out_is_told(tmp_path, capsys):
    """Every image a training filter leaves out, and every detection entry not used, is counted in one note
    (issue 24, hole 7); ds.skipped holds the counts. Nothing left out: no note."""
    root, f = tiny_hico(tmp_path, mutate=lambda d: d.update(empty=[0, 2]))
    HICODet(root, f)
    assert capsys.readouterr().err == ""
    ds = HICODet(root, f, skip_empty=True)
    assert ds.skipped == {"images_without_a_pair": 2} and len(ds) + 2 == len(ds._files)
    err = capsys.readouterr().err
    assert "left out 2 images without a pair; 1 of 3 images kept (left out: 'a.png', 'c.png')" in err
    ds = HICODet(root, f, zero_shot=[2], few_shot=1)
    assert ds.skipped["zero_shot_rows"] > 0 and sum(v for k, v in ds.skipped.items() if "images" in k) \
        == 3 - len(ds)
    assert f"{len(ds)} of 3 images kept" in capsys.readouterr().err
    det = tmp_path / "extra.json"
    one = {"boxes": [[0, 0, 5, 5]], "scores": [0.5], "labels": [1]}
    det.write_text(json.dumps({"a.png": one, "zz.png": one, "yy.png": one}))
    assert sorted(load_detections(det, filenames=["a.png", "b.png"])) == ["a.png", "b.png"]
    assert "detections of 2 images not in the dataset left out (first: 'yy.png')" in capsys.readouterr().err


def test_box_frames_of_datasets_and_detection_files(tmp_path):
    root, f = tiny_hico(tmp_path)
    assert HICODet(root, f).box_frame == "hico1"                      # HICO-DET files: no key
    root, f = tiny_hico(tmp_path, mutate=lambda d: d.update(name="synthetic"))
    assert HICODet(root, f).box_frame == "continuous"                 # worlds written before the key
    root, f = tiny_hico(tmp_path, mutate=lambda d: d.update(box_frame="continuous"))
    assert HICODet(root, f).box_frame == "continuous"
    assert HICODet(root, f, frame="hico1").box_frame == "hico1"
    # continuous -> hico1: x1 + 1, y1 + 1; x2, y2 kept; under one pixel wide: x1 = x2
    b = torch.tensor([[10.0, 20.0, 30.5, 40.0], [10.25, 5.0, 10.75, 9.0]])
    assert convert_box_frame(b, "continuous", "hico1").tolist() == [[11, 21, 30.5, 40], [10.75, 6, 10.75, 9]]
    assert convert_box_frame(b[:1], "hico1", "continuous").tolist() == [[9, 19, 30.5, 40]]
    assert convert_box_frame(b, "hico1", "hico1").tolist() == b.tolist()
    det = tmp_path / "dets.json"
    det.write_text(json.dumps({"a.png": {"boxes": [[0, 0, 31.5, 24]], "scores": [0.5], "labels": [1]}}))
    assert load_detections(det)["a.png"]["boxes"].tolist() == [[0, 0, 31.5, 24]]
    assert load_detections(det, frame="continuous", into="hico1")["a.png"]["boxes"].tolist() == [[1, 1, 31.5, 24]]
    assert load_detections(det, frame="hico1", into="hico1")["a.png"]["boxes"].tolist() == [[0, 0, 31.5, 24]]


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
    zs = HICODet("/nonexistent", HICO_TEST, zero_shot="rf-uc", zero_shot_rule="label")
    keep_rows = [sum(h not in unseen for h in a["hoi"]) for a in raw["annotation"]]
    assert len(zs) == sum(r > 0 for r in keep_rows)
    assert zs.num_pairs() == sum(keep_rows)
    assert set(zs.class_space().unseen) == unseen and zs.class_counts()[sorted(unseen)].sum() == 0
    # the pair rule (default) also removes the 485 seen rows that share a pair (same object
    # label, min inclusive IoU >= 0.5) with one of the 836 unseen rows: 1,321 rows, counted by
    # an independent numpy script on this file
    assert sum(len(a["hoi"]) for a in raw["annotation"]) - sum(keep_rows) == 836
    assert HICODet("/nonexistent", HICO_TEST, zero_shot="rf-uc").num_pairs() == 33405 - 1321


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
    save_detections(tmp_path / "e.json", {"a.png": {"boxes": torch.tensor([[1.234, 2, 3, 4]]),
                                                     "scores": torch.tensor([0.987]),
                                                     "labels": torch.tensor([3])}})
    e = load_detections(tmp_path / "e.json")
    assert e["a.png"]["boxes"][0, 0].item() == pytest.approx(1.23)
    assert e["a.png"]["scores"].item() == pytest.approx(0.99)


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
