"""Tests of the distillation (train_student.py): per-teacher adapters at the map and query levels,
teachers of other widths and layer counts, the student's own initialisation seed, and the
adapters' place in checkpoints. The data-parallel normalisation of the distillation terms is
tested by the 2-process gloo test in test_trainer.py."""
from __future__ import annotations

import json
import math

import pytest
import torch
from test_trainer import StandIn, TinyCfg, TinyCS, make_trainer, standin_widths, tiny_split

import train_student
from runs import CheckpointError, load_checkpoint
from train_student import (
    Adapters,
    Distiller,
    KDConfig,
    PairAlignmentError,
    Widths,
    distill_losses,
    query_layer_map,
    resolve_init_seed,
    student_parser,
)

B, GRID, D_LAT, D_Q, P, K = 2, (4, 4), 6, 8, 5, 3


def _out(latent, queries, logits=None):
    """A hand-made model output with P pairs (pairing and prior fixed, so outputs align)."""
    logits = torch.zeros(P, K) if logits is None else logits
    return {"pair_image": torch.tensor([0, 0, 0, 1, 1]),
            "pair_idx": torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1], [1, 0]]),
            "latent_map": latent, "queries": queries, "logits": logits, "prior": torch.full((P, K), 0.5)}


def _perm_matrix(idx: torch.Tensor) -> torch.Tensor:
    """W [d, d] with (x @ W.T)[..., j] = x[..., idx[j]], i.e. nn.Linear weight selecting channels."""
    w = torch.zeros(len(idx), len(idx))
    w[torch.arange(len(idx)), idx] = 1.0
    return w


def _mean(term) -> float:
    return float(term.mean().detach())


def _set(lin: torch.nn.Linear, weight: torch.Tensor) -> None:
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.zero_()


def test_permuted_teachers_through_adapters_give_near_zero_map_and_query_loss():
    """Two teachers hold the same features in different channel orders (a CLIP and a SigLIP
    teacher have unrelated bases). A student that copies teacher A, with adapters mapping its
    channels into each teacher's order, has ~0 map and query loss; the plain KL of channel c vs
    channel c (no adapter: what the mean-of-teachers code computed) is far from 0."""
    g = torch.Generator().manual_seed(0)
    x_map = 2 * torch.randn(B, GRID[0] * GRID[1], D_LAT, generator=g)
    x_q = [2 * torch.randn(P, D_Q, generator=g) for _ in range(3)]
    pa_m, pb_m = torch.randperm(D_LAT, generator=g), torch.randperm(D_LAT, generator=g)
    pa_q, pb_q = torch.randperm(D_Q, generator=g), torch.randperm(D_Q, generator=g)
    t_a = _out(x_map[..., pa_m], [q[:, pa_q] for q in x_q])
    t_b = _out(x_map[..., pb_m], [q[:, pb_q] for q in x_q])
    student = _out(t_a["latent_map"].clone().requires_grad_(), [q.clone() for q in t_a["queries"]])
    cfg = KDConfig(w_logit=0.0, temperature=2.0)
    w = Widths(D_LAT, D_Q, 3)
    ad = Adapters(w, [w, w], "linear", cfg.w_map, cfg.w_query)
    # student = teacher A: A's adapters are the identity (their initialisation for equal widths);
    # B's select, for B's channel j, the student channel holding it: inverse(perm_a)[perm_b[j]]
    assert torch.equal(ad.map[0].weight, torch.eye(D_LAT)) and torch.equal(ad.query[0].weight, torch.eye(D_Q))
    _set(ad.map[1], _perm_matrix(torch.argsort(pa_m)[pb_m]))
    _set(ad.query[1], _perm_matrix(torch.argsort(pa_q)[pb_q]))
    z = distill_losses(student, GRID, [t_a, t_b], [GRID, GRID], cfg, ad)
    assert _mean(z["loss_kd_map"]) < 1e-6 and _mean(z["loss_kd_query"]) < 1e-6
    # items: 2 images x 16 tokens for the map level, 5 pairs for the query level
    assert z["loss_kd_map"].count == 32 and z["loss_kd_query"].count == P
    for adapters in (None, Adapters(w, [w, w], "linear")):   # no adapter / identity ones
        plain = distill_losses(student, GRID, [t_a, t_b], [GRID, GRID], cfg, adapters)
        assert _mean(plain["loss_kd_map"]) > 0.5 and _mean(plain["loss_kd_query"]) > 0.5
    # one KL per teacher, averaged: with B's adapter off by a swap of two channels, the loss is
    # half of B's own loss (A's stays 0)
    _set(ad.map[1], _perm_matrix(torch.argsort(pa_m)[pb_m][[1, 0, 2, 3, 4, 5]]))
    only_b = distill_losses(student, GRID, [t_b], [GRID], cfg, _single(ad, 1))
    both = distill_losses(student, GRID, [t_a, t_b], [GRID, GRID], cfg, ad)
    assert _mean(only_b["loss_kd_map"]) > 0.1
    assert _mean(both["loss_kd_map"]) == pytest.approx(_mean(only_b["loss_kd_map"]) / 2, rel=1e-5)


def _single(ad: Adapters, m: int) -> Adapters:
    """Teacher m's adapters alone (as teacher 0)."""
    one = Adapters(Widths(D_LAT, D_Q, 3), [], "linear")
    one.map.append(ad.map[m])
    one.query.append(ad.query[m])
    return one


def test_teacher_of_other_widths_and_layer_count_works_through_adapters():
    """A teacher with d_latent 5, d_model 10 and 4 query tensors (the student: 6, 8, 3): its
    features are linear images of the student's; set to those maps the adapters give ~0 loss,
    the student's 3 query tensors meeting the teacher's tensors 0, 2 and 3 (relative depth)."""
    g = torch.Generator().manual_seed(1)
    x_map = torch.randn(B, 16, D_LAT, generator=g)
    x_q = [torch.randn(P, D_Q, generator=g) for _ in range(3)]
    w_map, w_q = torch.randn(5, D_LAT, generator=g), torch.randn(10, D_Q, generator=g)
    junk = 5 * torch.randn(P, 10, generator=g)              # teacher tensor 1: matched to no student layer
    teacher = _out(x_map @ w_map.T, [x_q[0] @ w_q.T, junk, x_q[1] @ w_q.T, x_q[2] @ w_q.T])
    student = _out(x_map, x_q)
    ad = Adapters(Widths(D_LAT, D_Q, 3), [Widths(5, 10, 4)], "linear")
    assert ad.map[0].weight.shape == (5, D_LAT) and ad.query[0].weight.shape == (10, D_Q)
    _set(ad.map[0], w_map)
    _set(ad.query[0], w_q)
    z = distill_losses(student, GRID, [teacher], [GRID], KDConfig(w_logit=0.0), ad)
    assert _mean(z["loss_kd_map"]) < 1e-6 and _mean(z["loss_kd_query"]) < 1e-6
    # the gradient reaches the student and the adapters
    student2 = _out(x_map.clone().requires_grad_(), [q.clone().requires_grad_() for q in x_q])
    _set(ad.map[0], w_map + 0.1)
    _set(ad.query[0], w_q + 0.1)
    z2 = distill_losses(student2, GRID, [teacher], [GRID], KDConfig(w_logit=0.0), ad)
    sum(v.total for v in z2.values()).backward()
    assert student2["latent_map"].grad.abs().sum() > 0 and ad.map[0].weight.grad.abs().sum() > 0
    assert ad.query[0].weight.grad.abs().sum() > 0


def test_query_layer_map():
    assert query_layer_map(3, 3) == [0, 1, 2]
    assert query_layer_map(3, 5) == [0, 2, 4]
    assert query_layer_map(3, 4) == [0, 2, 3]       # round(1.5) = 2
    assert query_layer_map(4, 2) == [0, 0, 1, 1]
    assert query_layer_map(1, 3) == [2]             # the tensor the classifier reads


def test_adapter_options_and_clear_errors():
    s = Widths(6, 8, 3)
    none = Adapters(s, [s], "none")
    assert isinstance(none.map[0], torch.nn.Identity) and not list(none.parameters())
    with pytest.raises(ValueError, match="teacher 0 latent map: width 5 vs the student's 6; --kd-adapter none"):
        Adapters(s, [Widths(5, 8, 3)], "none")
    with pytest.raises(ValueError, match="teacher 1 pair queries: width 16 vs the student's 8"):
        Adapters(s, [s, Widths(6, 16, 3)], "none")
    with pytest.raises(ValueError, match="teacher 0 has none"):
        Adapters(s, [Widths(None, 8, 3)])
    with pytest.raises(ValueError, match="the student has none"):
        Adapters(Widths(None, 8, 3), [s])
    assert len(Adapters(Widths(None, 8, 3), [s], w_map=0).map) == 0     # fine without map KD
    with pytest.raises(ValueError, match="--kd-adapter must be linear or none"):
        Adapters(s, [s], "mlp")
    # building adapters draws nothing from the training RNG stream; the seed fixes them
    state = torch.get_rng_state()
    a1, a2 = Adapters(s, [Widths(5, 10, 3)], seed=3), Adapters(s, [Widths(5, 10, 3)], seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a1.map[0].weight, a2.map[0].weight)


def test_distiller_state_is_the_adapters_only():
    t = StandIn(TinyCfg(width=10, latent=5), TinyCS())
    dist = Distiller([t], [None], standin_widths(TinyCfg()), [standin_widths(t.cfg)])
    assert sorted(dist.state_dict()) == ["adapters.map.0.bias", "adapters.map.0.weight",
                                         "adapters.query.0.bias", "adapters.query.0.weight"]
    assert all(p.requires_grad for p in dist.parameters()) and not any(p.requires_grad for p in t.parameters())


def test_init_seed_own_by_default_same_on_request():
    assert resolve_init_seed(None, 0, [0]) == 1
    assert resolve_init_seed(None, 0, [1, 2, 0]) == 3          # no teacher's initialisation
    assert resolve_init_seed(None, 4, [None]) == 5
    assert resolve_init_seed("same", 4, [4]) == 4
    assert resolve_init_seed("9", 4, [4]) == 9
    p = student_parser()
    assert p.parse_args(["--teacher", "t.pt"]).init_seed is None
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--teacher", "t.pt", "--init-seed", "abc"])
    assert e.value.code == 2


def test_adapters_trained_checkpointed_and_restored_on_resume(tmp_path):
    tr = make_trainer(tmp_path / "a", n=6, epochs=1, bs=3, kd=True)
    init = {k: v.clone() for k, v in tr.extra_module.state_dict().items()}
    tr.fit()
    ck = load_checkpoint(tr.ckpt_path)
    saved = ck["extra_state"]
    key = "adapters.query.0.weight"
    assert set(saved) == set(init) and not torch.equal(saved[key], init[key])     # trained
    assert not any(k.startswith("adapters") for k in ck["model"])
    tr2 = make_trainer(tmp_path / "a", n=6, epochs=2, bs=3, kd=True)
    with torch.no_grad():
        for p in tr2.extra_module.parameters():
            p.add_(1.0)
    tr2.resume(tr.ckpt_path, overrides=["epochs"])          # extending training: explicit
    for k, v in tr2.extra_module.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # a checkpoint without adapters, or with other ones, is refused with the field named
    no_extra = {k: v for k, v in ck.items() if k != "extra_state"}
    torch.save(no_extra, tmp_path / "no_extra.pt")
    with pytest.raises(CheckpointError, match="extra_state"):
        make_trainer(tmp_path / "a", n=6, epochs=2, bs=3, kd=True).resume(tmp_path / "no_extra.pt", ["epochs"])
    other = dict(ck, extra_state={**saved, "adapters.map.0.weight": torch.zeros(7, 6)})
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt: field extra_state does not fit"):
        make_trainer(tmp_path / "a", n=6, epochs=2, bs=3, kd=True).resume(tmp_path / "other.pt", ["epochs"])


def _push(form: str, student_logits, teacher_logits: list, prior=(0.5, 0.5, 0.0)) -> float:
    """d loss_kd_logit / d (a common shift of the pair's logits), through distill_losses, for one
    pair with classes 0 and 1 allowed (P = 0.5) and class 2 impossible; T = 1."""
    s = torch.tensor([student_logits], requires_grad=True)
    pair = {"pair_image": torch.tensor([0]), "pair_idx": torch.tensor([[0, 1]]), "prior": torch.tensor([prior])}
    t_outs = [dict(pair, logits=torch.tensor([t])) for t in teacher_logits]
    z = distill_losses(dict(pair, logits=s), GRID, t_outs, [GRID] * len(t_outs),
                       KDConfig(w_map=0, w_query=0, logit_form=form))
    z["loss_kd_logit"].mean().backward()
    return float(s.grad[0, :2].sum())


def test_logit_kd_push_on_an_unlabelled_pair_sigmoid_vs_softmax():
    """The student scores a pair 0.25 on both allowed classes (O = 0, P = 0.5). A teacher sure it
    interacts (O = +4) must push the student's logits up, one sure it does not (O = -4) down.
    Sigmoid form, by hand: d/dO of KL(Bern(p) || Bern(q)) = (q - p) dPsi/dO, q = 0.25,
    p = 0.5 sigmoid(+-4), dPsi/dO = e^-O / (1 - P + e^-O) = 2/3; two classes. The softmax form
    sees two equal classes either way: loss 0, push 0."""
    sig = torch.sigmoid(torch.tensor(4.0)).item()
    want = 2 * (0.25 - 0.5 * sig) * (2 / 3)                    # -0.321343
    assert _push("sigmoid", [0.0, 0.0, 0.0], [[4.0, 4.0, 4.0]]) == pytest.approx(want, abs=1e-5)
    assert _push("sigmoid", [0.0, 0.0, 0.0], [[-4.0, -4.0, -4.0]]) == pytest.approx(-want, abs=1e-5)
    assert want == pytest.approx(-0.321343, abs=1e-6)
    assert _push("softmax", [0.0, 0.0, 0.0], [[4.0, 4.0, 4.0]]) == pytest.approx(0.0, abs=1e-7)
    assert _push("softmax", [0.0, 0.0, 0.0], [[-4.0, -4.0, -4.0]]) == pytest.approx(0.0, abs=1e-7)
    # unequal student logits (1, -1), teachers shifted by +-4: the softmax form's push is 3x /
    # 7x smaller than the sigmoid form's (values from the formulas, autograd on a transcription)
    for shift in (4.0, -4.0):
        t = [1.0 + shift, -1.0 + shift, 0.0]
        want_sig, want_soft = _hand_push([1.0, -1.0], t[:2])
        assert _push("sigmoid", [1.0, -1.0, 0.0], [t]) == pytest.approx(want_sig, abs=1e-5)
        assert _push("softmax", [1.0, -1.0, 0.0], [t]) == pytest.approx(want_soft, abs=1e-5)
        assert abs(want_soft) < abs(want_sig) / 3 and want_sig * shift < 0
    # several teachers: the target is the mean of their probabilities (+4 and 0: p = 0.3705 on
    # each class), not the probability of their mean logit (+2: p = 0.4404)
    p = (0.5 * sig + 0.25) / 2
    got = _push("sigmoid", [0.0, 0.0, 0.0], [[4.0] * 3, [0.0] * 3])
    assert got == pytest.approx(2 * (0.25 - p) * (2 / 3), abs=1e-5)


def _hand_push(s, t, P=0.5):
    """The push of both forms for two allowed classes from their definitions (T = 1)."""
    def psi(o):
        return torch.log(torch.tensor(P)) - torch.log(1 - P + torch.exp(-o))
    out = []
    for form in ("sigmoid", "softmax"):
        x, y = torch.tensor(s, requires_grad=True), torch.tensor(t)
        if form == "sigmoid":
            q, p = torch.sigmoid(psi(x)), torch.sigmoid(psi(y))
            kl = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).sum()
        else:
            p = torch.softmax(psi(y), 0)
            kl = (p * (torch.log(p) - torch.log_softmax(psi(x), 0))).sum()
        kl.backward()
        out.append(float(x.grad.sum()))
    return out


def test_logit_kd_sigmoid_is_per_pair_and_validated():
    """Per pair: two identical pairs give the same mean as one, and twice its sum."""
    one = {"pair_image": torch.tensor([0]), "pair_idx": torch.tensor([[0, 1]]),
           "prior": torch.tensor([[0.5, 0.5, 0.0]]), "logits": torch.tensor([[0.0, 1.0, 0.0]])}
    two = {k: torch.cat([v, v]) for k, v in one.items()}
    t1 = dict(one, logits=torch.tensor([[3.0, -2.0, 5.0]]))
    t2 = {k: torch.cat([v, v]) for k, v in t1.items()}
    cfg = KDConfig(w_map=0, w_query=0)
    a = distill_losses(one, GRID, [t1], [GRID], cfg)["loss_kd_logit"]
    b = distill_losses(two, GRID, [t2], [GRID], cfg)["loss_kd_logit"]
    assert (a.count, b.count) == (1, 2) and float(b.total) == pytest.approx(2 * float(a.total), rel=1e-6)
    assert float(a.total) > 0.1
    with pytest.raises(ValueError, match=r"logit_form \(--kd-logit-form\) must be one of"):
        KDConfig(logit_form="softmax2")


def test_distillation_zero_for_identical_positive_otherwise_and_alignment(tmp_path):
    torch.manual_seed(0)
    cs = TinyCS()
    s = StandIn(TinyCfg(dropout=0.0), cs)
    t = StandIn(TinyCfg(dropout=0.0), cs)
    t.load_state_dict(s.state_dict())
    sp = tiny_split(tmp_path / "d", 3)
    feats = s.encode_images(s.preprocess([sp.image(i) for i in range(3)]))
    dets = [sp.item(i, 0, True)[0] for i in range(3)]
    sizes = [(16, 16)] * 3
    so, to = s(feats, dets, sizes), t(feats, dets, sizes)
    z = distill_losses(so, (4, 4), [to, to], [(4, 4), (4, 4)], KDConfig(temperature=2.0))
    assert set(z) == {"loss_kd_map", "loss_kd_query", "loss_kd_logit"}
    for v in z.values():
        assert abs(float(v.mean().detach())) < 1e-6
    # items: tokens for the map level (3 images x 16), pairs for the others
    n_pairs = so["logits"].shape[0]
    assert z["loss_kd_map"].count == 48 and z["loss_kd_query"].count == z["loss_kd_logit"].count == n_pairs
    with torch.no_grad():
        for p in t.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    to2 = t(feats, dets, sizes)
    pos = distill_losses(so, (4, 4), [to2], [(4, 4)])
    for k, v in pos.items():
        assert float(v.mean().detach()) > 1e-4, k
    # weights scale the terms; the gradient reaches the student only
    w = distill_losses(so, (4, 4), [to2], [(4, 4)], KDConfig(w_map=2.0, w_query=0.0, w_logit=0.5))
    assert float(w["loss_kd_map"].mean().detach()) == pytest.approx(2 * float(pos["loss_kd_map"].mean().detach()),
                                                                    rel=1e-6)
    assert "loss_kd_query" not in w
    # excluded classes (zero-shot unseen) leave the logit KD: all excluded -> 0, some -> changed
    logit_only = KDConfig(w_map=0, w_query=0)
    allx = distill_losses(so, (4, 4), [to2], [(4, 4)], logit_only, exclude_classes=[0, 1, 2])
    assert float(allx["loss_kd_logit"].mean().detach()) == 0.0
    part = distill_losses(so, (4, 4), [to2], [(4, 4)], logit_only, exclude_classes=[2])
    assert float(part["loss_kd_logit"].mean().detach()) != pytest.approx(float(pos["loss_kd_logit"].mean().detach()))
    sum(v.total for v in w.values()).backward()
    assert s.cls.weight.grad is not None and t.cls.weight.grad is None
    # a teacher fed other detections (other order) is refused
    dets_rev = [{k: v.flip(0) for k, v in d.items()} for d in dets]
    to3 = t(feats, dets_rev, sizes)
    with pytest.raises(PairAlignmentError, match="pair_idx|pair_image"):
        distill_losses(so, (4, 4), [to3], [(4, 4)])
    # a teacher on another grid is resized to the student's grid
    big = torch.nn.functional.interpolate(to["latent_map"].transpose(1, 2).reshape(1 * 3, 6, 4, 4),
                                          size=(8, 8), mode="bilinear", align_corners=False)
    to_big = dict(to, latent_map=big.reshape(3, 6, 64).transpose(1, 2))
    r = distill_losses(so, (4, 4), [to_big], [(8, 8)], KDConfig(w_query=0, w_logit=0))
    assert torch.isfinite(r["loss_kd_map"].total)


def test_student_hook_in_loop_runs_teachers_on_same_inputs(tmp_path):
    tr = make_trainer(tmp_path, n=4, epochs=1, bs=2, dropout=0.0)
    teacher = StandIn(TinyCfg(dropout=0.0), TinyCS())
    calls = []
    w = standin_widths(TinyCfg())
    dist = Distiller([teacher], [tr.feats], w, [w])
    orig = teacher.forward

    def spy(feats, dets, sizes, targets=None, outputs=None):
        calls.append([d["boxes"].clone() for d in dets])
        return orig(feats, dets, sizes, targets, outputs)
    teacher.forward = spy
    tr.extra_loss = dist   # set after construction: the adapters are not trained here
    tr.fit()
    assert len(calls) == 2
    rec = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    tr_rec = [r for r in rec if r["kind"] == "train"]
    assert all(r["loss_kd_logit"] > 0 and r["loss_kd_map"] >= 0 for r in tr_rec)
    assert all(abs(r["loss"] - (r["loss_gt"] + r["loss_kd_map"] + r["loss_kd_query"] + r["loss_kd_logit"])) < 1e-5
               for r in tr_rec)


def test_map_kd_axis_channels_or_positions():
    """--kd-map-axis: the map level's softmax over the channels of each token, or over the
    positions of each channel (channel-wise distillation). Hand case, T = 1, 2 images of 2
    tokens x 2 channels, teacher map 0: a student shifted by +1 on token 0 (every channel) has
    the teacher's channel distribution at every token (KL 0 over channels), while over
    positions each channel puts e / (e + 1) on token 0 instead of 1/2:
    KL = log((e + 1) / 2) - 1/2 per channel; per image the mean over channels. A student
    shifted by +1 on channel 0 (every token) is the mirror case."""
    tm = torch.zeros(2, 2, 2)                                   # [B, T, d]
    token_shift = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).expand(2, 2, 2)
    channel_shift = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).expand(2, 2, 2)
    meta = {"pair_image": torch.zeros(0, dtype=torch.long), "pair_idx": torch.zeros(0, 2, dtype=torch.long)}
    kl = math.log((math.e + 1) / 2) - 0.5                        # 0.1201
    kl_ch = 0.5 * math.log(0.5 * (math.e + 1) / math.e) + 0.5 * math.log(0.5 * (math.e + 1))
    assert kl == pytest.approx(kl_ch)
    for axis, sm, want, count in (("channels", token_shift, 0.0, 4), ("positions", token_shift, kl, 2),
                                  ("channels", channel_shift, kl, 4), ("positions", channel_shift, 0.0, 2)):
        r = distill_losses(dict(meta, latent_map=sm), (1, 2), [dict(meta, latent_map=tm)], [(1, 2)],
                           KDConfig(w_query=0, w_logit=0, map_axis=axis, impl="reference"))["loss_kd_map"]
        assert r.count == count, axis
        assert float(r.mean()) == pytest.approx(want, abs=1e-6), (axis, sm[0])
    with pytest.raises(ValueError, match="map_axis"):
        KDConfig(map_axis="tokens")
    args = train_student.student_parser().parse_args(["--teacher", "t.pt", "--kd-map-axis", "positions"])
    assert train_student.kd_config(args).map_axis == "positions"
    assert train_student.kd_config(train_student.student_parser().parse_args(["--teacher", "t.pt"])).map_axis \
        == "channels"
