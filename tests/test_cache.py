"""Tests of the feature cache (cache.py): reused while the key, the image list and the images'
bytes stay, rebuilt otherwise; every (image, view) encoded exactly once; a missing or damaged
image is named as such (a table through the training CLI). Disk-full and crash cases are in
test_reliability.py, cache keys of real VLMs in test_vlm.py."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from clicheck import refused
from PIL import Image
from test_trainer import StandIn, TinyCfg, TinyCS, TinyDS, tiny_split

import train_teacher
from cache import FeatureCache, FeatureSource
from data import Views
from runs import TrainInputError
from world import synthetic


def test_feature_cache_reused_and_rebuilt(tmp_path):
    model = StandIn(TinyCfg(), TinyCS())
    ds = TinyDS(tmp_path / "imgs", 5)
    paths = [ds.image_path(i) for i in range(5)]
    calls = []

    def enc(images):
        calls.append(len(images))
        return model.encode_images(model.preprocess(images))

    def load(i, v):
        return ds[i][0]

    c1 = FeatureCache(tmp_path / "c", "key-A", paths, 1, "float32").ensure(enc, load, 2, progress=False)
    assert c1.rebuilt and sum(calls) == 5
    want = model.encode_images(model.preprocess([ds[3][0]]))
    torch.testing.assert_close(c1.get([3], [0]), want, rtol=0, atol=0)
    calls.clear()
    c2 = FeatureCache(tmp_path / "c", "key-A", paths, 1, "float32").ensure(enc, load, 2, progress=False)
    assert not c2.rebuilt and calls == []                               # valid: reused
    c3 = FeatureCache(tmp_path / "c", "key-B", paths, 1, "float32").ensure(enc, load, 2, progress=False)
    assert c3.rebuilt and sum(calls) == 5                               # other key: rebuilt
    calls.clear()
    c4 = FeatureCache(tmp_path / "c", "key-A", paths[:4], 1, "float32").ensure(enc, load, 2, progress=False)
    assert c4.rebuilt and sum(calls) == 4                               # other image list
    calls.clear()
    # modify an image (content and mtime): the key-A cache is stale and rebuilt
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(paths[3])
    st = paths[3].stat()
    os.utime(paths[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c5 = FeatureCache(tmp_path / "c", "key-A", paths, 1, "float32")
    assert not c5.is_valid()
    c5.ensure(enc, load, 2, progress=False)
    assert c5.rebuilt and sum(calls) == 5
    torch.testing.assert_close(c5.get([3], [0]), model.encode_images(model.preprocess([ds[3][0]])))
    assert len(list(c5.dir.glob("feats-*.bin"))) == 1                  # the old data file removed
    # flips: both views stored, view 1 = the mirrored image
    cf = FeatureCache(tmp_path / "c", "key-A", paths, 2, "float32").ensure(
        enc, lambda i, v: ds[i][0].transpose(Image.FLIP_LEFT_RIGHT) if v else ds[i][0], 4, progress=False)
    mir = model.encode_images(model.preprocess([ds[1][0].transpose(Image.FLIP_LEFT_RIGHT)]))
    torch.testing.assert_close(cf.get([1], [1]), mir, rtol=0, atol=0)


def test_feature_cache_holds_each_view_once(tmp_path):
    """4 views (whole and a 0.5 crop, each mirrored) of 3 images: each (image, view) encoded
    exactly once, the cached map of each equals encoding that view's image; reused as long as
    the crop scales stay, rebuilt when they change."""
    model = StandIn(TinyCfg(), TinyCS())
    sp = tiny_split(tmp_path / "d", 3, views=Views(flip=True, crop_scales=(0.5,)))
    loads = []
    orig = sp.image
    sp.image = lambda i, v=0: (loads.append((i, v)), orig(i, v))[1]
    src = FeatureSource(model, sp, tmp_path / "cache", dtype="float32", progress=False)
    assert src.views == 4 and sorted(loads) == [(i, v) for i in range(3) for v in range(4)]
    data = list(src.cache.dir.glob("feats-*.bin"))
    assert len(data) == 1 and data[0].stat().st_size == 3 * 4 * 4 * 4 * 4 * 4     # N x V x C x 4 x 4 fp32
    for i in range(3):
        for v in range(4):
            want = model.encode_images(model.preprocess([orig(i, v)]))
            torch.testing.assert_close(src.get([i], [v]), want, rtol=0, atol=0)
    assert orig(0, 2).size == (8, 8) and orig(0, 1).size == (16, 16)
    loads.clear()
    FeatureSource(model, sp, tmp_path / "cache", dtype="float32", progress=False)
    assert loads == []                                                            # reused
    sp.views = Views(flip=True, crop_scales=(0.75,))
    FeatureSource(model, sp, tmp_path / "cache", dtype="float32", progress=False)
    assert len(loads) == 12                                                       # other crops: rebuilt
    with pytest.raises(TrainInputError, match="2 views asked"):
        FeatureSource(model, sp, None, 2)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyworld")
    synthetic.make_synthetic_world(root, n_train=4, n_test=2, image_size=64, seed=0, workers=1)
    return root


def _damage(p, kind):
    data = p.read_bytes()
    p.unlink()
    if kind == "truncated":
        p.write_bytes(data[:len(data) // 2])
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "not an image":
        p.write_text("my notes")
    elif kind == "a directory":
        p.mkdir()
    elif kind == "dangling link":
        p.symlink_to(p.parent / "nowhere.png")


# (how the image is damaged, what the one line says is wrong)
BAD_IMAGES = {"missing": "No such file or directory", "truncated": "image file is truncated",
              "empty": "cannot identify image file", "not an image": "cannot identify image file",
              "a directory": "Is a directory", "dangling link": "No such file or directory"}


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_a_bad_training_image_is_named_not_a_cache_write_error(tiny_world, tmp_path, kind):
    """The cache build reads every image: a missing or damaged one is one line naming the image
    and what is wrong with it (exit 2), never 'cache: cannot write'; the world is left as it was."""
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    img = world / "images" / "train" / "synth_train_000001.png"
    _damage(img, kind)
    argv = ["--dataset", "synthetic", "--world", str(world), "--runs", str(tmp_path / "runs"), "--vlm", "tiny",
            "--cache", str(tmp_path / "cache"), "--name", "t", "--epochs", "1", "--no-progress", "--threads", "1",
            "--model-opt", "d_model=32", "--model-opt", "d_latent=16", "--model-opt", "heads=2"]
    line = refused(lambda a: train_teacher.run_cli(lambda: train_teacher.main(a)), argv, [world],
                   [str(img), BAD_IMAGES[kind]])
    assert "cannot write" not in line
    assert not list((tmp_path / "cache").rglob("feats-*.bin"))
