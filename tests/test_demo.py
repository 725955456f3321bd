"""The demo: its results JSON and table (the simulated detector's box AP, the random-VLM
teachers beside the others), the VLM arguments it gives the training CLIs, the one-line
refusal of a missing or corrupt world-VLM checkpoint before anything is deleted or trained, and
its output folder: --fresh deletes only a folder the demo wrote (a table of foreign shapes), an
--out naming a file is one line."""
import json
import os

import pytest
import torch
from clicheck import refused, snapshot

import data
import demo
import detector_ap
import train_teacher
from common import file_sha256
from model import LINKConfig
from runs import RUN_OUTPUTS
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


# -- the output folder: --fresh deletes only what the demo wrote -----------------------------------
def own_folder(out, stamp="recipe.json", kind="a demo", runs=demo.RUNS + demo.CONTROL_RUNS, files=("results.json",)):
    """A folder as the command leaves it: its stamp, files, runs and logs, world, cache, a temp file."""
    out.mkdir(parents=True)
    (out / stamp).write_text(json.dumps(recipe.stamp_doc(kind, {"r": 1})))
    for f in files + tuple(f"{r}.out" for r in runs) + (".results.json.123.0a1b2c3d.tmp",):
        (out / f).write_text("x")
    for r in runs:
        (out / r).mkdir()
        for n in RUN_OUTPUTS:
            (out / r / n).write_text("x")
    (out / "world" / "images" / "train").mkdir(parents=True)
    (out / "world" / "images" / "train" / "synth_train_000000.png").write_bytes(b"png")
    (out / "world" / "instances_train.json").write_text("{}")
    (out / "cache" / "0123456789abcdef").mkdir(parents=True)
    for f in ("index.json", "feats-0a1b2c.bin", ".feats-0a1b2c.bin.tmp", ".lock"):
        (out / "cache" / "0123456789abcdef" / f).write_text("x")
    return out


def _notes(out):
    (out / "notes.txt").write_text("mine")


def _deep_notes(out):
    (out / "teacher" / "notes.txt").write_text("mine")


def _link_inside(out):
    (out / "teacher" / "last.pt").unlink()
    (out / "teacher" / "last.pt").symlink_to(out.parent / "elsewhere.txt")


def _folder_for_file(out):
    (out / "results.json").unlink()
    (out / "results.json").mkdir()


# foreign-folder shapes: (make it from the demo's own folder, a word of the refusal)
FOREIGN = {
    "no stamp": (lambda out: (out / "recipe.json").unlink(), "it has no recipe.json"),
    "stamp truncated": (lambda out: (out / "recipe.json").write_text('{"written_by": "LINK demo.py", "rec'),
                        "is not valid JSON"),
    "stamp empty": (lambda out: (out / "recipe.json").write_text(""), "is empty"),
    "stamp a folder": (lambda out: ((out / "recipe.json").unlink(), (out / "recipe.json").mkdir()), "directory"),
    "stamp a FIFO": (lambda out: ((out / "recipe.json").unlink(), os.mkfifo(out / "recipe.json")), "FIFO"),
    "stamp a dangling link": (lambda out: ((out / "recipe.json").unlink(),
                                           (out / "recipe.json").symlink_to(out / "gone.json")), "not found"),
    "stamp of another program": (lambda out: (out / "recipe.json").write_text('{"world": {}, "loop": []}'),
                                 "is not the stamp 'LINK demo.py' writes"),
    "the ablation's stamp": (lambda out: (out / "recipe.json").write_text(json.dumps(
        recipe.stamp_doc("an ablation", {}))), "is not the stamp 'LINK demo.py' writes"),
    "a user's file": (_notes, "notes.txt, a regular file this command does not write"),
    "a user's temp-like file": (lambda out: (out / ".notes.tmp").write_text("mine"), ".notes.tmp, a regular file"),
    "a user's file in a run": (_deep_notes, "teacher/notes.txt, a regular file"),
    "a link inside": (_link_inside, "last.pt, a symbolic link"),
    "a folder where a file belongs": (_folder_for_file, "results.json, a directory"),
}


@pytest.mark.parametrize("shape", list(FOREIGN))
def test_fresh_refuses_a_foreign_folder_and_deletes_nothing(tmp_path, shape):
    (tmp_path / "elsewhere.txt").write_text("mine")
    out = own_folder(tmp_path / "out")
    make, needle = FOREIGN[shape]
    make(out)
    refused(demo.main, ["--vlm", "tiny", "--out", str(out), "--fresh"], [tmp_path],
            [str(out), "not a demo output folder", needle, "nothing was deleted"])


@pytest.mark.parametrize("target", ["own folder", "user folder", "empty folder", "nothing"])
def test_fresh_refuses_a_link_as_the_folder(tmp_path, target):
    """--fresh never deletes through a link named as --out, whatever it points to."""
    real = tmp_path / "real"
    if target == "own folder":
        own_folder(real)
    elif target != "nothing":
        real.mkdir()
        if target == "user folder":
            _notes(real)
    link = tmp_path / "out"
    link.symlink_to(real)
    needle = "names a symbolic link, not a folder" if target == "nothing" else f"it is a symbolic link to {real}"
    refused(demo.main, ["--vlm", "tiny", "--out", str(link), "--fresh"], [tmp_path], [str(link), needle])
    if target in ("user folder", "nothing"):            # without --fresh: not a demo folder / not a folder
        refused(demo.main, ["--vlm", "tiny", "--out", str(link)], [tmp_path], [str(link)])
    assert link.is_symlink()


@pytest.mark.parametrize("kind", ["regular file", "fifo", "dangling link", "file in the path"])
def test_out_naming_a_file_is_one_line(tmp_path, kind):
    """--out naming an existing file (with or without --fresh): one line naming it, nothing changed."""
    out = tmp_path / "out"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "dangling link":
        out.symlink_to(tmp_path / "nowhere")
    else:
        out.write_text("mine")
    target = out / "demo" if kind == "file in the path" else out
    needle = {"regular file": "names a regular file, not a folder", "fifo": "names a FIFO",
              "dangling link": "names a symbolic link", "file in the path": "cannot create the output folder"}[kind]
    for fresh in ([], ["--fresh"]):
        refused(demo.main, ["--vlm", "tiny", "--out", str(target)] + fresh, [tmp_path], [str(target), needle])
    assert os.path.lexists(out)


def test_fresh_clears_the_demos_own_folder_only(tmp_path):
    """The demo's own folder (every kind of entry it writes) is emptied; the folder around it is kept."""
    (tmp_path / "mine.txt").write_text("mine")
    out = own_folder(tmp_path / "out")
    args = ("a demo", {"r": 2}, True, "x")
    assert recipe.claim_output_folder(out, "recipe.json", *args, layout=demo.LAYOUT) is None
    assert list(out.iterdir()) == [] and (tmp_path / "mine.txt").read_text() == "mine"
    # the stamp the demo writes is the one --fresh accepts
    own_folder(tmp_path / "again")
    assert recipe.read_stamp(tmp_path / "again", "recipe.json", "a demo") == ({"r": 1}, "")


def test_without_fresh_a_foreign_or_other_recipe_folder_is_refused(tmp_path):
    out = own_folder(tmp_path / "out")
    snap = {k: (size, sha) for k, (size, _, sha) in snapshot(tmp_path).items()}     # the bytes
    with pytest.raises(ValueError, match="runs of another recipe"):
        recipe.claim_output_folder(out, "recipe.json", "a demo", {"r": 2}, False, "x", layout=demo.LAYOUT)
    assert recipe.claim_output_folder(out, "recipe.json", "a demo", {"r": 1}, False, "x", layout=demo.LAYOUT) \
        == {"r": 1}
    (out / "recipe.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a demo output folder"):
        recipe.claim_output_folder(out, "recipe.json", "a demo", {"r": 1}, False, "x", layout=demo.LAYOUT)
    (out / "recipe.json").write_text(json.dumps(recipe.stamp_doc("a demo", {"r": 1})))
    assert {k: (size, sha) for k, (size, _, sha) in snapshot(tmp_path).items()} == snap
