"""ablation.py: rows -> command lines, aggregation and direction column, the scheduler (fake
runner), the output folder's guard (--fresh deletes only a folder the ablation wrote: a table of
foreign shapes), damaged run outputs, and one tiny end-to-end run against the runs' metrics.json."""
import json
import math
import threading
import time
from pathlib import Path

import pytest
from clicheck import refused

import ablation as A
from world import recipe, vlms

ROOT = Path(A.__file__).resolve().parent
S = A.Setup(Path("/o"), Path("/w"))          # world-clip / world-sig, the demo's 8 epochs, weights/
W = str(vlms.WEIGHTS)
COMMON = ["--dataset", "synthetic", "--world", "/w", "--runs", "/o", "--cache", "/o/cache"]
CLIP = ["--vlm", "world-clip", "--weights", str(vlms.WEIGHTS)]
LOOP = ["--threads", "1", "--no-progress", "--resume", "--keep-empty", "--epochs", "8", "--batch-size", "8",
        "--lr", "5e-4", "--warmup-steps", "20", "--schedule", "cosine", "--clip", "1.0", "--weight-decay", "1e-4"]
OPTS = ["--model-opt", "d_model=64", "--model-opt", "d_latent=32", "--model-opt", "heads=4",
        "--model-opt", "ffn_mult=2", "--model-opt", "impl=reference"]
BOTH = ["--model-opt", "geometric_encoder=true", "--model-opt", "linking_decoder=true"]


# -- rows -> command lines -----------------------------------------------------------------------
def test_a1_command():
    assert A.command(A.BY_NAME["A1"], 0, S) == [
        str(ROOT / "train_teacher.py")] + COMMON + CLIP + LOOP + ["--seed", "0"] + OPTS + [
        "--model-opt", "geometric_encoder=false", "--model-opt", "linking_decoder=false", "--name", "A1_s0"]


def test_a5_command_logit_kd_only_same_seed_teacher():
    assert A.command(A.BY_NAME["A5"], 2, S) == [
        str(ROOT / "train_student.py")] + COMMON + CLIP + LOOP + ["--seed", "2"] + OPTS + BOTH + [
        "--w-map", "0", "--w-query", "0", "--w-logit", "1.0", "--temperature", "2.0", "--name", "A5_s2",
        "--teacher", "/o/A4_s2/last.pt"]


def test_a8_two_teachers_and_a4_sig_on_the_second_vlm():
    a8 = A.command(A.BY_NAME["A8"], 1, S)
    assert a8[-6:] == ["--name", "A8_s1", "--teacher", "/o/A4_s1/last.pt", "--teacher", "/o/A4-sig_s1/last.pt"]
    assert a8[a8.index("--w-map"):a8.index("--name")] == ["--w-map", "1.0", "--w-query", "1.0", "--w-logit", "1.0",
                                                          "--temperature", "2.0"]
    sig = A.command(A.BY_NAME["A4-sig"], 1, A.Setup(Path("/o"), Path("/w"), epochs="1"))
    assert sig[sig.index("--vlm"):sig.index("--vlm") + 4] == ["--vlm", "world-sig", "--weights", W]
    assert sig[sig.index("--epochs") + 1] == "1"


def test_other_rows_options():
    def opts(name, seed=0, s=S):
        argv = A.command(A.BY_NAME[name], seed, s)
        return argv[argv.index("--weight-decay") + 4:]      # after "--seed N"
    kd = ["--w-map", "1.0", "--w-query", "1.0", "--w-logit", "1.0", "--temperature", "2.0"]
    assert opts("A7-softmax") == OPTS + BOTH + kd + ["--kd-logit-form", "softmax", "--name", "A7-softmax_s0",
                                                     "--teacher", "/o/A4_s0/last.pt"]
    assert opts("A7-pe") == OPTS + BOTH + ["--model-opt", "box_guidance=pe", "--w-map", "1.0", "--w-query", "1.0",
                                          "--w-logit", "1.0", "--temperature", "2.0", "--name", "A7-pe_s0",
                                          "--teacher", "/o/A4-pe_s0/last.pt"]
    assert opts("FS16") == OPTS + BOTH + ["--few-shot", "16", "--name", "FS16_s0"]
    assert opts("ZS-S", 1) == OPTS + BOTH + ["--zero-shot", "nf-uc"] + kd + ["--name", "ZS-S_s1",
                                                                            "--teacher", "/o/ZS-T_s1/last.pt"]
    rnd = A.command(A.BY_NAME["ZS-rand"], 0, S)
    assert rnd[rnd.index("--vlm"):rnd.index("--vlm") + 6] == ["--vlm", "world-clip", "--weights", W,
                                                              "--pretrained", "random"]
    assert "vlm_seed=0" in rnd and "vlm_seed=2" in A.command(A.BY_NAME["ZS-rand"], 2, S)   # a tower per seed
    assert not any(a.startswith("vlm_seed") for a in A.command(A.BY_NAME["ZS-T"], 2, S))
    tiny = A.command(A.BY_NAME["ZS-rand"], 0, A.Setup(Path("/o"), Path("/w"), vlm="tiny"))
    assert "--pretrained" not in tiny                  # tiny is random already; 'random' is no open_clip tag


def test_teachers_are_added_and_run_first():
    assert A.with_teachers(["A8"]) == ["A4", "A4-sig", "A8"]
    assert A.with_teachers(["A7-pe", "A1"]) == ["A1", "A4-pe", "A7-pe"]
    jobs = A.build_jobs(A.with_teachers(["A8", "A1"]), [0, 1], S)
    assert [j.name for j in jobs] == ["A4_s0", "A4_s1", "A4-sig_s0", "A4-sig_s1", "A1_s0", "A1_s1", "A8_s0", "A8_s1"]
    assert jobs[-1].deps == ("A4_s1", "A4-sig_s1")


def test_bad_rows_and_seeds_exit_2(capsys):
    for argv in (["--rows", "A9"], ["--seeds", "0,0"], ["--seeds", "x"], ["--jobs", "0"]):
        with pytest.raises(SystemExit) as e:
            A.parse(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1


# -- aggregation ---------------------------------------------------------------------------------
def _stats(full, rare):
    return A.summarise({s: {"full": f, "rare": r, "non_rare": None} for s, (f, r) in enumerate(zip(full, rare))},
                       ("full", "rare", "non_rare"))


def test_mean_std_and_direction():
    a1 = _stats([10.0, 11.0, 12.0], [20.0, 20.0, 20.0])
    a2 = _stats([10.0, 12.0, 14.0], [18.5, 19.0, 19.5])
    assert a2["mean"] == {"full": 12.0, "rare": 19.0, "non_rare": None}
    assert a2["std"]["full"] == pytest.approx(2.0) and a2["std"]["rare"] == pytest.approx(0.5) and a2["n"] == 3
    d = A.direction("A2", {"A1": a1, "A2": a2})
    # paper: A2 - A1 = +3.13 Full, +6.09 Rare
    assert d["full"]["paper_delta"] == 3.13 and d["rare"]["paper_delta"] == 6.09
    assert d["full"]["delta"] == pytest.approx(1.0) and d["full"]["reproduced"]
    assert d["full"]["se"] == pytest.approx(math.sqrt(4 / 3 + 1 / 3))
    assert d["full"]["within_noise"]                                   # 1.0 < 2 * 1.29
    assert d["rare"]["delta"] == pytest.approx(-1.0) and not d["rare"]["reproduced"]
    assert not d["rare"]["within_noise"]                               # 1.0 > 2 * sqrt(0.25 / 3 + 0 / 3) = 0.58
    assert A.direction_text(d) == "Full yes~, Rare no"


def test_direction_paper_sign_negative_and_one_seed():
    # A6 vs A5 in the paper: Full +0.45, Rare -0.20
    a5, a6 = _stats([30.0], [40.0]), _stats([31.0], [39.0])
    d = A.direction("A6", {"A5": a5, "A6": a6})
    assert d["rare"]["paper_delta"] == -0.2 and d["rare"]["reproduced"] and d["full"]["reproduced"]
    assert d["full"]["se"] is None and A.direction_text(d) == "Full yes?, Rare yes?"
    assert A.direction("A6", {"A6": a6}) is None            # base not run
    assert A.direction("A7-pe", {"A7": a6, "A7-pe": a6}) is None   # no paper figure


def test_failed_seed_left_out_of_the_mean(tmp_path):
    for sd, f in ((0, 10.0), (2, 20.0)):
        (tmp_path / f"A1_s{sd}").mkdir()
        (tmp_path / f"A1_s{sd}" / "metrics.json").write_text(json.dumps({"full": f, "rare": f, "non_rare": 1.0}))
    state = {"A1_s0": "ok", "A1_s1": "failed (exit 3)", "A1_s2": "ok"}
    r = A.collect(tmp_path, tmp_path / "world", ["A1"], [0, 1, 2], state)["rows"]["A1"]
    assert r["per_seed"]["1"] is None and r["status"]["1"] == "failed (exit 3)"
    assert r["mean"]["full"] == 15.0 and r["std"]["full"] == pytest.approx(math.sqrt(50)) and r["n"] == 2
    assert "failed (exit 3)" in A._row_line("A1", r, ("full", "rare", "non_rare"))


# -- the scheduler -------------------------------------------------------------------------------
def fake_runner(fail=(), raise_=()):
    lock, log = threading.Lock(), {"now": 0, "max": 0, "start": {}, "end": {}}

    def run(job):
        with lock:
            log["now"] += 1
            log["max"] = max(log["max"], log["now"])
            log["start"][job.name] = time.monotonic()
        time.sleep(0.02)
        with lock:
            log["now"] -= 1
            log["end"][job.name] = time.monotonic()
        if job.name in raise_:
            raise OSError("cannot start")
        return 3 if job.name in fail else 0
    return run, log


JOBS = [A.Job("T1", []), A.Job("T2", []), A.Job("T3", []), A.Job("T4", []),
        A.Job("S1", [], ("T1",)), A.Job("S2", [], ("T1", "T2")), A.Job("S3", [], ("S1",)), A.Job("S4", [], ("T4",))]


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_scheduler_order_and_limit(jobs):
    run, log = fake_runner()
    state = A.schedule(JOBS, run, jobs)
    assert state == {j.name: "ok" for j in JOBS}
    assert log["max"] == jobs                                   # never more, and the slots are used
    for j in JOBS:
        assert all(log["end"][d] <= log["start"][j.name] for d in j.deps)


def test_scheduler_failed_teacher_skips_its_students(capsys):
    run, log = fake_runner(fail={"T1"}, raise_={"T4"})
    state = A.schedule(JOBS + [A.Job("X", [], ("nope",))], run, 2)
    assert state["T1"] == "failed (exit 3)" and state["T4"] == "failed (exit -1)"
    assert state["S1"] == "skipped (T1 did not finish)" and state["S2"] == "skipped (T1 did not finish)"
    assert state["S3"] == "skipped (S1 did not finish)" and state["S4"] == "skipped (T4 did not finish)"
    assert state["X"] == "skipped (nope did not finish)"
    assert state["T2"] == state["T3"] == "ok"
    assert set(log["start"]) == {"T1", "T2", "T3", "T4"}        # no skipped job was started
    assert "T4: cannot start" in capsys.readouterr().err


# -- the output folder ---------------------------------------------------------------------------
def test_fresh_never_deletes_a_foreign_folder(tmp_path):
    r1, r2 = {"r": 1, "vlm_sha256": {}}, {"r": 2, "vlm_sha256": {}}
    (tmp_path / "mine.txt").write_text("keep")
    assert "not an ablation output folder" in A.prepare_out(tmp_path, r1, fresh=True)
    assert (tmp_path / "mine.txt").read_text() == "keep"
    out = tmp_path / "abl"
    assert A.prepare_out(out, r1, fresh=False) is None
    (out / "A1_s0").mkdir()
    assert "another recipe" in A.prepare_out(out, r2, fresh=False)
    assert (out / "A1_s0").is_dir()
    assert A.prepare_out(out, r2, fresh=True) is None and not (out / "A1_s0").exists()


def test_recipe_stamp_vlm_weights(tmp_path):
    """A subset run without the second VLM fits the folder; other weights of a VLM used do not."""
    base = {"r": 1}
    assert A.prepare_out(tmp_path, dict(base, vlm_sha256={"world-clip": "aa"}), fresh=False) is None
    (tmp_path / "A1_s0").mkdir()
    assert A.prepare_out(tmp_path, dict(base, vlm_sha256={"world-clip": "aa", "world-sig": "bb"}), False) is None
    assert A.prepare_out(tmp_path, dict(base, vlm_sha256={"world-sig": "bb"}), False) is None
    assert "another recipe" in A.prepare_out(tmp_path, dict(base, vlm_sha256={"world-sig": "cc"}), False)
    assert "another recipe" in A.prepare_out(tmp_path, dict(base, vlm_sha256={"world-clip": "ab"}), False)
    stamp = json.loads((tmp_path / A.STAMP).read_text())
    assert stamp["written_by"] == "LINK ablation.py"
    assert stamp["recipe"]["vlm_sha256"] == {"world-clip": "aa", "world-sig": "bb"}


def _user_file_in_a_run(out):
    (out / "A1_s0").mkdir()
    (out / "A1_s0" / "notes.txt").write_text("mine")


# foreign-folder shapes: (make it inside the ablation's own folder ``out``, a word of the refusal)
FOREIGN = {
    "no stamp": (lambda out: (out / A.STAMP).unlink(), f"it has no {A.STAMP}"),
    "stamp truncated": (lambda out: (out / A.STAMP).write_bytes((out / A.STAMP).read_bytes()[:20]),
                        "is not valid JSON"),
    "the demo's stamp": (lambda out: (out / A.STAMP).write_text(json.dumps(recipe.stamp_doc("a demo", {}))),
                         "is not the stamp 'LINK ablation.py' writes"),
    "a user's file": (lambda out: (out / "notes.txt").write_text("mine"), "notes.txt, a regular file"),
    "a user's file in a run": (_user_file_in_a_run, "A1_s0/notes.txt, a regular file"),
    "a run of no row": (lambda out: (out / "Z9_s0").mkdir(), "Z9_s0, a directory this command does not write"),
    "a link to a folder": (lambda out: (out / "cache").symlink_to(out.parent), "cache, a symbolic link"),
}
ARGV = ["--rows", "A1", "--seeds", "0", "--vlm", "tiny", "--fresh", "--out"]


@pytest.mark.parametrize("shape", list(FOREIGN))
def test_fresh_refuses_a_foreign_folder_and_deletes_nothing(tmp_path, shape):
    out = tmp_path / "abl"
    assert A.prepare_out(out, {"r": 1, "vlm_sha256": {}}, fresh=False) is None
    (out / "A1_s0.out").write_text("log")
    make, needle = FOREIGN[shape]
    make(out)
    refused(A.main, ARGV + [str(out)], [tmp_path], [str(out), "not an ablation output folder", needle,
                                                   "nothing was deleted"])


def test_fresh_refuses_a_link_or_a_file_as_the_folder(tmp_path):
    real = tmp_path / "real"
    assert A.prepare_out(real, {"r": 1, "vlm_sha256": {}}, fresh=False) is None
    (tmp_path / "link").symlink_to(real)
    refused(A.main, ARGV + [str(tmp_path / "link")], [tmp_path], [str(tmp_path / "link"), "symbolic link to"])
    (tmp_path / "file").write_text("mine")
    for argv in (ARGV, ARGV[:-2] + ["--out"]):           # with and without --fresh
        refused(A.main, argv + [str(tmp_path / "file")], [tmp_path], [str(tmp_path / "file"),
                                                                        "names a regular file, not a folder"])


def test_a_damaged_metrics_file_is_named_not_a_crash(tmp_path):
    (tmp_path / "A1_s0").mkdir()
    (tmp_path / "A1_s0" / "metrics.json").write_text('{"full": 1')
    r = A.read_row("A1", [0], tmp_path, {"A1_s0": "ok"})
    assert r["per_seed"] == {0: None}
    assert r["status"][0].startswith(f"damaged ({tmp_path / 'A1_s0' / 'metrics.json'}: run's metrics file")
    (tmp_path / "A1_s0" / "metrics.json").write_text('{"full": "high"}')
    assert "field 'full' is not a number" in A.read_row("A1", [0], tmp_path, {"A1_s0": "ok"})["status"][0]


def test_missing_world_vlm_refused_before_any_run(tmp_path, capsys):
    (tmp_path / "w").mkdir()
    # A1 needs only world-clip; A8 also world-sig (its second teacher)
    for rows, vlm in (("A1", "world-clip"), ("A8", "world-clip"), ("A8", "world-sig")):
        argv = ["--rows", rows, "--out", str(tmp_path / "abl"), "--weights", str(tmp_path / "w")]
        if vlm == "world-sig":
            argv += ["--vlm", "tiny"]
        assert A.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: ablation.py: world VLM '{vlm}'") and err.count("\n") == 1
        assert not (tmp_path / "abl").exists()


# -- end to end ----------------------------------------------------------------------------------
TINY = ["--seeds", "0", "--epochs", "1", "--n-train", "40", "--n-test", "6", "--vlm", "tiny"]


def test_tiny_end_to_end(tmp_path, capsys):
    """A4 -> A5 (teacher, student) for real: results.json holds the runs' metrics.json."""
    out = tmp_path / "abl"
    assert A.main(["--rows", "A5", "--out", str(out)] + TINY) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["runs"] == {"A4_s0": "ok", "A5_s0": "ok"} and list(res["rows"]) == ["A4", "A5"]
    assert set(res["run_wall_s"]) == {"A4_s0", "A5_s0"} and 0 < res["run_wall_s"]["A4_s0"] <= res["runtime_s"]
    for n in ("A4", "A5"):
        m = json.loads((out / f"{n}_s0" / "metrics.json").read_text())
        r = res["rows"][n]
        assert r["per_seed"]["0"] == m
        assert r["mean"] == {k: m[k] for k in ("full", "rare", "non_rare")}
    assert res["rows"]["A5"]["change"]["full"]["delta"] == pytest.approx(
        res["rows"]["A5"]["mean"]["full"] - res["rows"]["A4"]["mean"]["full"])
    assert 0 < res["chance"]["full"]["full"] < 100
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert f"{res['rows']['A5']['mean']['full']:7.2f}" in capsys.readouterr().out
    # again: finished runs are not run again
    stamp = (out / "A5_s0" / "last.pt").stat().st_mtime_ns
    assert A.main(["--rows", "A5", "--out", str(out)] + TINY) == 0
    assert (out / "A5_s0" / "last.pt").stat().st_mtime_ns == stamp
    assert "finished before" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["run_wall_s"] == {}
    # a truncated metrics.json (or predictions): that run again (it resumes from last.pt), not a crash
    good = (out / "A4_s0" / "metrics.json").read_bytes()
    (out / "A4_s0" / "metrics.json").write_bytes(good[:len(good) // 2])
    (out / "A5_s0" / "predictions_test.json").write_text("")
    assert A.main(["--rows", "A5", "--out", str(out)] + TINY) == 0
    printed = capsys.readouterr().out
    assert f"A4_s0            damaged output ({out / 'A4_s0' / 'metrics.json'}: run's metrics file" in printed
    assert "A5_s0            damaged output" in printed and "is empty" in printed
    assert json.loads((out / "A4_s0" / "metrics.json").read_text()) == json.loads(good)
    assert set(json.loads((out / "results.json").read_text())["run_wall_s"]) == {"A4_s0", "A5_s0"}
    # --fresh clears the folder the ablation wrote (every entry is of its layout)
    rec = A.recipe(A.parse(["--rows", "A5", "--out", str(out)] + TINY))
    assert A.prepare_out(out, rec, fresh=True) is None and [p.name for p in out.iterdir()] == [A.STAMP]


def test_a_failed_run_exits_1_and_the_others_print(tmp_path, monkeypatch, capsys):
    out = tmp_path / "abl"

    def runner(out_dir, wall):
        def run(job):
            if job.name == "A1_s0":
                return 3
            (out_dir / job.name).mkdir()
            (out_dir / job.name / "metrics.json").write_text(json.dumps({"full": 5.0, "rare": 4.0, "non_rare": 6.0}))
            return 0
        return run
    monkeypatch.setattr(A, "subprocess_runner", runner)
    assert A.main(["--rows", "A1,A2", "--out", str(out)] + TINY) == 1
    res = json.loads((out / "results.json").read_text())
    assert res["rows"]["A1"]["status"] == {"0": "failed (exit 3)"} and res["rows"]["A2"]["mean"]["full"] == 5.0
    cap = capsys.readouterr()
    assert "A2         + linking decoder" in cap.out and "A1_s0" in cap.err
