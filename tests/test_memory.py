"""The training step at its memory floor (issue 15), on the tiny random VLM.

What is checked, each against a value computed in the test:
- the loss and every gradient equal the ones of the step as it was computed before (the strided
  token view read by every projection, psi and scores built with graphs, the focal loss formula
  model.py used, which is kernels.focal_loss_reference: tests/test_focal_loss.py holds it to
  hand-computed values), to 1e-5 relative;
- psi and scores carry no graph, and a forward saves at most one [P, K] tensor besides the loss,
  whose fused op (kernels.focal_loss, cfg.impl) keeps its three inputs only;
- the token map is saved for backward once, not once per projection that reads it;
- ``forward(outputs=...)`` returns exactly the keys asked for, equal to the full forward's, and
  builds no classifier output when no logits are asked for; the Distiller asks a teacher for what
  distill_losses reads, nothing more, and gets the same losses;
- the loop runs a student's teachers before the student (Distiller.prepare), with the same
  losses and update as after it;
- the frozen image towers are released when every feature comes from the cache, kept with
  --no-cache, and the checkpoint still rebuilds a model that encodes images.

Peak memory and time are the benchmark's job (bench/train_step.py), not the tests'.
"""
import json

import pytest
import torch

import cache
import runs
import train_student
import train_teacher
from kernels import focal_loss_reference, psi_transform
from model import LINK, LINKConfig
from train_student import Distiller, KDConfig, distill_losses, kd_widths, teacher_keys
from vlm import register_tiny_vlm

TINY = register_tiny_vlm()
OBJECTS = ["person", "cup", "dog", "bicycle"]
HOI = [(0, 0), (2, 0), (0, 1), (0, 2), (2, 2), (1, 3), (0, 3)]          # (verb, object); class 4 unseen
CLASSES = dict(name="toy", prompts=[f"a person doing {v} with a {OBJECTS[o]}" for v, o in HOI],
               object_names=OBJECTS, hoi_object=[[o] for _, o in HOI], hoi_verb=[v for v, _ in HOI],
               verb_names=["hold", "ride", "feed"], person_label=0, rare=[5], unseen=[4])
SIZES = [(64, 48), (100, 80)]


def tiny(seed=0, **kw):
    cfg = dict(vlm=TINY, pretrained=None, image_size=64, d_model=32, d_latent=16, heads=4, enc_layers=1,
               dec_layers=2, dropout=0.1, impl="torch")
    cfg.update(kw)
    torch.manual_seed(seed)
    return LINK(LINKConfig(**cfg), CLASSES)


def batch():
    def d(boxes, scores, labels):
        return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
                "labels": torch.tensor(labels)}
    dets = [d([[2, 2, 30, 46], [34, 1, 62, 40], [20, 20, 40, 40], [40, 30, 60, 47], [0, 0, 10, 8]],
              [0.9, 0.8, 0.7, 0.6, 0.5], [0, 0, 1, 2, 3]),
            d([[10, 10, 50, 70], [45, 30, 95, 75], [60, 5, 90, 30]], [0.95, 0.6, 0.4], [0, 2, 3])]
    targets = [{"boxes_h": dets[0]["boxes"][[0, 1, 0]], "boxes_o": dets[0]["boxes"][[2, 4, 3]],
                "hoi": torch.tensor([2, 5, 4])},
               {"boxes_h": dets[1]["boxes"][[0, 0]], "boxes_o": dets[1]["boxes"][[1, 2]], "hoi": torch.tensor([3, 6])}]
    feats = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(1))
    return feats, dets, targets


# ----------------------------------------------------------------------------------------------
# the loss and gradients of the step as it was computed before
# ----------------------------------------------------------------------------------------------
def todays_step(m, feats, dets, targets, seed):
    """The loss as LINK.forward computed it before issue 15, from the model's own modules: the
    strided token view fed to the connector and to every layer, psi and scores with graphs, the
    focal loss formula (kernels.focal_loss_reference). The inputs of the encoder and of each
    decoder layer (boxes, pairs) are captured from a forward of the model itself, so the
    comparison covers what changed only."""
    enc_in, dec_in = [], []
    hooks = [m.encoder.register_forward_pre_hook(lambda mod, a, kw: enc_in.append((a, kw)), with_kwargs=True)]
    hooks += [layer.register_forward_pre_hook(lambda mod, a, kw: dec_in.append((a, kw)), with_kwargs=True)
              for layer in m.decoder]
    with torch.no_grad():
        probe = m(feats, dets, SIZES, targets)
    for h in hooks:
        h.remove()
    torch.manual_seed(seed)                                  # the same dropout masks as the step
    q = m.encoder(*enc_in[0][0], **enc_in[0][1])
    tokens = feats.flatten(2).transpose(1, 2)                # [B, T, C], strided
    latent = m.connector(tokens)
    for layer, (a, kw) in zip(m.decoder, dec_in):
        q = layer(q, tokens, latent, *a[3:], **kw)
    logits = m.classifier(q).float()
    prior = probe["prior"]
    psi, scores = psi_transform(logits, prior), torch.sigmoid(logits) * prior
    seen_prior = prior.masked_fill(m.classifier.unseen[None, :], 0)
    loss = focal_loss_reference(logits, seen_prior, probe["labels"], m.cfg.focal_alpha, m.cfg.focal_gamma)
    return loss, psi, scores


def grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_loss_and_gradients_equal_the_step_before(impl):
    m = tiny(impl=impl).train()
    feats, dets, targets = batch()
    torch.manual_seed(5)
    out = m(feats, dets, SIZES, targets)
    out["loss"].backward()
    new = grads(m)
    m.zero_grad(set_to_none=True)
    loss, psi, scores = todays_step(m, feats, dets, targets, seed=5)
    loss.backward()
    old = grads(m)
    assert out["num_pos"] == 4 and loss > 0                  # class 4 (unseen) is not a positive
    assert float(out["loss"].detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert set(new) == set(old) and len(new) > 20
    flat = lambda g: torch.cat([g[n].flatten() for n in sorted(g)])  # noqa: E731
    assert (flat(new) - flat(old)).norm() <= 1e-5 * flat(old).norm()
    for n in old:   # each tensor; a key projection's bias gets a gradient of 0 up to rounding (softmax)
        scale = old[n].norm() if not n.endswith("_k.bias") else flat(old).norm()
        assert (new[n] - old[n]).norm() <= 1e-5 * scale, n
    # psi and scores: the same values, but no graph (nothing differentiates through them)
    torch.testing.assert_close(out["scores"], scores.detach(), rtol=1e-6, atol=0)
    allowed = torch.isfinite(psi)
    assert torch.equal(allowed, torch.isfinite(out["psi"]))
    torch.testing.assert_close(out["psi"][allowed], psi.detach()[allowed], rtol=1e-6, atol=1e-6)
    assert not out["psi"].requires_grad and not out["scores"].requires_grad
    assert out["logits"].requires_grad


# ----------------------------------------------------------------------------------------------
# what the graph keeps for backward
# ----------------------------------------------------------------------------------------------
def saved_for_backward(fn):
    """Run fn() and return the distinct storages autograd saved for backward, as tensors."""
    saved = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, list(saved.values())


def test_psi_and_scores_save_nothing_for_backward():
    m = tiny().train()
    feats, dets, _ = batch()
    out, saved = saved_for_backward(lambda: m(feats, dets, SIZES))
    PK = out["logits"].numel()
    big = [t for t in saved if t.numel() == PK]
    # the classifier saves its cosine similarities once (the logit scale's gradient); before
    # issue 15, psi and scores saved three more [P, K] tensors
    assert len(big) <= 1, [tuple(t.shape) for t in big]


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_training_forward_saves_few_pairs_x_classes_tensors(impl):
    m = tiny(impl=impl).train()
    feats, dets, targets = batch()
    out, saved = saved_for_backward(lambda: m(feats, dets, SIZES, targets))
    big = [t for t in saved if t.numel() == out["logits"].numel()]
    # the fused focal loss keeps its inputs (logits, prior, labels) and recomputes in backward,
    # plus the classifier's one: 4. Its reference (the formula model.py used before) about a dozen
    assert len(big) <= 4 if impl == "torch" else len(big) >= 10, [tuple(t.shape) for t in big]


def test_token_map_saved_once():
    m = tiny().train()
    feats, dets, targets = batch()
    C = feats.shape[1]
    tokens = feats.flatten(2).transpose(1, 2).reshape(-1, C)                       # [B T, C]
    _, saved = saved_for_backward(lambda: m(feats, dets, SIZES, targets))
    copies = [t for t in saved if t.numel() == tokens.numel() and torch.equal(t.reshape(-1, C), tokens)]
    # the connector and the key / value projections of the 2 layers read it: 5 copies before
    assert len(copies) == 1


# ----------------------------------------------------------------------------------------------
# teachers asked only for what distillation reads
# ----------------------------------------------------------------------------------------------
def test_forward_outputs_subset_equal_and_nothing_else_built():
    m = tiny().eval()
    feats, dets, targets = batch()
    calls = []
    m.classifier.register_forward_hook(lambda mod, a, o: calls.append(1))
    with torch.no_grad():
        full = m(feats, dets, SIZES)
        part = m(feats, dets, SIZES, outputs=("pair_image", "pair_idx", "latent_map", "queries"))
    assert set(full) == set(LINK.OUTPUTS)
    assert set(part) == {"pair_image", "pair_idx", "latent_map", "queries"}
    assert len(calls) == 1                                   # no classifier without logits asked for
    assert torch.equal(part["latent_map"], full["latent_map"]) and torch.equal(part["pair_idx"], full["pair_idx"])
    assert all(torch.equal(a, b) for a, b in zip(part["queries"], full["queries"]))
    with torch.no_grad():
        lg = m(feats, dets, SIZES, outputs=["logits"])
    assert set(lg) == {"logits"} and torch.equal(lg["logits"], full["logits"])
    # with targets the loss comes too, whatever was asked for
    with torch.no_grad():
        tl = m(feats, dets, SIZES, targets, outputs=["pair_image"])
    assert set(tl) == {"pair_image", "labels", "loss", "num_pos"} and torch.isfinite(tl["loss"])
    with pytest.raises(ValueError, match="unknown outputs \\['psy'\\]"):
        m(feats, dets, SIZES, outputs=["psy"])


class _Source:
    def __init__(self, feats):
        self.feats = feats

    def get(self, indices, views):
        return self.feats[list(indices)]


@pytest.mark.parametrize("w", [dict(w_map=1.0, w_query=1.0, w_logit=1.0), dict(w_map=0.0, w_query=1.0, w_logit=0.5),
                               dict(w_map=2.0, w_query=0.0, w_logit=0.0)])
def test_distiller_asks_teachers_only_for_what_it_reads(w):
    student, t1, t2 = tiny(0).train(), tiny(1), tiny(2)
    feats, dets, targets = batch()
    asked = []
    for t in (t1, t2):
        orig = t.forward

        def spy(*a, _orig=orig, **kw):
            asked.append(kw.get("outputs"))
            return _orig(*a, **kw)
        t.forward = spy
    cfg = KDConfig(temperature=2.0, impl="torch", **w)
    dist = Distiller([t1, t2], [_Source(feats)] * 2, kd_widths(student), [kd_widths(t1), kd_widths(t2)], cfg, seed=3)
    s_out = student(feats, dets, SIZES, targets)
    got = dist(dict(out=s_out, feats=feats, indices=[0, 1], views=[0, 0], dets=dets, sizes=SIZES))
    want_keys = {"pair_image", "pair_idx"} | {k for k, on in (("latent_map", w["w_map"]), ("queries", w["w_query"]),
                                                              ("logits", w["w_logit"])) if on}
    assert [set(a) for a in asked] == [want_keys] * 2 and set(teacher_keys(cfg)) == want_keys
    with torch.no_grad():
        full = [t1.eval()(feats, dets, SIZES), t2.eval()(feats, dets, SIZES)]
    ref = distill_losses(s_out, (8, 8), full, [(8, 8)] * 2, cfg, dist.adapters)
    assert set(got) == set(ref) and got
    for k in ref:
        assert float(got[k].total.detach()) == pytest.approx(float(ref[k].total.detach()), rel=1e-6), k
        assert got[k].count == ref[k].count > 0


# ----------------------------------------------------------------------------------------------
# the frozen image towers leave memory when the cache holds every feature
# ----------------------------------------------------------------------------------------------
def test_towers_released_with_cache_kept_without(tmp_path, monkeypatch):
    released = []
    orig = LINK.release_vlm

    def spy(self):
        released.append(self)
        orig(self)
    monkeypatch.setattr(LINK, "release_vlm", spy)
    base = ["--world", str(tmp_path / "world"), "--world-train", "8", "--world-test", "4", "--world-size", "64",
            "--runs", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"), "--epochs", "1",
            "--batch-size", "4", "--no-progress", "--threads", "1", "--model-opt", "d_model=32",
            "--model-opt", "d_latent=16", "--model-opt", "heads=2", "--model-opt", "ffn_mult=1"]
    metrics = train_teacher.main(base + ["--name", "t"])
    assert len(released) == 1 and released[0].vlm.visual is None and 0 <= metrics["full"] <= 100
    with pytest.raises(RuntimeError, match="image tower was released"):
        released[0].encode_images(torch.zeros(1, 3, 64, 64))
    # the checkpoint alone rebuilds a model with its tower, whose features match the cache's
    ck = tmp_path / "runs" / "t" / "last.pt"
    rebuilt = LINK.from_checkpoint(runs.load_checkpoint(ck))
    assert rebuilt.vlm.visual is not None and rebuilt.encode_images(torch.zeros(1, 3, 64, 64)).shape == (1, 64, 8, 8)
    assert rebuilt.classifier.text_embed.shape == (16, 64)                       # text embeddings kept
    # a student releases its own tower and its teacher's; --no-cache keeps them all
    train_student.main(base + ["--name", "s", "--teacher", str(ck)])
    assert len(released) == 3
    train_teacher.main(base + ["--name", "t2", "--no-cache"])
    assert len(released) == 3
    assert json.loads((tmp_path / "runs" / "t2" / "metrics.json").read_text())["full"] >= 0


def test_release_unused_towers_needs_every_source_cached():
    class M:
        def __init__(self):
            self.vlm = object()

        def release_vlm(self):
            self.vlm = None

    class S:
        def __init__(self, model, cache):
            self.model, self.cache = model, cache
    a, b, c = M(), M(), M()
    n = cache.release_unused_towers([S(a, "cache"), S(a, "cache"), S(b, "cache"), S(b, None), None, S(c, None)])
    assert n == 1 and a.vlm is None and b.vlm is not None and c.vlm is not None


def _one_step(monkeypatch, prepare: bool, out_dir):
    """One Trainer.train_step of a tiny student with two tiny teachers -> (log record, the order
    in which the networks ran, the student's weights after the step)."""
    from bench.train_step import FixedBatch, FixedFeatures
    from data import Views
    from train_student import KDConfig, kd_widths
    from trainer import Dist, LoopConfig, Trainer

    if not prepare:
        monkeypatch.delattr(Distiller, "prepare")
    order = []
    student, teachers = tiny(0), [tiny(1), tiny(2)]
    for name, m in [("student", student), ("teacher 1", teachers[0]), ("teacher 2", teachers[1])]:
        m.register_forward_pre_hook(lambda mod, a, name=name: order.append(name))
    feats, dets, targets = batch()
    dist = Distiller(teachers, [FixedFeatures(t, feats) for t in teachers], kd_widths(student),
                     [kd_widths(t) for t in teachers], KDConfig(temperature=2.0, impl="torch"), seed=3)
    loop = LoopConfig(epochs=1, batch_size=2, progress=False, lr=1e-2)
    tr = Trainer(student, loop, FixedBatch(dets, SIZES, targets, Views.of(loop)), FixedFeatures(student, feats),
                 out_dir, Dist(), extra_loss=dist)
    torch.manual_seed(7)
    rec = tr.train_step([0, 1])
    return rec, order, {k: v.clone() for k, v in student.state_dict().items()}


def test_loop_runs_the_teachers_before_the_student(monkeypatch, tmp_path):
    rec, order, weights = _one_step(monkeypatch, True, tmp_path / "a")
    # teachers first: their forward temporaries never meet the student's saved activations
    assert order == ["teacher 1", "teacher 2", "student"]
    with monkeypatch.context() as mp:
        rec_after, order_after, weights_after = _one_step(mp, False, tmp_path / "b")
    assert order_after == ["student", "teacher 1", "teacher 2"]
    # the same step either way: losses, gradient norm and the updated weights
    assert set(rec) == set(rec_after) and rec["loss_kd_logit"] > 0 and rec["loss_kd_query"] > 0
    for k in rec:
        assert rec[k] == pytest.approx(rec_after[k], rel=1e-6, abs=1e-9), k
    for k in weights:
        torch.testing.assert_close(weights[k], weights_after[k], rtol=1e-6, atol=1e-8)
