"""The official HOI-detection rules (HICO-DET, V-COCO, SWiG-HOI) and the ``eval.py`` CLI.

Every number is meant to be the official one, rule for rule (our numpy re-derivation, no code
copied; the full rules are in docs/evaluation.md):
* HICO-DET: ywchao/ho-rcnn's MATLAB toolkit (eval_one.m, VOCevaldet_bboxpair.m), Default and
  Known-Object settings, plus the zero-shot splits RF-UC, NF-UC, UO, UV.
* V-COCO: s-gupta/v-coco's vsrl_eval.py (role AP scenarios 1 and 2, agent AP).
* SWiG-HOI: the THID evaluator (scwangdyd/promting_hoi swig_evaluator.py).

    python eval.py hico  --anno instances_test2015.json --pred PRED.json
                         [--zero-shot rf-uc|nf-uc|uo|uv] [--known-object [--image-labels FILE]]
    python eval.py vcoco --vsrl vcoco_test.json --coco instances_vcoco_all_2014.json --pred DETS.json
    python eval.py swig  --anno swig_test_1000.json --pred PRED.json [--meta META.json]
    python eval.py detector --anno ANNO.json --detections DETS.json   (box AP: detector_ap.py)
    every subcommand: [--out RESULT.json] (written atomically, never over an input)

Files are read by formats.py; bad input raises :class:`EvalInputError` (formats.FormatError),
one line naming the file, the image and the field; the CLI prints ``error: <message>`` and
exits with status 2.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

import detector_ap
from common import (
    ZERO_SHOT_SPLITS,
    OneLineParser,
    atomic_write_json,
    clean_stale_temps,
    data_root,
    refuse_outputs_over_inputs,
    run_command,
)
from formats import (
    FormatError,
    FormatFileNotFoundError,
    HicoGT,
    SwigGT,
    VCOCODets,
    as_index_list,
    coco_boxes,
    coco_index,
    fail,
    iou_continuous,
    iou_inclusive,
    is_number,
    load_swig_meta,
    load_vcoco_dets,
    parse_hico_anno,
    parse_swig_gt,
    prediction_rows,
    read,
    vcoco_role_keys,
    vsrl_actions,
    zero_shot_unseen,
)

#: t of the official MATLAB loop ``for t = 0:0.1:1`` (== np.arange(0, 1.1, 0.1), float64[11])
HICO_THRESHOLDS = np.arange(0, 1.1, 0.1)
#: t = i / 10.0 of the THID SWiG evaluator, float64[11]
SWIG_THRESHOLDS = np.array([i / 10.0 for i in range(11)])
SWIG_TOPK = 19999
MIN_OVERLAP = 0.5

#: bad evaluation input (formats.FormatError: one line naming the file, the image, the field)
EvalInputError = FormatError
EvalFileNotFoundError = FormatFileNotFoundError


def _json_safe(x: Any) -> Any:
    """Replace NaN/inf by None and numpy scalars/arrays by Python objects (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as strict JSON (NaN/inf -> null) to ``path`` atomically (common.atomic_write)."""
    atomic_write_json(os.path.abspath(os.fspath(path)), _json_safe(obj), indent=1)


# ---------------------------------------------------------------------------------------
# Core: IoU, matching, AP (shared by HICO-DET and SWiG-HOI)
# ---------------------------------------------------------------------------------------



def _gt_lookup(det_key: np.ndarray, gt_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each detection key, (first row in the sorted gt_key with that key, how many).

    det_key: int64[N]; gt_key: int64[M] sorted.  Returns lo int64[N], cnt int64[N] (0 where
    no GT has that key).  Uses a dense int32 table over the key space when it is small
    (HICO-DET: 600 x 9,658 = 5.8 M entries, 23 MB; much faster than a random-access binary
    search), else two binary searches.
    """
    space = int(gt_key[-1]) + 1
    if space <= max(1 << 24, 4 * det_key.shape[0]) and det_key.max(initial=0) < (1 << 62):
        ukey, ustart, ucount = np.unique(gt_key, return_index=True, return_counts=True)
        table = np.full(space + 1, -1, dtype=np.int32)       # last entry: keys beyond the GT
        table[ukey] = np.arange(ukey.size, dtype=np.int32)
        u = table[np.minimum(det_key, space)]
        hit = u >= 0
        lo = np.zeros(det_key.shape[0], dtype=np.int64)
        cnt = np.zeros(det_key.shape[0], dtype=np.int64)
        lo[hit] = ustart[u[hit]]
        cnt[hit] = ucount[u[hit]]
        return lo, cnt
    lo = np.searchsorted(gt_key, det_key, side="left")
    return lo, np.searchsorted(gt_key, det_key, side="right") - lo


def _best_gt(det_key: np.ndarray, det_boxes: np.ndarray, gt_key: np.ndarray,
             gt_boxes: np.ndarray, iou_fn) -> tuple[np.ndarray, np.ndarray]:
    """For every detection, the first GT (of the same key) with the maximal pair overlap.

    det_key: int64[N] (class * num_images + image); det_boxes: float64[N, 8] (human, object).
    gt_key: int64[M] sorted ascending; gt_boxes: float64[M, 8] in that order.
    Returns best: int64[N] (row of gt_key, -1 if no GT with that key) and
    ov: float64[N] (min(IoU_h, IoU_o) with it, -inf if none).

    Loops over k = 0 .. (most GT sharing one key) - 1, each step vectorised over the
    detections that have more than k GT; total work = number of (det, GT) pairs compared.
    The strict ``>`` keeps the first maximum, as the reference loops do.
    """
    n = det_key.shape[0]
    best = np.full(n, -1, dtype=np.int64)
    ov = np.full(n, -np.inf)
    if n == 0 or gt_key.shape[0] == 0:
        return best, ov
    lo, cnt = _gt_lookup(det_key, gt_key)
    sel = np.flatnonzero(cnt)
    if sel.size == 0:
        return best, ov
    sel = sel[np.argsort(-cnt[sel], kind="stable")]      # most GT first: active set = prefix
    c = cnt[sel]                                           # int64[S] descending
    first_gt = lo[sel]                                     # int64[S]
    boxes = det_boxes[sel]                                 # float64[S, 8]
    n_active = np.searchsorted(-c, -np.arange(int(c[0])), side="left")  # #(c > k) per k
    cur_ov = np.full(sel.size, -np.inf)
    cur_arg = np.zeros(sel.size, dtype=np.int64)
    for k in range(int(c[0])):
        m = int(n_active[k])
        g = first_gt[:m] + k
        gb = gt_boxes[g]
        o = np.minimum(iou_fn(boxes[:m, :4], gb[:, :4]), iou_fn(boxes[:m, 4:], gb[:, 4:]))
        upd = o > cur_ov[:m]
        cur_ov[:m][upd] = o[upd]
        cur_arg[:m][upd] = g[upd]
    best[sel] = cur_arg
    ov[sel] = cur_ov
    return best, ov


def _first_hits(best: np.ndarray, ov: np.ndarray, pos: np.ndarray, n_gt: int,
                thresh: float = MIN_OVERLAP) -> np.ndarray:
    """TP flags in evaluation order.

    best, ov: int64[N], float64[N] from _best_gt (input order); pos: int64[N] position of
    each detection in evaluation order.  A detection is a TP iff ov >= thresh and it is the
    first (smallest pos) detection whose best GT is that GT.  Returns bool[N] indexed by pos.
    """
    n = pos.shape[0]
    tp = np.zeros(n, dtype=bool)
    cand = np.flatnonzero(ov >= thresh)
    if cand.size:
        first = np.full(n_gt, n, dtype=np.int64)
        np.minimum.at(first, best[cand], pos[cand])
        tp[first[first < n]] = True
    return tp


def _ap_sorted(cls_sorted: np.ndarray, tp_sorted: np.ndarray, npos: np.ndarray,
               thresholds: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """11-point interpolated AP for all classes at once.

    cls_sorted: int64[N] non-decreasing (detections grouped by class, each class in its
    evaluation order); tp_sorted: bool[N]; npos: int64[K] GT count per class;
    thresholds: float64[T] ascending.  Returns (ap float64[K], recall float64[K] = recall
    after the last detection, num_det int64[K]).

    p(t) = max(prec[rec >= t]) (0 if empty); ap = ((0 + p(t0)/11) + p(t1)/11) + ... in order
    of t, which is how both reference implementations accumulate it.
    """
    K = num_classes
    T = thresholds.shape[0]
    n = cls_sorted.shape[0]
    ndet = np.bincount(cls_sorted, minlength=K).astype(np.int64)
    start = np.zeros(K, dtype=np.int64)
    np.cumsum(ndet[:-1], out=start[1:])
    end = start + ndet
    ap = np.zeros(K)
    recall = np.zeros(K)
    if n == 0:
        return ap, recall, ndet
    ctp_all = np.cumsum(tp_sorted, dtype=np.int64)
    before = np.concatenate(([0], ctp_all))[start]          # int64[K] TPs before the class
    ctp = (ctp_all - before[cls_sorted]).astype(np.float64)  # cumsum(tp) within the class
    nd = (np.arange(n, dtype=np.int64) - start[cls_sorted] + 1).astype(np.float64)  # tp + fp
    prec = ctp / nd
    npos_f = npos.astype(np.float64)[cls_sorted]
    with np.errstate(divide="ignore", invalid="ignore"):
        rec = ctp / npos_f                                   # NaN where npos == 0 (0/0)
    level = np.searchsorted(thresholds, rec, side="right")   # number of t with t <= rec
    level[np.isnan(rec)] = 0                                 # NaN >= t is false
    has = ndet > 0
    recall[has] = np.where(npos[has] > 0, rec[end[has] - 1], 0.0)
    cnt = np.bincount(cls_sorted * (T + 1) + level, minlength=K * (T + 1)).reshape(K, T + 1)
    # bounds[c, k] = first detection of class c with rec >= t_k (k < T); bounds[c, T] = end
    bounds = np.empty((K, T + 1), dtype=np.int64)
    bounds[:, :T] = start[:, None] + np.cumsum(cnt, axis=1)[:, :T]
    bounds[:, T] = end
    # max of prec over the disjoint ranges [bounds[c, k], bounds[c, k+1]) (0 when empty), then
    # p(t_k) = max over ranges j >= k: total work O(N) instead of O(11 N)
    prec_ext = np.concatenate((prec, [0.0]))                 # so that index n is valid
    seg = np.maximum.reduceat(prec_ext, bounds.ravel()).reshape(K, T + 1)[:, :T]
    seg[bounds[:, 1:] <= bounds[:, :T]] = 0.0                # empty ranges
    p = np.maximum.accumulate(seg[:, ::-1], axis=1)[:, ::-1]
    for k in range(T):
        ap = ap + p[:, k] / 11
    return ap, recall, ndet


def _hico_order(det_class: np.ndarray, det_score: np.ndarray, det_image: np.ndarray) -> np.ndarray:
    """Evaluation order: class ascending, score descending, ties by image then input order.

    Equal to ``np.lexsort((arange(N), det_image, -det_score, det_class))`` (NaN-free scores).
    Fast path (scores exactly representable in float32, as model outputs are, and
    bits(K) + 32 + bits(N) <= 64): one SIMD ``np.sort`` of a packed uint64 key
    (class | order-preserving float32 bits | tie rank).  General path: one unstable argsort
    of the scores, runs of tied scores put back in (image, input) order with one int64 key,
    then a stable radix sort of the int16 classes.
    """
    n = det_score.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    monotone = n == 1 or bool(np.all(det_image[1:] >= det_image[:-1]))

    def tie_rank():                                       # rank in (image, input) order
        if monotone:
            return np.arange(n, dtype=np.int64)
        r = np.empty(n, dtype=np.int64)
        r[np.argsort(det_image, kind="stable")] = np.arange(n, dtype=np.int64)
        return r

    cls_bits = int(det_class.max()).bit_length()
    n_bits = max(int(n - 1).bit_length(), 1)
    if cls_bits + 32 + n_bits <= 64 and det_class.min() >= 0:
        s32 = det_score.astype(np.float32) + np.float32(0.0)   # -0.0 -> +0.0 (they tie)
        if np.array_equal(s32.astype(np.float64), det_score):
            b = s32.view(np.uint32)
            asc = np.where(b >> np.uint32(31), ~b, b | np.uint32(0x80000000))  # ascending value
            desc = (~asc).astype(np.uint64)                   # ascending = score descending
            key = (det_class.astype(np.uint64) << np.uint64(32 + n_bits)) | \
                  (desc << np.uint64(n_bits)) | tie_rank().astype(np.uint64)
            key.sort()
            order_rank = (key & np.uint64((1 << n_bits) - 1)).astype(np.int64)
            if monotone:
                return order_rank
            inv = np.empty(n, dtype=np.int64)                 # rank -> row
            inv[tie_rank()] = np.arange(n, dtype=np.int64)
            return inv[order_rank]
    neg = -det_score
    o = np.argsort(neg)
    s = neg[o]
    tie = s[1:] == s[:-1]                                  # bool[N-1]
    if tie.any():
        run = np.cumsum(np.r_[True, ~tie]) - 1             # run id of every sorted position
        sub = np.flatnonzero(np.r_[tie, False] | np.r_[False, tie])
        osub = o[sub]
        o[sub] = osub[np.argsort(run[sub] * n + tie_rank()[osub])]
    cls = det_class[o]
    if cls.max() < 32767:
        cls = cls.astype(np.int16)                         # stable sort = radix sort
    return o[np.argsort(cls, kind="stable")]


def _gt_sorted(gt_class, gt_image, gt_boxes, num_images):
    """GT sorted by key = class * num_images + image (stable: keeps GT order within a key)."""
    key = gt_class.astype(np.int64) * num_images + gt_image.astype(np.int64)
    o = np.argsort(key, kind="stable")
    return key[o], np.ascontiguousarray(gt_boxes[o], dtype=np.float64)


def hico_ap_arrays(det_class: np.ndarray, det_score: np.ndarray, det_image: np.ndarray,
                   det_boxes: np.ndarray, gt_class: np.ndarray, gt_image: np.ndarray,
                   gt_boxes: np.ndarray, num_classes: int, num_images: int | None = None,
                   keep: np.ndarray | None = None) -> dict:
    """HICO-DET matching + AP on concatenated arrays (the fast in-process entry point).

    det_class: int[N] HOI index in [0, K); det_score: float64[N]; det_image: int[N] image
    index (the tie-break order, i.e. the annotation file's image order); det_boxes:
    float64[N, 8] ``[hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2]``.  Rows of one image must appear
    in their row order (ties within an image keep input order).
    gt_class: int[M]; gt_image: int[M]; gt_boxes: float64[M, 8] (one row per GT pair).
    keep: optional bool[N] (Known-Object filtering): rows with False are dropped first.
    No validation here (evaluate_hico / load_predictions validate).

    Returns a dict of numpy arrays: ``ap`` float64[K] (fractions, not %), ``recall``
    float64[K] (recall after the last detection), ``num_det`` int64[K], ``npos`` int64[K]
    and ``tp`` bool[N'] (per kept detection, input order).
    """
    det_class = np.asarray(det_class).astype(np.int64, copy=False)
    det_score = np.asarray(det_score, dtype=np.float64)
    det_image = np.asarray(det_image).astype(np.int64, copy=False)
    det_boxes = np.asarray(det_boxes, dtype=np.float64)
    gt_class = np.asarray(gt_class).astype(np.int64, copy=False)
    gt_image = np.asarray(gt_image).astype(np.int64, copy=False)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 8)
    if keep is not None:
        keep = np.asarray(keep, dtype=bool)
        det_class, det_score, det_image, det_boxes = (det_class[keep], det_score[keep],
                                                      det_image[keep], det_boxes[keep])
    if num_images is None:
        num_images = int(max(det_image.max(initial=-1), gt_image.max(initial=-1))) + 1
    n = det_class.shape[0]
    order = _hico_order(det_class, det_score, det_image)
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n, dtype=np.int64)
    gkey, gboxes = _gt_sorted(gt_class, gt_image, gt_boxes, num_images)
    best, ov = _best_gt(det_class * num_images + det_image, det_boxes, gkey, gboxes, iou_inclusive)
    tp_sorted = _first_hits(best, ov, pos, gkey.shape[0])
    npos = np.bincount(gt_class, minlength=num_classes).astype(np.int64)
    ap, recall, ndet = _ap_sorted(det_class[order], tp_sorted, npos, HICO_THRESHOLDS, num_classes)
    return {"ap": ap, "recall": recall, "num_det": ndet, "npos": npos, "tp": tp_sorted[pos]}


# ---------------------------------------------------------------------------------------
# HICO-DET: annotation file, predictions, evaluation
# ---------------------------------------------------------------------------------------



def _image_label_matrix(gt: HicoGT, image_labels, src: str = "<image-labels>") -> np.ndarray:
    """Known-Object: bool[O, num_images] 'image i has a positive label of object o'."""
    num_obj = int(gt.obj_of_class.max()) + 1
    n_img = len(gt.filenames)
    allowed = np.zeros((num_obj, n_img), dtype=bool)
    if isinstance(image_labels, (str, os.PathLike)):
        src = str(image_labels)
        image_labels = read(image_labels, "image-labels file")
    if isinstance(image_labels, dict):
        items = []
        for nm, labs in image_labels.items():
            i = gt.index.get(nm)
            if i is None:
                raise EvalInputError(f"{src}: image '{nm}': unknown image name (not in the "
                                     f"annotation file)")
            items.append((i, nm, labs))
    elif isinstance(image_labels, list):
        if len(image_labels) != n_img:
            raise EvalInputError(f"{src}: list of image labels has {len(image_labels)} entries, "
                                 f"the annotation file has {n_img} images")
        items = [(i, gt.filenames[i], labs) for i, labs in enumerate(image_labels)]
    else:
        raise EvalInputError(f"{src}: expected {{file_name: [hoi, ...]}} or a list of [hoi, ...] "
                             f"aligned with the annotation's filenames")
    for i, nm, labs in items:
        try:
            labs = as_index_list(list(labs) if isinstance(labs, np.ndarray) else labs, gt.num_classes)
        except ValueError as e:
            raise EvalInputError(f"{src}: image '{nm}': labels must be a list of hoi indices in "
                                 f"[0, {gt.num_classes}) ({e})") from None
        if len(labs):
            allowed[gt.obj_of_class[np.asarray(labs, dtype=np.int64)], i] = True
    return allowed


def _summarise(ap: np.ndarray, groups: dict) -> dict:
    out = {}
    for name, idx in groups.items():
        out[name] = None if idx is None or len(idx) == 0 else float(np.mean(ap[np.asarray(idx)]) * 100)
    return out


def _evaluate_hico_rows(gt: HicoGT, rows: np.ndarray, img: np.ndarray, zero_shot=None,
                        known_object: bool = False, image_labels=None,
                        labels_src: str = "<image-labels>") -> dict:
    """Evaluate validated rows float64[N, 10] with image indices img int64[N]."""
    K = gt.num_classes
    n_img = len(gt.filenames)
    det_class = rows[:, 0].astype(np.int64)
    keep = None
    approx = False
    result: dict = {"dataset": "hicodet", "setting": "known_object" if known_object else "default"}
    if known_object:
        if image_labels is None:
            approx = True
            allowed = np.zeros((int(gt.obj_of_class.max()) + 1, n_img), dtype=bool)
            allowed[gt.obj_of_class[gt.gt_class], gt.gt_image] = True
        else:
            allowed = _image_label_matrix(gt, image_labels, labels_src)
        keep = allowed[gt.obj_of_class[det_class], img]
        gt_outside = int((~allowed[gt.obj_of_class[gt.gt_class], gt.gt_image]).sum())
    r = hico_ap_arrays(det_class, rows[:, 1], img, rows[:, 2:10], gt.gt_class, gt.gt_image,
                       gt.gt_boxes, K, n_img, keep=keep)
    ap = r["ap"]
    all_idx = np.arange(K)
    groups = {"full": all_idx, "rare": gt.rare, "non_rare": gt.non_rare}
    zs_name, unseen = None, None
    if zero_shot is not None:
        zs_name, unseen = zero_shot_unseen(zero_shot, gt.zero_shot, gt.num_classes, gt.name)
        seen = np.setdiff1d(all_idx, unseen)
        groups.update(unseen=unseen, seen=seen)
    result.update(_summarise(ap, groups))
    result["zero_shot"] = zs_name
    if zs_name is not None:
        result["unseen_classes"] = unseen
    result["per_class"] = (ap * 100).tolist()
    result["per_class_recall"] = r["recall"].tolist()
    counts = {
        "num_classes": K,
        "num_images": n_img,
        "num_empty_images": gt.num_empty,
        "num_images_with_predictions": int(np.count_nonzero(np.bincount(img, minlength=n_img))),
        "num_detections": int(rows.shape[0]),
        "num_detections_evaluated": int(r["num_det"].sum()),
        "num_true_positives": int(r["tp"].sum()),
        "num_gt_pairs": int(gt.gt_class.shape[0]),
        "num_rare": None if gt.rare is None else len(gt.rare),
        "num_non_rare": None if gt.non_rare is None else len(gt.non_rare),
        "classes_without_gt": np.flatnonzero(r["npos"] == 0).tolist(),
        "gt_pairs_per_class": r["npos"].tolist(),
        "detections_per_class": r["num_det"].tolist(),
    }
    if zs_name is not None:
        counts["num_unseen"] = len(unseen)
        counts["num_seen"] = K - len(unseen)
    result["counts"] = counts
    if known_object:
        result["known_object_approximation"] = approx
        if approx:
            result["note"] = ("Known-Object image labels derived from the ground truth (images whose "
                              "GT contains the object), not the official anno.mat labels: an "
                              "approximation that can only raise the number. Pass --image-labels "
                              "for the official setting.")
        else:
            counts["gt_pairs_outside_image_labels"] = gt_outside
            if gt_outside:
                result["note"] = (f"{gt_outside} GT pairs lie in images whose labels do not contain "
                                  f"their object (the official anno.mat never does this)")
    return result


def evaluate_hico(anno: dict | HicoGT, preds: dict, zero_shot=None, known_object: bool = False,
                  image_labels=None) -> dict:
    """Official HICO-DET mAP of in-memory predictions.

    anno: the annotation dict (fredzzhang/hicodet format; K = len(correspondence)) or a
    parsed HicoGT.  preds: ``{filename: np.ndarray[N, 10]}`` (or lists of rows)
    ``[hoi, score, hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2]``, validated.
    zero_shot: None, 'rf-uc' | 'nf-uc' | 'uo' | 'uv' (or the long names), or a list of unseen
    class indices.  known_object: Known-Object setting; image_labels: None (GT-derived
    approximation), ``{filename: [hoi, ...]}``, a list aligned with filenames, or a path.

    Returns a dict: ``full``, ``rare``, ``non_rare`` (and ``unseen``, ``seen``) in percent,
    ``per_class`` (K APs in percent, class order), ``per_class_recall``, ``counts``,
    ``setting``, ``zero_shot`` (and ``known_object_approximation``/``note`` for Known-Object).
    """
    gt = anno if isinstance(anno, HicoGT) else parse_hico_anno(anno)
    rows, img = prediction_rows(preds, gt.filenames, gt.index, gt.num_classes, "<predictions>")
    return _evaluate_hico_rows(gt, rows, img, zero_shot, known_object, image_labels)


def evaluate_hico_files(anno_path, pred_path, zero_shot=None, known_object=False,
                        image_labels=None) -> dict:
    """evaluate_hico from files (the CLI path; avoids re-splitting the rows per image)."""
    gt = parse_hico_anno(read(anno_path, "annotation file"), str(anno_path))
    obj = read(pred_path, "prediction file")
    rows, img = prediction_rows(obj, gt.filenames, gt.index, gt.num_classes, str(pred_path))
    del obj
    res = _evaluate_hico_rows(gt, rows, img, zero_shot, known_object, image_labels,
                              str(image_labels) if image_labels is not None else "<image-labels>")
    res["files"] = {"anno": str(anno_path), "pred": str(pred_path)}
    if image_labels is not None:
        res["files"]["image_labels"] = str(image_labels)
    return res


def format_hico(res: dict) -> str:
    """Readable table of an evaluate_hico result."""
    c = res["counts"]
    head = (f"HICO-DET mAP ({res['setting'].replace('_', '-')} setting"
            + (f", zero-shot {res['zero_shot'].upper()}" if res.get("zero_shot") else "") + ")")
    lines = [head,
             f"  {c['num_classes']} classes, {c['num_images']} images, {c['num_detections']} "
             f"detections ({c['num_detections_evaluated']} evaluated), {c['num_gt_pairs']} GT pairs"]

    def row(label, key, n):
        v = res.get(key)
        count = f"   ({n} classes)" if n is not None else ""
        lines.append(f"  {label:<10}{'n/a' if v is None else f'{v:8.2f}'}" + count)

    if res.get("zero_shot"):
        row("Unseen", "unseen", c["num_unseen"])
        row("Seen", "seen", c["num_seen"])
        row("Full", "full", c["num_classes"])
    else:
        row("Full", "full", c["num_classes"])
        row("Rare", "rare", c["num_rare"])
        row("Non-rare", "non_rare", c["num_non_rare"])
    if res.get("known_object_approximation"):
        lines.append("  NOTE: " + res["note"])
    elif res.get("note"):
        lines.append("  note: " + res["note"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# V-COCO (vsrl_eval.py semantics)
# ---------------------------------------------------------------------------------------


@dataclass
class VCOCOGt:
    """Per-image V-COCO ground truth, as vsrl_eval's vcocodb (person rows only)."""
    actions: list                      # A action names
    roles: list                        # A lists: ['agent', role1, ...]
    image_ids: list                    # sorted image ids
    boxes: dict = field(default_factory=dict)      # image id -> float32[G, 4] all valid objects
    person: dict = field(default_factory=dict)     # image id -> int64[P] rows of persons in boxes
    actions_gt: dict = field(default_factory=dict)  # image id -> int[P, A] (-1 ignored, 0/1)
    role_gt: dict = field(default_factory=dict)    # image id -> int[P, A, 2] row in boxes or -1


def parse_vcoco_gt(vsrl: Any, coco: Any, vsrl_name: str = "<vsrl>", coco_name: str = "<coco>") -> VCOCOGt:
    """The V-COCO ground truth from the official VSRL list and COCO instances dict (both read and
    checked by formats.py), as vsrl_eval's vcocodb."""
    acts, roles, data = vsrl_actions(vsrl, vsrl_name)
    base_ann, lab_mat, roi_mat = _vsrl_labels(acts, data, vsrl_name)
    pos_of_ann = {int(v): i for i, v in enumerate(base_ann)}     # VSRL person -> row of lab_mat
    image_ids = sorted({int(v) for v in data[0][0]})
    person_cat, sizes, anns_by_img = coco_index(coco, image_ids, coco_name)
    gt = VCOCOGt(actions=acts, roles=roles, image_ids=image_ids)
    for img, aid in zip(data[0][0].tolist(), data[0][1].tolist()):
        if not any(is_number(an.get("id")) and an["id"] == aid for an in anns_by_img.get(img, [])):
            raise fail(vsrl_name, f"ann_id {aid} is not an annotation of that image in {coco_name}", img)
    for i in image_ids:
        if i not in sizes:
            raise fail(coco_name, f"not in 'images' (an image of {vsrl_name})", i)
        boxes, ids, is_person = coco_boxes(anns_by_img[i], sizes[i], person_cat, coco_name, i)
        pid = np.flatnonzero(np.array(is_person, dtype=bool))
        row_of_id = {v: r for r, v in enumerate(ids)}
        act = -np.ones((pid.size, len(acts)), dtype=np.int64)
        rol = -np.ones((pid.size, len(acts), 2), dtype=np.int64)
        for p, r in enumerate(pid):
            aid = ids[r]
            if aid not in pos_of_ann:
                continue
            q = pos_of_ann[aid]
            act[p] = lab_mat[q]
            for a in np.flatnonzero(lab_mat[q]):
                for j in range(len(roles[a]) - 1):
                    oid = int(roi_mat[q, a, j])
                    if oid == 0:
                        continue
                    if oid not in row_of_id:
                        raise fail(vsrl_name, f"ann_id {aid} role '{roles[a][j + 1]}': role object {oid} is "
                                              f"not a valid annotation of that image in {coco_name}", i,
                                   field_=f"{acts[a]}.role_object_id")
                    rol[p, a, j] = row_of_id[oid]
        gt.boxes[i] = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        gt.person[i] = pid
        gt.actions_gt[i] = act
        gt.role_gt[i] = rol
    return gt


def _vsrl_labels(acts: list, data: list, vsrl_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per VSRL person (the first action's ann_id order): (ann_id int64[M], action labels
    int64[M, A], role object ids int64[M, A, 2]); every action must list the same persons."""
    A = len(acts)
    base_ann = data[0][1]
    for a in range(1, A):
        if not np.array_equal(data[a][1], base_ann):
            raise fail(vsrl_name, "differs from the first action's (the official file lists every person "
                                  "for every action)", field_=f"{acts[a]}.ann_id")
    pos_of_ann = {int(v): i for i, v in enumerate(base_ann)}
    lab_mat = np.zeros((base_ann.size, A), dtype=np.int64)
    roi_mat = np.zeros((base_ann.size, A, 2), dtype=np.int64)
    for a, (img, ann, lab, roi) in enumerate(data):
        rows = np.flatnonzero(lab == 1)
        idx = np.array([pos_of_ann[int(v)] for v in ann[rows]], dtype=np.int64)
        if np.unique(idx).size != idx.size:
            raise fail(vsrl_name, "a person has label 1 twice", field_=f"{acts[a]}.label")
        lab_mat[idx, a] = 1
        bad = roi[rows, 0] != ann[rows]
        if bad.any():
            raise fail(vsrl_name, f"role_object_id[:, 0] must equal ann_id ({int(ann[rows][bad][0])})",
                       field_=f"{acts[a]}.role_object_id")
        roi_mat[idx, a, :roi.shape[1] - 1] = roi[rows, 1:]
    return base_ann, lab_mat, roi_mat


def _overlap32(boxes: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """vsrl_eval-style IoU (+1 convention, float32): boxes float32[..., G, 4] vs ref float32[..., 1, 4].

    Broadcasts; returns float32 with the same operation order as get_overlap.
    """
    one = np.float32(1.0)
    ixmin = np.maximum(boxes[..., 0], ref[..., 0])
    iymin = np.maximum(boxes[..., 1], ref[..., 1])
    ixmax = np.minimum(boxes[..., 2], ref[..., 2])
    iymax = np.minimum(boxes[..., 3], ref[..., 3])
    iw = np.maximum(ixmax - ixmin + one, np.float32(0))
    ih = np.maximum(iymax - iymin + one, np.float32(0))
    inters = iw * ih
    uni = ((ref[..., 2] - ref[..., 0] + one) * (ref[..., 3] - ref[..., 1] + one)
           + (boxes[..., 2] - boxes[..., 0] + one) * (boxes[..., 3] - boxes[..., 1] + one) - inters)
    with np.errstate(divide="ignore", invalid="ignore"):
        return inters / uni



def _voc_ap_allpoint(rec: np.ndarray, prec: np.ndarray) -> float:
    """VOC all-point AP (precision envelope, sum of recall steps x precision)."""
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def vcoco_ap(sc: list, tp: list, npos: int) -> float:
    """AP of one (action[, role]) from per-image lists (vsrl_eval's sort, dtypes and voc_ap)."""
    if npos == 0:
        return float("nan")
    if not sc:
        return 0.0
    a_sc = np.concatenate(sc).astype(np.float32)
    a_tp = np.concatenate(tp).astype(np.float32)
    idx = a_sc.argsort()[::-1]
    a_tp = a_tp[idx]
    a_fp = np.float32(1) - a_tp
    a_fp = np.cumsum(a_fp)
    a_tp = np.cumsum(a_tp)
    rec = a_tp / np.float32(npos)                              # float32, as vsrl_eval
    prec = a_tp / np.maximum(a_tp + a_fp, np.finfo(np.float64).eps)  # float64 (numpy 2)
    return float(np.float32(_voc_ap_allpoint(rec, prec)))      # role_ap is a float32 array


def _person_arrays(gt: VCOCOGt):
    """Concatenate the per-image person GT: start/count per image and global person arrays."""
    A = len(gt.actions)
    cnt = np.array([gt.person[i].size for i in gt.image_ids], dtype=np.int64)
    start = np.zeros(len(gt.image_ids), dtype=np.int64)
    np.cumsum(cnt[:-1], out=start[1:])
    P = int(cnt.sum())
    boxes = np.zeros((P, 4), dtype=np.float32)
    act = -np.ones((P, A), dtype=np.int64)
    role_box = np.full((P, A, 2, 4), -1.0, dtype=np.float32)
    role_has = np.zeros((P, A, 2), dtype=bool)
    for k, i in enumerate(gt.image_ids):
        s, n = int(start[k]), int(cnt[k])
        if n == 0:
            continue
        boxes[s:s + n] = gt.boxes[i][gt.person[i]]
        act[s:s + n] = gt.actions_gt[i]
        rid = gt.role_gt[i]                                     # int[n, A, 2]
        has = rid > -1
        role_has[s:s + n] = has
        role_box[s:s + n][has] = gt.boxes[i][rid[has]]
    return start, cnt, boxes, act, role_box, role_has


def _per_image_order(img: np.ndarray, score: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """vsrl_eval's per-image order of the detections idx (file order, valid scores):
    images ascending, inside an image ``scores.argsort()[::-1]``.

    Sorted by (image, -score); images with tied scores (whose order depends on numpy's sort)
    are redone with the very same ``argsort()[::-1]`` call on that image's scores.
    """
    if idx.size == 0:
        return idx
    ii = img[idx]
    o = idx[np.lexsort((-score[idx], ii))]
    so, io = score[o], img[o]
    tie = (so[1:] == so[:-1]) & (io[1:] == io[:-1])
    if tie.any():
        by_img = idx[np.argsort(ii, kind="stable")]             # file order inside each image
        tie_imgs = np.unique(io[1:][tie])
        lo = np.searchsorted(io, tie_imgs, side="left")
        hi = np.searchsorted(io, tie_imgs, side="right")
        for a, b in zip(lo.tolist(), hi.tolist()):              # same segments in o and by_img
            mine = by_img[a:b]
            o[a:b] = mine[score[mine].argsort()[::-1]]
    return o


def _best_person(dets: VCOCODets, pstart: np.ndarray, pcnt: np.ndarray, pbox: np.ndarray):
    """The best GT person of every detection of its image: (row of the person arrays, -1 when
    the image has none; its IoU), first maximum over float32 overlaps, as vsrl_eval."""
    D = dets.img.shape[0]
    jmax = np.full(D, -1, dtype=np.int64)
    ovmax = np.full(D, -np.inf, dtype=np.float32)
    n_per = pcnt[dets.img]
    for k in range(int(n_per.max(initial=0))):                  # k-th person of each image
        act_d = np.flatnonzero(n_per > k)
        g = pstart[dets.img[act_d]] + k
        ov = _overlap32(pbox[g], dets.person[act_d])
        upd = ov > ovmax[act_d]
        jmax[act_d[upd]] = g[upd]
        ovmax[act_d[upd]] = ov[upd]
    return jmax, ovmax


def evaluate_vcoco(gt: VCOCOGt, dets: VCOCODets, ovr_thresh: float = 0.5) -> dict:
    """Role AP (scenarios 1 and 2) and agent AP with vsrl_eval semantics, vectorised.

    Per (action[, role]): detections with a non-NaN score, in vsrl_eval's order (images in
    id order, then score descending per image); each is matched to the GT person of its
    image with the highest IoU (first maximum, +1 convention, float32); a match on an
    unannotated ("ignored") person skips the detection; TP = the person does the action,
    person IoU >= 0.5, role overlap >= 0.5 (scenario rules for a missing GT role) and the
    first such detection on that person; all others FP.  AP: vsrl_eval's global
    ``argsort()[::-1]`` of the scores and VOC all-point AP.
    """
    A = len(gt.actions)
    D = dets.img.shape[0]
    pstart, pcnt, pbox, pact, prole_box, prole_has = _person_arrays(gt)
    npos = (pact == 1).sum(0)                                   # int64[A]
    n_persons, n_ignored = pact.shape[0], int(np.any(pact == -1, axis=1).sum()) if pact.size else 0
    if pact.shape[0] == 0:      # no GT person at all: one dummy row, so that jm = 0 indexes (never a TP)
        pact, prole_box, prole_has = (np.zeros((1,) + x.shape[1:], x.dtype) for x in (pact, prole_box, prole_has))
    jmax, ovmax = _best_person(dets, pstart, pcnt, pbox)
    has_p = jmax >= 0
    jm = np.where(has_p, jmax, 0)
    ignored = has_p & np.any(pact[jm] == -1, axis=1) if pact.shape[0] else np.zeros(D, bool)
    n_skipped = 0

    def run(score, aid, extra_ok):
        nonlocal n_skipped
        o = _per_image_order(dets.img, score, np.flatnonzero(~np.isnan(score)))
        n_skipped += int(ignored[o].sum())
        o = o[~ignored[o]]
        ok = has_p[o] & (pact[jm[o], aid] == 1) & (ovmax[o] >= ovr_thresh) & extra_ok[o]
        tp = np.zeros(o.size, dtype=bool)
        cand = np.flatnonzero(ok)
        if cand.size:
            _, first = np.unique(jmax[o[cand]], return_index=True)
            tp[cand[first]] = True
        return score[o], tp

    everything = np.ones(D, dtype=bool)
    agent_ap = []
    for a in range(A):
        sc, tp = run(dets.agent[:, a], a, everything)
        agent_ap.append(vcoco_ap([sc], [tp], int(npos[a])))
    per_role = []
    for q, (a, r) in enumerate(vcoco_role_keys(gt)):
        rbox = dets.role[:, q, :4]                              # float32[D, 4]
        rsc = dets.role[:, q, 4]
        has_gt = has_p & prole_has[jm, a, r]
        ov_role = np.zeros(D, dtype=np.float32)
        if has_gt.any():
            ov_role[has_gt] = _overlap32(prole_box[jm[has_gt], a, r], rbox[has_gt])
        empty = np.all(rbox == 0.0, axis=1) | np.all(np.isnan(rbox), axis=1)
        s1 = np.where(has_gt, ov_role >= ovr_thresh, empty)     # no GT role: ok iff none predicted
        s2 = np.where(has_gt, ov_role >= ovr_thresh, True)      # no GT role: always ok
        aps = []
        for ok in (s1, s2):
            sc, tp = run(rsc, a, ok)
            aps.append(vcoco_ap([sc], [tp], int(npos[a])))
        per_role.append({"action": gt.actions[a], "role": gt.roles[a][r + 1], "npos": int(npos[a]),
                         "ap_scenario_1": aps[0] * 100, "ap_scenario_2": aps[1] * 100,
                         "num_det": int((~np.isnan(rsc)).sum())})
    main = [p for p in per_role if not (p["action"] == "point" and p["role"] == "instr")]

    def mean(vals):
        v = np.array(vals, dtype=np.float64)
        v = v[~np.isnan(v)]
        return float(v.mean()) if v.size else None

    return {
        "dataset": "vcoco",
        "role_ap_scenario_1": mean([p["ap_scenario_1"] for p in main]),
        "role_ap_scenario_2": mean([p["ap_scenario_2"] for p in main]),
        "num_roles": len(main),
        "role_ap_scenario_1_all_roles": mean([p["ap_scenario_1"] for p in per_role]),
        "role_ap_scenario_2_all_roles": mean([p["ap_scenario_2"] for p in per_role]),
        "agent_ap": mean([x * 100 for x in agent_ap]),
        "per_role": per_role,
        "per_action_agent": [{"action": gt.actions[a], "npos": int(npos[a]), "ap": agent_ap[a] * 100}
                             for a in range(A)],
        "counts": {"num_images": len(gt.image_ids),
                   "num_images_with_detections": int(np.unique(dets.img).size),
                   "num_detections": int(D),
                   "num_gt_persons": int(n_persons),
                   "num_gt_persons_ignored": n_ignored,
                   "num_skipped_ignored_person": n_skipped,
                   "num_actions": A},
    }


def evaluate_vcoco_files(vsrl_path, coco_path, pred_path) -> dict:
    """V-COCO evaluation from the VSRL file, the COCO instances file and a detection file."""
    gt = parse_vcoco_gt(read(vsrl_path, "VSRL file"), read(coco_path, "COCO file"),
                        str(vsrl_path), str(coco_path))
    dets, unknown, n = load_vcoco_dets(read(pred_path, "detection file"), gt, str(pred_path))
    res = evaluate_vcoco(gt, dets)
    res["unknown_keys"] = unknown
    res["files"] = {"vsrl": str(vsrl_path), "coco": str(coco_path), "pred": str(pred_path)}
    return res


def format_vcoco(res: dict) -> str:
    c = res["counts"]

    def f(v):
        return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.2f}"

    lines = [f"V-COCO ({c['num_images']} images, {c['num_detections']} detections)",
             f"  {'action-role':<24}{'#pos':>6}{'S1':>8}{'S2':>8}"]
    for p in res["per_role"]:
        lines.append(f"  {p['action'] + '-' + p['role']:<24}{p['npos']:>6}  {f(p['ap_scenario_1'])}  "
                     f"{f(p['ap_scenario_2'])}")
    lines.append(f"  Role AP scenario 1 ({res['num_roles']} roles): {f(res['role_ap_scenario_1'])}")
    lines.append(f"  Role AP scenario 2 ({res['num_roles']} roles): {f(res['role_ap_scenario_2'])}")
    lines.append(f"  Agent AP ({len(res['per_action_agent'])} actions):      {f(res['agent_ap'])}")
    if res.get("unknown_keys"):
        lines.append(f"  warning: ignored unknown detection keys: {', '.join(res['unknown_keys'][:10])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# SWiG-HOI (THID evaluator)
# ---------------------------------------------------------------------------------------


def swig_ap_arrays(det_class, det_score, det_image, det_boxes, gt_class, gt_image, gt_boxes,
                   num_classes, eval_ids, num_images=None, topk: int = SWIG_TOPK) -> dict:
    """THID SWiG-HOI matching + AP on arrays (rows in prediction-file order).

    Per evaluated class: ``np.argsort(scores)[::-1][:topk]`` over that class's detections in
    input order (THID's exact order, ties included), continuous IoU, first strict maximum,
    >= 0.5 on an unused GT, AP with t = i / 10.  Returns ``ap`` float64[K] (0 for classes not
    evaluated), ``recall``, ``num_det`` (kept), ``npos``.
    """
    det_class = np.asarray(det_class).astype(np.int64, copy=False)
    det_score = np.asarray(det_score, dtype=np.float64)
    det_image = np.asarray(det_image).astype(np.int64, copy=False)
    det_boxes = np.asarray(det_boxes, dtype=np.float64)
    gt_class = np.asarray(gt_class, dtype=np.int64)
    gt_image = np.asarray(gt_image, dtype=np.int64)
    if num_images is None:
        num_images = int(max(det_image.max(initial=-1), gt_image.max(initial=-1))) + 1
    is_eval = np.zeros(num_classes, dtype=bool)
    is_eval[np.asarray(eval_ids, dtype=np.int64)] = True
    by_cls = np.argsort(det_class, kind="stable")
    by_cls = by_cls[is_eval[det_class[by_cls]]]
    cls_sorted = det_class[by_cls]
    bounds = np.flatnonzero(np.r_[True, cls_sorted[1:] != cls_sorted[:-1], True])
    parts = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        idx = by_cls[s:e]
        parts.append(idx[np.argsort(det_score[idx])[::-1][:topk]])
    order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = order.size
    c = det_class[order]
    gkey, gboxes = _gt_sorted(gt_class, gt_image, gt_boxes, num_images)
    best, ov = _best_gt(c * num_images + det_image[order], det_boxes[order], gkey, gboxes,
                        iou_continuous)
    tp = _first_hits(best, ov, np.arange(n, dtype=np.int64), gkey.shape[0])
    npos = np.bincount(gt_class, minlength=num_classes).astype(np.int64)
    ap, recall, ndet = _ap_sorted(c, tp, npos, SWIG_THRESHOLDS, num_classes)
    return {"ap": ap, "recall": recall, "num_det": ndet, "npos": npos}


def _evaluate_swig_rows(gt: SwigGT, rows, img) -> dict:
    r = swig_ap_arrays(rows[:, 0].astype(np.int64), rows[:, 1], img, rows[:, 2:10], gt.gt_class,
                       gt.gt_image, gt.gt_boxes, gt.num_classes, gt.eval_ids, len(gt.filenames))
    ap = r["ap"]
    e = gt.eval_ids
    f = gt.frequency[e]
    groups = {"full": e, "non_rare": e[f == 2], "rare": e[f == 1], "unseen": e[f == 0]}
    res = {"dataset": "swig"}
    res.update(_summarise(ap, groups))
    res["class_ids"] = e.tolist()
    res["per_class"] = (ap[e] * 100).tolist()
    res["counts"] = {
        "num_images": len(gt.filenames),
        "num_classes_evaluated": int(e.size),
        "num_non_rare": int((f == 2).sum()), "num_rare": int((f == 1).sum()),
        "num_unseen": int((f == 0).sum()),
        "num_detections": int(rows.shape[0]),
        "num_detections_evaluated": int(r["num_det"].sum()),
        "num_gt_pairs": int(gt.gt_class.size),
        "num_gt_pairs_no_object_skipped": gt.num_no_object,
        "num_gt_pairs_evaluated": int(r["npos"][e].sum()),
        "gt_pairs_per_class": r["npos"][e].tolist(),
    }
    return res


def evaluate_swig(anno: Any, preds: dict, meta: dict | None = None) -> dict:
    """SWiG-HOI Non-rare / Rare / Unseen / Full mAP (percent) of in-memory predictions.

    anno: the SWiG-HOI json list (or a parsed SwigGT); preds: ``{file_name: [N, 10] rows}``
    with hoi = SWiG interaction id.
    """
    gt = anno if isinstance(anno, SwigGT) else parse_swig_gt(anno, meta or load_swig_meta())
    rows, img = prediction_rows(preds, gt.filenames, gt.index, gt.num_classes, "<predictions>")
    return _evaluate_swig_rows(gt, rows, img)


def evaluate_swig_files(anno_path, pred_path, meta_path=None) -> dict:
    gt = parse_swig_gt(read(anno_path, "annotation file"), load_swig_meta(meta_path),
                       str(anno_path))
    obj = read(pred_path, "prediction file")
    rows, img = prediction_rows(obj, gt.filenames, gt.index, gt.num_classes, str(pred_path))
    res = _evaluate_swig_rows(gt, rows, img)
    res["files"] = {"anno": str(anno_path), "pred": str(pred_path)}
    return res


def format_swig(res: dict) -> str:
    c = res["counts"]
    lines = [f"SWiG-HOI mAP ({c['num_images']} images, {c['num_detections']} detections, "
             f"{c['num_classes_evaluated']} evaluated interactions)"]
    for label, key, n in (("Non-rare", "non_rare", c["num_non_rare"]), ("Rare", "rare", c["num_rare"]),
                          ("Unseen", "unseen", c["num_unseen"]),
                          ("Full", "full", c["num_classes_evaluated"])):
        v = res[key]
        lines.append(f"  {label:<10}{'n/a' if v is None else f'{v:8.2f}'}   ({n} classes)")
    return "\n".join(lines)



# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

def _build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="eval.py", description="Official HOI detection evaluators "
                      "(HICO-DET, V-COCO, SWiG-HOI).")
    sub = p.add_subparsers(dest="dataset", required=True)
    h = sub.add_parser("hico", help="HICO-DET mAP (MATLAB toolkit semantics)")
    h.add_argument("--anno", required=True, help="instances_test2015.json (fredzzhang format)")
    h.add_argument("--pred", required=True, help="prediction file {file_name: [[hoi, score, h(4), o(4)], ...]}")
    h.add_argument("--zero-shot", choices=sorted(ZERO_SHOT_SPLITS), default=None)
    h.add_argument("--known-object", action="store_true", help="Known-Object setting")
    h.add_argument("--image-labels", default=None,
                   help="Known-Object image-level labels: {file_name: [hoi, ...]} or a list aligned "
                        "with filenames (default: derived from GT, an approximation)")
    h.add_argument("--out", default=None, help="write the result JSON here (atomically; never an input)")
    v = sub.add_parser("vcoco", help="V-COCO role AP (vsrl_eval.py semantics)")
    v.add_argument("--vsrl", required=True, help="official VSRL file, e.g. vcoco_test.json")
    v.add_argument("--coco", required=True, help="COCO instances JSON with the boxes "
                                                  "(e.g. instances_vcoco_all_2014.json)")
    v.add_argument("--pred", required=True, help="vsrl_eval detection list (JSON)")
    v.add_argument("--out", default=None)
    s = sub.add_parser("swig", help="SWiG-HOI mAP (THID evaluator semantics)")
    s.add_argument("--anno", required=True, help="swig_test_1000.json")
    s.add_argument("--pred", required=True, help="prediction file keyed by file_name")
    s.add_argument("--meta", default=None, help="swig_v1_meta.json (default: shared data)")
    s.add_argument("--out", default=None)
    d = sub.add_parser("detector", help="box AP of a detection file on a dataset's GT boxes "
                                        "(detector_ap.py, pycocotools COCOeval)")
    d.add_argument("--anno", required=True, help="HICO-DET / synthetic world / V-COCO (fredzzhang "
                   "instances_vcoco_*.json) / SWiG-HOI annotation file")
    d.add_argument("--detections", required=True, help="per-image JSON {file_name: {boxes, scores, "
                   "labels}} in the annotation's frame, or a COCO results list (image_id: V-COCO's "
                   "COCO ids, else the last number in the file name; category_id: COCO's 1..90, "
                   "SWiG-HOI's own)")
    d.add_argument("--dataset", dest="det_dataset", choices=detector_ap.DETECTOR_DATASETS, default=None,
                   help="default: from the file (a list: swig; 'annotations': vcoco; 'annotation': "
                        "synthetic if its name is 'synthetic', else hico)")
    d.add_argument("--meta", default=None, help="SWiG-HOI: swig_v1_meta.json (default: shared data)")
    d.add_argument("--out", default=None, help="write the result JSON here (atomically; never an input)")
    return p


#: the options of the subcommands that name input files (all of them are checked against --out)
INPUT_OPTIONS = ("anno", "pred", "image_labels", "vsrl", "coco", "meta", "detections")


def _cli_inputs(args: argparse.Namespace) -> list:
    """(option, path) of every input file of the command, the shared files it reads included."""
    inputs = [(f"--{k.replace('_', '-')}", getattr(args, k)) for k in INPUT_OPTIONS
              if getattr(args, k, None) is not None]
    if args.dataset == "hico" and args.zero_shot:
        inputs.append(("zero-shot split file",
                       data_root() / "hicodet" / "derived" / "zero_shot_unseen_hoi_indices.json"))
    if args.dataset in ("swig", "detector") and args.meta is None:
        inputs.append(("SWiG meta file", data_root() / "swig_hoi" / "derived" / "swig_v1_meta.json"))
    return inputs


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (common.run_command): bad input, a file that cannot be read or written -> one line, 2."""
    args = _build_parser().parse_args(argv)
    return run_command(lambda: _cli(args), [((EvalInputError, OSError), 2)], doing=f"evaluating {args.dataset}")


def _cli(args: argparse.Namespace) -> int:
    if args.out:       # the temps of a run killed while writing --out; an interrupted one removes its own
        clean_stale_temps(os.path.dirname(os.path.abspath(args.out)), os.path.basename(args.out))
    res, text = _run(args)
    print(text)
    if args.out:
        write_json_atomic(res, args.out)
        print(f"wrote {args.out}")
    return 0


def _run(args: argparse.Namespace) -> tuple[dict, str]:
    """The subcommand of the parsed command line -> (result, its table)."""
    if args.out:
        refuse_outputs_over_inputs([("--out", args.out)], _cli_inputs(args), EvalInputError)
    if args.dataset == "hico" and args.image_labels and not args.known_object:
        raise EvalInputError("--image-labels is only used with --known-object")
    if args.dataset == "hico":
        res = evaluate_hico_files(args.anno, args.pred, args.zero_shot, args.known_object,
                                  args.image_labels)
        text = format_hico(res)
    elif args.dataset == "vcoco":
        res = evaluate_vcoco_files(args.vsrl, args.coco, args.pred)
        text = format_vcoco(res)
    elif args.dataset == "detector":
        res = detector_ap.evaluate_detector(args.anno, args.detections, args.det_dataset, args.meta)
        text = detector_ap.format_detector(res)
    else:
        res = evaluate_swig_files(args.anno, args.pred, args.meta)
        text = format_swig(res)
    return res, text


if __name__ == "__main__":
    sys.exit(main())
