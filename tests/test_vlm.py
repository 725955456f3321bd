"""Tests of the frozen VLM (vlm.py): the activation, input size and pixel statistics the weights
were trained for (one rule; a local file's activation is never guessed), preprocessing, the dense
map of each tower (tokens, MaskCLIP, SigLIP's pool head), SigLIP's Hugging Face tokenizer from a
local folder, and the identity of features (cache key, feature cache, checkpoints, infer.py).
No network: downloads are faked, weights are random."""
import io
import json
import os
import re
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cache
import data
import infer
import runs
import train_teacher
import trainer
from common import file_sha256
from model import LINK, LINKConfig
from vlm import TINY_VLM, FrozenVLM, dense_features, register_tiny_vlm, resolve_vlm_config, weights_id
from world import synthetic

TINY = register_tiny_vlm()
CLASSES = dict(name="toy", prompts=["a photo of a person riding a bicycle", "a photo of a person holding a cup"],
               object_names=["person", "bicycle", "cup"], hoi_object=[[1], [2]], hoi_verb=[0, 1],
               verb_names=["ride", "hold"], person_label=0, rare=[], unseen=[])
OPENAI = (tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def tiny_cfg(**kw):
    base = dict(vlm=TINY, pretrained=None, d_model=64, d_latent=32, heads=4, enc_layers=1, dec_layers=1,
                dropout=0.0, impl="reference")
    return LINKConfig(**{**base, **kw})


def tiny_weights(path, seed=123):
    """A state-dict file of the tiny VLM with its own random weights -> path."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clip = open_clip.create_model(TINY, pretrained=None)
    torch.save(clip.state_dict(), path)
    return path


def rewrite_in_place(path):
    """Change the weights in the file, keeping its size and mtime (as an in-place fine-tune might)."""
    st = os.stat(path)
    sd = torch.load(path)
    sd["visual.proj"] = sd["visual.proj"] * 1.5
    torch.save(sd, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(path) == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


# ---------------------------------------------------------------------------------------------
# activation, input size, pixel statistics
# ---------------------------------------------------------------------------------------------

def fake_download(monkeypatch):
    """open_clip's real tag lookup and model construction; only the download and the weight
    loading are replaced (they would fetch hundreds of MB). Returns the list of loads."""
    loads = []
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **kw: "/nonexistent/fake.pt")
    monkeypatch.setattr(open_clip.factory, "load_checkpoint", lambda m, path, **kw: loads.append(path))
    return loads


def test_openai_tag_builds_quick_gelu(monkeypatch):
    """ViT-B-16 + openai: both towers use QuickGELU (open_clip alone would build nn.GELU and only
    warn), with OpenAI's pixel statistics. (Input size 32 keeps the test fast; the default size
    is checked below.)"""
    loads, built = fake_download(monkeypatch), []
    real_create = open_clip.create_model
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **kw: built.append(real_create(*a, **kw)) or built[-1])
    net = LINK(LINKConfig(vlm="ViT-B-16", pretrained="openai", image_size=32, d_model=64, d_latent=32, heads=4,
                          enc_layers=1, dec_layers=1), CLASSES)
    assert loads == ["/nonexistent/fake.pt"] and len(built) == 1
    assert net.cfg.quick_gelu is True and net.vlm.grid == (2, 2)
    assert (net.cfg.image_mean, net.cfg.image_std) == OPENAI
    for tower in (built[0].visual, built[0]):               # image tower, text tower
        assert all(isinstance(b.mlp.gelu, open_clip.transformer.QuickGELU) for b in tower.transformer.resblocks)
    assert net.vlm.visual is built[0].visual
    assert "act=quick_gelu" in net.cache_key() and "weights=tag:openai" in net.cache_key()


@pytest.mark.parametrize("vlm, tag, size, quick, stats", [
    ("ViT-B-16", "openai", 224, True, OPENAI),
    ("ViT-B-16", "laion2b_s34b_b88k", 224, False, OPENAI),
    ("ViT-L-14-336", "openai", 336, True, OPENAI),
    ("ViT-B-16-SigLIP", "webli", 224, False, HALF),
    ("ViT-SO400M-14-SigLIP-384", "webli", 384, False, HALF),
    ("ViT-B-16-quickgelu", "metaclip_fullcc", 224, True, OPENAI),
])
def test_resolved_from_open_clip_configs(vlm, tag, size, quick, stats):
    c = resolve_vlm_config(LINKConfig(vlm=vlm, pretrained=tag))
    assert (c.image_size, c.quick_gelu, (c.image_mean, c.image_std)) == (size, quick, stats)
    assert resolve_vlm_config(LINKConfig(vlm=vlm, pretrained=tag, image_size=448)).image_size == 448


def test_local_file_pixel_statistics(tmp_path):
    """A local file never silently gets OpenAI's statistics: SigLIP's 0.5 (what every open_clip
    tag of the architecture uses), or an error when the tags disagree (ViT-L-14) or are none."""
    f = tmp_path / "weights.bin"
    f.write_bytes(b"not read beyond hashing")
    siglip = resolve_vlm_config(LINKConfig(vlm="ViT-B-16-SigLIP2", pretrained=str(f)))
    assert (siglip.image_mean, siglip.image_std) == HALF and siglip.quick_gelu is False
    for vlm, why in (("ViT-L-14", "disagree"), (TINY, "are none")):
        with pytest.raises(ValueError, match=f"{why}.*image_mean and image_std"):
            resolve_vlm_config(LINKConfig(vlm=vlm, pretrained=str(f)))
    c = resolve_vlm_config(LINKConfig(vlm="ViT-L-14", pretrained=str(f), image_mean="0.5,0.4,0.3", image_std=0.25,
                                      quick_gelu=True))                   # (its tags disagree on it too)
    assert (c.image_mean, c.image_std) == ((0.5, 0.4, 0.3), (0.25, 0.25, 0.25))
    assert (resolve_vlm_config(tiny_cfg()).image_mean, resolve_vlm_config(tiny_cfg()).image_std) == OPENAI
    for bad, msg in ((dict(image_mean=(0.5, 0.5), image_std=0.5), "image_mean must be 3 finite numbers"),
                     (dict(image_mean=0.5, image_std=0.0), "image_std must be 3 finite numbers > 0"),
                     (dict(image_mean=0.5), "set both image_mean and image_std")):
        with pytest.raises(ValueError, match=msg):
            resolve_vlm_config(LINKConfig(vlm="ViT-L-14", pretrained=str(f), **bad))


FLAG = "set LINKConfig.quick_gelu (--model-opt quick_gelu=true or quick_gelu=false)"


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_local_file_activation_is_refused_when_nothing_says(tmp_path):
    """A local file on an architecture whose open_clip tags disagree (ViT-B-16: OpenAI's QuickGELU,
    LAION's GELU) and whose config names no activation: refused in one line naming the flag,
    whatever the file looks like (its contents are never read to guess): a TorchScript archive
    (OpenAI's format), a file in the Hugging Face cache of a QuickGELU tag, a renamed copy."""
    script = tmp_path / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(script))
    hub = tmp_path / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "abc"
    hub.mkdir(parents=True)
    (hub / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    plain = tmp_path / "renamed.bin"
    plain.write_bytes(b"weights")
    for f in (script, hub / "open_clip_pytorch_model.bin", plain):
        with pytest.raises(ValueError) as e:
            resolve_vlm_config(LINKConfig(vlm="ViT-B-16", pretrained=str(f)))
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{f}: its activation") and msg.endswith(FLAG), msg
        assert "tags of ViT-B-16 disagree" in msg


def test_local_file_activation_comes_from_the_flag_the_config_or_the_tags(tmp_path):
    """The flag decides (either way); else the architecture's config where it names one (the
    '-quickgelu' models); a config LINK registered decides always (its key, else GELU: what
    open_clip builds from it); else what every tag of the architecture shares. A tag decides
    for itself even where a file of that name exists (test_a_tag_wins_over_a_file_of_that_name)."""
    f = tmp_path / "weights.bin"
    f.write_bytes(b"not read beyond hashing")
    kw = dict(pretrained=str(f), image_mean=0.5, image_std=0.5)
    for q in (True, False):
        assert resolve_vlm_config(LINKConfig(vlm="ViT-B-16", quick_gelu=q, **kw)).quick_gelu is q
        assert resolve_vlm_config(LINKConfig(vlm="ViT-B-16-SigLIP2", quick_gelu=q, **kw)).quick_gelu is q
    assert resolve_vlm_config(LINKConfig(vlm="ViT-B-16-quickgelu", **kw)).quick_gelu is True     # config
    carried = dict(TINY_VLM, quick_gelu=True)
    assert resolve_vlm_config(LINKConfig(vlm="test-act-carried", vlm_config=carried, **kw)).quick_gelu is True
    assert resolve_vlm_config(LINKConfig(vlm="test-act-gelu", vlm_config=TINY_VLM, **kw)).quick_gelu is False
    assert resolve_vlm_config(tiny_cfg(**kw)).quick_gelu is False                 # the tiny VLM: GELU
    assert resolve_vlm_config(LINKConfig(vlm="ViT-L-14-336", **kw)).quick_gelu is True  # its one tag: OpenAI's
    assert resolve_vlm_config(LINKConfig(vlm="ViT-B-16-SigLIP2", **kw)).quick_gelu is False   # all GELU
    with pytest.raises(ValueError, match=r"activation .* unknown .*" + re.escape(FLAG)):
        resolve_vlm_config(LINKConfig(vlm="ViT-L-14", **kw))                     # OpenAI's and LAION's


def test_frozen_vlm_resolves_what_it_builds(monkeypatch):
    """There is no way to build the VLM of an unresolved config other than LINK's: FrozenVLM
    resolves the config itself (ViT-B-16 + openai: QuickGELU in both towers; open_clip alone
    would build GELU)."""
    fake_download(monkeypatch)
    v = FrozenVLM(LINKConfig(vlm="ViT-B-16", pretrained="openai", image_size=32))
    assert v.cfg.quick_gelu is True and v.grid == (2, 2) and v.width == 512
    for tower in (v.visual, v.clip):
        assert all(isinstance(b.mlp.gelu, open_clip.transformer.QuickGELU) for b in tower.transformer.resblocks)
    import model
    import vlm as vlm_py
    assert not any(hasattr(m, n) for m in (model, vlm_py) for n in ("build_vlm", "quick_gelu_evidence"))


def test_a_tag_wins_over_a_file_of_that_name(tmp_path, monkeypatch):
    """As in open_clip.create_model: 'openai' is the tag even where a file 'openai' exists."""
    monkeypatch.chdir(tmp_path)
    Path("openai").write_bytes(b"something else")
    assert resolve_vlm_config(LINKConfig(vlm="ViT-B-16", pretrained="openai")).quick_gelu is True
    assert weights_id(LINKConfig(vlm="ViT-B-16", pretrained="openai")) == "tag:openai"


def test_tag_goes_through_open_clip_lookup(tmp_path, monkeypatch):
    """A pretrained tag goes through open_clip's real tag lookup (its mean / std and activation
    are used); only the download is faked."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        clip = open_clip.create_model(TINY, pretrained=None, force_image_size=96)
    path = tmp_path / "downloaded.pt"
    torch.save(clip.state_dict(), path)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY,
                        {"fake_tag": {"url": "https://example.invalid/tiny.pt", "hf_hub": "",
                                      "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}})
    downloads = []
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **kw: downloads.append(cfg) or str(path))
    m = LINK(tiny_cfg(pretrained="fake_tag", image_size=96), CLASSES)
    assert len(downloads) == 1 and downloads[0]["url"] == "https://example.invalid/tiny.pt"
    assert torch.equal(m.vlm.visual.positional_embedding, clip.visual.positional_embedding)
    assert m.cfg.image_mean == (0.5, 0.5, 0.5) and m.cfg.image_std == (0.25, 0.25, 0.25)
    assert m.encode_images(torch.zeros(1, 3, 96, 96)).shape == (1, 64, 12, 12)
    assert m.cache_key() == (f"features=v2|vlm={TINY}|weights=tag:fake_tag|act=gelu|size=96|mean=0.5,0.5,0.5|"
                             f"std=0.25,0.25,0.25|resize=bicubic|dense=tokens")
    with pytest.raises(ValueError, match="neither a file nor an open_clip tag of link-tiny .tags: fake_tag"):
        LINK(tiny_cfg(pretrained="no_such_tag"), CLASSES)


def test_local_checkpoint_loaded(tmp_path):
    path = tiny_weights(tmp_path / "tiny_clip.pt")
    m = LINK(tiny_cfg(pretrained=str(path), image_mean=0.5, image_std=0.5), CLASSES)
    want = {k[len("visual."):]: v for k, v in torch.load(path).items() if k.startswith("visual.")}
    got = m.vlm.visual.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(LINK(tiny_cfg(), CLASSES).vlm.visual.conv1.weight, got["conv1.weight"])
    assert f"weights=sha256:{file_sha256(path)}" in m.cache_key()
    with pytest.raises(FileNotFoundError, match="pretrained"):
        LINK(tiny_cfg(pretrained=str(tmp_path / "missing.pt")), CLASSES)


def test_image_size_defaults_to_the_tower_and_grid_is_logged(capsys):
    big = register_tiny_vlm("link-tiny-96", {"image_size": 96, "layers": 1, "width": 64, "head_width": 32,
                                             "patch_size": 8})
    assert resolve_vlm_config(tiny_cfg(vlm=big)).image_size == 96
    args = train_teacher.teacher_parser().parse_args(["--vlm", big, "--model-opt", "d_model=64",
                                                      "--model-opt", "d_latent=32", "--model-opt", "heads=4"])
    m = train_teacher.build_model(args, CLASSES, "cpu")
    assert m.cfg.image_size == 96 and m.vlm.grid == (12, 12)
    err = capsys.readouterr().err
    assert f"VLM {big} (random, seed 0; GELU;" in err
    assert "at 96 px: dense map 'tokens' of 12 x 12 tokens, width 64" in err


def test_preprocess():
    net = LINK(tiny_cfg(), CLASSES)
    ims = [Image.new("RGB", (40, 30), (255, 0, 128)), Image.new("L", (10, 90), 0)]
    x = net.preprocess(ims)
    mean, std = torch.tensor(net.cfg.image_mean), torch.tensor(net.cfg.image_std)
    assert x.shape == (2, 3, 64, 64)
    assert torch.allclose(x[0, :, 5, 5], (torch.tensor([1.0, 0.0, 128 / 255]) - mean) / std, atol=1e-6)
    assert torch.allclose(x[1, :, 5, 5], -mean / std, atol=1e-6)
    assert net.cfg.image_mean == tuple(open_clip.OPENAI_DATASET_MEAN)


# ---------------------------------------------------------------------------------------------
# the dense map of each tower
# ---------------------------------------------------------------------------------------------

def test_vit_dense_tokens_and_maskclip():
    """tokens = open_clip's own output tokens @ proj; maskclip = the last block with each token's
    attention replaced by its value path, computed here by hand from the block's weights."""
    net = LINK(tiny_cfg(dense="maskclip"), CLASSES)
    v = net.vlm.visual
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v.output_tokens = True
        ref_tokens = (v(x)[1] @ v.proj).reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
        h = v._embeds(x)
        for blk in v.transformer.resblocks[:-1]:
            h = blk(h)
        last, width = v.transformer.resblocks[-1], h.shape[-1]
        value = F.linear(last.ln_1(h), last.attn.in_proj_weight[2 * width:], last.attn.in_proj_bias[2 * width:])
        h = h + last.attn.out_proj(value)
        h = h + last.mlp(last.ln_2(h))
        ref_mask = (v.ln_post(h)[:, 1:] @ v.proj).reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
        tokens, maskclip = dense_features(v, x, "tokens"), net.encode_images(x)
    assert torch.allclose(tokens, ref_tokens, atol=1e-5)
    assert torch.allclose(maskclip, ref_mask, atol=1e-5)
    assert (maskclip - tokens).abs().max() > 1e-2
    assert "dense=maskclip" in net.cache_key() and "dense=tokens" in LINK(tiny_cfg(), CLASSES).cache_key()
    with pytest.raises(ValueError, match="'tokens' or 'maskclip'"):
        dense_features(v, x, "mask")


def register_tiny_siglip() -> str:
    """A SigLIP-shaped tiny VLM: timm ViT trunk with an attention-pool (MAP) head and no
    projection, a bidirectional text tower pooled at the last token, a Hugging Face tokenizer."""
    name = "link-tiny-siglip"
    if name not in open_clip.list_models():
        cfg = {"embed_dim": 64, "init_logit_bias": -10, "custom_text": True,
               "vision_cfg": {"image_size": 64, "timm_model_name": "test_vit", "timm_model_pretrained": False,
                              "timm_pool": "map", "timm_proj": "none"},
               "text_cfg": {"context_length": 16, "vocab_size": 32, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP",
                            "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 64, "heads": 2, "layers": 1,
                            "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                            "norm_kwargs": {"eps": 1e-6}}}
        path = Path(tempfile.mkdtemp(prefix="link_vlm_")) / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
    return name


def write_sentencepiece_tokenizer(folder: Path) -> Path:
    """A T5Tokenizer folder (spiece.model + tokenizer_config.json), the format of SigLIP's."""
    import sentencepiece as spm
    words = "a photo of person riding bicycle holding cup".split()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([" ".join(words)] * 20), model_writer=buf,
                                   vocab_size=len(words) + 3, model_type="word", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "model_max_length": 16, "extra_ids": 0,
         "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder / "spiece.model"


def test_siglip_text_tower_from_local_tokenizer(tmp_path):
    import sentencepiece as spm
    spiece = write_sentencepiece_tokenizer(tmp_path / "tok")
    name = register_tiny_siglip()
    net = LINK(tiny_cfg(vlm=name, tokenizer=str(tmp_path / "tok")), CLASSES)
    assert (net.cfg.image_mean, net.cfg.image_std) == OPENAI  # random weights, no tag: stated default
    sp = spm.SentencePieceProcessor(model_file=str(spiece))
    ids = torch.zeros(2, 16, dtype=torch.long)                # pad 0 after the words and </s> (1)
    for i, p in enumerate(CLASSES["prompts"]):
        row = sp.encode(p) + [1]
        ids[i, :len(row)] = torch.tensor(row)
    assert (ids[:, :8] > 2).all() and (ids[:, 8] == 1).all()  # 8 known words per prompt, then </s>
    with torch.no_grad():
        want = FrozenVLM(net.cfg).clip.encode_text(ids, normalize=True)
    assert torch.allclose(net.classifier.text_embed, want, atol=1e-6)
    with pytest.raises(ValueError, match=r"tokenizer '.*missing' could not be loaded .*LINKConfig.tokenizer"):
        LINK(tiny_cfg(vlm=name, tokenizer=str(tmp_path / "missing")), CLASSES)
    with pytest.raises(ValueError, match="BPE tokenizer; leave it unset"):
        LINK(tiny_cfg(tokenizer=str(tmp_path / "tok")), CLASSES)


def test_siglip_dense_map_goes_through_the_pool_head():
    """Each trunk token through the MAP head on its own (value, output projection, residual MLP):
    for an image whose tokens are all equal, that IS the pooled image embedding; maskclip also
    replaces the trunk's last attention by the value path (checked by hand)."""
    net = LINK(tiny_cfg(vlm=register_tiny_siglip(), dense="maskclip"), CLASSES, text_embed=torch.randn(2, 64))
    trunk, pool = net.vlm.visual.trunk, net.vlm.visual.trunk.attn_pool
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tok = trunk.forward_features(x)[:, 1:]                               # [2, 16, 64]
        ref = torch.stack([pool(t[:, None]) for t in tok]).view(2, 4, 4, -1).permute(0, 3, 1, 2)
        got = dense_features(net.vlm.visual, x, "tokens")
        same = tok[:1, :1].expand(1, 16, 64)                                  # 16 equal tokens
        assert torch.allclose(pool(same), pool(tok[0, :1][None]), atol=1e-5)
        h = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(x))))
        for blk in trunk.blocks[:-1]:
            h = blk(h)
        last, width = trunk.blocks[-1], h.shape[-1]
        h = h + last.ls1(last.attn.proj(last.attn.qkv(last.norm1(h))[..., 2 * width:]))
        h = h + last.ls2(last.mlp(last.norm2(h)))
        ref_mask = torch.stack([pool(t[:, None]) for t in trunk.norm(h)[:, 1:]]).view(2, 4, 4, -1).permute(0, 3, 1, 2)
        maskclip = net.encode_images(x)
    assert got.shape == (2, 64, 4, 4) and torch.allclose(got, ref, atol=1e-6)
    scale = got.abs().max()
    assert torch.allclose(maskclip, ref_mask, atol=1e-6) and (maskclip - got).abs().max() > 0.02 * scale
    assert (got - tok.view(2, 4, 4, -1).permute(0, 3, 1, 2)).abs().max() > 0.05 * scale  # not the raw trunk


def test_timm_tower_without_pool_head():
    name = register_tiny_vlm("link-tiny-convnext", {"timm_model_name": "convnext_atto", "timm_pool": "",
                                                    "timm_proj": "linear", "image_size": 64})
    m = LINK(tiny_cfg(vlm=name), CLASSES).eval()
    assert m.encode_images(torch.randn(2, 3, 64, 64)).shape == (2, 64, 2, 2)  # stride 32, projected
    with pytest.raises(ValueError, match="dense='maskclip' needs a ViT tower"):
        LINK(tiny_cfg(vlm=name, dense="maskclip"), CLASSES)


# ---------------------------------------------------------------------------------------------
# identity of the features: cache key, feature cache, checkpoints, infer.py
# ---------------------------------------------------------------------------------------------

def test_cache_key_names_everything_that_changes_features(tmp_path):
    path = tiny_weights(tmp_path / "w.pt")
    base = dict(pretrained=str(path), image_mean=0.5, image_std=0.5)
    net = LINK(tiny_cfg(**base), CLASSES)
    key = net.cache_key()
    x = net.preprocess([Image.new("RGB", (64, 64), (200, 10, 10))])
    f0 = net.encode_images(x)
    for change in (dict(quick_gelu=True), dict(image_mean=0.4), dict(image_std=0.4), dict(image_size=72),
                   dict(dense="maskclip"), dict(pretrained=None)):
        other = LINK(tiny_cfg(**{**base, **change}), CLASSES)
        assert other.cache_key() != key, change
        feats = other.encode_images(other.preprocess([Image.new("RGB", (64, 64), (200, 10, 10))]))
        assert feats.shape != f0.shape or not torch.allclose(feats, f0, atol=1e-4), change  # it mattered
    rewrite_in_place(path)
    again = LINK(tiny_cfg(**base), CLASSES)
    assert again.cache_key() != key and not torch.allclose(again.encode_images(x), f0, atol=1e-4)
    assert common_key_difference(key, again.cache_key()).startswith("weights sha256:")


def common_key_difference(a, b):
    import common
    return common.key_difference(a, b)


def write_images(folder, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i}.bmp"                          # uncompressed: a repaint keeps the size
        Image.new("RGB", (16, 16), (40 * i, 20, 200)).save(p)
        paths.append(p)
    return paths


def build_cache(root, paths, key="k"):
    encoded = []

    def encode(images):
        encoded.extend(images)
        return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)[:2, :2].T.copy()) for im in images])

    c = cache.FeatureCache(root, key, paths).ensure(encode, lambda i, v: Image.open(paths[i]).convert("RGB"),
                                                     progress=False)
    return c, len(encoded)


def test_feature_cache_detects_image_rewritten_with_size_and_mtime_kept(tmp_path, monkeypatch):
    paths = write_images(tmp_path / "img")
    c, n = build_cache(tmp_path / "cache", paths)
    assert c.rebuilt and n == 2
    idx = json.loads(c.index_path.read_text())
    assert idx["version"] == 2 and idx["images"][0][-1] == file_sha256(paths[0])
    monkeypatch.setattr(cache, "file_sha256", lambda p: pytest.fail("re-hashed an untouched image"))
    c, n = build_cache(tmp_path / "cache", paths)
    assert not c.rebuilt and n == 0                     # untouched: stat only, no hashing
    monkeypatch.undo()
    os.chmod(paths[1], 0o644)                           # ctime moves, bytes do not: hash, reuse
    hashed = []
    monkeypatch.setattr(cache, "file_sha256", lambda p: hashed.append(p) or file_sha256(p))
    c, n = build_cache(tmp_path / "cache", paths)
    assert not c.rebuilt and n == 0 and hashed == [paths[1]]
    c, n = build_cache(tmp_path / "cache", paths)      # the index took the new stamp: no re-hash
    assert not c.rebuilt and n == 0 and hashed == [paths[1]]
    monkeypatch.undo()
    st = os.stat(paths[0])
    Image.new("RGB", (16, 16), (255, 255, 0)).save(paths[0])   # repainted in place
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(paths[0]).st_size == st.st_size and os.stat(paths[0]).st_mtime_ns == st.st_mtime_ns
    c, n = build_cache(tmp_path / "cache", paths)
    assert c.rebuilt and n == 2


def test_feature_cache_of_an_older_version_is_not_reused(tmp_path):
    paths = write_images(tmp_path / "img")
    c, _ = build_cache(tmp_path / "cache", paths)
    idx = json.loads(c.index_path.read_text())
    c.index_path.write_text(json.dumps({**idx, "version": 1}))
    c, n = build_cache(tmp_path / "cache", paths)
    assert c.rebuilt and n == 2


def save_checkpoint(net, path, cs=CLASSES):
    torch.save({"version": 1, "config": asdict(net.cfg), "class_space": cs,
                "model": net.checkpoint_state_dict(), "cache_key": net.cache_key()}, path)
    return path


def test_checkpoint_refuses_a_changed_vlm(tmp_path):
    weights = tiny_weights(tmp_path / "w.pt")
    net = LINK(tiny_cfg(pretrained=str(weights), image_mean=0.5, image_std=0.5), CLASSES)
    ck = save_checkpoint(net, tmp_path / "ck.pt")
    assert LINK.from_checkpoint(runs.load_checkpoint(ck)).cache_key() == net.cache_key()
    stored = torch.load(ck, weights_only=False)
    runs.check_checkpoint_matches(stored, net, ck, class_space=CLASSES)          # same VLM: fine
    rewrite_in_place(weights)
    with pytest.raises(ValueError, match=r"the frozen VLM differs .*\(weights sha256:"):
        LINK.from_checkpoint(runs.load_checkpoint(ck))
    with pytest.raises(infer.InferError, match="frozen VLM differs"):
        infer.load_model(ck)
    moved = LINK(tiny_cfg(pretrained=str(weights), image_mean=0.5, image_std=0.5), CLASSES)
    with pytest.raises(runs.CheckpointError, match="other frozen-VLM features .field: cache_key; weights"):
        runs.check_checkpoint_matches(stored, moved, ck, class_space=CLASSES)


def test_trainer_stores_the_cache_key(tmp_path):
    net = LINK(tiny_cfg(), CLASSES)

    class OneImage:
        filenames = ["a.png"]

    split = data.Split(OneImage(), {}, tmp_path, None, select=lambda d: d, gt_dets=lambda t: t)
    t = trainer.Trainer(net, trainer.LoopConfig(progress=False), split, None, tmp_path / "run", class_space=CLASSES)
    assert t.state(rngs=[None])["cache_key"] == net.cache_key()


def test_infer_cli_refuses_a_changed_vlm(tmp_path, capsys):
    world = synthetic.make_synthetic_world(tmp_path / "world", n_train=1, n_test=1, image_size=64, seed=0)
    weights = tiny_weights(tmp_path / "w.pt")
    cs = synthetic.synthetic_class_space()
    ck = save_checkpoint(LINK(tiny_cfg(pretrained=str(weights), image_mean=0.5, image_std=0.5), cs),
                         tmp_path / "ck.pt", cs.asdict())
    rewrite_in_place(weights)
    out = tmp_path / "out"
    rc = infer.main([str(world["test_images"]), "--checkpoint", str(ck), "--gt-anno", str(world["test_anno"]),
                     "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "ck.pt: the frozen VLM differs" in err and "weights sha256:" in err
    assert not out.exists() or not any(out.iterdir())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
