"""The demo: its results JSON and table (the simulated detector's box AP, the random-VLM
teachers beside the others), the VLM arguments it gives the training CLIs, and the one-line
refusal of a missing or corrupt world-VLM checkpoint before anything is deleted or trained."""
import json

import pytest
import torch

import data
import demo
import detector_ap
import train_teacher
from common import file_sha256
from model import LINKConfig
from vlm import FrozenVLM
from world import recipe, synthetic


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    # 40 train images: enough rows for a non-rare class, which the chance level reports
    synthetic.make_synthetic_world(root, n_train=40, n_test=6, image_size=64, seed=0, workers=1)
    return root


def fake_runs(out, world, metrics=None):
    """The six run folders as collect_results reads them: hand-set metrics (run -> {key: mAP},
    default 10 everywhere), no prediction rows."""
    (out / "world").symlink_to(world)
    for k in demo.RUNS + demo.CONTROL_RUNS:
        (out / k).mkdir()
        m = (metrics or {}).get(k, {m: 10.0 for m in demo.KEYS + demo.ZS_KEYS})
        (out / k / "metrics.json").write_text(json.dumps(m))
        (out / k / "predictions_test.json").write_text("{}")


def test_results_and_table_carry_the_detector_ap(tmp_path, world, capsys):
    fake_runs(tmp_path, world)
    anno = json.loads((world / "instances_test.json").read_text())
    res = demo.collect_results(tmp_path, anno, "nf-uc")
    ref = detector_ap.evaluate_detector(world / "instances_test.json", world / "detections_test.json",
                                     dataset="synthetic")
    assert res["detector"] == {k: round(ref[k], 2) for k in ("ap", "ap50", "ar100")}
    assert 0 < res["detector"]["ap"] < 100          # the simulated boxes are jittered, dropped, invented
    demo.print_table(res)
    out = capsys.readouterr().out
    d = res["detector"]
    assert f"box AP {d['ap']:.2f}, AP50 {d['ap50']:.2f}, AR@100 {d['ar100']:.2f}" in out
    assert "idle people/objects are false positives" in out


def test_perfect_detections_give_100(tmp_path, world):
    """The GT boxes themselves (data.gt_detections, score 1) written as the detection file."""
    (tmp_path / "instances_test.json").write_bytes((world / "instances_test.json").read_bytes())
    ds = data.HICODet(str(world / "images" / "test"), str(world / "instances_test.json"))
    person = ds.class_space().person_label
    dets = {}
    for i in range(len(ds)):
        g = data.gt_detections(ds.target(i, size=(0, 0)), person)
        dets[ds.filenames[i]] = {k: g[k].tolist() for k in ("boxes", "scores", "labels")}
    (tmp_path / "detections_test.json").write_text(json.dumps(dets))
    assert demo.detector_ap(tmp_path) == {"ap": 100.0, "ap50": 100.0, "ar100": 100.0}


# hand-made metrics: every run and key a different number, so a swapped row or column shows
HAND = {"teacher": {"full": 60.0, "rare": 40.0, "non_rare": 65.0},
        "student": {"full": 61.5, "rare": 39.25, "non_rare": 66.0},
        "random_teacher": {"full": 50.125, "rare": 30.0, "non_rare": 55.0},
        "zs_teacher": {"full": 58.0, "seen": 60.0, "unseen": 40.0},
        "zs_student": {"full": 58.5, "seen": 61.0, "unseen": 39.0},
        "random_zs_teacher": {"full": 48.0, "seen": 51.0, "unseen": 20.004}}


def test_table_and_results_carry_the_random_vlm_teachers(tmp_path, world, capsys):
    fake_runs(tmp_path, world, HAND)
    anno = json.loads((world / "instances_test.json").read_text())
    res = demo.collect_results(tmp_path, anno, "nf-uc")
    assert res["teacher"] == HAND["teacher"] and res["student"] == HAND["student"]
    assert res["random_vlm_teacher"] == {"full": 50.12, "rare": 30.0, "non_rare": 55.0}   # rounded, 2 decimals
    z = res["zero_shot"]
    assert (z["teacher"], z["student"]) == (HAND["zs_teacher"], HAND["zs_student"])
    assert z["random_vlm_teacher"] == {"full": 48.0, "seen": 51.0, "unseen": 20.0}
    res["vlm"] = {"name": "world-clip"}
    demo.print_table(res)
    out = capsys.readouterr().out
    assert "VLM world-clip" in out
    rows = [ln for ln in out.splitlines() if ln[:26].strip() in
            ("teacher, random VLM", "teacher", "student", "student - teacher")]
    assert [r.split() for r in rows] == [
        ["teacher,", "random", "VLM", "50.12", "30.00", "55.00"], ["teacher", "60.00", "40.00", "65.00"],
        ["student", "61.50", "39.25", "66.00"], ["student", "-", "teacher", "+1.50", "-0.75", "+1.00"],
        ["teacher,", "random", "VLM", "48.00", "51.00", "20.00"], ["teacher", "58.00", "60.00", "40.00"],
        ["student", "58.50", "61.00", "39.00"], ["student", "-", "teacher", "+0.50", "+1.00", "-1.00"]]
    # the chance row comes first in each block, then the random-VLM teacher
    lines = out.splitlines()
    chance = [i for i, ln in enumerate(lines) if ln.startswith("chance (random scores)")]
    ctl = [i for i, ln in enumerate(lines) if ln.startswith("teacher, random VLM")]
    assert len(chance) == 2 and [c + 1 for c in chance] == ctl
    # without the control runs (--vlm random / tiny): null in the JSON, no row in the table
    res = demo.collect_results(tmp_path, anno, "nf-uc", control=False)
    assert res["random_vlm_teacher"] is None and res["zero_shot"]["random_vlm_teacher"] is None
    res["vlm"] = {"name": "tiny"}
    demo.print_table(res)
    assert "random VLM" not in capsys.readouterr().out


def test_vlm_arguments_of_the_training_runs(tmp_path):
    w = str(tmp_path)
    assert recipe.vlm_args("world-clip", tmp_path) == ["--vlm", "world-clip", "--weights", w]
    assert recipe.vlm_args("world-clip", tmp_path, random_weights=True) == \
        ["--vlm", "world-clip", "--weights", w, "--pretrained", "random"]
    assert recipe.vlm_args("world-sig", tmp_path, random_weights=True) == \
        ["--vlm", "world-sig", "--weights", w, "--pretrained", "random"]
    assert recipe.vlm_args("random", tmp_path) == ["--vlm", "world-clip", "--weights", w, "--pretrained", "random"]
    assert recipe.vlm_args("tiny", tmp_path) == ["--vlm", "tiny"]


TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 64, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A weights folder as world/pretrain_vlm.py writes it, with a tiny random 'world-clip' (64 px)."""
    folder = tmp_path_factory.mktemp("weights")
    vlm = FrozenVLM(LINKConfig(vlm="test-demo-world-clip", vlm_config=TINY, pretrained=None, image_size=64)).clip
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in vlm.state_dict().items()},
               folder / "world_clip.pt")
    doc = {"name": "world-clip", "open_clip_config": TINY, "checkpoint": "world_clip.pt",
           "sha256": file_sha256(folder / "world_clip.pt"), "image_size": 64,
           "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    (folder / "world_clip.json").write_text(json.dumps(doc))
    return folder


def test_the_training_cli_loads_the_world_vlm_of_its_weights_folder(weights):
    opts = ["--model-opt", "d_model=32", "--model-opt", "d_latent=16", "--model-opt", "heads=2"]
    cs = synthetic.synthetic_class_space()
    args = train_teacher.teacher_parser().parse_args(recipe.vlm_args("world-clip", weights) + opts)
    m = train_teacher.build_model(args, cs, "cpu")
    assert m.cfg.pretrained == str(weights / "world_clip.pt") and m.cfg.image_size == 64
    assert f"weights=sha256:{file_sha256(weights / 'world_clip.pt')}" in m.cache_key()
    args = train_teacher.teacher_parser().parse_args(recipe.vlm_args("world-clip", weights, True) + opts)
    m = train_teacher.build_model(args, cs, "cpu")
    assert m.cfg.pretrained is None and "weights=random:seed0" in m.cache_key()


def test_check_vlm_describes_the_checkpoint(weights):
    sha = file_sha256(weights / "world_clip.pt")
    assert recipe.check_vlm("world-clip", weights) == {"name": "world-clip", "pretrained": True,
                                                     "architecture": "world-clip", "checkpoint": "world_clip.pt",
                                                     "sha256": sha}
    assert recipe.check_vlm("random", weights)["pretrained"] is False
    assert recipe.check_vlm("tiny", weights) == {"name": "tiny", "pretrained": False}


@pytest.mark.parametrize("damage", ["corrupt", "missing", "no manifest"])
def test_a_bad_checkpoint_stops_the_demo_before_anything(tmp_path, weights, capsys, damage):
    folder = tmp_path / "weights"
    folder.mkdir()
    for f in weights.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    ck = folder / "world_clip.pt"
    if damage == "corrupt":                   # one byte changed: the SHA-256 differs
        b = bytearray(ck.read_bytes())
        b[len(b) // 2] ^= 1
        ck.write_bytes(bytes(b))
    elif damage == "missing":
        ck.unlink()
    else:
        (folder / "world_clip.json").unlink()
    out = tmp_path / "demo"                   # an earlier demo's folder: --fresh must not delete it
    out.mkdir()
    (out / "recipe.json").write_text("{}")
    (out / "teacher").mkdir()
    assert demo.main(["--weights", str(folder), "--out", str(out), "--fresh"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1 and cap.err.startswith("error: demo.py --vlm world-clip: ")
    want = {"corrupt": f"{ck}: sha256 differs from its manifest's",
            "missing": f"{ck}: world VLM checkpoint not found",
            "no manifest": f"world VLM 'world-clip': not in {folder}"}[damage]
    assert want in cap.err
    assert sorted(p.name for p in out.iterdir()) == ["recipe.json", "teacher"]
