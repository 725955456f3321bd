"""The demo's results JSON and table carry the simulated detector's box AP (eval.evaluate_detector)."""
import json

import pytest

import data
import demo
import eval as hoi_eval
import synthetic


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    # 40 train images: enough rows for a non-rare class, which the chance level reports
    synthetic.make_synthetic_world(root, n_train=40, n_test=6, image_size=64, seed=0, workers=1)
    return root


def fake_runs(out, world):
    """The four run folders as collect_results reads them: hand-set metrics, no prediction rows."""
    (out / "world").symlink_to(world)
    for k in ("teacher", "student", "zs_teacher", "zs_student"):
        (out / k).mkdir()
        (out / k / "metrics.json").write_text(json.dumps({m: 10.0 for m in demo.KEYS + demo.ZS_KEYS}))
        (out / k / "predictions_test.json").write_text("{}")


def test_results_and_table_carry_the_detector_ap(tmp_path, world, capsys):
    fake_runs(tmp_path, world)
    anno = json.loads((world / "instances_test.json").read_text())
    res = demo.collect_results(tmp_path, anno, "nf-uc")
    ref = hoi_eval.evaluate_detector(world / "instances_test.json", world / "detections_test.json",
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
