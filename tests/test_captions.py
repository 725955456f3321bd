"""world/captions.py: image-level captions of the synthetic world (exact strings, reachability, scenes)."""
import json

import numpy as np
import pytest

from world import captions as C
from world import synthetic


def test_class_phrases_are_the_prompts_without_prefix():
    ph = C.class_phrases()
    assert len(ph) == 16
    assert ph[0] == "a person riding a bicycle"
    assert ph[5] == "a person holding a sports ball"
    assert ph[6] == "a person holding an umbrella"
    assert ph[13] == "a person looking at a bicycle"
    assert ph[15] == "a person shaking hands with a person"


@pytest.mark.parametrize("gt, expected", [
    ({"interactions": [1, 4]}, "a photo of a person riding a horse and a person holding a cup"),
    ({"interactions": [4, 1], "objects": ["sports_ball", "kite", "sports_ball"], "persons": 2},
     "a photo of a person riding a horse, a person holding a cup, a kite, two sports balls and two people standing"),
    ({"interactions": [15]}, "a photo of a person shaking hands with a person"),
    ({"interactions": [0, 0]}, "a photo of a person riding a bicycle and a person riding a bicycle"),
    ({"objects": ["umbrella", "bench", "bench", "bench"], "persons": 1},
     "a photo of three benches, an umbrella and a person standing"),
    ({"persons": 3}, "a photo of three people standing"),
    ({"interactions": [], "objects": [], "persons": 0}, "a photo of an empty scene"),
    ({}, "a photo of an empty scene"),
])
def test_canonical_captions_exact(gt, expected):
    assert C.caption(gt) == expected


def test_seeded_captions_keep_interactions_drop_some_extras_and_vary():
    gt = {"interactions": [7, 13], "objects": ["cup", "horse"], "persons": 1}
    phrases = C.class_phrases()
    extras = ["a cup", "a horse", "a person standing"]
    templates, orders, kept = set(), set(), 0
    n = 400
    for seed in range(n):
        cap = C.caption(gt, seed)
        assert cap == C.caption(gt, seed)                             # deterministic from the seed
        t = next(t for t in C.TEMPLATES if cap.startswith(t.format("")))
        body = cap[len(t.format("")):]
        parts = body.replace(" and ", ", ").split(", ")
        assert sorted(p for p in parts if p not in extras) == sorted([phrases[7], phrases[13]])
        assert len(parts) == len(set(parts)) and set(parts) <= set(extras) | {phrases[7], phrases[13]}
        templates.add(t)
        orders.add(tuple(parts))
        kept += sum(p in extras for p in parts)
    assert templates == set(C.TEMPLATES)
    assert len(orders) > 20
    rate = 1 - kept / (3 * n)                                       # drop rate of the 3 extra phrases
    assert abs(rate - C.DROP_EXTRA) < 4 * np.sqrt(C.DROP_EXTRA * (1 - C.DROP_EXTRA) / (3 * n))


def test_scene_of_a_hand_made_layout():
    P = {"kind": "person"}
    state = {"entities": [P, {"kind": "object", "name": "cup"}, P, P, {"kind": "string"},
                          {"kind": "object", "name": "kite"}, {"kind": "object", "name": "cup"}, P],
             "pairs": [(0, 1, 4), (2, 3, 15), (3, 2, 15), (7, 5, 14)]}
    assert synthetic._scene(state) == {"interactions": [4, 14, 15], "objects": ["cup"], "persons": 0}
    state["pairs"] = [(2, 3, 15), (3, 2, 15)]
    assert synthetic._scene(state) == {"interactions": [15], "objects": ["cup", "cup", "kite"], "persons": 2}


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("capworld")
    paths, gts = C.caption_world(root, 60, seed=11, image_size=64)
    return root, paths, gts


def test_every_class_phrase_reachable_including_zero_shot(small_world):
    root, paths, gts = small_world
    caps = [C.caption(g) for g in gts]
    phrases = C.class_phrases()
    hidden = sorted({c for v in C.SYN_ZERO_SHOT.values() for c in v})
    assert hidden == [0, 1, 6, 7, 10, 12, 13, 14]
    for k, ph in enumerate(phrases):
        assert any(ph in c for c in caps), (k, ph)
    assert any("standing" in c for c in caps)
    for name in ("bicycle", "horse", "chair", "bench", "cup", "sports ball", "umbrella", "kite"):
        assert any(g["objects"] and name.replace(" ", "_") in g["objects"] for g in gts), name


def test_world_ground_truth_agrees_with_the_annotation_file(small_world):
    root, paths, gts = small_world
    anno = json.loads((root / "instances_test.json").read_text())
    assert [p.rsplit("/", 1)[1] for p in paths] == anno["filenames"]
    for a, g in zip(anno["annotation"], gts):
        rows = np.bincount(np.asarray(a["hoi"], dtype=int), minlength=16)
        events = np.bincount(np.asarray(g["interactions"], dtype=int), minlength=16)
        events[15] *= 2                                             # shake_hand: one row per direction
        assert (rows == events).all()


def test_scenes_show_every_drawn_interaction_whatever_the_label_drop(tmp_path):
    full = synthetic.make_synthetic_world(tmp_path / "a", n_train=30, n_test=4, image_size=64, seed=2)
    drop = synthetic.make_synthetic_world(tmp_path / "b", n_train=30, n_test=4, image_size=64, seed=2,
                                          train_label_drop=0.5)
    a, b = (json.loads(open(p["train_scenes"]).read()) for p in (full, drop))
    assert a == b and len(a["scenes"]) == 30                       # the pixels are the same
    rows = sum(len(x["hoi"]) for x in json.loads(open(drop["train_anno"]).read())["annotation"])
    events = sum(len(s["interactions"]) + s["interactions"].count(15) for s in b["scenes"])
    assert rows < events                                           # labels dropped, interactions drawn


def test_reuse_keeps_a_world_of_the_same_seed_only(tmp_path, monkeypatch):
    first = C.caption_world(tmp_path, 12, seed=4, image_size=64)
    calls = []
    real = C.make_synthetic_world
    monkeypatch.setattr(C, "make_synthetic_world", lambda *a, **k: calls.append(k) or real(*a, **k))
    assert C.caption_world(tmp_path, 12, seed=4, image_size=64, reuse=True) == first
    assert calls == []                                            # same seed, count, size: kept
    other = C.caption_world(tmp_path, 12, seed=6, image_size=64, reuse=True)
    assert len(calls) == 1 and other[1] != first[1]               # another seed: drawn again
    C.caption_world(tmp_path, 12, seed=6, image_size=64)          # reuse=False: always drawn
    assert len(calls) == 2
