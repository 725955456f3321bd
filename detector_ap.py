"""COCO box AP (pycocotools COCOeval) of a detector on an HOI dataset's ground-truth boxes.

Reached as ``python eval.py detector --anno ANNO.json --detections DETS.json [--dataset ...]``.
The GT is the unique human and object boxes of each image's annotated pairs, so a detected
bystander is a false positive: the numbers compare detectors on one file only. HICO-DET's
1-based inclusive boxes become COCO's x = x1 - 1, w = x2 - x1 + 1; the continuous frames give
x = x1, w = x2 - x1. A per-image detection file is in the annotation's frame and goes through
the same conversion (the GT fed back scores 100); a COCO results file is used as it is.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

import formats
from formats import FormatError, read

DETECTOR_DATASETS = ("hico", "vcoco", "swig", "synthetic")
_DATASET_TITLE = {"hico": "HICO-DET", "vcoco": "V-COCO", "swig": "SWiG-HOI", "synthetic": "synthetic world"}


@dataclass
class DetectorGT:
    """Unique ground-truth boxes of every image of an HOI annotation file."""
    dataset: str                    # one of DETECTOR_DATASETS
    name: str                       # the annotation file (for messages)
    filenames: list                 # image file names, annotation order
    object_names: list              # O names of the object label space
    person_label: int
    category_ids: list              # COCO category id of each object label
    inclusive: bool                 # HICO-DET's 1-based inclusive frame
    boxes: list                     # per image float64[n, 4] x1, y1, x2, y2 (annotation frame)
    labels: list                    # per image int64[n]
    coco_image_ids: list | None     # the file's COCO image ids (V-COCO `images`), else None
    skipped: dict | None = None     # SWiG-HOI pairs left out of the GT: {no_object, unknown_interaction}


def _detector_dataset(obj: Any, dataset: str | None, src: str) -> str:
    """The kind of a parsed annotation file; ``dataset`` (if given) must agree with it."""
    if isinstance(obj, list):
        kind = "swig"
    elif isinstance(obj, dict) and "annotation" in obj:
        kind = "synthetic" if obj.get("name") == "synthetic" else "hico"
    elif isinstance(obj, dict) and "annotations" in obj:
        kind = "vcoco"
    else:
        raise FormatError(f"{src}: not a HICO-DET / synthetic (key 'annotation'), V-COCO (key "
                             f"'annotations') or SWiG-HOI (a list of images) annotation file")
    if dataset is None:
        return kind
    if dataset not in DETECTOR_DATASETS:
        raise FormatError(f"--dataset: unknown dataset '{dataset}' (expected one of "
                             f"{', '.join(DETECTOR_DATASETS)})")
    family = {"hico": "hico", "synthetic": "hico", "vcoco": "vcoco", "swig": "swig"}
    # a user's own HICO-format file in a continuous frame may say synthetic; the reverse is
    # the synthetic world read in the wrong frame
    if family[dataset] != family[kind] or (dataset, kind) == ("hico", "synthetic"):
        raise FormatError(f"{src}: --dataset {dataset}, but this is a {_DATASET_TITLE[kind]} "
                             f"annotation file")
    return dataset


def load_detector_gt(anno_path: str | os.PathLike, dataset: str | None = None,
                     meta: str | os.PathLike | None = None) -> DetectorGT:
    """Read an annotation file (formats.py, as the datasets read it) -> DetectorGT.

    dataset: hico | vcoco | swig | synthetic, or None to tell it from the file.  meta: SWiG-HOI's
    swig_v1_meta.json (default: the shared data).
    """
    src = str(anno_path)
    obj = read(anno_path, "annotation file")
    kind, skipped = _detector_dataset(obj, dataset, src), None
    if kind == "vcoco":
        v = formats.parse_vcoco_pairs(obj, src)
        files, names, ids, rows = v.filenames, v.objects, v.image_ids, v.rows
    else:
        if kind == "swig":
            g = formats.parse_swig_gt(obj, formats.load_swig_meta(meta), src, skip_unknown=True)
            files, names, objects = g.filenames, g.tables[0], g.gt_category
            skipped = {"no_object": g.num_no_object, "unknown_interaction": g.num_unknown}
        else:
            g = formats.parse_hico_anno(obj, src, names=True)
            files, names, objects = g.filenames, g.objects, g.gt_object
        ids, bounds = None, np.searchsorted(g.gt_image, np.arange(len(files) + 1))
        rows = [{"boxes_h": g.gt_boxes[s:e, :4], "boxes_o": g.gt_boxes[s:e, 4:], "object": objects[s:e]}
                for s, e in zip(bounds[:-1], bounds[1:])]
    person = names.index("person") if "person" in names else 0
    uniq = [formats.unique_boxes(r["boxes_h"], r["boxes_o"], r["object"], person)[:2] for r in rows]
    boxes, labels = [b.astype(np.float64) for b, _ in uniq], [lab for _, lab in uniq]
    coco80 = [n.replace(" ", "_") for n in names] == formats.COCO80_NAMES
    return DetectorGT(
        dataset=kind, name=src, filenames=files, object_names=list(names), person_label=person,
        inclusive=kind == "hico",
        # COCO results name classes by COCO's ids (1..90) over COCO-80; SWiG-HOI by its own
        # 0-based category_id, as in its annotation file
        category_ids=list(formats.COCO80_TO_COCO91) if coco80 else list(range(len(names))),
        boxes=boxes, labels=labels, coco_image_ids=ids, skipped=skipped)


def _coco_xywh(boxes: np.ndarray, inclusive: bool) -> np.ndarray:
    """float64[N, 4] x1, y1, x2, y2 in the annotation frame -> COCO x, y, w, h (see above)."""
    off = 1.0 if inclusive else 0.0
    return np.stack([boxes[:, 0] - off, boxes[:, 1] - off,
                     boxes[:, 2] - boxes[:, 0] + off, boxes[:, 3] - boxes[:, 1] + off], axis=1)


def _per_image_detections(path: str | os.PathLike, obj: dict, gt: DetectorGT) -> np.ndarray:
    """The project's per-image detection file -> float64[N, 7] rows
    [image index + 1, x, y, w, h, score, category id] (pycocotools' array form); boxes and
    scores pass through float32, as the GT boxes (data.load_detections stores them so)."""
    src = str(path)
    index = {f: i for i, f in enumerate(gt.filenames)}
    cat = np.asarray(gt.category_ids, dtype=np.float64)
    parts = []
    for img, e in obj.items():
        if img not in index:
            raise formats.fail(src, "unknown image name (not in the annotation file)", img)
        b, s, lab = formats.image_detections(e, src, img, len(gt.object_names))
        parts.append((index[img], b.astype(np.float32), s.astype(np.float32), lab))
    rows = [np.column_stack([np.full(len(s), i + 1.0), _coco_xywh(b.astype(np.float64), gt.inclusive),
                             s.astype(np.float64), cat[lab]]) for i, b, s, lab in sorted(parts, key=lambda p: p[0])
            if len(s)]
    return np.concatenate(rows) if rows else np.zeros((0, 7))


def _results_image_ids(gt: DetectorGT, src: str) -> list:
    """COCO image id of each image: the file's COCO ids (V-COCO), else, as infer.py, the last
    number in the file name (HICO_test2015_00000001.jpg -> 1)."""
    ids = gt.coco_image_ids
    if ids is None:
        ids = []
        for f in gt.filenames:
            digits = re.findall(r"\d+", os.path.splitext(os.path.basename(f))[0])
            if not digits:
                raise FormatError(f"{src}: a COCO results file needs image ids, but image '{f}' has "
                                     f"no number in its name; use the per-image detection format")
            ids.append(int(digits[-1]))
    seen: dict = {}
    for f, iid in zip(gt.filenames, ids):
        if iid in seen:
            raise FormatError(f"{src}: images '{seen[iid]}' and '{f}' both have image_id {iid}; "
                                 f"use the per-image detection format")
        seen[iid] = f
    return list(ids)


def _coco_results(obj: list, gt: DetectorGT, image_ids: list, src: str) -> list:
    """Validate a COCO results list (formats.coco_result) before pycocotools' loadRes takes it
    (loadRes asserts, or silently accepts, what we refuse)."""
    names, labels = dict(zip(image_ids, gt.filenames)), {c: k for k, c in enumerate(gt.category_ids)}
    for r, e in enumerate(obj):
        formats.coco_result(e, r, src, names, labels)
    return obj


def _cocoeval(gt: DetectorGT, image_ids: list, dets: Any) -> dict:
    """Run COCOeval (bbox) silently; dets: a validated results list or a float64[N, 7] array."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise FormatError("eval.py detector needs pycocotools (pip install pycocotools)") from None
    anns = []
    for iid, b, lab in zip(image_ids, gt.boxes, gt.labels):
        for xywh, c in zip(_coco_xywh(b, gt.inclusive).tolist(), lab.tolist()):
            anns.append({"id": len(anns) + 1,  # ids from 1: COCOeval reads id 0 as "unmatched"
                         "image_id": iid, "category_id": gt.category_ids[c], "bbox": xywh,
                         "area": xywh[2] * xywh[3], "iscrowd": 0})
    if not anns:
        raise FormatError(f"{gt.name}: no ground-truth box (no annotated pair): nothing to measure")
    cats = [{"id": c, "name": n} for c, n in zip(gt.category_ids, gt.object_names)]
    images = [{"id": iid} for iid in image_ids]
    coco_gt, coco_dt = COCO(), COCO()
    coco_gt.dataset = {"images": images, "annotations": anns, "categories": cats}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        if len(dets):
            coco_dt = coco_gt.loadRes(dets)
        else:                                   # loadRes needs at least one result
            coco_dt.dataset = {"images": images, "annotations": [], "categories": cats}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        # classes without GT would give precision -1, which COCOeval leaves out of every mean:
        # evaluating only the classes with GT gives the same numbers, faster
        ev.params.catIds = sorted({a["category_id"] for a in anns})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"stats": ev.stats, "cat_ids": list(ev.params.catIds),
            "precision": ev.eval["precision"][:, :, :, 0, -1],        # [T, R, K]: all areas, 100 dets
            "det_cats": [a["category_id"] for a in coco_dt.dataset["annotations"]]}


def _pct(v: float) -> float | None:
    return None if v < 0 else float(v) * 100.0


def evaluate_detector(anno: str | os.PathLike | DetectorGT, detections: str | os.PathLike,
                      dataset: str | None = None, meta: str | os.PathLike | None = None) -> dict:
    """COCO box AP (percent) of a detection file against an HOI annotation file's GT boxes.

    anno: annotation path (HICO-DET / synthetic HICO-format JSON, fredzzhang V-COCO
    instances_vcoco_*.json, SWiG-HOI json) or a DetectorGT from ``load_detector_gt``.
    detections: the per-image JSON {file_name: {boxes, scores, labels}} (labels in the
    dataset's object labels, boxes in the annotation's frame) or a COCO results list.
    Returns ap, ap50, ap75, ap_small, ap_medium, ap_large, ar100 (None where COCOeval has no
    GT), person {ap, num_gt, num_det}, per_class {name: {ap, num_gt, num_det}} (object classes
    with GT, person excluded), counts, dataset, detections_format, box_frame.
    """
    gt = anno if isinstance(anno, DetectorGT) else load_detector_gt(anno, dataset, meta)
    src = str(detections)
    obj = read(detections, "detection file")
    if isinstance(obj, dict):
        fmt, image_ids = "per-image", list(range(1, len(gt.filenames) + 1))
        dets = _per_image_detections(detections, obj, gt)
    elif isinstance(obj, list):
        fmt, image_ids = "coco-results", _results_image_ids(gt, src)
        dets = _coco_results(obj, gt, image_ids, src)
    else:
        raise FormatError(f"{src}: expected a JSON object {{file_name: {{boxes, scores, labels}}}} "
                             f"or a COCO results list, got {type(obj).__name__}")
    r = _cocoeval(gt, image_ids, dets)
    s = r["stats"]
    res = {"dataset": gt.dataset, "detections_format": fmt,
           "box_frame": ("1-based inclusive pixels: x = x1 - 1, w = x2 - x1 + 1" if gt.inclusive
                         else "continuous: x = x1, w = x2 - x1"),
           "ap": _pct(s[0]), "ap50": _pct(s[1]), "ap75": _pct(s[2]), "ap_small": _pct(s[3]),
           "ap_medium": _pct(s[4]), "ap_large": _pct(s[5]), "ar100": _pct(s[8])}
    num_gt = np.bincount(np.concatenate(gt.labels), minlength=len(gt.object_names))
    label_of = {c: k for k, c in enumerate(gt.category_ids)}
    num_det = np.bincount([label_of[c] for c in r["det_cats"]], minlength=len(gt.object_names))
    per_class = {}
    for k, cid in enumerate(r["cat_ids"]):
        p = r["precision"][:, :, k]
        lab = label_of[cid]
        per_class[gt.object_names[lab]] = {"ap": _pct(p[p > -1].mean()) if (p > -1).any() else None,
                                           "num_gt": int(num_gt[lab]), "num_det": int(num_det[lab])}
    res["person"] = per_class.pop(gt.object_names[gt.person_label],
                                  {"ap": None, "num_gt": 0, "num_det": int(num_det[gt.person_label])})
    res["per_class"] = per_class
    res["counts"] = {"num_images": len(gt.filenames), "num_gt_boxes": int(num_gt.sum()),
                     "num_classes_with_gt": len(r["cat_ids"]), "num_detections": int(num_det.sum()),
                     "num_detections_unscored": int(num_det[num_gt == 0].sum()),
                     "num_pairs_left_out": sum((gt.skipped or {}).values())}
    res["files"] = {"anno": gt.name, "detections": src}
    return res


def format_detector(res: dict) -> str:
    """Readable table of an evaluate_detector result."""
    c = res["counts"]
    lines = [f"Detector box AP (pycocotools COCOeval) on the {_DATASET_TITLE[res['dataset']]} "
             f"ground-truth boxes ({res['detections_format']} detections)",
             f"  {c['num_images']} images, {c['num_gt_boxes']} GT boxes in {c['num_classes_with_gt']} "
             f"classes, {c['num_detections']} detections"
             + (f" ({c['num_detections_unscored']} in classes without GT, not scored)"
                if c["num_detections_unscored"] else "")
             + (f"; {c['num_pairs_left_out']} pairs without an object or of an unknown interaction left out of the GT"
                if c.get("num_pairs_left_out") else "")]

    def f(v):
        return "     n/a" if v is None else f"{v:8.2f}"

    for label, key in (("AP", "ap"), ("AP50", "ap50"), ("AP75", "ap75"), ("AP small", "ap_small"),
                       ("AP medium", "ap_medium"), ("AP large", "ap_large"), ("AR@100", "ar100")):
        lines.append(f"  {label:<16}{f(res[key])}")
    p = res["person"]
    lines.append(f"  {'person':<16}{f(p['ap'])}   ({p['num_gt']} GT boxes, {p['num_det']} detections)")
    if res["per_class"]:
        lines.append("  object classes (AP, GT boxes, detections):")
        for name, v in res["per_class"].items():
            lines.append(f"    {name:<14}{f(v['ap'])}   ({v['num_gt']}, {v['num_det']})")
    return "\n".join(lines)
