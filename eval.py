"""Exact HOI-detection evaluators (HICO-DET, V-COCO, SWiG-HOI) and their CLI.

Every number this file prints is meant to be the official one (see PROTOCOLS.md), not a
close one.  The three evaluators reproduce, rule for rule:

* HICO-DET: the MATLAB toolkit of ywchao/ho-rcnn (``evaluation/eval_one.m`` and
  ``VOCevaldet_bboxpair.m``), default and Known-Object settings, plus the four zero-shot
  splits (RF-UC, NF-UC, UO, UV).
* V-COCO: ``vsrl_eval.py`` of s-gupta/v-coco (role AP, scenarios 1 and 2, agent AP).
* SWiG-HOI: the evaluator of the THID code (scwangdyd/promting_hoi ``swig_evaluator.py``).

The code is ours (a re-derivation of the rules, vectorised with numpy); none of it is copied.

Command line
------------
    python eval.py hico  --anno instances_test2015.json --pred PRED.json
                         [--zero-shot rf-uc|nf-uc|uo|uv] [--known-object [--image-labels FILE]]
                         [--out RESULT.json]
    python eval.py vcoco --vsrl vcoco_test.json --coco instances_vcoco_all_2014.json
                         --pred DETS.json [--out RESULT.json]
    python eval.py swig  --anno swig_test_1000.json --pred PRED.json [--meta META.json]
                         [--out RESULT.json]
    python eval.py detector --anno ANNO.json --detections DETS.json
                         [--dataset hico|vcoco|swig|synthetic] [--meta META.json] [--out RESULT.json]
                         (COCO box AP of a detector on the GT boxes, pycocotools; see its block below)

Bad input (a missing/empty/malformed file, an unknown image, a class out of range, a NaN
score or box, x2 < x1, ...) raises :class:`EvalInputError` (a ``ValueError``) whose one-line
message names the file, the image and the field; the CLI prints ``error: <message>`` on
stderr and exits with status 2.  ``--out`` writes the result JSON atomically (temp file in
the same folder + ``os.replace``).

Prediction file (HICO-DET and SWiG-HOI; PROTOCOLS.md)
-----------------------------------------------------
JSON object ``{file_name: [[hoi, score, hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2], ...]}``,
``hoi`` 0-based in the dataset's class order (an integral float such as ``5.0`` is accepted),
boxes in the annotation file's own pixel frame (HICO-DET: the raw 1-based inclusive boxes).
Images absent from the file have no detections; ``{}`` is a valid (all-zero) prediction.
Rows are reported 0-based in error messages (``row 3`` is the fourth row of that image).

HICO-DET rules (ywchao/ho-rcnn)
-------------------------------
Per class: all detections of the class over all images, stable-sorted by score descending
(ties keep image order, image order = order of ``filenames`` in the annotation file, then
row order).  Each detection is compared with the GT pairs of its class in its image:
overlap = min(IoU_h, IoU_o), IoU with the inclusive ``+1`` convention; the FIRST GT with the
maximal overlap is taken; overlap >= 0.5 on an unused GT -> TP (GT marked used), on a used
GT -> FP (no fall-back to the second best), otherwise FP.  rec = cumsum(tp)/npos,
prec = cumsum(tp)/(cumsum(tp)+cumsum(fp)); AP = sum over t in ``0:0.1:1`` (the values of
``np.arange(0, 1.1, 0.1)``, i.e. 0.30000000000000004, 0.6000000000000001, ...) of
``max(prec[rec >= t])`` (0 if empty), accumulated exactly like MATLAB's ``ap = ap + p/11``.
(PROTOCOLS.md fixes these t values: GNU Octave and the numpy ports of the toolkit produce
them.  MATLAB's own colon operator is reported to build the upper half of a range from its
end, which would give exactly 0.6 and 0.7; the two differ only for a class whose recall is
exactly 0.6 or 0.7 where the precision envelope changes; ``HICO_THRESHOLDS`` is the switch.)
A class without detections has AP 0 (a class without GT, possible only in small synthetic
sets, also gets 0, as in the MATLAB code).  Full = mean over all classes, Rare/Non-rare over
the annotation file's ``rare``/``non_rare`` lists.

Vectorised form of the sequential "used GT" rule: since a used GT turns every later detection
whose best GT it is into an FP (no fall-back), a detection is a TP iff its overlap is >= 0.5
and it is the FIRST detection in evaluation order whose best GT is that GT.  Detections are
grouped by (class, image) with ``searchsorted`` on the sorted GT keys, so IoU is only computed
against the GT of that class in that image; memory is proportional to the input.

Known-Object (``ko`` mode of eval_one.m): for class c with object o, only detections in
images whose image-level labels contain any HOI of object o are kept (GT unchanged).  The
official image-level labels (``anno.mat``) are not shipped with the project; pass them with
``--image-labels FILE`` in one of two forms:
  * ``{"<file_name>": [hoi, hoi, ...], ...}``  positive HOI labels per image (0-based; images
    not listed have no label), or
  * ``[[hoi, ...], [hoi, ...], ...]``  a list aligned with the annotation file's ``filenames``.
(Convert ``anno.mat``'s ``anno_test`` matrix by taking, per image, the HOIs whose entry is 1.)
Without it the labels are derived from the ground truth ("images whose GT contains o"): that
set is contained in the official one, so it keeps fewer false positives and can only RAISE the
number; the output says so (``known_object_approximation: true`` and a ``note``).

Zero-shot (``--zero-shot``): unseen classes from the annotation file's optional ``zero_shot``
dict (``{split: [hoi, ...]}`` or ``{split: {"unseen": [hoi, ...]}}``, keys either ``rf-uc``/``nf-uc``/``uo``/``uv`` or
``rare_first``/``non_rare_first``/``unseen_object``/``unseen_verb``; the synthetic world writes
it), else from ``data/hicodet/derived/zero_shot_unseen_hoi_indices.json`` (600-class HICO-DET
only).  Reports Unseen, Seen and Full (and Rare/Non-rare as usual).

V-COCO (s-gupta/v-coco vsrl_eval.py)
------------------------------------
Ground truth: the official VSRL file (list over actions of ``{action_name, role_name,
image_id, ann_id, label, role_object_id, include}``, e.g. ``vcoco_test.json``) plus a COCO
instances JSON holding at least those images and annotations (``images``: id, width, height;
``annotations``: id, image_id, category_id, bbox [x, y, w, h], area, iscrowd, optional
ignore; optional ``categories``: person = the category named "person", else id 1).  The
evaluated images are the VSRL file's image ids.  COCO boxes become
``[x, y, x + max(0, w - 1), y + max(0, h - 1)]`` clipped to the image, and annotations with
area 0 or no extent are dropped, exactly as vsrl_eval does.
Detections (``--pred``): a JSON list of dicts, vsrl_eval's own detection format:
``{"image_id": int, "person_box": [x1, y1, x2, y2], "<action>_agent": score,
"<action>_<role>": [x1, y1, x2, y2, score], ...}`` (role names from the VSRL file, e.g.
``hit_instr``, ``hit_obj``, ``eat_obj``).  A NaN/null/missing score means "not predicted"
(vsrl_eval skips NaN scores); a role box of all zeros or NaN means "no role object"
(scenario 1).  Reported: role AP scenario 1 and 2 = mean over the action-roles without
``point-instr`` (24 on V-COCO), agent AP = mean over actions, NaN (no positives) ignored.
Extensions where vsrl_eval would crash: an (action, role) without detections gets AP 0; one
without positives gets NaN and is left out of the means; a detection in an image without any
person ground truth is an FP.  Float32 arithmetic for boxes and overlaps, float64 precision
and the same (non-stable) ``argsort()[::-1]`` orders are used, as in vsrl_eval under numpy 2.

SWiG-HOI (THID)
---------------
Ground truth: the THID/SWiG json (``swig_test_1000.json``): a list of images
``{"file_name", "box_annotations": [{"bbox": [x1, y1, x2, y2], "category_id"}],
"hoi_annotations": [{"subject_id", "object_id", "action_id"}]}``; (action_id, category of the
object box) -> interaction id through ``SWIG_INTERACTIONS`` of
``data/swig_hoi/derived/swig_v1_meta.json``.  Predictions: the prediction file above keyed by
``file_name``, ``hoi`` = interaction id.  Only ``evaluation == 1`` interactions count (5,539).
Per class the top 19,999 detections by score (``np.argsort(scores)[::-1]`` over the
prediction file's order, as THID), continuous IoU (no +1), first strict maximum, >= 0.5 on an
unused GT; AP 11-point with t = i / 10.  Reports Non-rare (frequency 2), Rare (1),
Unseen (0) and Full.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Sequence

import numpy as np

from common import (
    ZERO_SHOT_SPLITS,
    HeldNotes,
    OneLineParser,
    as_box,
    as_index,
    as_index_list,
    atomic_write_json,
    data_root,
    first_duplicate,
    print_error,
    read_json,
    refuse_outputs_over_inputs,
    swig_meta_tables,
)

#: t of the official MATLAB loop ``for t = 0:0.1:1`` (== np.arange(0, 1.1, 0.1), float64[11])
HICO_THRESHOLDS = np.arange(0, 1.1, 0.1)
#: t = i / 10.0 of the THID SWiG evaluator, float64[11]
SWIG_THRESHOLDS = np.array([i / 10.0 for i in range(11)])
SWIG_TOPK = 19999
MIN_OVERLAP = 0.5

ROW_FIELDS = ("hoi", "score", "hx1", "hy1", "hx2", "hy2", "ox1", "oy1", "ox2", "oy2")


class EvalInputError(ValueError):
    """Bad evaluation input; the one-line message names the file, the image and the field."""


class EvalFileNotFoundError(EvalInputError, FileNotFoundError):
    """An input file does not exist."""


# ---------------------------------------------------------------------------------------
# File helpers
# ---------------------------------------------------------------------------------------

def _read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file; raise EvalInputError (EvalFileNotFoundError) naming the file on any problem."""
    return read_json(path, what, error=EvalInputError, missing=EvalFileNotFoundError)


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


def _isnum(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------
# Core: IoU, matching, AP (shared by HICO-DET and SWiG-HOI)
# ---------------------------------------------------------------------------------------

def _iou_inclusive(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise IoU with the inclusive +1 convention of the MATLAB toolkit.

    a, b: float64[n, 4] ``[x1, y1, x2, y2]`` -> float64[n]; 0 unless iw > 0 and ih > 0.
    Same operation order as VOCevaldet_bboxpair.m (bit-identical results).
    """
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1
    inter = iw * ih
    ua = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1) + \
         (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1) - inter
    ok = (iw > 0) & (ih > 0)
    out = np.zeros(a.shape[0])
    np.divide(inter, ua, out=out, where=ok)
    return out


def _iou_continuous(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise plain IoU (no +1) of the THID SWiG evaluator.

    a, b: float64[n, 4] -> float64[n]; widths/heights and the intersection are clamped at 0,
    IoU = 0 when the intersection is <= 0, else inter / (area_a + area_b - inter).
    """
    wa = np.maximum(a[:, 2] - a[:, 0], 0.0)
    ha = np.maximum(a[:, 3] - a[:, 1], 0.0)
    wb = np.maximum(b[:, 2] - b[:, 0], 0.0)
    hb = np.maximum(b[:, 3] - b[:, 1], 0.0)
    xi = np.maximum(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0.0)
    yi = np.maximum(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0.0)
    inter = xi * yi
    den = wa * ha + wb * hb - inter
    out = np.zeros(a.shape[0])
    np.divide(inter, den, out=out, where=inter > 0)
    return out


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
    best, ov = _best_gt(det_class * num_images + det_image, det_boxes, gkey, gboxes, _iou_inclusive)
    tp_sorted = _first_hits(best, ov, pos, gkey.shape[0])
    npos = np.bincount(gt_class, minlength=num_classes).astype(np.int64)
    ap, recall, ndet = _ap_sorted(det_class[order], tp_sorted, npos, HICO_THRESHOLDS, num_classes)
    return {"ap": ap, "recall": recall, "num_det": ndet, "npos": npos, "tp": tp_sorted[pos]}


# ---------------------------------------------------------------------------------------
# HICO-DET: annotation file, predictions, evaluation
# ---------------------------------------------------------------------------------------

@dataclass
class HicoGT:
    """Parsed HICO-DET-format annotation (fredzzhang/hicodet JSON or the synthetic world)."""
    name: str
    filenames: list
    index: dict                     # filename -> image index
    num_classes: int
    obj_of_class: np.ndarray        # int64[K] object index of each class
    gt_class: np.ndarray            # int64[M]
    gt_image: np.ndarray            # int64[M]
    gt_boxes: np.ndarray            # float64[M, 8]
    rare: list | None
    non_rare: list | None
    zero_shot: dict | None
    num_empty: int = 0


def _anno_err(name, msg):
    return EvalInputError(f"{name}: {msg}")


def parse_hico_anno(anno: dict, name: str = "<anno>") -> HicoGT:
    """Validate a HICO-DET annotation dict and extract the GT arrays.

    Required keys: ``annotation`` (per image ``boxes_h``, ``boxes_o``, ``hoi``), ``filenames``,
    ``correspondence`` ([hoi, object, verb] per class; K = its length).  Optional: ``rare``,
    ``non_rare``, ``zero_shot``, ``empty``.
    """
    fns, annos, corr = _hico_header(anno, name)
    K = corr.shape[0]
    index = {}
    for i, f in enumerate(fns):
        if f in index:
            raise _anno_err(name, f"image '{f}': duplicate file name in 'filenames'")
        index[f] = i
    gt_class, gt_image, gt_boxes = _hico_pairs(annos, fns, K, name)
    rare, non_rare = _class_list(anno, "rare", K, name), _class_list(anno, "non_rare", K, name)
    if rare and non_rare and set(rare) & set(non_rare):
        raise _anno_err(name, f"class {min(set(rare) & set(non_rare))} is in both 'rare' and 'non_rare'")
    empty = _class_list(anno, "empty", len(fns), name, "image indices") or []
    zs = anno.get("zero_shot")
    if zs is not None and not isinstance(zs, dict):
        raise _anno_err(name, "field 'zero_shot' must be an object {split: [hoi, ...]}")
    return HicoGT(name=name, filenames=fns, index=index, num_classes=K,
                  obj_of_class=corr[:, 1].copy(), gt_class=gt_class, gt_image=gt_image,
                  gt_boxes=gt_boxes, rare=rare, non_rare=non_rare,
                  zero_shot=zs, num_empty=len(empty))


def _hico_header(anno: Any, name: str) -> tuple[list, list, np.ndarray]:
    """The file's top level -> (filenames, annotation entries, correspondence int64[K, >= 2])."""
    if not isinstance(anno, dict):
        raise _anno_err(name, "annotation file must be a JSON object (fredzzhang/hicodet format)")
    for key in ("annotation", "filenames", "correspondence"):
        if key not in anno:
            raise _anno_err(name, f"missing key '{key}'")
    fns, annos, corr = anno["filenames"], anno["annotation"], anno["correspondence"]
    if not isinstance(fns, list) or not all(isinstance(f, str) for f in fns):
        raise _anno_err(name, "field 'filenames' must be a list of strings")
    if not isinstance(annos, list) or len(annos) != len(fns):
        raise _anno_err(name, f"field 'annotation' must be a list with one entry per filename "
                              f"({len(fns)})")
    if not isinstance(corr, list) or not corr:
        raise _anno_err(name, "field 'correspondence' must be a non-empty list of [hoi, object, verb]")
    K = len(corr)
    corr_a = np.full((K, 3), -1, dtype=np.int64)           # row k: class k's [k, object, verb]
    for r, c in enumerate(corr):
        try:
            if not isinstance(c, list) or len(c) not in (2, 3):
                raise ValueError("expected [hoi, object, verb]")
            row = [as_index(c[0], K)] + [as_index(x) for x in c[1:]]
        except ValueError as e:
            raise _anno_err(name, f"field 'correspondence[{r}]': {e}") from None
        if corr_a[row[0], 0] >= 0:
            raise _anno_err(name, f"field 'correspondence[{r}]': class {row[0]} listed twice")
        corr_a[row[0], :len(row)] = row
    return fns, annos, corr_a


def _hico_pairs(annos: list, fns: list, K: int, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The GT pairs of all images -> (class int64[M], image int64[M], boxes float64[M, 8]).

    Fast path: one conversion of every image's lists; _diagnose_hico_pairs finds the first
    malformed value only when that conversion fails."""
    cls_l, img_l, bh_l, bo_l = [], [], [], []
    for i, a in enumerate(annos):
        if not isinstance(a, dict):
            raise _anno_err(name, f"image '{fns[i]}': annotation entry must be an object")
        for key in ("boxes_h", "boxes_o", "hoi"):
            if key not in a or not isinstance(a[key], list):
                raise _anno_err(name, f"image '{fns[i]}': missing or malformed field '{key}'")
        n = len(a["hoi"])
        if len(a["boxes_h"]) != n or len(a["boxes_o"]) != n:
            raise _anno_err(name, f"image '{fns[i]}': fields 'boxes_h', 'boxes_o' and 'hoi' "
                                  f"have different lengths")
        if n:
            cls_l.append(a["hoi"])
            img_l.append(n)
            bh_l.append(a["boxes_h"])
            bo_l.append(a["boxes_o"])
    m = sum(img_l)
    gt_image = np.repeat(np.array([i for i, a in enumerate(annos) if len(a["hoi"])], dtype=np.int64),
                         img_l) if m else np.zeros(0, np.int64)
    try:
        gt_class = np.array(list(chain.from_iterable(cls_l)), dtype=np.float64).reshape(-1)
        bh = np.array(list(chain.from_iterable(bh_l)), dtype=np.float64).reshape(m, 4)
        bo = np.array(list(chain.from_iterable(bo_l)), dtype=np.float64).reshape(m, 4)
    except (ValueError, TypeError):
        _diagnose_hico_pairs(annos, fns, name)
        raise _anno_err(name, "malformed 'annotation'") from None
    checks = [
        (~np.isfinite(gt_class) | (gt_class != np.floor(gt_class)) | (gt_class < 0) | (gt_class >= K),
         f"field 'hoi' out of range [0, {K}) or not an integer"),
        (~np.isfinite(bh).all(1), "field 'boxes_h' has a NaN/inf coordinate"),
        (~np.isfinite(bo).all(1), "field 'boxes_o' has a NaN/inf coordinate"),
        ((bh[:, 2] < bh[:, 0]) | (bh[:, 3] < bh[:, 1]), "field 'boxes_h': x2 < x1 or y2 < y1"),
        ((bo[:, 2] < bo[:, 0]) | (bo[:, 3] < bo[:, 1]), "field 'boxes_o': x2 < x1 or y2 < y1"),
    ]
    for bad, msg in checks:          # the annotation is checked like the predictions
        if bad.any():
            j = int(np.argmax(bad))
            i = int(gt_image[j])
            r = j - int(np.searchsorted(gt_image, i))
            raise _anno_err(name, f"image '{fns[i]}' pair {r}: {msg}")
    return gt_class.astype(np.int64), gt_image, np.concatenate([bh, bo], axis=1)


def _diagnose_hico_pairs(annos: list, fns: list, name: str) -> None:
    """Slow path: raise on the first box that is not [x1, y1, x2, y2] or hoi that is not a number."""
    for i, a in enumerate(annos):
        for key in ("boxes_h", "boxes_o"):
            for r, b in enumerate(a[key]):
                if not (isinstance(b, list) and len(b) == 4 and all(_isnum(v) for v in b)):
                    raise _anno_err(name, f"image '{fns[i]}' pair {r}: field '{key}' must be "
                                          f"[x1, y1, x2, y2]")
        for r, h in enumerate(a["hoi"]):
            if not _isnum(h):
                raise _anno_err(name, f"image '{fns[i]}' pair {r}: field 'hoi' must be an integer")


def _class_list(anno: dict, key: str, K: int, name: str, what: str = "class indices") -> list | None:
    """The optional list of indices anno[key] (rare, non_rare: classes; empty: images), each in
    [0, K) once; None when absent."""
    if key not in anno or anno[key] is None:
        return None
    try:
        return as_index_list(anno[key], K, unique=True)
    except ValueError as e:
        raise _anno_err(name, f"field '{key}' must be a list of {what} in [0, {K}), each once ({e})") from None


def _row_error(src, filenames, img, offsets, j, msg):
    i = int(img[j])
    return EvalInputError(f"{src}: image '{filenames[i]}' row {j - int(offsets[i])}: {msg}")


def _validate_rows(rows: np.ndarray, img: np.ndarray, filenames: Sequence[str],
                   num_classes: int, src: str) -> None:
    """Vectorised value checks of prediction rows float64[N, 10] (img: int64[N], grouped)."""
    if rows.shape[0] == 0:
        return
    hoi, score = rows[:, 0], rows[:, 1]
    # fast path: everything fine (a few passes); the detailed checks only run on failure
    if (np.isfinite(rows).all() and ((hoi >= 0) & (hoi < num_classes) & (hoi == np.floor(hoi))).all()
            and (rows[:, 4:6] >= rows[:, 2:4]).all() and (rows[:, 8:10] >= rows[:, 6:8]).all()):
        return
    checks = [
        (~np.isfinite(hoi), lambda j: "hoi index is not a finite number"),
        (np.isfinite(hoi) & (hoi != np.floor(hoi)), lambda j: f"hoi index {float(rows[j, 0])!r} is not an integer"),
        ((hoi < 0) | (hoi >= num_classes),
         lambda j: f"hoi index {rows[j, 0]:g} out of range [0, {num_classes})"),
        (~np.isfinite(score), lambda j: f"score is {float(rows[j, 1])!r}"),
        (~np.isfinite(rows[:, 2:6]).all(1), lambda j: "human box has a NaN/inf coordinate"),
        (~np.isfinite(rows[:, 6:10]).all(1), lambda j: "object box has a NaN/inf coordinate"),
        (rows[:, 4] < rows[:, 2], lambda j: "x2 < x1 in human box"),
        (rows[:, 5] < rows[:, 3], lambda j: "y2 < y1 in human box"),
        (rows[:, 8] < rows[:, 6], lambda j: "x2 < x1 in object box"),
        (rows[:, 9] < rows[:, 7], lambda j: "y2 < y1 in object box"),
    ]
    bad = np.zeros(rows.shape[0], dtype=bool)
    for m, _ in checks:
        bad |= m
    if not bad.any():
        return
    j = int(np.argmax(bad))
    # offsets: first row of each image (rows are grouped by image, in any image order)
    offsets = np.zeros(len(filenames), dtype=np.int64)
    first = np.flatnonzero(np.r_[True, img[1:] != img[:-1]])
    offsets[img[first]] = first
    for m, msg in checks:
        if m[j]:
            raise _row_error(src, filenames, img, offsets, j, msg(j))


def _diagnose_rows(src: str, name: str, rows: Any) -> None:
    """Slow path: find the first structurally malformed row of one image and raise."""
    if not isinstance(rows, list):
        raise EvalInputError(f"{src}: image '{name}': expected a list of rows "
                             f"[hoi, score, hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2], "
                             f"got {type(rows).__name__}")
    for r, row in enumerate(rows):
        if not isinstance(row, list):
            raise EvalInputError(f"{src}: image '{name}' row {r}: expected a list of 10 numbers, "
                                 f"got {type(row).__name__}")
        if len(row) != 10:
            raise EvalInputError(f"{src}: image '{name}' row {r}: expected 10 values "
                                 f"[hoi, score, hx1, hy1, hx2, hy2, ox1, oy1, ox2, oy2], "
                                 f"got {len(row)}")
        for c, v in enumerate(row):
            if not _isnum(v):
                raise EvalInputError(f"{src}: image '{name}' row {r}: field '{ROW_FIELDS[c]}' is "
                                     f"not a number ({v!r})")


def _pred_arrays_from_obj(obj: Any, filenames: Sequence[str], index: dict, num_classes: int,
                          src: str) -> tuple[np.ndarray, np.ndarray]:
    """{filename: rows} (lists or arrays) -> (rows float64[N, 10], img int64[N]), validated.

    Rows keep the object's image order (file order for a JSON file), then row order.
    """
    if not isinstance(obj, dict):
        raise EvalInputError(f"{src}: expected a JSON object {{file_name: [[hoi, score, hx1, hy1, "
                             f"hx2, hy2, ox1, oy1, ox2, oy2], ...]}}, got {type(obj).__name__}")
    names = list(obj.keys())
    img_idx = np.empty(len(names), dtype=np.int64)
    for k, nm in enumerate(names):
        i = index.get(nm)
        if i is None:
            raise EvalInputError(f"{src}: image '{nm}': unknown image name (not in the annotation file)")
        img_idx[k] = i
    vals = list(obj.values())
    if any(isinstance(v, np.ndarray) or hasattr(v, "__array__") for v in vals):  # arrays/tensors
        rows, counts = _rows_from_arrays(names, vals, src)
    else:
        rows, counts = _rows_from_lists(names, vals, src)
    img = np.repeat(img_idx, counts)
    _validate_rows(rows, img, filenames, num_classes, src)
    return rows, img


def _rows_from_arrays(names: list, vals: list, src: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image arrays / tensors [n, 10] -> (rows float64[N, 10], rows per image int64[images])."""
    counts = np.empty(len(vals), dtype=np.int64)
    parts = []
    for k, v in enumerate(vals):
        try:
            a = np.asarray(v, dtype=np.float64)
        except (ValueError, TypeError):
            _diagnose_rows(src, names[k], v if isinstance(v, list) else list(v))
            raise EvalInputError(f"{src}: image '{names[k]}': malformed rows") from None
        if a.size == 0:
            a = a.reshape(0, 10)
        if a.ndim != 2 or a.shape[1] != 10:
            raise EvalInputError(f"{src}: image '{names[k]}': expected an array [N, 10] of rows "
                                 f"[hoi, score, hx1, ..., oy2], got shape {tuple(a.shape)}")
        counts[k] = a.shape[0]
        parts.append(a)
    return (np.concatenate(parts, axis=0) if parts else np.zeros((0, 10))), counts


def _rows_from_lists(names: list, vals: list, src: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image lists of rows (parsed JSON) -> (rows float64[N, 10], rows per image).
    Fast path: one conversion of all rows; _diagnose_rows runs only when it fails."""
    counts = np.empty(len(vals), dtype=np.int64)
    for k, v in enumerate(vals):
        if not isinstance(v, list):
            _diagnose_rows(src, names[k], v)
        counts[k] = len(v)
    if not counts.sum():
        return np.zeros((0, 10)), counts
    try:
        with np.errstate(all="ignore"):
            rows = np.array(list(chain.from_iterable(vals)))
    except (ValueError, TypeError):
        rows = None
    if rows is None or rows.ndim != 2 or rows.shape[1] != 10 or rows.dtype.kind not in "iuf":
        for k, v in enumerate(vals):
            _diagnose_rows(src, names[k], v)
        raise EvalInputError(f"{src}: malformed prediction rows")
    return rows.astype(np.float64, copy=False), counts


def load_predictions(path: str | os.PathLike, anno: dict | HicoGT) -> dict:
    """Read and validate a prediction file against a HICO-DET-format annotation.

    Returns ``{filename: float64[N, 10]}`` (file order).  Raises EvalInputError naming the
    file, the image and the field on any problem (empty file, invalid JSON, unknown image,
    wrong row length, non-numeric value, class out of range, NaN/inf, x2 < x1, y2 < y1).
    """
    gt = anno if isinstance(anno, HicoGT) else parse_hico_anno(anno)
    obj = _read_json(path, "prediction file")
    rows, img = _pred_arrays_from_obj(obj, gt.filenames, gt.index, gt.num_classes, str(path))
    counts = [len(v) for v in obj.values()]
    splits = np.split(rows, np.cumsum(counts)[:-1]) if counts else []
    return dict(zip(obj.keys(), splits))


def _zero_shot_unseen(gt: HicoGT, zero_shot) -> tuple[str, list]:
    """Resolve a zero-shot split name (or explicit index list) to (name, unseen indices)."""
    if not isinstance(zero_shot, str):
        try:
            idx = as_index_list(list(zero_shot), gt.num_classes)
        except ValueError as e:
            raise EvalInputError(f"zero_shot: {e} (class indices in [0, {gt.num_classes}))") from None
        return "custom", sorted(set(idx))
    key = zero_shot.lower()
    canon = ZERO_SHOT_SPLITS.get(key, key)
    if canon not in ZERO_SHOT_SPLITS.values():
        raise EvalInputError(f"zero_shot: unknown split '{zero_shot}' (expected one of "
                             f"{', '.join(ZERO_SHOT_SPLITS)})")
    cli = {v: k for k, v in ZERO_SHOT_SPLITS.items()}[canon]
    if gt.zero_shot is not None:
        for k in (cli, canon, cli.upper()):
            if k in gt.zero_shot:
                src, idx = f"{gt.name} field 'zero_shot'", gt.zero_shot[k]
                break
        else:
            raise EvalInputError(f"{gt.name}: field 'zero_shot' has no split '{cli}' / '{canon}'")
    else:
        path = data_root() / "hicodet" / "derived" / "zero_shot_unseen_hoi_indices.json"
        if gt.num_classes != 600:
            raise EvalInputError(f"{gt.name}: no 'zero_shot' field and {gt.num_classes} classes "
                                 f"(the default splits are for the 600 HICO-DET classes)")
        d = _read_json(path, "zero-shot split file")
        try:
            idx = d["splits"][canon]
        except (KeyError, TypeError):
            raise EvalInputError(f"{path}: missing split 'splits.{canon}'") from None
        src = str(path)
    if isinstance(idx, dict):                                # {"unseen": [...], ...} form
        idx = idx.get("unseen")
    try:
        idx = as_index_list(idx, gt.num_classes)
    except ValueError as e:
        raise EvalInputError(f"{src}: split '{canon}' must be a list of class indices in "
                             f"[0, {gt.num_classes}) ({e})") from None
    return cli, sorted(set(idx))


def _image_label_matrix(gt: HicoGT, image_labels, src: str = "<image-labels>") -> np.ndarray:
    """Known-Object: bool[O, num_images] 'image i has a positive label of object o'."""
    num_obj = int(gt.obj_of_class.max()) + 1
    n_img = len(gt.filenames)
    allowed = np.zeros((num_obj, n_img), dtype=bool)
    if isinstance(image_labels, (str, os.PathLike)):
        src = str(image_labels)
        image_labels = _read_json(image_labels, "image-labels file")
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
        zs_name, unseen = _zero_shot_unseen(gt, zero_shot)
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
    rows, img = _pred_arrays_from_obj(preds, gt.filenames, gt.index, gt.num_classes, "<predictions>")
    return _evaluate_hico_rows(gt, rows, img, zero_shot, known_object, image_labels)


def evaluate_hico_files(anno_path, pred_path, zero_shot=None, known_object=False,
                        image_labels=None) -> dict:
    """evaluate_hico from files (the CLI path; avoids re-splitting the rows per image)."""
    gt = parse_hico_anno(_read_json(anno_path, "annotation file"), str(anno_path))
    obj = _read_json(pred_path, "prediction file")
    rows, img = _pred_arrays_from_obj(obj, gt.filenames, gt.index, gt.num_classes, str(pred_path))
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


def parse_vcoco_gt(vsrl: Any, coco: Any, vsrl_name: str = "<vsrl>", coco_name: str = "<coco>") -> VCOCOGt:
    """Build the V-COCO ground truth from the official VSRL list and COCO instances dict."""
    acts, roles, data = _vsrl_actions(vsrl, vsrl_name)
    base_ann, lab_mat, roi_mat = _vsrl_labels(acts, data, vsrl_name)
    pos_of_ann = {int(v): i for i, v in enumerate(base_ann)}     # VSRL person -> row of lab_mat
    image_ids = sorted({int(v) for v in data[0][0]})
    person_cat, sizes, anns_by_img = _coco_index(coco, image_ids, coco_name)
    gt = VCOCOGt(actions=acts, roles=roles, image_ids=image_ids)
    for img, aid in zip(data[0][0].tolist(), data[0][1].tolist()):
        if not any(_isnum(an.get("id")) and an["id"] == aid for an in anns_by_img.get(img, [])):
            raise EvalInputError(f"{vsrl_name}: ann_id {aid} of image {img} is not an annotation of that "
                                 f"image in {coco_name}")
    for i in image_ids:
        if i not in sizes:
            raise EvalInputError(f"{coco_name}: image {i} (in {vsrl_name}) not in 'images'")
        boxes, ids, is_person = _coco_boxes(anns_by_img[i], sizes[i], person_cat, coco_name, i)
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
                        raise EvalInputError(f"{vsrl_name}: image {i} ann_id {aid} action "
                                             f"'{acts[a]}' role '{roles[a][j + 1]}': role object "
                                             f"{oid} is not a valid annotation of that image in "
                                             f"{coco_name}")
                    rol[p, a, j] = row_of_id[oid]
        gt.boxes[i] = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        gt.person[i] = pid
        gt.actions_gt[i] = act
        gt.role_gt[i] = rol
    return gt


def _vsrl_actions(vsrl: Any, vsrl_name: str) -> tuple[list, list, list]:
    """The VSRL list -> (action names, role names per action, (image_id, ann_id, label,
    role_object_id [N, roles]) int64 arrays per action), validated."""
    if not isinstance(vsrl, list) or not vsrl:
        raise EvalInputError(f"{vsrl_name}: expected the official VSRL list (one entry per action)")
    acts, roles, data = [], [], []
    for a, x in enumerate(vsrl):
        if not isinstance(x, dict):
            raise EvalInputError(f"{vsrl_name}: entry {a} must be an object")
        for key in ("action_name", "role_name", "image_id", "ann_id", "label", "role_object_id"):
            if key not in x:
                raise EvalInputError(f"{vsrl_name}: action entry {a}: missing key '{key}'")
        name = x["action_name"]
        rn = x["role_name"]
        if not isinstance(name, str) or name in acts:
            raise EvalInputError(f"{vsrl_name}: action entry {a}: field 'action_name' must be a string "
                                 f"naming each action once, got {name!r}")
        if not isinstance(rn, list) or not rn or rn[0] != "agent" or len(rn) > 3 or \
                not all(isinstance(r, str) for r in rn) or first_duplicate(rn) is not None:
            raise EvalInputError(f"{vsrl_name}: action '{name}': field 'role_name' must be "
                                 f"['agent', ...] with at most 2 other distinct roles")
        img, ann, lab, roi = (_int_vector(x[k], f"{vsrl_name}: action '{name}': field '{k}'")
                              for k in ("image_id", "ann_id", "label", "role_object_id"))
        if roi.size % len(rn) or not (img.size == ann.size == lab.size == roi.size // len(rn)):
            raise EvalInputError(f"{vsrl_name}: action '{name}': image_id, ann_id, label and "
                                 f"role_object_id (len(role_name) x N) have different lengths")
        roi = roi.reshape(len(rn), -1).T
        if not np.isin(lab, (0, 1)).all():
            raise EvalInputError(f"{vsrl_name}: action '{name}': field 'label' must hold 0 or 1, "
                                 f"got {int(lab[~np.isin(lab, (0, 1))][0])}")
        dup = first_duplicate(ann.tolist())
        if dup is not None:
            raise EvalInputError(f"{vsrl_name}: action '{name}': field 'ann_id' lists person {dup} twice")
        acts.append(name)
        roles.append(list(rn))
        data.append((img, ann, lab, roi))
    return acts, roles, data


def _int_vector(v: Any, where: str) -> np.ndarray:
    """A (possibly nested) list of integers -> int64[N]: no fraction, bool, NaN or overflow."""
    try:
        a = np.asarray(v, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError):
        raise EvalInputError(f"{where}: expected a list of integers") from None
    bad = ~np.isfinite(a) | (a != np.floor(a)) | (np.abs(a) >= 2.0 ** 63)
    if bad.any() or (isinstance(v, list) and any(isinstance(x, bool) for x in v)):
        raise EvalInputError(f"{where}: expected integers, got {a[bad][0] if bad.any() else 'a boolean'!r}")
    return a.astype(np.int64)


def _vsrl_labels(acts: list, data: list, vsrl_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per VSRL person (the first action's ann_id order): (ann_id int64[M], action labels
    int64[M, A], role object ids int64[M, A, 2]); every action must list the same persons."""
    A = len(acts)
    base_ann = data[0][1]
    for a in range(1, A):
        if not np.array_equal(data[a][1], base_ann):
            raise EvalInputError(f"{vsrl_name}: action '{acts[a]}': field 'ann_id' differs from the "
                                 f"first action's (the official file lists every person for every action)")
    pos_of_ann = {int(v): i for i, v in enumerate(base_ann)}
    lab_mat = np.zeros((base_ann.size, A), dtype=np.int64)
    roi_mat = np.zeros((base_ann.size, A, 2), dtype=np.int64)
    for a, (img, ann, lab, roi) in enumerate(data):
        rows = np.flatnonzero(lab == 1)
        idx = np.array([pos_of_ann[int(v)] for v in ann[rows]], dtype=np.int64)
        if np.unique(idx).size != idx.size:
            raise EvalInputError(f"{vsrl_name}: action '{acts[a]}': a person has label 1 twice")
        lab_mat[idx, a] = 1
        bad = roi[rows, 0] != ann[rows]
        if bad.any():
            raise EvalInputError(f"{vsrl_name}: action '{acts[a]}' ann_id {int(ann[rows][bad][0])}: "
                                 f"role_object_id[:, 0] must equal ann_id")
        roi_mat[idx, a, :roi.shape[1] - 1] = roi[rows, 1:]
    return base_ann, lab_mat, roi_mat


def _coco_index(coco: Any, image_ids: list, coco_name: str) -> tuple[Any, dict, dict]:
    """COCO instances dict -> (person category id, {image id: (width, height)},
    {image id: [annotation dicts]}) for the wanted image ids."""
    if not isinstance(coco, dict) or not isinstance(coco.get("annotations"), list) or \
            not isinstance(coco.get("images"), list):
        raise EvalInputError(f"{coco_name}: expected a COCO instances JSON with 'images' and "
                             f"'annotations' (lists)")
    person_cat = 1
    cats = coco.get("categories")
    if isinstance(cats, list):
        for c in cats:
            if isinstance(c, dict) and c.get("name") == "person":
                person_cat = c.get("id")
    wanted = set(image_ids)
    sizes = {}
    for im in coco["images"]:
        if isinstance(im, dict) and _isnum(im.get("id")) and im["id"] in wanted:
            w, h = im.get("width"), im.get("height")
            if not (_isnum(w) and _isnum(h) and 0 < w < math.inf and 0 < h < math.inf):
                raise EvalInputError(f"{coco_name}: image {im.get('id')}: fields 'width'/'height' must "
                                     f"be positive numbers, got {w!r}, {h!r}")
            if int(im["id"]) in sizes:
                raise EvalInputError(f"{coco_name}: image {im['id']} listed twice in 'images'")
            sizes[int(im["id"])] = (float(w), float(h))
    anns_by_img: dict = {i: [] for i in image_ids}
    for k, an in enumerate(coco["annotations"]):
        if not isinstance(an, dict):
            raise EvalInputError(f"{coco_name}: annotation {k} must be an object")
        try:
            i = as_index(an.get("image_id"))
        except ValueError as e:
            raise EvalInputError(f"{coco_name}: annotation {k}: field 'image_id': {e}") from None
        if i in anns_by_img:
            anns_by_img[i].append(an)
    return person_cat, sizes, anns_by_img


def _coco_boxes(anns: list, size: tuple, person_cat, coco_name: str, image_id: int) -> tuple[list, list, list]:
    """One image's COCO annotations -> (boxes, annotation ids, is-person flags) of the valid
    ones, as vsrl_eval: [x, y, x + max(0, w - 1), y + max(0, h - 1)] clipped to the image;
    ignored, zero-area and extent-less annotations are dropped."""
    width, height = size
    boxes, ids, is_person = [], [], []
    for an in anns:
        try:
            if an.get("ignore", 0) == 1:
                continue
            b = an["bbox"]
            if not (isinstance(b, list) and len(b) == 4 and all(_isnum(v) and math.isfinite(v) for v in b)) \
                    or not _isnum(an["area"]) or not math.isfinite(an["area"]):
                raise ValueError
            as_index(an["id"])
            x, y, w, h = (float(v) for v in b)
            x1, y1 = x, y
            x2 = x1 + max(0.0, w - 1.0)
            y2 = y1 + max(0.0, h - 1.0)
            x1 = min(width - 1.0, max(0.0, x1))
            y1 = min(height - 1.0, max(0.0, y1))
            x2 = min(width - 1.0, max(0.0, x2))
            y2 = min(height - 1.0, max(0.0, y2))
            if an["area"] > 0 and x2 > x1 and y2 > y1:
                boxes.append((x1, y1, x2, y2))
                ids.append(int(an["id"]))
                is_person.append(an["category_id"] == person_cat)
        except (KeyError, TypeError, ValueError):
            raise EvalInputError(f"{coco_name}: image {image_id} annotation {an.get('id')}: missing or "
                                 f"malformed field (needs id, bbox [x, y, w, h], area, "
                                 f"category_id)") from None
    return boxes, ids, is_person


@dataclass
class VCOCODets:
    """Detections in vsrl_eval's layout, concatenated in file order.

    img: int64[D] position of the image in gt.image_ids; person: float32[D, 4];
    agent: float32[D, A] agent scores (NaN = not predicted); role: float32[D, R, 5] role box +
    score for the R action-roles ``gt.role_keys()`` (NaN score = not predicted).
    """
    img: np.ndarray
    person: np.ndarray
    agent: np.ndarray
    role: np.ndarray


def _vcoco_role_keys(gt: VCOCOGt) -> list:
    """[(action index, role index)] of every action-role, vsrl_eval order."""
    return [(a, r) for a in range(len(gt.actions)) for r in range(len(gt.roles[a]) - 1)]


def _load_vcoco_dets(obj: Any, gt: VCOCOGt, src: str):
    """vsrl_eval detection list -> (VCOCODets, unknown keys, number of detections).

    Missing/null keys mean "not predicted" (NaN), as vsrl_eval's NaN convention.
    """
    if not isinstance(obj, list):
        raise EvalInputError(f"{src}: expected a JSON list of detections {{'image_id', 'person_box', "
                             f"'<action>_agent', '<action>_<role>'}}")
    img, person = _vcoco_det_persons(obj, gt, src)
    agent_keys = [f"{name}_agent" for name in gt.actions]
    role_keys = [f"{gt.actions[a]}_{gt.roles[a][r + 1]}" for a, r in _vcoco_role_keys(gt)]
    D = len(obj)
    agent = np.full((D, len(agent_keys)), np.nan, dtype=np.float32)
    for a, key in enumerate(agent_keys):
        agent[:, a] = _vcoco_score_column(obj, key, gt, img, src)
    role = np.full((D, len(role_keys), 5), np.nan, dtype=np.float32)
    for q, key in enumerate(role_keys):
        role[:, q] = _vcoco_role_column(obj, key, gt, img, src)
    unknown: set = set()
    for d in obj[:1000]:                                        # a sample is enough to warn
        unknown.update(d.keys())
    known = {"image_id", "person_box", *agent_keys, *role_keys}
    return VCOCODets(img=img, person=person, agent=agent, role=role), sorted(unknown - known), D


def _vcoco_det_persons(obj: list, gt: VCOCOGt, src: str) -> tuple[np.ndarray, np.ndarray]:
    """Each detection's image (position in gt.image_ids, int64[D]) and person box float32[D, 4]."""
    pos = {i: k for k, i in enumerate(gt.image_ids)}
    img = np.empty(len(obj), dtype=np.int64)
    person = []
    for k, d in enumerate(obj):
        if not isinstance(d, dict):
            raise EvalInputError(f"{src}: detection {k}: must be an object")
        i = d.get("image_id")
        if not _isnum(i) or i != int(i):
            raise EvalInputError(f"{src}: detection {k}: field 'image_id' missing or not an integer")
        p = pos.get(int(i))
        if p is None:
            raise EvalInputError(f"{src}: image_id {int(i)} detection {k}: image not in the V-COCO "
                                 f"ground truth")
        img[k] = p
        pb = d.get("person_box")
        if not (isinstance(pb, list) and len(pb) == 4 and all(_isnum(v) and math.isfinite(v) for v in pb)):
            raise EvalInputError(f"{src}: image_id {int(i)} detection {k}: field 'person_box' must be "
                                 f"4 finite numbers [x1, y1, x2, y2]")
        if pb[2] < pb[0] or pb[3] < pb[1]:
            raise EvalInputError(f"{src}: image_id {int(i)} detection {k}: "
                                 f"{'x2 < x1' if pb[2] < pb[0] else 'y2 < y1'} in field 'person_box'")
        person.append(pb)
    return img, np.array(person, dtype=np.float32).reshape(len(obj), 4)


_SCORE_TYPES = {float, int, type(None)}


def _bad_score(v) -> bool:
    return not (v is None or (type(v) in (float, int) and not math.isinf(v)))


def _bad_role(v) -> bool:
    return v is not None and not (type(v) is list and len(v) == 5 and not any(map(_bad_score, v)))


def _vcoco_where(src: str, gt: VCOCOGt, img: np.ndarray, k: int) -> str:
    return f"{src}: image_id {gt.image_ids[int(img[k])]} detection {k}"


def _vcoco_score_column(obj: list, key: str, gt: VCOCOGt, img: np.ndarray, src: str) -> np.ndarray:
    """The scores obj[k][key] -> float64[D] (missing/null -> NaN). Fast path: one type check
    and one conversion; the first bad value is looked for only when they fail."""
    vals = [d.get(key) for d in obj]
    arr = None
    if set(map(type, vals)) <= _SCORE_TYPES:                   # fast type check (C loops)
        arr = np.array(vals, dtype=np.float64).reshape(len(obj))
    if arr is None or np.isinf(arr).any():
        k = next(k for k, v in enumerate(vals) if _bad_score(v))
        raise EvalInputError(f"{_vcoco_where(src, gt, img, k)}: field '{key}' must be a score (number, "
                             f"NaN or null = not predicted)")
    return arr


def _vcoco_role_column(obj: list, key: str, gt: VCOCOGt, img: np.ndarray, src: str) -> np.ndarray:
    """The role boxes + scores obj[k][key] -> float64[D, 5] (missing/null -> NaN), fast path
    as _vcoco_score_column."""
    vals = [d.get(key) for d in obj]
    arr = None
    if set(map(type, vals)) <= {list, type(None)}:
        lists = [v for v in vals if v is not None]
        if set(map(len, lists)) <= {5} and set(map(type, chain.from_iterable(lists))) <= _SCORE_TYPES:
            nan5 = [np.nan] * 5
            arr = np.array([nan5 if v is None else v for v in vals], dtype=np.float64).reshape(len(obj), 5)
    if arr is None or np.isinf(arr).any():
        k = next(k for k, v in enumerate(vals) if _bad_role(v))
        raise EvalInputError(f"{_vcoco_where(src, gt, img, k)}: field '{key}' must be [x1, y1, x2, y2, "
                             f"score] (finite or NaN/null; NaN/null score = not predicted)")
    return arr


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
    for q, (a, r) in enumerate(_vcoco_role_keys(gt)):
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
    gt = parse_vcoco_gt(_read_json(vsrl_path, "VSRL file"), _read_json(coco_path, "COCO file"),
                        str(vsrl_path), str(coco_path))
    dets, unknown, n = _load_vcoco_dets(_read_json(pred_path, "detection file"), gt, str(pred_path))
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

@dataclass
class SwigGT:
    name: str
    filenames: list
    index: dict
    num_classes: int                 # len(SWIG_INTERACTIONS)
    eval_ids: np.ndarray             # int64[E] evaluated interaction ids (ascending)
    frequency: np.ndarray            # int64[K] 0 unseen / 1 rare / 2 non-rare
    gt_class: np.ndarray
    gt_image: np.ndarray
    gt_boxes: np.ndarray             # float64[M, 8]
    num_no_object: int = 0           # pairs with object_id -1, left out


def load_swig_meta(path=None) -> dict:
    """swig_v1_meta.json (default: the shared data), validated (common.swig_meta_tables)."""
    path = path or data_root() / "swig_hoi" / "derived" / "swig_v1_meta.json"
    meta = _read_json(path, "SWiG meta file")
    try:
        swig_meta_tables(meta)
    except ValueError as e:
        raise EvalInputError(f"{path}: SWiG meta file: {e}") from None
    return meta


def parse_swig_gt(anno: Any, meta: dict, name: str = "<anno>") -> SwigGT:
    """THID/SWiG annotation list -> GT arrays (all interactions; only evaluated ones reported).
    Checked like the predictions: box indices point into box_annotations (a negative one never
    wraps around to another box), boxes finite with x2 >= x1, ids and categories integers.
    A pair with object_id -1 (no object, as data.SWiGHOI reads it) is left out and counted."""
    try:
        _, actions, inter = swig_meta_tables(meta)
    except ValueError as e:
        raise EvalInputError(f"<meta>: SWiG meta file: {e}") from None
    K = len(inter)
    freq = np.array([x["frequency"] for x in inter], dtype=np.int64)
    mapper = {(x["action_id"], x["object_id"]): x["id"] for x in inter}
    eval_ids = [x["id"] for x in inter if x["evaluation"] == 1]
    if not isinstance(anno, list):
        raise EvalInputError(f"{name}: expected the SWiG-HOI json: a list of images with "
                             f"file_name, box_annotations, hoi_annotations")
    filenames, index = [], {}
    cls_l, img_l, box_l, no_object = [], [], [], 0
    for i, im in enumerate(anno):
        if not isinstance(im, dict) or not isinstance(im.get("file_name"), str):
            raise EvalInputError(f"{name}: image entry {i}: missing field 'file_name'")
        fn = im["file_name"]
        if fn in index:
            raise EvalInputError(f"{name}: image '{fn}': duplicate file_name")
        index[fn] = i
        filenames.append(fn)
        for c, b, skipped in _swig_pairs(im, mapper, len(actions), f"{name}: image '{fn}'"):
            no_object += skipped
            if not skipped:
                cls_l.append(c)
                img_l.append(i)
                box_l.append(b)
    return SwigGT(name=name, filenames=filenames, index=index, num_classes=K,
                  eval_ids=np.array(sorted(eval_ids), dtype=np.int64), frequency=freq,
                  gt_class=np.array(cls_l, dtype=np.int64), gt_image=np.array(img_l, dtype=np.int64),
                  gt_boxes=np.array(box_l, dtype=np.float64).reshape(-1, 8), num_no_object=no_object)


def _swig_pairs(im: dict, mapper: dict, num_actions: int, where: str):
    """Yield (class, [h box, o box], skipped) for each hoi_annotations entry of an image."""
    boxes = im.get("box_annotations", []) or []
    hois = im.get("hoi_annotations", []) or []
    if not isinstance(boxes, list) or not isinstance(hois, list):
        raise EvalInputError(f"{where}: fields 'box_annotations' and 'hoi_annotations' must be lists")
    for h, hoi in enumerate(hois):
        field_ = f"hoi_annotations[{h}]"
        try:
            if not isinstance(hoi, dict):
                raise ValueError("expected {subject_id, object_id, action_id}")
            field_ = f"hoi_annotations[{h}].object_id"
            if _isnum(hoi.get("object_id")) and hoi["object_id"] == -1:
                yield -1, None, 1
                continue
            o = as_index(hoi.get("object_id"), len(boxes))
            field_ = f"hoi_annotations[{h}].subject_id"
            sb = _swig_box(boxes, as_index(hoi.get("subject_id"), len(boxes)))
            field_ = f"box_annotations[{o}]"
            ob, cat = _swig_box(boxes, o), as_index(boxes[o].get("category_id"))
            field_ = f"hoi_annotations[{h}].action_id"
            key = (as_index(hoi.get("action_id"), num_actions), cat)
        except ValueError as e:
            raise EvalInputError(f"{where}: field '{field_}': {e}") from None
        if key not in mapper:
            raise EvalInputError(f"{where} hoi_annotations[{h}]: (action_id, object category) = {key} "
                                 f"is not a SWiG-HOI interaction")
        yield mapper[key], sb + ob, 0


def _swig_box(boxes: list, j: int) -> list:
    b = boxes[j]
    if not isinstance(b, dict) or "bbox" not in b:
        raise ValueError(f"box_annotations[{j}] needs 'bbox' [x1, y1, x2, y2] and 'category_id'")
    return as_box(b["bbox"])


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
                        _iou_continuous)
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
    rows, img = _pred_arrays_from_obj(preds, gt.filenames, gt.index, gt.num_classes, "<predictions>")
    return _evaluate_swig_rows(gt, rows, img)


def evaluate_swig_files(anno_path, pred_path, meta_path=None) -> dict:
    gt = parse_swig_gt(_read_json(anno_path, "annotation file"), load_swig_meta(meta_path),
                       str(anno_path))
    obj = _read_json(pred_path, "prediction file")
    rows, img = _pred_arrays_from_obj(obj, gt.filenames, gt.index, gt.num_classes, str(pred_path))
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
# Detector box AP (pycocotools COCOeval) on a dataset's ground-truth boxes
# ---------------------------------------------------------------------------------------
# LINK pairs up the detector's boxes, so its HOI mAP is bounded by how good those boxes are.
# ``evaluate_detector`` scores a detection file with COCO's own box AP (pycocotools COCOeval,
# its printing suppressed) against the unique human and object boxes of each image's annotated
# pairs (data.gt_detections: humans labelled person, objects their object label, exact
# duplicates, e.g. a human shared by several pairs, counted once).  That GT holds only boxes
# that take part in an annotated interaction, so a detected bystander is a false positive: the
# numbers are lower than the same detector's COCO AP and compare detectors on one file only.
#
# Box frame.  COCOeval works in COCO's continuous frame (x, y, w, h; pixel column j covers
# [j, j + 1)).  HICO-DET's boxes are 1-based inclusive pixel indices, so x1..x2 covers
# [x1 - 1, x2): x = x1 - 1, w = x2 - x1 + 1 (the "+1" of the HICO-DET evaluator's IoU).  The
# continuous frames (V-COCO's COCO-derived boxes, SWiG-HOI, the synthetic world) give x = x1,
# w = x2 - x1.  A per-image detection file is in the annotation's frame and goes through the
# SAME conversion, so the GT fed back scores 100; a COCO results file is in COCO's frame
# already and is used as it is.  GT boxes and per-image detections pass through float32 alike
# (data.gt_detections and data.load_detections store them so); COCO results keep float64.

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


def _detector_dataset(obj: Any, dataset: str | None, src: str) -> str:
    """The kind of a parsed annotation file; ``dataset`` (if given) must agree with it."""
    if isinstance(obj, list):
        kind = "swig"
    elif isinstance(obj, dict) and "annotation" in obj:
        kind = "synthetic" if obj.get("name") == "synthetic" else "hico"
    elif isinstance(obj, dict) and "annotations" in obj:
        kind = "vcoco"
    else:
        raise EvalInputError(f"{src}: not a HICO-DET / synthetic (key 'annotation'), V-COCO (key "
                             f"'annotations') or SWiG-HOI (a list of images) annotation file")
    if dataset is None:
        return kind
    if dataset not in DETECTOR_DATASETS:
        raise EvalInputError(f"--dataset: unknown dataset '{dataset}' (expected one of "
                             f"{', '.join(DETECTOR_DATASETS)})")
    family = {"hico": "hico", "synthetic": "hico", "vcoco": "vcoco", "swig": "swig"}
    # a user's own HICO-format file in a continuous frame may say synthetic; the reverse is
    # the synthetic world read in the wrong frame
    if family[dataset] != family[kind] or (dataset, kind) == ("hico", "synthetic"):
        raise EvalInputError(f"{src}: --dataset {dataset}, but this is a {_DATASET_TITLE[kind]} "
                             f"annotation file")
    return dataset


def load_detector_gt(anno_path: str | os.PathLike, dataset: str | None = None,
                     meta: str | os.PathLike | None = None) -> DetectorGT:
    """Read an annotation file with the project's dataset classes -> DetectorGT.

    dataset: hico | vcoco | swig | synthetic, or None to tell it from the file.  meta: SWiG-HOI's
    swig_v1_meta.json (default: the shared data).
    """
    import data  # lazy: the evaluators themselves need no torch
    src = str(anno_path)
    kind = _detector_dataset(_read_json(anno_path, "annotation file"), dataset, src)
    root = os.path.dirname(os.path.abspath(src))    # image folder: no image is opened here
    try:
        if kind == "swig":
            ds = data.SWiGHOI(root, anno_path, meta)
        elif kind == "vcoco":
            ds = data.VCOCO(root, anno_path)
        else:
            ds = data.HICODet(root, anno_path)
    except (data.DataError, FileNotFoundError) as e:
        raise EvalInputError(str(e)) from None
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise EvalInputError(f"{src}: malformed {_DATASET_TITLE[kind]} annotation file "
                             f"({type(e).__name__}: {e})") from None
    cs = ds.class_space()
    boxes, labels = [], []
    for i in range(len(ds)):
        g = data.gt_detections(ds.target(i, size=(0, 0)), cs.person_label)  # size unused: no image read
        boxes.append(g["boxes"].double().numpy())
        labels.append(g["labels"].numpy())
    coco80 = [n.replace(" ", "_") for n in cs.object_names] == data.COCO80_NAMES
    return DetectorGT(
        dataset=kind, name=src, filenames=ds.filenames, object_names=list(cs.object_names),
        person_label=cs.person_label, inclusive=kind == "hico",
        # COCO results name classes by COCO's ids (1..90) over COCO-80; SWiG-HOI by its own
        # 0-based category_id, as in its annotation file
        category_ids=list(data.COCO80_TO_COCO91) if coco80 else list(range(len(cs.object_names))),
        boxes=boxes, labels=labels, coco_image_ids=getattr(ds, "image_ids", None))


def _coco_xywh(boxes: np.ndarray, inclusive: bool) -> np.ndarray:
    """float64[N, 4] x1, y1, x2, y2 in the annotation frame -> COCO x, y, w, h (see above)."""
    off = 1.0 if inclusive else 0.0
    return np.stack([boxes[:, 0] - off, boxes[:, 1] - off,
                     boxes[:, 2] - boxes[:, 0] + off, boxes[:, 3] - boxes[:, 1] + off], axis=1)


def _per_image_detections(path: str | os.PathLike, obj: dict, gt: DetectorGT) -> np.ndarray:
    """The project's per-image detection file -> float64[N, 7] rows
    [image index + 1, x, y, w, h, score, category id] (pycocotools' array form)."""
    import data  # lazy: the evaluators themselves need no torch
    src = str(path)
    known = set(gt.filenames)
    for img, e in obj.items():
        if img not in known:                    # load_detections would drop it silently
            raise EvalInputError(f"{src}: image '{img}': unknown image name (not in the annotation file)")
    try:
        dets = data.load_detections(path, filenames=gt.filenames, num_labels=len(gt.object_names))
    except (data.DataError, FileNotFoundError) as e:
        raise EvalInputError(str(e)) from None
    cat = np.asarray(gt.category_ids, dtype=np.float64)
    parts = []
    for i, f in enumerate(gt.filenames):
        d = dets[f]
        if len(d["scores"]):
            parts.append(np.column_stack([np.full(len(d["scores"]), i + 1.0),
                                          _coco_xywh(d["boxes"].double().numpy(), gt.inclusive),
                                          d["scores"].double().numpy(), cat[d["labels"].numpy()]]))
    return np.concatenate(parts) if parts else np.zeros((0, 7))


def _results_image_ids(gt: DetectorGT, src: str) -> list:
    """COCO image id of each image: the file's COCO ids (V-COCO), else, as infer.py, the last
    number in the file name (HICO_test2015_00000001.jpg -> 1)."""
    ids = gt.coco_image_ids
    if ids is None:
        ids = []
        for f in gt.filenames:
            digits = re.findall(r"\d+", os.path.splitext(os.path.basename(f))[0])
            if not digits:
                raise EvalInputError(f"{src}: a COCO results file needs image ids, but image '{f}' has "
                                     f"no number in its name; use the per-image detection format")
            ids.append(int(digits[-1]))
    seen: dict = {}
    for f, iid in zip(gt.filenames, ids):
        if iid in seen:
            raise EvalInputError(f"{src}: images '{seen[iid]}' and '{f}' both have image_id {iid}; "
                                 f"use the per-image detection format")
        seen[iid] = f
    return list(ids)


def _coco_results(obj: list, gt: DetectorGT, image_ids: list, src: str) -> list:
    """Validate a COCO results list [{image_id, category_id, bbox [x, y, w, h], score}] before
    pycocotools' loadRes takes it (loadRes asserts, or silently accepts, what we refuse)."""
    name_of = dict(zip(image_ids, gt.filenames))
    cats = set(gt.category_ids)
    for r, e in enumerate(obj):
        if not isinstance(e, dict):
            raise EvalInputError(f"{src}: entry {r}: expected an object {{image_id, category_id, bbox, score}}")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in e:
                raise EvalInputError(f"{src}: entry {r}: missing field '{key}'")
        iid = e["image_id"]
        if not (isinstance(iid, int) and not isinstance(iid, bool) and iid in name_of):
            raise EvalInputError(f"{src}: entry {r}: field 'image_id': unknown image id {iid!r}")
        where = f"{src}: image '{name_of[iid]}' (entry {r})"
        cid, b, s = e["category_id"], e["bbox"], e["score"]
        if not (isinstance(cid, int) and not isinstance(cid, bool) and cid in cats):
            raise EvalInputError(f"{where}: field 'category_id': {cid!r} is not a category of the "
                                 f"{_DATASET_TITLE[gt.dataset]} object set")
        if not (isinstance(b, list) and len(b) == 4 and all(_isnum(v) for v in b)):
            raise EvalInputError(f"{where}: field 'bbox': expected [x, y, w, h] (4 numbers), got {b!r}")
        if not all(math.isfinite(v) for v in b) or b[2] < 0 or b[3] < 0:
            raise EvalInputError(f"{where}: field 'bbox': {b!r} is non-finite or has a negative "
                                 f"width/height (x2 < x1)")
        if not (_isnum(s) and math.isfinite(s)):
            raise EvalInputError(f"{where}: field 'score': {s!r} is not a finite number")
    return obj


def _cocoeval(gt: DetectorGT, image_ids: list, dets: Any) -> dict:
    """Run COCOeval (bbox) silently; dets: a validated results list or a float64[N, 7] array."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise EvalInputError("eval.py detector needs pycocotools (pip install pycocotools)") from None
    anns = []
    for iid, b, lab in zip(image_ids, gt.boxes, gt.labels):
        for xywh, c in zip(_coco_xywh(b, gt.inclusive).tolist(), lab.tolist()):
            anns.append({"id": len(anns) + 1,  # ids from 1: COCOeval reads id 0 as "unmatched"
                         "image_id": iid, "category_id": gt.category_ids[c], "bbox": xywh,
                         "area": xywh[2] * xywh[3], "iscrowd": 0})
    if not anns:
        raise EvalInputError(f"{gt.name}: no ground-truth box (no annotated pair): nothing to measure")
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
    obj = _read_json(detections, "detection file")
    if isinstance(obj, dict):
        fmt, image_ids = "per-image", list(range(1, len(gt.filenames) + 1))
        dets = _per_image_detections(detections, obj, gt)
    elif isinstance(obj, list):
        fmt, image_ids = "coco-results", _results_image_ids(gt, src)
        dets = _coco_results(obj, gt, image_ids, src)
    else:
        raise EvalInputError(f"{src}: expected a JSON object {{file_name: {{boxes, scores, labels}}}} "
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
                     "num_detections_unscored": int(num_det[num_gt == 0].sum())}
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
                if c["num_detections_unscored"] else "")]

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


def _add_detector_parser(sub: Any) -> None:
    d = sub.add_parser("detector", help="box AP of a detection file on a dataset's GT boxes "
                                        "(pycocotools COCOeval)")
    d.add_argument("--anno", required=True, help="HICO-DET / synthetic world / V-COCO (fredzzhang "
                   "instances_vcoco_*.json) / SWiG-HOI annotation file")
    d.add_argument("--detections", required=True, help="per-image JSON {file_name: {boxes, scores, "
                   "labels}} in the annotation's frame, or a COCO results list (image_id: V-COCO's "
                   "COCO ids, else the last number in the file name; category_id: COCO's 1..90, "
                   "SWiG-HOI's own)")
    d.add_argument("--dataset", dest="det_dataset", choices=DETECTOR_DATASETS, default=None,
                   help="default: from the file (a list: swig; 'annotations': vcoco; 'annotation': "
                        "synthetic if its name is 'synthetic', else hico)")
    d.add_argument("--meta", default=None, help="SWiG-HOI: swig_v1_meta.json (default: shared data)")
    d.add_argument("--out", default=None, help="write the result JSON here (atomically; never an input)")


def _run_detector(args: argparse.Namespace) -> tuple[dict, str]:
    # --out vs the inputs: main()'s refuse_outputs_over_inputs, as for every subcommand
    res = evaluate_detector(args.anno, args.detections, args.det_dataset, args.meta)
    return res, format_detector(res)


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
    _add_detector_parser(sub)
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
    args = _build_parser().parse_args(argv)
    try:
        with HeldNotes():         # a library's warnings never come before the error line
            res, text = _run(args)
        print(text)
        if args.out:
            write_json_atomic(res, args.out)
            print(f"wrote {args.out}")
    except (EvalInputError, OSError) as e:   # bad input; a file that cannot be read or written
        print_error(e)
        return 2
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
        res, text = _run_detector(args)
    else:
        res = evaluate_swig_files(args.anno, args.pred, args.meta)
        text = format_swig(res)
    return res, text


if __name__ == "__main__":
    sys.exit(main())
