"""Tests for model.py, the network, on the tiny random VLM (no network, no downloaded weights);
the frozen VLM itself (vlm.py) is tested in tests/test_vlm.py."""
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model
import runs
import vlm
from kernels import box_attention, box_bias
from model import LINK, LINKConfig, associate, focal_loss
from vlm import FrozenVLM, register_tiny_vlm

TINY = register_tiny_vlm()
OBJECTS = ["person", "cup", "dog", "bicycle"]
VERBS = ["hold", "ride", "feed"]
# K = 7 classes; class 6 ("feed dog") is unseen; class 0 and 1 take "person" as object.
HOI = [(0, 0), (2, 0), (0, 1), (0, 2), (2, 2), (1, 3), (0, 3)]
CLASSES = dict(
    name="toy", prompts=[f"a photo of a person {VERBS[v]}ing a {OBJECTS[o]}" for v, o in HOI],
    object_names=OBJECTS, hoi_object=[[o] for _, o in HOI], hoi_verb=[v for v, _ in HOI],
    verb_names=VERBS, person_label=0, rare=[5], unseen=[4])
K = len(HOI)


def tiny_cfg(**kw):
    base = dict(vlm=TINY, pretrained=None, image_size=64, d_model=64, d_latent=32, heads=4,
                enc_layers=1, dec_layers=2, dropout=0.0, impl="reference")
    base.update(kw)
    return LINKConfig(**base)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return LINK(tiny_cfg(), CLASSES).eval()


def dets(boxes, scores, labels, dtype=torch.float32):
    return {"boxes": torch.tensor(boxes, dtype=dtype), "scores": torch.tensor(scores, dtype=dtype),
            "labels": torch.tensor(labels)}


# 2 humans + 3 objects in a 64 x 48 image; 1 human + 1 dog in a 100 x 80 image
DETS = [dets([[2, 2, 30, 46], [34, 1, 62, 40], [20, 20, 40, 40], [40, 30, 60, 47], [0, 0, 10, 8]],
             [0.9, 0.8, 0.7, 0.6, 0.5], [0, 0, 1, 2, 3]),
        dets([[10, 10, 50, 70], [45, 30, 95, 75]], [0.95, 0.6], [0, 2])]
SIZES = [(64, 48), (100, 80)]


@pytest.fixture(scope="module")
def feats(net):
    torch.manual_seed(1)
    return net.encode_images(torch.randn(2, 3, 64, 64))


def match_pairs(out, detections):
    """{(image, human box, other box): row} so outputs can be compared by box identity."""
    rows = {}
    for p, (b, (i, j)) in enumerate(zip(out["pair_image"].tolist(), out["pair_idx"].tolist())):
        bx = detections[b]["boxes"]
        rows[(b, tuple(map(float, bx[i])), tuple(map(float, bx[j])))] = p
    return rows


def test_output_shapes_and_masks(net, feats):
    out = net(feats, DETS, SIZES)
    P = 2 * 4 + 1 * 1  # every human with every other box
    assert out["num_images"] == 2 and out["pair_image"].tolist() == [0] * 8 + [1]
    for key in ("logits", "prior", "psi", "scores"):
        assert out[key].shape == (P, K)
    assert out["pair_idx"].shape == (P, 2) and out["boxes_h"].shape == out["boxes_o"].shape == (P, 4)
    assert out["latent_map"].shape == (2, 64, 32)
    assert len(out["queries"]) == 1 + 2 and all(q.shape == (P, 64) for q in out["queries"])
    # allowed mask: prior > 0 exactly where the pair's object label is in hoi_object[k]
    allowed = torch.tensor([[out["object"][p].item() in CLASSES["hoi_object"][k] for k in range(K)]
                            for p in range(P)])
    assert torch.equal(out["prior"] > 0, allowed)
    # eval mode: prior = (s_h s_o)^2.8 where allowed; scores = sigmoid(logit) * prior
    for p in range(P):
        b, (i, j) = out["pair_image"][p].item(), out["pair_idx"][p].tolist()
        s = (DETS[b]["scores"][i] * DETS[b]["scores"][j]) ** 2.8
        assert torch.allclose(out["prior"][p][allowed[p]], s.expand(int(allowed[p].sum())), rtol=1e-5)
        assert torch.equal(out["boxes_h"][p], DETS[b]["boxes"][i])
        assert torch.equal(out["boxes_o"][p], DETS[b]["boxes"][j])
        assert DETS[b]["labels"][i] == 0 and i != j and out["object"][p] == DETS[b]["labels"][j]
    assert torch.allclose(out["scores"], torch.sigmoid(out["logits"]) * out["prior"])
    assert torch.isinf(out["psi"][~allowed]).all() and torch.isfinite(out["psi"][allowed]).all()
    # human-human pairs take "person" as object: classes 0 and 1 allowed
    hh = (out["object"] == 0).nonzero().squeeze(1)
    assert len(hh) == 2 and allowed[hh][:, :2].all()


def test_permutation_permutes_outputs_only(net, feats):
    out = net(feats, DETS, SIZES)
    perm = [torch.tensor([3, 1, 4, 0, 2]), torch.tensor([1, 0])]
    dets2 = [{k: v[p] for k, v in d.items()} for d, p in zip(DETS, perm)]
    out2 = net(feats, dets2, SIZES)
    a, b = match_pairs(out, DETS), match_pairs(out2, dets2)
    assert a.keys() == b.keys() and len(a) == 9
    for key, p in a.items():
        q = b[key]
        for name in ("logits", "prior", "scores", "boxes_h", "boxes_o", "object"):
            assert torch.equal(out[name][p], out2[name][q]), name
        assert all(torch.equal(x[p], y[q]) for x, y in zip(out["queries"], out2["queries"]))
    assert torch.equal(out["latent_map"], out2["latent_map"])


def test_same_boxes_from_two_sources_identical(net, feats):
    """Source B lists the boxes in another order, as float64 numpy arrays, int32 labels, and
    had extra low-score boxes that pair bounding removed before the model saw them."""
    out = net(feats, DETS, SIZES)
    dets_b = []
    for d in DETS:
        order = torch.arange(len(d["scores"]) - 1, -1, -1)
        boxes = np.concatenate([d["boxes"][order].double().numpy(), [[1, 1, 5, 5]]])
        scores = np.concatenate([d["scores"][order].double().numpy(), [0.01]])
        labels = np.concatenate([d["labels"][order].numpy(), [1]]).astype(np.int32)
        keep = scores >= 0.2  # what select_boxes' threshold does
        dets_b.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    out_b = net(feats, dets_b, SIZES)
    for name in ("logits", "scores", "prior", "psi", "boxes_h", "boxes_o"):
        assert torch.equal(out[name], out_b[name]), name  # same canonical pair order, bit-identical
    # pair_idx points into each source's own list
    for p, (bi, (i, j)) in enumerate(zip(out_b["pair_image"].tolist(), out_b["pair_idx"].tolist())):
        assert np.array_equal(dets_b[bi]["boxes"][i].astype(np.float32), out["boxes_h"][p].numpy())


def test_teacher_and_student_align_pair_by_pair(net, feats):
    torch.manual_seed(5)
    student = LINK(tiny_cfg(d_model=32, d_latent=16, dec_layers=1), CLASSES).eval()
    t, s = net(feats, DETS, SIZES), student(feats, DETS, SIZES)
    assert torch.equal(t["pair_idx"], s["pair_idx"]) and torch.equal(t["pair_image"], s["pair_image"])


def test_box_bias_steers_attention():
    """Uniform content logits (q = 0): the attention mass on the tokens inside the human box is
    n_in e^s / (n_in e^s + n_out), growing with the strength s."""
    gh = gw = 8
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.25], [0.9, 0.9, 0.95, 0.95], [0.0, 0.0, 0.5, 0.25]]])
    cy, cx = torch.meshgrid((torch.arange(gh) + 0.5) / gh, (torch.arange(gw) + 0.5) / gw, indexing="ij")
    in_h = ((cx <= 0.5) & (cy <= 0.25)).flatten().float()                      # 8 tokens
    v = in_h.view(1, 1, -1, 1).expand(1, 1, gh * gw, 1)                       # value = indicator
    q, k = torch.zeros(1, 1, 1), torch.zeros(1, 1, gh * gw, 1)
    masses = []
    for s in (0.0, 1.0, 2.0, 4.0):
        strength = torch.tensor([[s, 0.0, 0.0]])
        out = box_attention(q, k, v.contiguous(), torch.zeros(1, dtype=torch.long), boxes, strength,
                            (gh, gw), impl="reference")
        masses.append(out.item())
        assert math.isclose(out.item(), 8 * math.exp(s) / (8 * math.exp(s) + 56), rel_tol=1e-5)
    assert masses == sorted(masses) and masses[0] == pytest.approx(8 / 64) and masses[-1] > 0.85


def test_classifier_rows_are_text_embeddings_at_init(net):
    clip = FrozenVLM(net.cfg).clip
    tok = open_clip.get_tokenizer(TINY)
    with torch.no_grad():
        text = F.normalize(clip.encode_text(tok(CLASSES["prompts"])), dim=1)
    assert torch.allclose(net.classifier.rows(), text, atol=1e-6)
    assert torch.allclose(net.classifier.weight, text, atol=1e-6)
    assert "classifier.text_embed" in net.checkpoint_state_dict()
    assert not any(k.startswith("vlm.") for k in net.checkpoint_state_dict())


def targets_for(detections):
    """GT: human 0 holds the cup (class 2), human 1 rides the bicycle (class 5) in image 0."""
    d = detections[0]["boxes"]
    return [{"boxes_h": d[[0, 1]], "boxes_o": d[[2, 4]], "hoi": torch.tensor([2, 5])},
            {"boxes_h": torch.zeros(0, 4), "boxes_o": torch.zeros(0, 4), "hoi": torch.zeros(0, dtype=torch.long)}]


def test_gradients_reach_trainables_not_vlm(feats):
    torch.manual_seed(0)
    m = LINK(tiny_cfg(fusion="gated"), CLASSES).train()
    assert not m.vlm.training  # frozen VLM stays in eval mode under model.train()
    out = m(feats, DETS, SIZES, targets_for(DETS))
    assert out["labels"].sum() == 2 and torch.isfinite(out["loss"]) and out["loss"] > 0
    assert out["num_pos"].item() == 2.0   # the loss's normaliser, re-summed over ranks in training
    out["loss"].backward()
    for name, p in m.named_parameters():
        if name.startswith("vlm."):
            assert not p.requires_grad and p.grad is None, name
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        g = p.grad[~m.classifier.unseen] if name == "classifier.weight" else p.grad
        assert g.abs().sum() > 0, name
    assert torch.equal(m.classifier.weight.grad[4], torch.zeros_like(m.classifier.weight.grad[4]))


def test_focal_loss_hand_value():
    logits = torch.tensor([[0.0, 2.0, 5.0]])
    prior = torch.tensor([[0.5, 1.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0]])       # the third entry has P = 0: skipped
    p1, p2 = 0.5 * 0.5, 1 / (1 + math.exp(-2.0))
    want = -0.5 * (1 - p1) ** 0.2 * math.log(p1) - 0.5 * p2 ** 0.2 * math.log(1 - p2)
    assert focal_loss(logits, prior, labels, 0.5, 0.2).item() == pytest.approx(want / 1, rel=1e-6)
    # two positives among the kept entries -> divided by 2
    labels2 = torch.tensor([[1.0, 1.0, 0.0]])
    want2 = (-0.5 * (1 - p1) ** 0.2 * math.log(p1) - 0.5 * (1 - p2) ** 0.2 * math.log(p2)) / 2
    assert focal_loss(logits, prior, labels2).item() == pytest.approx(want2, rel=1e-6)


def test_loss_finite_on_adversarial_inputs():
    logits = torch.tensor([[1e4, -1e4, 1e4, -1e4, 0.0, 1e4]], requires_grad=True)
    prior = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1e-30]])
    for labels in (torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0, 1.0]]), torch.zeros(1, 6),
                   torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0, 0.0]])):
        loss = focal_loss(logits, prior, labels)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
        logits.grad = None
    # no positives at all: sum of negatives / 1, confident negatives cost ~0
    no_pos = focal_loss(torch.full((2, 3), -1e4), torch.ones(2, 3), torch.zeros(2, 3))
    assert no_pos.item() == pytest.approx(0.0, abs=1e-6)


def test_empty_images_give_empty_outputs(net, feats):
    no_det = dets(np.zeros((0, 4)), [], np.zeros(0, dtype=np.int64))
    only_objects = dets([[1, 1, 20, 20], [30, 30, 50, 40]], [0.9, 0.8], [1, 2])
    lone_human = dets([[1, 1, 20, 20]], [0.9], [0])
    for batch in ([no_det, only_objects], [lone_human, no_det]):
        tg = [{"boxes_h": torch.zeros(0, 4), "boxes_o": torch.zeros(0, 4), "hoi": torch.zeros(0, dtype=torch.long)}] * 2
        out = net(feats, batch, SIZES, tg)
        assert out["logits"].shape == (0, K) and out["pair_idx"].shape == (0, 2)
        assert out["boxes_h"].shape == (0, 4) and out["labels"].shape == (0, K)
        assert out["latent_map"].shape == (2, 64, 32) and all(q.shape == (0, 64) for q in out["queries"])
        assert out["loss"].item() == 0.0
        assert [p.shape for p in net.postprocess(out)] == [(0, 10), (0, 10)]
    # one empty image beside a full one: the full one is unaffected
    full = net(feats[:1], DETS[:1], SIZES[:1])
    mixed = net(feats, [DETS[0], no_det], SIZES)
    assert torch.allclose(full["logits"], mixed["logits"], atol=1e-6)


def test_degenerate_boxes(net, feats):
    d = dets([[5, 5, 5, 5], [-50, -40, -10, -5], [60, 40, 200, 300], [30, 20, 10, 5], [0, 0, 64, 48]],
             [0.9, 0.8, 0.7, 0.6, 0.5], [0, 0, 1, 2, 3])
    target = {"boxes_h": d["boxes"][:1], "boxes_o": d["boxes"][2:3], "hoi": torch.tensor([2])}
    out = net(feats[:1], [d], SIZES[:1], [target])
    assert out["logits"].shape == (8, K)
    assert all(torch.isfinite(out[k]).all() for k in ("logits", "prior", "scores", "loss"))
    assert all(torch.isfinite(q).all() for q in out["queries"])
    assert torch.equal(out["boxes_h"][0], d["boxes"][0])  # the caller's boxes come back as given


def test_label_association_hand_case():
    # GT: human [0,0,10,10] with object [20,0,30,10], class 3; and the same human with another
    # object [40,0,50,10], class 1 and class 5 (multi-label on one GT pair box).
    target = {"boxes_h": torch.tensor([[0.0, 0, 10, 10]] * 3),
              "boxes_o": torch.tensor([[20.0, 0, 30, 10], [40, 0, 50, 10], [40, 0, 50, 10]]),
              "hoi": torch.tensor([3, 1, 5])}
    bh = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 4.9], [0, 0, 10, 10]])
    bo = torch.tensor([[20.0, 0, 30, 10], [20, 0, 30, 10], [20, 0, 30, 10], [40, 0, 50, 10]])
    labels = associate(bh, bo, target, 6, 0.5)
    want = torch.zeros(4, 6)
    want[0, 3] = 1   # exact match
    want[1, 3] = 1   # IoU_h = 50/100 = 0.5 exactly: positive
    #  row 2: IoU_h = 0.49 -> negative
    want[3, 1] = want[3, 5] = 1
    assert torch.equal(labels, want)


def test_unseen_rows_unchanged_after_optimiser_step(feats):
    torch.manual_seed(0)
    m = LINK(tiny_cfg(), CLASSES).train()
    before = m.classifier.rows().detach().clone()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        m(feats, DETS, SIZES, targets_for(DETS))["loss"].backward()
        opt.step()
    after = m.classifier.rows().detach()
    assert torch.equal(after[4], before[4])                       # unseen: text embedding kept
    seen = [k for k in range(K) if k != 4]
    assert (after[seen] - before[seen]).abs().sum(1).min() > 0    # seen rows trained


def test_checkpoint_roundtrip(net, feats, tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    from dataclasses import asdict
    torch.save({"config": asdict(net.cfg), "class_space": CLASSES, "model": net.checkpoint_state_dict(),
                "version": 1}, path)
    monkeypatch.setattr(vlm.FrozenVLM, "encode_text", lambda *a, **k: pytest.fail("text tower re-run"))
    m2 = LINK.from_checkpoint(runs.load_checkpoint(path)).eval()
    a, b = net(feats, DETS, SIZES), m2(feats, DETS, SIZES)
    assert torch.equal(a["logits"], b["logits"])
    with pytest.raises(runs.CheckpointError, match="not found"):   # the file reader is runs.py
        runs.load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="class_space"):
        LINK.from_checkpoint({"config": asdict(net.cfg)})


def test_ablation_switches(feats):
    for kw in ({"geometric_encoder": False}, {"linking_decoder": False},
               {"geometric_encoder": False, "linking_decoder": False}):
        m = LINK(tiny_cfg(dec_layers=1, **kw), CLASSES).train()
        assert hasattr(m.encoder, "fusion") == kw.get("geometric_encoder", True)
        out = m(feats, DETS, SIZES, targets_for(DETS))
        assert out["logits"].shape == (9, K) and torch.isfinite(out["loss"])
        assert (out["latent_map"] is None) == (not kw.get("linking_decoder", True))
        out["loss"].backward()
        assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_postprocess_rows(net, feats):
    out = net(feats, DETS, SIZES)
    preds = net.postprocess(out, DETS)
    for b, rows in enumerate(preds):
        sel = (out["pair_image"] == b).nonzero().squeeze(1)
        assert len(rows) == int((out["scores"][sel] > 0).sum())
        assert np.all(np.diff(rows[:, 1]) <= 0) and np.all(rows[:, 1] > 0)
        for r in rows:
            k = int(r[0])
            hb, ob = torch.tensor(r[2:6]).float(), torch.tensor(r[6:]).float()
            p = [q for q in sel.tolist() if torch.equal(out["boxes_h"][q], hb) and torch.equal(out["boxes_o"][q], ob)]
            assert len(p) == 1 and out["object"][p[0]] in CLASSES["hoi_object"][k]
            assert r[1] == pytest.approx(out["scores"][p[0], k].item(), rel=1e-6)
    top = net.postprocess(out, k=3)
    assert [len(t) for t in top] == [3, min(3, len(preds[1]))]
    assert np.array_equal(top[0], preds[0][:3])


def test_impl_switch_matches_reference(net, feats):
    """Every layer reads the one shared cfg, so switching cfg.impl switches all kernel calls."""
    a = net(feats, DETS, SIZES)
    try:
        net.cfg.impl = "torch"
        b = net(feats, DETS, SIZES)
    finally:
        net.cfg.impl = "reference"
    assert torch.allclose(a["logits"], b["logits"], atol=1e-4)


def test_bad_input_messages(net, feats):
    bad = dict(DETS[0])
    bad["labels"] = torch.tensor([0, 0, 1, 2, 9])
    with pytest.raises(ValueError, match="image 0.*labels"):
        net(feats[:1], [bad], SIZES[:1])
    with pytest.raises(ValueError, match="image 0.*size"):
        net(feats[:1], DETS[:1], [(0, 10)])
    with pytest.raises(ValueError, match="2 feature maps"):
        net(feats, DETS[:1], SIZES[:1])


# -- section 4: box guidance -----------------------------------------------------------------

def _decoder_inputs(m, feats, detections, sizes):
    """The last decoder layer's forward arguments, captured by a pre-hook during one forward."""
    captured = {}
    h = m.decoder[-1].register_forward_pre_hook(lambda mod, args: captured.__setitem__("a", args))
    with torch.no_grad():
        m(feats, detections, sizes)
    h.remove()
    return captured["a"]


def test_union_contains_grown_small_object(net, feats):
    """64 x 64 image, 8 x 8 grid (cells of 8 px, token centres at (j + 0.5) / 8). Human box
    [0, 0, 32, 32]; a 1-px object at [42, 42, 43, 43]: centre 42.5 / 64 = 0.664, grown to one
    cell [0.602, 0.727], so it covers token (5, 5) (centre 0.6875). The union of the raw boxes
    ends at 43 / 64 = 0.672 and misses that token; the union of the grown boxes contains it.
    With all strengths 1, the object's token then gets o + u = 2, like a human token (h + u = 2),
    not 1 (the 2:1 pull towards the human of the raw union)."""
    d = [dets([[0, 0, 32, 32], [42, 42, 43, 43]], [0.9, 0.8], [0, 1])]
    _, _, _, _, boxes, grid_hw, *_ = _decoder_inputs(net, feats[:1], d, [(64, 64)])
    assert grid_hw == (8, 8) and boxes.shape == (1, 3, 4)
    c = 42.5 / 64
    assert torch.allclose(boxes[0, 1], torch.tensor([c - 1 / 16, c - 1 / 16, c + 1 / 16, c + 1 / 16]), atol=1e-6)
    assert torch.allclose(boxes[0, 2], torch.tensor([0.0, 0.0, c + 1 / 16, c + 1 / 16]), atol=1e-6)
    bias = box_bias(boxes, torch.ones(1, 3), grid_hw)[0, 0].view(8, 8)
    assert bias[5, 5].item() == 2.0                      # the object's token: object + union
    assert bias[1, 1].item() == 2.0                      # a human token: human + union
    assert bias[7, 7].item() == 0.0 and bias[4, 4].item() == 1.0   # outside all; union only


def test_d_model_must_be_a_multiple_of_8():
    """d_model = 260 divides by heads = 4 and by 4, but box_encoding gives each of its 4 box
    numbers 260 / 4 = 65 channels, an odd number of sine-cosine channels: refused by name."""
    with pytest.raises(ValueError, match=r"LINKConfig.d_model must be a multiple of 8, got 260"):
        LINK(tiny_cfg(d_model=260), CLASSES)
    with pytest.raises(ValueError, match="box_guidance"):
        LINK(tiny_cfg(box_guidance="bias"), CLASSES)


@pytest.mark.parametrize("guidance", ["mask", "pe", "both"])
def test_box_guidance_parameters(guidance, feats):
    """"mask": a strength per spatial layer, no PE projections; "pe": PE projections in both
    branches and no strength; "both": all of them. Every one gets a gradient."""
    torch.manual_seed(0)
    m = LINK(tiny_cfg(box_guidance=guidance, dec_layers=1), CLASSES).train()
    names = {n for n, _ in m.named_parameters() if n.startswith("decoder.0.")}
    pe = {f"decoder.0.{b}_{w}pos.{t}" for b in ("sp", "sem") for w in "qk" for t in ("weight", "bias")}
    assert ("decoder.0.strength" in names) == (guidance != "pe")
    assert (pe <= names) == (guidance != "mask") and (names & pe) == (pe if guidance != "mask" else set())
    out = m(feats, DETS, SIZES, targets_for(DETS))
    out["loss"].backward()
    for n, p in m.named_parameters():
        if n in pe or n == "decoder.0.strength":
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def _pe_only_layer(linking_decoder: bool):
    """A one-layer, one-head "pe" model whose branch content logits are 0 (zero q projection)
    and whose position logit is PE(C_human) . PE(C_token) (identity position projections)."""
    torch.manual_seed(0)
    m = LINK(tiny_cfg(box_guidance="pe", heads=1, dec_layers=1, linking_decoder=linking_decoder),
             CLASSES).eval()
    layer = m.decoder[0]
    br = layer._branch(linking_decoder)
    w = br.q.out_features                                    # branch width (d_latent or C)
    half = m.cfg.d_model // 2                                # PE(C) width of one box = token PE width
    with torch.no_grad():
        br.q.weight.zero_(), br.q.bias.zero_()
        br.q_pos.weight.zero_(), br.q_pos.bias.zero_(), br.k_pos.weight.zero_(), br.k_pos.bias.zero_()
        br.q_pos.weight[:half, :half] = torch.eye(half)      # the human box's PE(C) -> channels 0..half
        br.k_pos.weight[:half, :half] = torch.eye(half)      # the token's PE(C) -> channels 0..half
    assert w >= half
    return m, layer


@pytest.mark.parametrize("linking_decoder", [True, False])
def test_pe_guidance_attends_to_the_pair(linking_decoder, feats):
    """Conditional cross-attention: with zero content logits, the logit of token t is
    PE(C_h) . PE(C_t) / sqrt(2 w) = sum_i [cos(2 pi dx / f_i) + cos(2 pi dy / f_i)] / sqrt(2 w),
    f_i = 20^(2 i / 16), largest at the token under the human box's centre. Checked against that
    formula, for the spatial branch and (without the linking decoder) the semantic one; the
    forward's attention output is attn @ V with the same weights."""
    m, layer = _pe_only_layer(linking_decoder)
    for hb, cell in (([8, 8, 16, 16], (1, 1)), ([44, 24, 60, 32], (3, 6))):   # centres on that token's
        d = [dets([hb, [30, 30, 40, 40]], [0.9, 0.8], [0, 1])]
        args = _decoder_inputs(m, feats[:1], d, [(64, 64)])
        att = layer.attention_map(*args, pair=0)                                # [1, 8, 8]
        assert att.shape == (1, 8, 8) and torch.isclose(att.sum(), torch.tensor(1.0))
        assert divmod(int(att.argmax()), 8) == cell
        cxh, cyh = (hb[0] + hb[2]) / 128, (hb[1] + hb[3]) / 128
        tc = (torch.arange(8) + 0.5) / 8
        f = 20.0 ** (2 * torch.arange(8) / 16)
        cos = lambda delta: torch.cos(2 * math.pi * delta[:, None] / f).sum(1)  # noqa: E731
        logit = cos(cxh - tc)[None, :] + cos(cyh - tc)[:, None]                  # [row y, col x]
        w = layer._branch(linking_decoder).q.out_features
        assert torch.allclose(att[0], (logit / math.sqrt(2 * w)).flatten().softmax(0).view(8, 8), atol=1e-5)
        # the forward's branch output is attn @ V through the output projection
        q, tokens, latent, pair_image, boxes, grid_hw = args
        kv = latent if linking_decoder else tokens
        pos = model.pair_positions(boxes, grid_hw, m.cfg.d_model)
        got = layer._attend(linking_decoder, q, kv, pair_image, boxes, grid_hw, pos)[0]
        br = layer._branch(linking_decoder)
        want = br.out(att.view(1, 64) @ br.v(kv[0]))[0]
        assert torch.allclose(got, want, atol=1e-5)


def test_both_guidance_adds_the_box_bias(feats):
    """"both": the attention logits are the PE logits of "pe" plus the mask bias of the boxes."""
    torch.manual_seed(0)
    m = LINK(tiny_cfg(box_guidance="both", dec_layers=1), CLASSES).eval()
    layer = m.decoder[0]
    args = _decoder_inputs(m, feats, DETS, SIZES)
    att = layer.attention_map(*args, pair=3)
    with torch.no_grad():
        layer.strength.zero_()
    plain = layer.attention_map(*args, pair=3)
    with torch.no_grad():
        layer.strength.fill_(1.0)
    bias = box_bias(args[4][3:4], torch.ones(4, 3), args[5])[0].view(4, 8, 8)
    want = (plain.log() + bias).flatten(1).softmax(1).view(4, 8, 8)
    assert torch.allclose(att, want, atol=1e-5) and not torch.allclose(att, plain, atol=1e-3)


@pytest.mark.parametrize("guidance", ["pe", "both"])
def test_pe_guidance_impl_switch(guidance, feats):
    """The lean torch path of box_attention gives the reference's outputs with the PE too."""
    torch.manual_seed(0)
    m = LINK(tiny_cfg(box_guidance=guidance), CLASSES).eval()
    a = m(feats, DETS, SIZES)
    m.cfg.impl = "torch"
    b = m(feats, DETS, SIZES)
    assert torch.allclose(a["logits"], b["logits"], atol=1e-4)


def test_weight_decay_groups_hold_exactly_the_matrices():
    """trainer.param_groups on LINK: decay on the weight matrices of linear maps (Linear weights,
    the pair projections w1 / w2, the classifier rows); none on LayerNorm gains and biases,
    Linear biases, the pair bias b, the logit scale and bias, nor the box strengths [Hd, 3]
    (named by LINK.no_weight_decay). Listed here from the module types, not from the rule.
    One AdamW step with zero gradients then moves only the decayed parameters."""
    from trainer import param_groups
    torch.manual_seed(0)
    m = LINK(tiny_cfg(box_guidance="both"), CLASSES)
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    want_decay = {"encoder.w1", "encoder.w2", "classifier.weight"}
    want_rest = {"encoder.b", "classifier.logit_scale", "classifier.logit_bias",
                 "decoder.0.strength", "decoder.1.strength"}
    for name, mod in m.named_modules():
        if name.startswith("vlm"):
            continue
        if isinstance(mod, nn.Linear):
            want_decay.add(f"{name}.weight")
            want_rest.add(f"{name}.bias")
        elif isinstance(mod, nn.LayerNorm):
            want_rest |= {f"{name}.weight", f"{name}.bias"}
    assert want_decay | want_rest == set(trainable) and not want_decay & want_rest
    groups = param_groups(m, list(trainable.values()), 0.5)
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert {n for n, _ in groups[0]["params"]} == want_decay
    assert {n for n, _ in groups[1]["params"]} == want_rest
    opt = torch.optim.AdamW(groups, lr=0.1)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    for p in trainable.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in trainable.items():          # AdamW with a zero gradient: p <- p (1 - lr wd)
        assert torch.allclose(p, before[n] * (0.95 if n in want_decay else 1.0)), n


def test_spatial_features_see_pixel_boxes(net, feats):
    """The model hands kernels.pair_enum its boxes in pixels with the image size: a 100-px square
    human in a 640 x 480 image has aspect ratio 1 (UPT), not the 0.75 of its normalised box; the
    object (150, 150, 350, 250) has 2, and their centres are divided by the image's w and h."""
    captured = {}
    h = net.encoder.fusion.register_forward_pre_hook(lambda mod, args: captured.__setitem__("f", args[1]))
    with torch.no_grad():
        net(feats[:1], [dets([[100, 100, 200, 200], [150, 150, 350, 250]], [0.9, 0.8], [0, 1])], [(640, 480)])
    h.remove()
    f = captured["f"]                                                # [1 pair, 36]
    assert f.shape == (1, 36)
    assert f[0, 11].item() == pytest.approx(1.0) and f[0, 12].item() == pytest.approx(2.0)
    assert f[0, :2].tolist() == pytest.approx([150 / 640, 150 / 480])
