"""world/pretrain_vlm.py and world/vlms.py: losses and retrieval against hand-computed values, a tiny
pretraining run (the loss falls, deterministic from the seed), fp16 checkpoints through the
real LINKConfig(pretrained=FILE) path, and the shipped world VLMs (checksum, features, text)."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common import file_sha256
from model import LINKConfig
from vlm import FrozenVLM, dense_features
from world import captions as C
from world import pretrain_vlm as P
from world import vlms as W

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 64, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_clip_loss_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    eye = torch.eye(2, dtype=torch.bool)
    # logits = 2 * [[1, .6], [0, .8]]; rows: images -> captions, columns: captions -> images
    ce = lambda row, j: -row[j] + math.log(sum(math.exp(v) for v in row))  # noqa: E731
    L = [[2.0, 1.2], [0.0, 1.6]]
    i2t = (ce(L[0], 0) + ce(L[1], 1)) / 2
    t2i = (ce([L[0][0], L[1][0]], 0) + ce([L[0][1], L[1][1]], 1)) / 2
    got = P.clip_loss(img, txt, torch.tensor(2.0), eye)
    assert got.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    # both captions the same text: each row's target is uniform over both columns
    both = torch.ones(2, 2, dtype=torch.bool)
    soft = lambda row: -0.5 * sum(row) + math.log(sum(math.exp(v) for v in row))  # noqa: E731
    want = 0.5 * ((soft(L[0]) + soft(L[1])) / 2 + (soft([2.0, 0.0]) + soft([1.2, 1.6])) / 2)
    assert P.clip_loss(img, txt, torch.tensor(2.0), both).item() == pytest.approx(want, abs=1e-6)


def test_siglip_loss_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    pos = torch.tensor([[True, False], [False, True]])
    ls = lambda x: -math.log1p(math.exp(-x))  # noqa: E731   log sigmoid
    # logits = 3 * sim - 1: [[2, .8], [-1, 1.4]]; positives on the diagonal
    want = -(ls(2.0) + ls(-0.8) + ls(1.0) + ls(1.4)) / 2
    got = P.siglip_loss(img, txt, torch.tensor(3.0), torch.tensor(-1.0), pos)
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_same_text_and_retrieval_ranks():
    assert P.same_text(["a", "b", "a"]).tolist() == [[True, False, True], [False, True, False],
                                                     [True, False, True]]
    sim = torch.tensor([[0.9, 0.1, 0.2, 0.0, 0.0, 0.0, 0.0],    # own (col 0) first
                        [0.5, 0.4, 0.6, 0.7, 0.8, 0.9, 0.0],    # own (col 1) 6th
                        [0.3, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1]])   # own (col 2) tied with 2 others: 3rd
    r = P.retrieval(sim, torch.tensor([0, 1, 2]))
    assert r == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(2 / 3)}


def test_class_ap_by_hand():
    sim = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.1, 0.2], [0.5, 0.3]])
    labels = np.array([[1, 0], [0, 0], [1, 0], [1, 1]], dtype=bool)
    ap = P.class_ap(sim, labels)
    # class 0: ranked 0.9(+) 0.8(-) 0.5(+) 0.1(+): precision at the hits 1, 2/3, 3/4 -> all-point AP
    assert ap[0] == pytest.approx((1 + 3 / 4 + 3 / 4) / 3, abs=1e-6)   # envelope: max precision to the right
    assert ap[1] == pytest.approx(1 / 2, abs=1e-6)                      # 0.7(-) then 0.3(+)


def test_lr_schedule():
    assert P.lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert P.lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert P.lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert P.lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    paths, gts = C.caption_world(tmp_path_factory.mktemp("vlmworld"), 24, seed=5, image_size=64)
    return P.load_images(paths), gts


def _tiny_run(images, gts, seed, kind, steps=6):
    name = f"test-world-tiny-{kind[:3]}"
    clip = P.build(name, P.model_config(TINY, kind), seed)
    tok = P.open_clip.get_tokenizer(name)
    opt = P.optimiser(clip, 2e-3, 0.1)
    gen = torch.Generator().manual_seed(seed)
    batch = [torch.arange(12)] * steps                            # the same 12 images, every step
    return clip, P.train_steps(clip, tok, images, gts, batch, kind, opt, lambda s: 2e-3, seed, 0, 0, gen)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_pretraining_step_decreases_loss_and_is_deterministic(tiny_world, kind):
    images, gts = tiny_world
    assert images.shape == (24, 3, 64, 64) and images.dtype == torch.uint8
    # 12 steps, not 6: after 6, CLIP seed 0 ended at 0.756 of its first loss, too near 0.8 for
    # another CPU; after 12, seeds 0-2 of both kinds end at 0.06-0.42 (1 and 2 threads, AMD EPYC)
    _, a = _tiny_run(images, gts, 0, kind, steps=12)
    _, b = _tiny_run(images, gts, 0, kind, steps=12)
    _, c = _tiny_run(images, gts, 1, kind, steps=12)
    assert a == b                                                 # bitwise, same seed
    assert a != c
    assert a[-1] < 0.8 * a[0], a                                  # same batch: the loss must fall
    if kind == "clip":                                            # an untrained model: about log(12)
        assert abs(a[0] - math.log(12)) < 0.5


def test_fp16_checkpoint_loads_through_linkconfig(tiny_world, tmp_path):
    images, gts = tiny_world
    clip, _ = _tiny_run(images, gts, 0, "clip", steps=2)
    path = tmp_path / "tiny.pt"
    P.save_fp16(clip, path)
    state = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    loaded = FrozenVLM(LINKConfig(vlm="test-world-tiny-cli", vlm_config=TINY, pretrained=str(path), image_size=64,
                                  image_mean=0.5, image_std=0.5)).clip
    for k, v in clip.state_dict().items():
        want = v.half().float() if v.is_floating_point() else v
        assert torch.equal(loaded.state_dict()[k].float() if v.is_floating_point() else loaded.state_dict()[k],
                           want), k


def test_arguments_are_checked(tmp_path, capsys):
    out = tmp_path / "m.pt"
    out.write_bytes(b"user file")
    for argv, msg in [(["--out", str(out)], "exists"), (["--out", str(tmp_path / "x_siglip.pt")], "siglip"),
                      (["--images", "100", "--heldout", "50"], "--batch-size"),
                      (["--out", str(tmp_path / "m.pth")], "must end in .pt"),
                      (["--out", str(tmp_path / "ViT-B-16.pt")], "one of open_clip's own models"),
                      (["--batch-size", "0"], "--batch-size"), (["--threads", "0"], "--threads"),
                      (["--lr", "-1"], "--lr"), (["--locked-text", "1.5"], "--locked-text")]:
        with pytest.raises(SystemExit) as e:
            P.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and msg in err and err.count("\n") == 1
    assert out.read_bytes() == b"user file"


def test_bad_checksum_is_refused(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"not the trained weights")
    doc = {"name": "world-test-bad", "open_clip_config": TINY, "checkpoint": "m.pt", "sha256": "0" * 64,
           "image_size": 64, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="m.pt: sha256 differs"):
        W.world_vlm("world-test-bad", folder=tmp_path)
    doc["sha256"] = file_sha256(tmp_path / "m.pt")
    (tmp_path / "m.json").write_text(json.dumps(doc))
    assert W.world_vlm("world-test-bad", folder=tmp_path) == {
        "vlm": "world-test-bad", "vlm_config": TINY, "pretrained": str(tmp_path / "m.pt"), "image_size": 64,
        "image_mean": (0.5,) * 3, "image_std": (0.25,) * 3, "quick_gelu": False}
    with pytest.raises(ValueError, match="not in"):
        W.world_vlm("world-nope", folder=tmp_path)
    (tmp_path / "m.pt").unlink()
    with pytest.raises(FileNotFoundError, match="m.pt: world VLM checkpoint not found"):
        W.world_vlm("world-test-bad", folder=tmp_path)


def test_a_carried_vlm_config_registers_replaces_its_own_and_refuses_open_clips():
    from vlm import register_vlm_config, resolve_vlm_config
    cfg = resolve_vlm_config(LINKConfig(vlm="test-carried-cfg", vlm_config=TINY, pretrained=None))
    assert cfg.image_size == 64 and P.open_clip.get_model_config("test-carried-cfg") == TINY
    assert register_vlm_config("test-carried-cfg", TINY) == "test-carried-cfg"     # idempotent
    other = dict(TINY, embed_dim=16)                   # a checkpoint of the same name, another architecture
    built = FrozenVLM(LINKConfig(vlm="test-carried-cfg", vlm_config=other, pretrained=None, image_size=64)).clip
    assert built.visual.output_dim == 16 and P.open_clip.get_model_config("test-carried-cfg") == other
    again = FrozenVLM(LINKConfig(vlm="test-carried-cfg", vlm_config=TINY, pretrained=None, image_size=64)).clip
    assert again.visual.output_dim == 32
    with pytest.raises(ValueError, match="one of open_clip's own"):
        register_vlm_config("ViT-B-16", TINY)
    with pytest.raises(ValueError, match="siglip"):
        register_vlm_config("my-siglip-x", TINY)


SHIPPED = sorted(W.shipped())


def test_two_different_world_vlms_ship():
    docs = W.shipped()
    assert set(docs) == {"world-clip", "world-sig"}
    assert docs["world-clip"]["loss"] == "clip" and docs["world-sig"]["loss"] == "siglip"
    assert docs["world-sig"]["open_clip_config"]["init_logit_bias"] == -10.0     # the SigLIP loss's bias


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_through_the_real_path(name):
    spec = W.world_vlm(name)                                      # checks the sha256
    doc = W.shipped()[name]
    ckpt = Path(spec["pretrained"])
    assert ckpt.stat().st_size == doc["bytes"] <= 10 * 2 ** 20
    state = torch.load(ckpt, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    cfg = LINKConfig(**spec)
    vlm = FrozenVLM(cfg)                                          # what a user's local CLIP takes
    x = torch.rand(2, 3, spec["image_size"], spec["image_size"])
    f = dense_features(vlm.visual, x)
    assert f.shape == (2, doc["open_clip_config"]["embed_dim"], 8, 8) and torch.isfinite(f).all()
    e = vlm.encode_text(["a photo of a person riding a horse", "a photo of a person holding a cup"])
    assert torch.isfinite(e).all() and (e[0] @ e[1]).item() < 0.99
    rand = FrozenVLM(dataclasses.replace(cfg, pretrained=None))   # the trained weights are not random ones
    assert (dense_features(rand.visual, x) - f).abs().max() > 0.1


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_manifest_records_its_training(name):
    doc = W.shipped()[name]
    h = doc["heldout"]
    assert h["class_map"] > h["class_map_chance"] and h["top5"] > h["chance_top5"]
    assert doc["command"].startswith("python -m world.pretrain_vlm") and doc["train"]["wall_s"] > 0


def test_pretraining_never_draws_over_a_folder_it_did_not_draw(tmp_path):
    user = tmp_path / "my_hoi_world"
    user.mkdir()
    (user / "instances_train.json").write_text("my annotations")
    with pytest.raises(ValueError, match="my_hoi_world: not empty and not a caption world"):
        C.caption_world(user, 4, seed=1, image_size=64)
    assert sorted(p.name for p in user.iterdir()) == ["instances_train.json"]
    assert (user / "instances_train.json").read_text() == "my annotations"
    ours = tmp_path / "half_drawn"                     # a draw of ours that was interrupted: drawn again
    ours.mkdir()
    (ours / "caption_world.json").write_text(json.dumps({"drawing": {"seed": 1, "n": 4, "image_size": 64}}))
    paths, scenes = C.caption_world(ours, 4, seed=1, image_size=64, reuse=True)
    assert len(paths) == len(scenes) == 4 and json.loads((ours / "caption_world.json").read_text())["n"] == 4


def _manifest_folder(tmp_path, **change):
    (tmp_path / "m.pt").write_bytes(b"weights")
    doc = {"name": "world-test-m", "open_clip_config": TINY, "checkpoint": "m.pt",
           "sha256": file_sha256(tmp_path / "m.pt"), "image_size": 64, "image_mean": [0.5] * 3,
           "image_std": [0.25] * 3, **change}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    return tmp_path


@pytest.mark.parametrize("field, value", [("image_mean", 0.5), ("image_std", [1, 2]), ("image_size", "64"),
                                          ("open_clip_config", {"embed_dim": 8}), ("sha256", None)])
def test_a_bad_manifest_field_is_named(tmp_path, field, value):
    folder = _manifest_folder(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=f"m.json: field '{field}'"):
        W.world_vlm("world-test-m", folder=folder)


def test_other_json_files_are_not_manifests_and_quick_gelu_follows_the_config(tmp_path):
    folder = _manifest_folder(tmp_path, open_clip_config=dict(TINY, quick_gelu=True))
    (folder / "notes.json").write_text(json.dumps({"comment": "not a manifest"}))
    assert set(W.shipped(folder)) == {"world-test-m"}
    assert W.world_vlm("world-test-m", folder=folder)["quick_gelu"] is True
    with pytest.raises(FileNotFoundError, match="nowhere: world VLM weights folder not found"):
        W.world_vlm("world-test-m", folder=tmp_path / "nowhere")


def test_the_cache_key_changes_with_the_carried_architecture():
    from model import LINK
    from world.captions import synthetic_class_space
    small = dict(d_model=64, d_latent=16, heads=4, dec_layers=1, pretrained=None, image_size=64)
    a = LINK(LINKConfig(vlm="test-arch-key", vlm_config=TINY, **small), synthetic_class_space())
    other = json.loads(json.dumps(TINY))
    other["vision_cfg"]["layers"] = 2
    b = LINK(LINKConfig(vlm="test-arch-key", vlm_config=other, **small), synthetic_class_space())
    assert a.cache_key() != b.cache_key()                       # same name, same (random) weights id
    assert a.cache_key().split("|arch=")[0] == b.cache_key().split("|arch=")[0]
    plain = LINK(LINKConfig(vlm="link-tiny", **small), synthetic_class_space()).cache_key()
    assert "arch=" not in plain                                 # keys of stock models are unchanged


def test_preprocessing_matches_the_pretraining_normalisation():
    """LINK's preprocess with the manifest's mean / std gives the input pretrain_vlm trained on."""
    spec = W.world_vlm("world-clip")
    from model import LINK
    from world.captions import synthetic_class_space
    model = LINK(LINKConfig(**spec, d_model=64, d_latent=16, heads=4, dec_layers=1), synthetic_class_space())
    from PIL import Image
    img = torch.randint(0, 256, (1, 3, 128, 128), dtype=torch.uint8)
    ours = P.normalise(img)
    theirs = model.preprocess([Image.fromarray(img[0].permute(1, 2, 0).numpy())])   # 128 px: no resize
    assert torch.allclose(theirs, ours, atol=1e-5)

