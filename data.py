"""Datasets, class spaces, detections and pair bounding; the training splits and views.

One box convention: float ``[x1, y1, x2, y2]`` in the pixel frame of the annotation file, never shifted
(``ds.box_frame``: ``hico1`` for HICO-DET's 1-based inclusive values, ``continuous`` for V-COCO, SWiG-HOI and the
synthetic world; common.BOX_FRAMES). Detections and predictions are written in the same frame; a detection file
in the other frame is converted when read (``load_detections(..., frame=, into=)``). Formats: docs/data.md.

- ``ClassSpace``                      the interaction class space (stored in checkpoints)
- ``HICODet``, ``VCOCO``, ``SWiGHOI``   ``ds[i] -> (PIL.Image RGB, target dict)``
- ``collate(batch)``
- ``load_detections``, ``save_detections``, ``gt_detections``, ``select_boxes``, ``convert_box_frame``
- ``Views``, ``view_boxes``, ``Split``: the training views and splits
- ``DataError`` (a ValueError), ``ImageError`` (DataError + FileNotFoundError)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from common import BOX_FRAMES, atomic_write_text, data_root, note, read_json
from formats import (
    COCO80_NAMES,
    COCO80_TO_COCO91,
    COCO91_TO_COCO80,
    FormatError,
    coco_result,
    fail,
    hico_box_frame,
    image_detections,
    iou_continuous,
    iou_inclusive,
    load_swig_meta,
    parse_hico_anno,
    parse_swig_gt,
    parse_vcoco_pairs,
    read,
    unique_boxes,
    zero_shot_unseen,
)
from runs import TrainInputError

__all__ = [
    "ClassSpace", "HICODet", "VCOCO", "SWiGHOI", "collate", "load_detections",
    "save_detections", "gt_detections", "select_boxes", "convert_box_frame",
    "DataError", "ImageError", "COCO80_NAMES", "COCO80_TO_COCO91",
]


# ---------------------------------------------------------------------------------------
# constants and helpers
# ---------------------------------------------------------------------------------------

#: bad annotation / detection input (formats.FormatError: one line naming the file, image, field)
DataError = FormatError


class ImageError(DataError, FileNotFoundError):
    """An image file is missing or unreadable (message names the file and dataset index)."""


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


# ---------------------------------------------------------------------------------------
# class space
# ---------------------------------------------------------------------------------------

@dataclass
class ClassSpace:
    """Interaction class space: K classes over O object labels and V verbs.

    Built by the datasets, consumed by the model, stored in checkpoints as a plain dict
    (``dataclasses.asdict(cs)`` / ``cs.asdict()``; ``ClassSpace.from_dict(d)`` rebuilds).
    """
    name: str
    prompts: list  # list[str], K prompts in class order
    object_names: list  # list[str], O names of the object label space
    hoi_object: list  # list[list[int]], for each class the object labels it may take
    hoi_verb: list  # list[int], verb index of each class (-1 if none)
    verb_names: list  # list[str]
    person_label: int = 0
    rare: list = field(default_factory=list)  # list[int]
    unseen: list = field(default_factory=list)  # list[int]

    def __post_init__(self):
        K, O, V = len(self.prompts), len(self.object_names), len(self.verb_names)
        self.prompts, self.object_names, self.verb_names = (
            [str(p) for p in x] for x in (self.prompts, self.object_names, self.verb_names))
        self.hoi_object = [[int(o) for o in (objs if isinstance(objs, (list, tuple)) else [objs])]
                           for objs in self.hoi_object]
        self.hoi_verb = [int(v) for v in self.hoi_verb]
        self.person_label = int(self.person_label)
        self.rare = sorted(int(k) for k in self.rare)
        self.unseen = sorted(int(k) for k in self.unseen)
        where = f"ClassSpace {self.name!r}"
        if len(self.hoi_object) != K or len(self.hoi_verb) != K:
            raise ValueError(f"{where}: {K} prompts but {len(self.hoi_object)} hoi_object and "
                             f"{len(self.hoi_verb)} hoi_verb entries")
        for k, objs in enumerate(self.hoi_object):
            if any(o < 0 or o >= O for o in objs):
                raise ValueError(f"{where}: hoi_object[{k}]={objs} out of range [0, {O})")
        for k, v in enumerate(self.hoi_verb):
            if v < -1 or v >= V:
                raise ValueError(f"{where}: hoi_verb[{k}]={v} out of range [-1, {V})")
        if not 0 <= self.person_label < O:
            raise ValueError(f"{where}: person_label {self.person_label} out of range [0, {O})")
        for nm in ("rare", "unseen"):
            if bad := [k for k in getattr(self, nm) if k < 0 or k >= K]:
                raise ValueError(f"{where}: {nm} index {bad[0]} out of range [0, {K})")

    @property
    def num_classes(self) -> int:
        return len(self.prompts)

    @property
    def num_objects(self) -> int:
        return len(self.object_names)

    def object_mask(self) -> torch.Tensor:
        """BoolTensor[K, O]: True where class k may take object label o."""
        m = torch.zeros(self.num_classes, self.num_objects, dtype=torch.bool)
        for k, objs in enumerate(self.hoi_object):
            m[k, objs] = True
        return m

    def asdict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassSpace":
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(d) - names:
            raise ValueError(f"ClassSpace.from_dict: unknown keys {sorted(unknown)}")
        return cls(**{k: d[k] for k in names if k in d})


# ---------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------

class _HOIDataset(torch.utils.data.Dataset):
    """Common part of the three datasets.

    Subclasses fill ``self._files`` (file name of every image of the annotation file),
    ``self._sizes`` ((w, h) or None when the file has no size), ``self._ann`` (per image a
    dict of numpy arrays boxes_h [P,4], boxes_o [P,4], object [P], hoi [P], verb [P]) and
    ``self.indices`` (the annotation-file indices this dataset exposes, in order).
    """

    dataset_name = "hoi"
    box_frame = "continuous"  # the annotation file's box frame (common.BOX_FRAMES)

    def __init__(self, image_root, anno_file):
        self.image_root = Path(image_root)
        self.anno_file = Path(anno_file)
        self._files, self._sizes, self._ann, self.indices = [], [], [], []
        self.skipped: dict = {}    # what of the file the dataset leaves out: {what: count}, told by _report_skipped
        self._size_warned = False

    # -- sizes / names ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.indices)

    @property
    def filenames(self) -> list:
        """File names of the exposed images, in dataset order."""
        return [self._files[j] for j in self.indices]

    def _check_index(self, i) -> int:
        n = len(self.indices)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"{self.dataset_name}: index must be an int, got {type(i).__name__}")
        if i < -n or i >= n:
            raise IndexError(f"{self.dataset_name}: index {i} out of range for {n} images")
        return int(i) % n

    def image_path(self, i) -> Path:
        return self.image_root / self._files[self.indices[self._check_index(i)]]

    def _open(self, i, header_only=False):
        path = self.image_path(i)
        if not path.is_file():
            raise ImageError(f"{self.dataset_name}: image file {str(path)!r} not found "
                             f"(dataset index {i}, annotation file {self.anno_file})")
        try:
            img = Image.open(path)
            if not header_only:
                img = img.convert("RGB")
            return img
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageError(f"{self.dataset_name}: cannot read image {str(path)!r} "
                             f"(dataset index {i}, annotation file {self.anno_file}): {e}") from None

    def image_size(self, i) -> tuple:
        """(w, h) of image i: from the annotation file when it has sizes, else the header."""
        j = self.indices[self._check_index(i)]
        if self._sizes[j] is not None:
            return self._sizes[j]
        with self._open(i, header_only=True) as img:
            return tuple(int(s) for s in img.size)

    # -- items -----------------------------------------------------------------------
    def target(self, i, size=None) -> dict:
        """Target dict of image i without decoding the image (see module docstring)."""
        i = self._check_index(i)
        j = self.indices[i]
        a = self._ann[j]
        if size is None:
            size = self.image_size(i)
        return {
            "filename": self._files[j],
            "index": j,  # index in the annotation file
            "size": (int(size[0]), int(size[1])),
            "boxes_h": torch.as_tensor(a["boxes_h"], dtype=torch.float32).reshape(-1, 4),  # [P, 4]
            "boxes_o": torch.as_tensor(a["boxes_o"], dtype=torch.float32).reshape(-1, 4),  # [P, 4]
            "object": torch.as_tensor(a["object"], dtype=torch.long),  # [P]
            "hoi": torch.as_tensor(a["hoi"], dtype=torch.long),  # [P]
            "verb": torch.as_tensor(a["verb"], dtype=torch.long),  # [P]
        }

    def __getitem__(self, i):
        i = self._check_index(i)
        img = self._open(i)
        j = self.indices[i]
        size = self._sizes[j]
        real = (int(img.size[0]), int(img.size[1]))
        if size is None:
            size = real
        elif tuple(size) != real and not self._size_warned:
            self._size_warned = True
            warnings.warn(f"{self.dataset_name}: {self.anno_file}: image {self._files[j]!r}: "
                          f"field 'size': file says {tuple(size)}, image is {real}; boxes are "
                          f"kept in the file's frame")
        return img, self.target(i, size=size)

    def num_pairs(self) -> int:
        """Number of (pair, class) rows over the exposed images."""
        return int(sum(len(self._ann[j]["hoi"]) for j in self.indices))

    def class_counts(self) -> np.ndarray:
        """int64[K]: (pair, class) rows per class over the exposed images."""
        K = self.class_space().num_classes
        c = np.zeros(K, dtype=np.int64)
        for j in self.indices:
            c += np.bincount(self._ann[j]["hoi"], minlength=K)
        return c

    def class_space(self) -> ClassSpace:
        return self._class_space

    def _report_skipped(self, words: Optional[dict] = None) -> None:
        """One note of what the dataset leaves out of its file: self.skipped's counts (words: key -> what it counts,
        default the key), the first images."""
        if what := ", ".join(f"{n} {(words or {}).get(k, k.replace('_', ' '))}" for k, n in self.skipped.items() if n):
            left = sorted(set(range(len(self._files))) - set(self.indices))
            first = ", ".join(repr(self._files[j]) for j in left[:3]) + (" ..." if len(left) > 3 else "")
            note(f"note: {self.anno_file}: left out {what}"
                 + (f"; {len(self.indices)} of {len(self._files)} images kept (left out: {first})" if left else ""))


def _few_shot_indices(labels: Sequence[np.ndarray], num_classes: int, k: int, seed: int) -> list:
    """Few-shot image subset (positions into ``labels``): the rule of docs/data.md "Splits" (classes rarest
    first, each keeps its next image in one seeded order until it has k rows)."""
    if k < 1:
        raise ValueError(f"few_shot must be >= 1, got {k}")
    rng = np.random.default_rng(seed)
    n = len(labels)
    order = rng.permutation(n)
    rank = np.argsort(order)              # the inverse permutation: image i's place in the order
    per_image = [np.bincount(lab, minlength=num_classes) for lab in labels]
    total = np.sum(per_image, axis=0) if n else np.zeros(num_classes, dtype=np.int64)
    images_of = [[] for _ in range(num_classes)]
    for i, cnt in enumerate(per_image):
        for c in np.nonzero(cnt)[0]:
            images_of[c].append(i)
    class_order = rng.permutation(num_classes)
    class_order = class_order[np.argsort(total[class_order], kind="stable")]
    counts = np.zeros(num_classes, dtype=np.int64)
    kept = np.zeros(n, dtype=bool)
    for c in class_order:
        for i in sorted(images_of[c], key=lambda x: rank[x]):
            if counts[c] >= k:
                break
            if kept[i]:
                continue
            kept[i] = True
            counts += per_image[i]
    return [int(i) for i in np.nonzero(kept)[0]]


def _hico_prompts(objects, verbs, corr) -> list:
    """HICO-DET prompts from shared/data/hicodet/derived/hico_text_label.json.

    That file's keys are [verb_index (117 verbs), coco80_object_index]; we look each class up
    by its (verb, object) from ``correspondence``. Classes it lacks (or a missing file) get
    "a photo of a person <verb> a/an <object>".
    """
    table = {}
    f = data_root() / "hicodet" / "derived" / "hico_text_label.json"
    if list(objects) == COCO80_NAMES and len(verbs) == 117 and f.is_file():
        for (v, o), text in read_json(f, "annotation file", DataError)["hico_text_label"]:
            table[(int(v), int(o))] = text
    out = []
    for _, o, v in corr:
        if (v, o) in table:
            out.append(table[(v, o)])
        else:
            vb, ob = verbs[v].replace("_", " "), objects[o].replace("_", " ")
            out.append(f"a photo of a person {vb} {article(ob)} {ob}")
    return out


#: min(IoU_h, IoU_o) from which two rows of an image are the same (human, object) pair
SAME_PAIR_IOU = 0.5


def _zero_shot_rows(a: dict, unseen: np.ndarray, rule: str, frame: str) -> np.ndarray:
    """Bool[P]: the rows of one image's annotation the zero-shot training filter removes.

    "label": the rows of unseen classes. "pair" (GEN-VLKT / HOICLIP ``skip_pair``): also every
    row of a pair that carries an unseen label. A pair is what those codes index as one
    (subject, object): in fredzzhang's files each (pair, class) row has its own boxes, drawn
    per class by the annotators (none of the 33,405 test rows repeats another's boxes, yet 58 %
    share a person and an object with another row), so two rows are the same pair when their
    objects have the same label and min(IoU_h, IoU_o) >= SAME_PAIR_IOU (the protocols' IoU of
    the frame; the same threshold as the training-label rule). Exact box equality would leave
    the "pair" rule equal to the "label" rule on those files.
    """
    u = unseen[a["hoi"]]
    if rule == "label" or not u.any() or u.all():
        return u
    iou = iou_inclusive if BOX_FRAMES[frame] == 1 else iou_continuous
    i, j = (x.reshape(-1) for x in np.meshgrid(np.arange(len(u)), np.nonzero(u)[0], indexing="ij"))
    same = (np.minimum(iou(a["boxes_h"][i], a["boxes_h"][j]), iou(a["boxes_o"][i], a["boxes_o"][j]))
            >= SAME_PAIR_IOU) & (a["object"][i] == a["object"][j])
    return u | same.reshape(len(u), -1).any(1)


class HICODet(_HOIDataset):
    """HICO-DET in the fredzzhang/hicodet JSON format (also the synthetic world's format).

    Keys: ``annotation`` (per image {boxes_h, boxes_o, hoi, object, verb}, one row per
    (pair, class)), ``filenames``, ``empty``, ``objects``, ``verbs``, ``correspondence``
    ([hoi, object, verb] for every class), ``size`` ([w, h] per image), ``rare``,
    ``non_rare``; optional ``prompts`` (K strings), ``zero_shot`` ({split: [hoi]}) and
    ``name``. ``empty``/``size``/``rare``/``non_rare`` may be absent (older files).
    ``ds.raw`` is the file as read (unfiltered), e.g. for ``eval.evaluate_hico``.

    zero_shot: None, a split name (rf-uc | nf-uc | uo | uv, or the long names rare_first ...,
        or any key of the file's ``zero_shot`` dict) or an explicit list of class indices.
        Training filter (``zero_shot_rule``, see ``_zero_shot_rows``): "pair" (default, the
        GEN-VLKT / HOICLIP ``skip_pair`` rule) removes every pair that carries an unseen label
        with ALL its labels, "label" only the unseen rows; images left without any row are
        dropped; ``class_space().unseen`` lists the unseen classes.
    few_shot: None or k >= 1, see ``_few_shot_indices`` (applied after the zero-shot filter).
    skip_empty: drop the images the file lists in ``empty`` (no visible pair; UPT leaves them
        out of training) and every image without any row (implied by zero_shot).
    frame: the boxes' frame (common.BOX_FRAMES); default: the file's ``box_frame`` key, else
        ``continuous`` for a synthetic world (``name`` "synthetic", written before that key
        existed), else ``hico1`` (the HICO-DET files).
    """

    dataset_name = "HICODet"

    def __init__(self, image_root, anno_file, zero_shot=None, few_shot=None, seed=0,
                 skip_empty=False, zero_shot_rule="pair", frame=None):
        super().__init__(image_root, anno_file)
        fname = self.anno_file
        d = read(fname, "annotation file")
        gt = parse_hico_anno(d, str(fname), names=True)
        self.raw = d
        bounds = np.searchsorted(gt.gt_image, np.arange(len(gt.filenames) + 1))
        for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):   # views of the file's rows
            self._ann.append({"boxes_h": gt.gt_boxes[s:e, :4], "boxes_o": gt.gt_boxes[s:e, 4:],
                              "object": gt.gt_object[s:e], "hoi": gt.gt_class[s:e], "verb": gt.gt_verb[s:e]})
        self._files = list(gt.filenames)
        self._sizes = gt.sizes or [None] * len(gt.filenames)
        K, objects, corr = gt.num_classes, gt.objects, gt.correspondence.tolist()
        self.box_frame = hico_box_frame(d, fname, frame)
        self.unseen = [] if zero_shot is None else zero_shot_unseen(zero_shot, gt.zero_shot, K, str(fname))[1]
        self._class_space = ClassSpace(
            name=str(d.get("name", "hicodet")), prompts=gt.prompts or _hico_prompts(objects, gt.verbs, corr),
            object_names=objects, hoi_object=[[c[1]] for c in corr], hoi_verb=[c[2] for c in corr],
            verb_names=gt.verbs, person_label=objects.index("person") if "person" in objects else 0,
            rare=gt.rare or [], unseen=self.unseen)
        if zero_shot_rule not in ("pair", "label"):
            raise ValueError(f"zero_shot_rule must be 'pair' or 'label', got {zero_shot_rule!r}")
        self.indices = self._training_subset(K, skip_empty, few_shot, seed, set(gt.empty), zero_shot_rule)
        self._report_skipped()

    def _training_subset(self, K: int, skip_empty: bool, few_shot, seed: int, empty: set,
                         rule: str) -> list:
        """The training filters, in order: zero-shot (the rows ``_zero_shot_rows`` names removed
        from self._ann, images left empty dropped), empty images (the file's ``empty`` list and
        images without rows), few-shot -> kept image indices."""
        keep = list(range(len(self._ann)))
        if self.unseen:
            unseen = np.zeros(K, dtype=bool)
            unseen[self.unseen] = True
            for j in keep:
                a = self._ann[j]
                m = ~_zero_shot_rows(a, unseen, rule, self.box_frame)
                self.skipped["zero_shot_rows"] = self.skipped.get("zero_shot_rows", 0) + int((~m).sum())
                if not m.all():
                    self._ann[j] = {key: val[m] for key, val in a.items()}
            skip_empty = True
        if skip_empty:
            keep = [j for j in keep if len(self._ann[j]["hoi"]) > 0 and j not in empty]
            self.skipped["images_without_a_pair"] = len(self._ann) - len(keep)   # the file's 'empty', zero-shot
        if few_shot is not None:
            pos = _few_shot_indices([self._ann[j]["hoi"] for j in keep], K, int(few_shot), seed)
            self.skipped["images_not_drawn_by_few_shot"] = len(keep) - len(pos)
            keep = [keep[p] for p in pos]
        return keep


#: one prompt per V-COCO action-role class name (fredzzhang's 24 ``classes``)
VCOCO_PROMPTS = {
    "hold obj": "a photo of a person holding something",
    "sit instr": "a photo of a person sitting on something",
    "ride instr": "a photo of a person riding something",
    "look obj": "a photo of a person looking at something",
    "hit instr": "a photo of a person hitting with something",
    "hit obj": "a photo of a person hitting something",
    "eat obj": "a photo of a person eating something",
    "eat instr": "a photo of a person eating with something",
    "jump instr": "a photo of a person jumping on something",
    "lay instr": "a photo of a person lying on something",
    "talk_on_phone instr": "a photo of a person talking on a phone",
    "carry obj": "a photo of a person carrying something",
    "throw obj": "a photo of a person throwing something",
    "catch obj": "a photo of a person catching something",
    "cut instr": "a photo of a person cutting with something",
    "cut obj": "a photo of a person cutting something",
    "work_on_computer instr": "a photo of a person working on a computer",
    "ski instr": "a photo of a person skiing on skis",
    "surf instr": "a photo of a person surfing on a surfboard",
    "skateboard instr": "a photo of a person riding a skateboard",
    "drink instr": "a photo of a person drinking with something",
    "kick obj": "a photo of a person kicking something",
    "read obj": "a photo of a person reading something",
    "snowboard instr": "a photo of a person riding a snowboard",
}


class VCOCO(_HOIDataset):
    """V-COCO in fredzzhang/vcoco's ``instances_vcoco_*.json`` format.

    Keys: ``annotations`` (per image {boxes_h, boxes_o, actions, objects, file_name}),
    ``classes`` (24 action-role names), ``objects`` (81 names: 'background' + COCO-80),
    optional ``images`` (COCO image ids) and ``action_to_object``. The file's object indices
    count 'background' as 0; targets use COCO-80 labels (file index - 1), so 'person' is 0.
    hoi = verb = the action-role index. The file has no image sizes: ``size`` comes from the
    image header. Pairs whose role object is missing were dropped by that format. An optional
    ``prompts`` list (24 strings) replaces the built-in VCOCO_PROMPTS.
    """

    dataset_name = "VCOCO"

    def __init__(self, image_root, anno_file):
        super().__init__(image_root, anno_file)
        fname = self.anno_file
        self.raw = read(fname, "annotation file")
        v = parse_vcoco_pairs(self.raw, fname)
        self._ann = [dict(r, verb=r["hoi"].copy()) for r in v.rows]
        self._files, self._sizes, self.image_ids = v.filenames, [None] * len(v.rows), v.image_ids
        self.indices = list(range(len(v.rows)))
        prompts = v.prompts or [VCOCO_PROMPTS.get(c, "a photo of a person " + c.split(" ")[0].replace("_", " "))
                                for c in v.classes]
        self._class_space = ClassSpace(
            name="vcoco", prompts=prompts, object_names=v.objects, hoi_object=v.hoi_object,
            hoi_verb=list(range(len(v.classes))), verb_names=v.classes,
            person_label=v.objects.index("person") if "person" in v.objects else 0)


class SWiGHOI(_HOIDataset):
    """SWiG-HOI (THID / scwangdyd format): a JSON list, one entry per image:

        {"file_name": str, "img_id": int, "height": int, "width": int,
         "box_annotations": [{"bbox": [x1, y1, x2, y2], "category_id": int (0..999),
                              "aux_category_id": [...]}, ...],
         "hoi_annotations": [{"subject_id": int, "object_id": int, "action_id": int}, ...]}

    subject_id/object_id index box_annotations. A pair's class is the entry of
    SWIG_INTERACTIONS (shared/data/swig_hoi/derived/swig_v1_meta.json) with the same
    (action_id, object box category_id); K = 14,130. Pairs with object_id == -1 or an
    (action, object) combination absent from SWIG_INTERACTIONS are skipped and counted in
    ``self.skipped``. ``height``/``width`` are optional (else read from the image header).
    class_space(): rare = frequency 1, unseen = frequency 0 (never in training).
    """

    dataset_name = "SWiGHOI"

    def __init__(self, image_root, anno_file, meta_file=None):
        super().__init__(image_root, anno_file)
        fname = self.anno_file
        meta_file = Path(meta_file) if meta_file else data_root() / "swig_hoi" / "derived" / "swig_v1_meta.json"
        gt = parse_swig_gt(read(fname, "annotation file"), load_swig_meta(meta_file), str(fname), skip_unknown=True)
        obj_names, act_names, inters = gt.tables
        self.skipped = {"no_object": gt.num_no_object, "unknown_interaction": gt.num_unknown}   # pairs
        bounds = np.searchsorted(gt.gt_image, np.arange(len(gt.filenames) + 1))
        for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            self._ann.append({"boxes_h": gt.gt_boxes[s:e, :4], "boxes_o": gt.gt_boxes[s:e, 4:],
                              "object": gt.gt_category[s:e], "hoi": gt.gt_class[s:e], "verb": gt.gt_action[s:e]})
        self._files, self._sizes = gt.filenames, gt.sizes
        self.indices = list(range(len(self._files)))
        self._report_skipped({"no_object": "pairs with no object", "unknown_interaction": "unknown-interaction pairs"})
        prompts = []
        for x in inters:
            ob = obj_names[x["object_id"]].replace("_", " ")
            prompts.append(f"a photo of a person {act_names[x['action_id']].replace('_', ' ')} "
                           f"{article(ob)} {ob}")
        self._class_space = ClassSpace(
            name="swig", prompts=prompts, object_names=obj_names,
            hoi_object=[[x["object_id"]] for x in inters],
            hoi_verb=[x["action_id"] for x in inters], verb_names=act_names,
            person_label=obj_names.index("person") if "person" in obj_names else 0,
            rare=[x["id"] for x in inters if x["frequency"] == 1],
            unseen=[x["id"] for x in inters if x["frequency"] == 0])


def collate(batch):
    """[(PIL.Image, target), ...] -> (list[PIL.Image], list[dict])."""
    return [b[0] for b in batch], [b[1] for b in batch]


# ---------------------------------------------------------------------------------------
# detections
# ---------------------------------------------------------------------------------------

def _empty_dets() -> dict:
    return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}


def _make_dets(boxes, scores, labels) -> dict:
    return {
        "boxes": torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),  # [N, 4]
        "scores": torch.as_tensor(np.asarray(scores, dtype=np.float32).reshape(-1)),  # [N]
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)),  # [N]
    }


def convert_box_frame(boxes: torch.Tensor, frame: str, into: str) -> torch.Tensor:
    """[N, 4] boxes from box frame ``frame`` into ``into`` (common.BOX_FRAMES): x1 and y1 move by
    o(into) - o(frame), x2 and y2 stay. continuous -> hico1: [x1 + 1, y1 + 1, x2, y2]; hico1 ->
    continuous: [x1 - 1, y1 - 1, x2, y2] (UPT's conversion of the HICO-DET boxes). Widths are
    kept in each frame's convention (x2 - x1 + o). A continuous box narrower than one pixel has
    no hico1 form: it keeps its x2 / y2 and becomes one pixel wide / high (x1 = x2)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    shift = float(BOX_FRAMES[into] - BOX_FRAMES[frame])
    if shift == 0:
        return boxes.clone()
    out = boxes.clone()
    out[:, :2] = torch.minimum(boxes[:, :2] + shift, boxes[:, 2:])
    return out


def load_detections(path, filenames=None, image_ids=None, num_labels=None, frame=None, into=None) -> dict:
    """Read detections -> {filename: {"boxes": [N,4], "scores": [N], "labels": [N]}}.

    Two formats, told apart by the JSON's top level:
    - object (per-image, the project's format):
      ``{"<filename>": {"boxes": [[x1,y1,x2,y2], ...], "scores": [...], "labels": [...]}}``,
      labels already in the class space's object label space;
    - list (COCO results): ``[{"image_id": int, "category_id": COCO id (1..90),
      "bbox": [x, y, w, h], "score": float}, ...]``; needs ``image_ids``
      ({image_id: filename}); converted to COCO-80 labels and ``[x, y, x + w, y + h]``.
    filenames: when given, the result has exactly these keys, images the file lacks get
        zero detections, images not asked for are dropped; a file matching none of them is
        an error (almost surely the wrong file).
    num_labels: when given, labels must lie in [0, num_labels).
    frame, into: the file's box frame and the dataset's (common.BOX_FRAMES: hico1 |
        continuous); when both are given and differ, boxes are converted (convert_box_frame).
        A COCO results list is in the continuous frame (``frame`` defaults to it).
    Errors (DataError) name the file, the image and the field.
    """
    path = Path(path)
    d = read(path, "detection file")
    if isinstance(d, dict):
        out = {str(img): _make_dets(*image_detections(e, path, img, num_labels)) for img, e in d.items()}
    elif isinstance(d, list):
        if image_ids is None:
            raise fail(path, "COCO results format needs image_ids {image_id: filename}")
        names = {int(k): str(v) for k, v in image_ids.items()}
        labels = {c: k for c, k in COCO91_TO_COCO80.items() if num_labels is None or k < num_labels}
        acc: dict = {}
        for r, e in enumerate(d):
            img, (x, y, w, h), score, label = coco_result(e, r, path, names, labels)
            for lst, v in zip(acc.setdefault(img, ([], [], [])), ([x, y, x + w, y + h], score, label)):
                lst.append(v)
        out = {img: _make_dets(*v) for img, v in acc.items()}
    else:
        raise fail(path, "expected a JSON object (per-image) or a list (COCO results)")
    if isinstance(d, list) and frame is None:
        frame = "continuous"
    for f in (frame, into):
        if f is not None and f not in BOX_FRAMES:
            raise fail(path, f"box frame {f!r} is not one of {sorted(BOX_FRAMES)}")
    if frame is not None and into is not None and frame != into:
        out = {img: dict(e, boxes=convert_box_frame(e["boxes"], frame, into)) for img, e in out.items()}
    if filenames is not None:
        filenames = [str(f) for f in filenames]
        if filenames and out and not any(f in out for f in filenames):
            raise fail(path, f"has detections for {len(out)} images but none of the "
                             f"{len(filenames)} requested (first: {filenames[0]!r})")
        if extra := sorted(set(out).difference(filenames)):
            note(f"note: {path}: detections of {len(extra)} images not in the dataset left out (first: {extra[0]!r})")
        out = {f: out.get(f, _empty_dets()) for f in filenames}
    return out


def save_detections(path, detections: dict, decimals: int = 2):
    """Write {filename: dets} in the per-image JSON format (atomically). Boxes and scores are
    rounded to ``decimals`` places (None: full float precision)."""
    def r(x):
        return [round(float(v), decimals) if decimals is not None else float(v) for v in x]
    obj = {}
    for img, e in detections.items():
        boxes = torch.as_tensor(e["boxes"]).reshape(-1, 4).tolist()
        obj[str(img)] = {
            "boxes": [r(b) for b in boxes],
            "scores": r(torch.as_tensor(e["scores"]).reshape(-1).tolist()),
            "labels": [int(v) for v in torch.as_tensor(e["labels"]).reshape(-1).tolist()],
        }
    atomic_write_text(path, json.dumps(obj, separators=(",", ":")))


def gt_detections(target: dict, person_label: int = 0, return_index: bool = False):
    """Unique ground-truth boxes of a target as detections (score 1.0).

    Human boxes (label ``person_label``) come first in order of first appearance, then
    object boxes (label ``target["object"]``); a box is a duplicate when its 4 coordinates
    AND its label are equal (so a person that is also the object of a human-human pair
    appears once). With ``return_index``: also (idx_h Long[P], idx_o Long[P]) = the
    detection index of each row's human and object box.
    """
    boxes, labels, idx_h, idx_o = unique_boxes(*(torch.as_tensor(target[k]).numpy() for k in
                                                ("boxes_h", "boxes_o", "object")), person_label)
    dets = _make_dets(boxes, np.ones(len(boxes)), labels)
    return (dets, torch.from_numpy(idx_h), torch.from_numpy(idx_o)) if return_index else dets


def select_boxes(dets: dict, person_label: int = 0, nms: float = 0.5, score_thresh: float = 0.2,
                 min_h: int = 3, max_h: int = 15, min_o: int = 3, max_o: int = 15,
                 return_index: bool = False):
    """Pair-bounding rules of the two-stage peers (PROTOCOLS.md), exactly:

    1. class-wise NMS at IoU ``nms`` (torchvision.ops.batched_nms, labels as classes);
    2. among the survivors, humans (label == person_label) and objects (the rest) are
       handled separately: let n = how many have score >= score_thresh. If n < min, keep the
       top ``min`` by score (even under the threshold; all of them if fewer exist); if
       n > max, keep the top ``max``; else keep the n above the threshold.
    Output: humans (score desc), then objects (score desc); equal scores keep input order.
    With ``return_index`` also returns Long[N'] indices into the input.
    """
    from torchvision.ops import batched_nms

    boxes = torch.as_tensor(dets["boxes"], dtype=torch.float32).reshape(-1, 4)  # [N, 4]
    scores = torch.as_tensor(dets["scores"], dtype=torch.float32).reshape(-1)  # [N]
    labels = torch.as_tensor(dets["labels"], dtype=torch.long).reshape(-1)  # [N]
    if len(boxes):
        keep = batched_nms(boxes, scores, labels, nms)
        survivor = torch.zeros(len(boxes), dtype=torch.bool)
        survivor[keep] = True
    else:
        survivor = torch.zeros(0, dtype=torch.bool)
    # stable order: score desc, ties by input index
    order = torch.from_numpy(np.argsort(-scores.numpy(), kind="stable")).long()
    chosen = []
    for is_h, lo, hi in ((True, min_h, max_h), (False, min_o, max_o)):
        cand = [int(i) for i in order if survivor[i] and ((labels[i] == person_label) == is_h)]
        n = sum(1 for i in cand if scores[i] >= score_thresh)
        if n < lo:
            cand = cand[:lo]
        elif n > hi:
            cand = cand[:hi]
        else:
            cand = [i for i in cand if scores[i] >= score_thresh]
        chosen += cand
    idx = torch.tensor(chosen, dtype=torch.long)
    out = {"boxes": boxes[idx], "scores": scores[idx], "labels": labels[idx]}
    return (out, idx) if return_index else out


# ----------------------------------------------------------------------------------------------
# Splits and views: a dataset split as the training loop sees it (trainer.Trainer, cache.py)
# ----------------------------------------------------------------------------------------------
# Views (augmentation with a frozen, cached VLM): a ViT is neither flip- nor scale-equivariant,
# so each view is encoded on its own and cached ([N, V, C, Gh, Gw]): the whole image, one crop per
# ``crop_scales`` entry at a fixed, hashed position per image (crop_window), each also mirrored
# with ``flip``. Each epoch trains every image on one view drawn by view_of from (seed, epoch,
# index). Boxes follow the view in the split's box frame (view_boxes); detections are mapped into
# the view before ``select``. Any other image augmentation must bypass the cache.
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a permutation of range(n), a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(int(seed) * 100003 + int(epoch))
    return torch.randperm(n, generator=g).tolist()


def view_of(seed: int, epoch: int, index: int, n_views: int) -> int:
    """The view (see :class:`Views`) an image is trained on in an epoch, uniform over
    range(n_views); a pure function of (seed, epoch, index), so a resumed run sees the same
    views. With 2 views (flip only) the same choice as before crop views existed."""
    if isinstance(n_views, bool) or n_views < 1:
        raise TypeError(f"view_of: n_views must be a positive int, got {n_views!r}")
    if n_views == 1:
        return 0
    h = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") % n_views


#: version of crop_window's placement rule (part of the feature-cache key of crop views)
CROP_RULE = "blake2b-v1"


def crop_window(filename: str, k: int, scale: float, w: int, h: int) -> tuple[int, int, int, int]:
    """(x0, y0, cw, ch): the k-th crop window (``scale`` of w x h, rounded, at least 1 pixel) of an image, at a
    corner drawn by a hash of (file name, k, scale): fixed per image (cached once), independent of the seed."""
    cw = min(int(w), max(1, math.floor(scale * w + 0.5)))
    ch = min(int(h), max(1, math.floor(scale * h + 0.5)))
    dg = hashlib.blake2b(f"{filename}|{k}|{scale!r}".encode(), digest_size=8).digest()
    ux, uy = (int.from_bytes(dg[a:a + 4], "little") / 2 ** 32 for a in (0, 4))
    return int(ux * (w - cw + 1)), int(uy * (h - ch + 1)), cw, ch


@dataclass(frozen=True)
class Views:
    """The views of each training image (docs/data.md "Views"), each cached once: window 0 is the whole image,
    window k >= 1 the crop ``crop_scales[k - 1]`` (:func:`crop_window`). View v = window * F + m (F = 2 with
    ``flip``, else 1; m = 1: mirrored): view 0 is the image itself (evaluation's only view)."""
    flip: bool = False
    crop_scales: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "flip", bool(self.flip))
        object.__setattr__(self, "crop_scales", tuple(float(s) for s in self.crop_scales))
        bad = [s for s in self.crop_scales if not 0 < s < 1]
        if bad:
            raise TrainInputError(f"crop scales must lie strictly between 0 and 1 (the whole image is always "
                                  f"a view), got {bad[0]}")

    @classmethod
    def of(cls, cfg) -> "Views":
        """The views a LoopConfig (or its checkpointed dict) asks for."""
        get = cfg.get if isinstance(cfg, dict) else (lambda k, dflt: getattr(cfg, k, dflt))
        return cls(get("flip", False), tuple(get("crop_scales", ()) or ()))

    @property
    def count(self) -> int:
        return (1 + len(self.crop_scales)) * (2 if self.flip else 1)

    def parts(self, v: int) -> tuple[int, bool]:
        """(window, mirrored) of view v."""
        if not 0 <= v < self.count:
            raise IndexError(f"view {v} out of range for {self.count} views")
        f = 2 if self.flip else 1
        return v // f, bool(v % f)

    def key(self) -> str:
        """What the views add to the feature-cache key: nothing for the whole image and its
        mirror (the cache's view count names them), else the crop scales and placement rule."""
        if not self.crop_scales:
            return ""
        return "|crops=" + ",".join(repr(s) for s in self.crop_scales) + "@" + CROP_RULE

    def window(self, v: int, filename: str, w: int, h: int) -> tuple[int, int, int, int]:
        """(x0, y0, cw, ch) of view v's window in image ``filename`` of w x h pixels."""
        k, _ = self.parts(v)
        if k == 0:
            return 0, 0, int(w), int(h)
        return crop_window(filename, k, self.crop_scales[k - 1], w, h)


def view_boxes(boxes: torch.Tensor, size: tuple, window: tuple, mirrored: bool,
               offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 4] xyxy boxes of an image of ``size`` (w, h) -> (the boxes in the view, Bool[N] kept).

    ``offset``: the frame's o (common.BOX_FRAMES; the image spans [o, w], a width is x2 - x1 + o). Crop to
    window (x0, y0, cw, ch): x' = x - x0, clamped to [o, cw]; kept when the overlap has a positive width and
    height (min(x2, x0 + cw) - max(x1, x0 + o) + o > 0), as DETR's crops. Mirror: x' = cw + o - x."""
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    x0, y0, cw, ch = window
    keep = torch.ones(len(b), dtype=torch.bool)
    if (x0, y0, cw, ch) != (0, 0, int(size[0]), int(size[1])):
        lo = torch.tensor([x0 + offset, y0 + offset], dtype=torch.float32)
        hi = torch.tensor([x0 + cw, y0 + ch], dtype=torch.float32)
        overlap = torch.minimum(b[:, 2:], hi) - torch.maximum(b[:, :2], lo) + offset      # [N, 2]
        keep = (overlap > 0).all(1)
        shift = torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        high = torch.tensor([cw, ch, cw, ch], dtype=torch.float32)
        b = torch.minimum(torch.clamp(b - shift, min=float(offset)), high)
    if mirrored:
        b = b.clone()
        b[:, 0], b[:, 2] = cw + offset - b[:, 2], cw + offset - b[:, 0]
    return b, keep


#: the per-row fields of a target (rows dropped with their boxes when a crop leaves them out)
TARGET_ROW_FIELDS = ("boxes_h", "boxes_o", "object", "hoi", "verb")


class Split:
    """A dataset split as the loop sees it.

    dataset: ``filenames``, ``ds[i] -> (PIL image, target)``, optionally ``target(i)``, ``image_path(i)``; a
    target holds ``size`` (w, h), ``boxes_h``, ``boxes_o`` [N, 4] xyxy and what the loss reads. dets_file:
    {filename: dets} before ``select`` (callable(dets) -> dets, data.select_boxes); image_root: the images'
    folder; anno: the raw annotation for the metric; gt_dets: callable(target) -> dets (data.gt_detections);
    views: :class:`Views` (evaluation: view 0); frame: the boxes' frame (common.BOX_FRAMES; default the
    dataset's ``box_frame``, else continuous); append_gt: add the GT boxes to the detector's in training
    (SCG's practice; UPT, the default, trains on the detector's alone)."""

    def __init__(self, dataset, dets_file: dict, image_root, anno: Optional[dict], select: Callable,
                 gt_dets: Callable, name: str = "split", views: Optional[Views] = None,
                 frame: Optional[str] = None, append_gt: bool = False):
        self.ds, self.dets_file, self.anno, self.name = dataset, dets_file, anno, name
        self.select, self.gt_dets = select, gt_dets
        self.views = views if views is not None else Views()
        self.frame = frame or getattr(dataset, "box_frame", "continuous")
        if self.frame not in BOX_FRAMES:
            raise TrainInputError(f"split {name}: box frame {self.frame!r} is not one of {sorted(BOX_FRAMES)}")
        self.append_gt = bool(append_gt)
        self.filenames = list(dataset.filenames)
        self.image_root = Path(image_root)
        if hasattr(dataset, "image_path"):
            self.image_paths = [Path(dataset.image_path(i)) for i in range(len(self.filenames))]
        else:
            self.image_paths = [self.image_root / f for f in self.filenames]
        self._targets = {}

    def __len__(self):
        return len(self.filenames)

    def target(self, i: int) -> dict:
        if i not in self._targets:
            if hasattr(self.ds, "target"):
                self._targets[i] = self.ds.target(i)
            else:
                self._targets[i] = self.ds[i][1]
        return self._targets[i]

    def image(self, i: int, view: int = 0):
        """The PIL image of view ``view`` of image i: its window cropped, then mirrored."""
        img, tgt = self.ds[i]
        self._targets.setdefault(i, tgt)
        if view == 0:
            return img
        w, h = tgt["size"]
        x0, y0, cw, ch = self.views.window(view, self.filenames[i], w, h)
        if (x0, y0, cw, ch) != (0, 0, w, h):
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
        return ImageOps.mirror(img) if self.views.parts(view)[1] else img

    def item(self, i: int, view: int, train: bool):
        """-> (detections, size (w, h), target) for image i in the given view (its window's
        size; boxes mapped by view_boxes, boxes and GT rows outside the window dropped), the
        detections selected by ``select`` in the view. With append_gt, training adds the GT
        boxes to the detector's first (SCG's practice; docs/training.md)."""
        tgt = self.target(i)
        dets = self.dets_file.get(self.filenames[i], _empty_dets())
        if train and self.append_gt:
            g = self.gt_dets(tgt)
            dets = {"boxes": torch.cat([g["boxes"].float(), dets["boxes"].float().reshape(-1, 4)]),
                    "scores": torch.cat([g["scores"].float(), dets["scores"].float().reshape(-1)]),
                    "labels": torch.cat([g["labels"].long(), dets["labels"].long().reshape(-1)])}
        size = tuple(tgt["size"])
        if view != 0:
            dets, tgt, size = self._in_view(i, view, dets, tgt)
        return self.select(dets), size, tgt

    def _in_view(self, i: int, view: int, dets: dict, tgt: dict) -> tuple[dict, dict, tuple]:
        """Detections and target of image i mapped into view ``view`` -> (dets, target, size)."""
        w, h = tgt["size"]
        win = self.views.window(view, self.filenames[i], w, h)
        mirrored, o = self.views.parts(view)[1], BOX_FRAMES[self.frame]
        boxes, kd = view_boxes(dets["boxes"], (w, h), win, mirrored, o)
        dets = {"boxes": boxes[kd], "scores": torch.as_tensor(dets["scores"]).reshape(-1)[kd],
                "labels": torch.as_tensor(dets["labels"]).reshape(-1)[kd]}
        bh, kh = view_boxes(tgt["boxes_h"], (w, h), win, mirrored, o)
        bo, ko = view_boxes(tgt["boxes_o"], (w, h), win, mirrored, o)
        rows = kh & ko                                 # a GT pair needs both boxes in the window
        new = dict(tgt, size=(win[2], win[3]), boxes_h=bh[rows], boxes_o=bo[rows])
        for k in TARGET_ROW_FIELDS[2:]:
            if k in tgt:
                new[k] = torch.as_tensor(tgt[k])[rows]
        return dets, new, (win[2], win[3])

    def fingerprint(self) -> str:
        return hashlib.sha1("\n".join(self.filenames).encode()).hexdigest()[:16]
