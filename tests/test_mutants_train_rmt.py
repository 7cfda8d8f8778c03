"""Exact tests of the RMT recipe (fastvlm/train/rmt.py, docs/methods.md section 2) at a non-trivial state
(scores moved off their all-ones start, so the KL term is not 0 and the regulariser's gradient is not
uniform), on every architecture the mask tuner supports: open_clip ViT (fused masks) and ResNet (unfused,
parametrized), transformers CLIP and SigLIP, timm ViT.

The reference is written from the recipe's formulas: the zero-shot teacher is an unpatched twin of the model
(same seed), CE = cross-entropy of the tuned logits, L_kl = -sum p_zs log p (soft cross-entropy, T = 1,
mean over the batch), reg = 1e-4 * sum_layers ||S||_2 (not squared), and each layer's gradient is
grad_dropout(grad_S (CE + reg), grad_S L_kl, lambda, seed of (run seed, step, layer))."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastvlm.functional import grad_dropout
from fastvlm.models import encode_image
from fastvlm.train import rmt as R
from fastvlm.tuners.mask import MaskConfig, apply_masks, masked_layers, score_parameters

from . import any_models
from .test_tuner_pairs import tiny_model

SCALE = 4.0  # the recipe's 100 saturates the softmax of random-init features (every loss about 0): a soft one
ARCHS = ["open_clip_vit", "open_clip_rn", *any_models.ARCHS]


def build(arch, seed=0):
    if arch == "open_clip_vit":
        return tiny_model(seed), torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    if arch == "open_clip_rn":
        from fastvlm.models import TINY_RN, load_clip

        torch.manual_seed(seed)
        m, *_ = load_clip(TINY_RN, None)
        return m, torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return any_models.build(arch, seed), any_models.images(4)


def patched(arch, seed=0):
    """(masked model, its unpatched twin, images, labels, classifier) with the scores perturbed."""
    model, x = build(arch, seed)
    twin, _ = build(arch, seed)
    apply_masks(model, MaskConfig(mlp=True))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for s in score_parameters(model):
            s.copy_(torch.empty(s.shape).uniform_(-0.002, 0.03, generator=g))  # about 1 in 5 masks off
    with torch.no_grad():
        dim = encode_image(twin, x[:1]).shape[-1]
    cls = F.normalize(torch.randn(3, dim, generator=torch.Generator().manual_seed(2)), dim=-1)
    y = torch.tensor([0, 2, 1, 2])
    return model, twin, x, y, cls


def reference(model, twin, x, y, cls, scale=SCALE, reg=1e-4):
    """(ce, l_kl, reg term, g_a, g_b) written from the formulas, the teacher from the unpatched twin."""
    scores = score_parameters(model)
    with torch.no_grad():
        p_zs = torch.softmax(scale * F.normalize(encode_image(twin, x), dim=-1) @ cls.T, dim=-1)
    logits = scale * F.normalize(encode_image(model, x), dim=-1) @ cls.T
    ce = F.cross_entropy(logits, y)
    logp = torch.log_softmax(logits, dim=-1)
    l_kl = -(p_zs * logp).sum(dim=-1).mean()
    reg_term = reg * sum(torch.sqrt(torch.sum(s.double() ** 2)).float() for s in scores)
    g_b = torch.autograd.grad(l_kl, scores, retain_graph=True)
    g_a = torch.autograd.grad(ce + reg_term, scores)
    return ce, l_kl, reg_term, g_a, g_b


def step_order(model):
    """The layer index of each score in the step: fused layers first, in model order, then the unfused."""
    layers = [m for _, m in masked_layers(model)]
    fused = [m for m in layers if getattr(m, "fused", False)]
    unfused = [m for m in layers if not getattr(m, "fused", False)]
    index = {id(m.scores): i for i, m in enumerate(fused + unfused)}
    return [index[id(s)] for s in score_parameters(model)]


class Capture(torch.optim.Optimizer):
    """An optimizer whose step records the gradients it was given."""

    def __init__(self, params):
        self.params = list(params)
        super().__init__(self.params, {})

    def step(self):
        self.grads = [None if p.grad is None else p.grad.clone() for p in self.params]


@pytest.mark.parametrize("arch", ARCHS)
def test_losses_at_a_perturbed_state(arch):
    model, twin, x, y, cls = patched(arch)
    ce, l_kl, reg, scores = R.rmt_losses(model, x, y, cls, R.RMTRecipe(logit_scale=SCALE))
    want_ce, want_kl, want_reg, _, _ = reference(model, twin, x, y, cls)
    assert [id(s) for s in scores] == [id(s) for s in score_parameters(model)]
    torch.testing.assert_close(ce, want_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l_kl, want_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reg, want_reg, rtol=1e-5, atol=0)
    # not trivial: the tuned model differs from the teacher, so the soft CE is above the teacher's entropy
    with torch.no_grad():
        p_zs = torch.softmax(SCALE * F.normalize(encode_image(twin, x), dim=-1) @ cls.T, dim=-1)
    entropy = -(p_zs * p_zs.clamp_min(1e-30).log()).sum(-1).mean()
    assert float(l_kl.detach() - entropy) > 1e-3
    assert not any(m.bypass for _, m in masked_layers(model))  # the teacher's bypass was undone


def test_losses_take_the_recipes_logit_scale_and_reg():
    model, twin, x, y, cls = patched("open_clip_vit")
    ce, l_kl, reg, _ = R.rmt_losses(model, x, y, cls, R.RMTRecipe(logit_scale=1.5, reg=0.5))
    want_ce, want_kl, want_reg, _, _ = reference(model, twin, x, y, cls, scale=1.5, reg=0.5)
    torch.testing.assert_close((ce, l_kl, reg), (want_ce, want_kl, want_reg), rtol=1e-5, atol=1e-6)


def test_clip_logits_by_hand():
    class Fixed(torch.nn.Module):
        def encode_image(self, x):
            return x

    f = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    cls = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    want = torch.tensor([[0.6, 0.8, 0.36 + 0.64], [0.0, -1.0, -0.8]])
    torch.testing.assert_close(R.clip_logits(Fixed(), f, cls, scale=1.0), want)
    torch.testing.assert_close(R.clip_logits(Fixed(), f, cls), 100 * want)


def test_layer_seed_is_the_recorded_stream():
    """The per-layer dropout seeds are part of a run's reproducibility (a resumed run, a rank, the fused and
    the explicit step must all drop the same entries): pinned at hand-computed points of
    (seed * 1000003 + step * 7919 + index * 104729) mod 2^62."""
    assert R.layer_seed(0, 0, 0) == 0
    assert R.layer_seed(1, 0, 0) == 1_000_003
    assert R.layer_seed(0, 1, 0) == 7_919
    assert R.layer_seed(0, 0, 1) == 104_729
    assert R.layer_seed(5, 7, 3) == 5_000_015 + 55_433 + 314_187
    assert R.layer_seed(2**62, 0, 2) == 209_458  # wraps below 2^62
    assert R.layer_seed(2**61, 0, 0) == 2**61 * 1_000_003 % 2**62
    seeds = {R.layer_seed(3, s, i) for s in range(50) for i in range(20)}
    assert len(seeds) == 1000 and all(0 <= v < 2**62 for v in seeds)


def test_recipe_defaults_are_the_papers():
    r = R.RMTRecipe()
    assert (r.lr, r.weight_decay, r.epochs, r.batch_size, r.drop_ratio, r.reg, r.logit_scale, r.seed) == \
        (8e-5, 0.0, 30, 32, 1.0, 1e-4, 100.0, 0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ratio", [0.0, 0.7])
def test_step_gradient_is_exact(arch, ratio):
    model, twin, x, y, cls = patched(arch)
    recipe = R.RMTRecipe(drop_ratio=ratio, seed=3, logit_scale=SCALE)
    ce, l_kl, reg, g_a, g_b = reference(model, twin, x, y, cls)
    if ratio:
        order = step_order(model)
        want = [grad_dropout(a, b, ratio, R.layer_seed(3, 9, i)) for a, b, i in zip(g_a, g_b, order)]
    else:
        want = list(g_a)  # plain L_a
    scores = score_parameters(model)
    for s in scores:
        s.grad = torch.full_like(s, 5.0)  # stale gradients: the step must start from none
    opt = Capture(scores)
    out = R.rmt_step(model, x, y, cls, opt, recipe, step=9)
    for i, (got, exp) in enumerate(zip(opt.grads, want)):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-9, msg=f"{arch} layer {i}")
    assert set(out) == {"ce", "kl", "reg", "loss_a"}
    assert out["ce"] == pytest.approx(float(ce), rel=1e-5) and out["kl"] == pytest.approx(float(l_kl), rel=1e-5)
    assert out["reg"] == pytest.approx(float(reg), rel=1e-5)
    assert out["loss_a"] == pytest.approx(float(ce) + float(reg), rel=1e-5)
    if ratio:  # dropout did drop something: the result is not plain g_a
        assert any(not torch.allclose(a, b) for a, b in zip(opt.grads, g_a))


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("ratio", [0.0, 0.7])
def test_distributed_step_on_one_rank_is_the_same_step(ratio, one_rank_group):
    model, twin, x, y, cls = patched("open_clip_vit")
    recipe = R.RMTRecipe(drop_ratio=ratio, seed=4, logit_scale=SCALE)
    ce, l_kl, reg, g_a, g_b = reference(model, twin, x, y, cls)
    want = [grad_dropout(a, b, ratio, R.layer_seed(4, 2, i)) for i, (a, b) in enumerate(zip(g_a, g_b))] \
        if ratio else list(g_a)
    scores = score_parameters(model)
    opt = Capture(scores)
    out = R.rmt_step_distributed(model, x, y, cls, opt, recipe, step=2)
    for i, (got, exp) in enumerate(zip(opt.grads, want)):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-9, msg=f"layer {i}")
    assert all(s.grad is None for s in scores)  # zeroed after the step, set to none
    assert out["loss_a"] == pytest.approx(float(ce) + float(reg), rel=1e-5)
    assert (out["ce"], out["kl"], out["reg"]) == pytest.approx((float(ce), float(l_kl), float(reg)), rel=1e-5)


def test_train_rmt_wires_adam_the_schedule_and_the_state(monkeypatch):
    model, _, x, y, cls = patched("open_clip_vit")
    seen = {}

    def fake_run_epochs(name, **kw):
        seen.update(kw, name=name)
        return ["done"]

    steps = []
    monkeypatch.setattr(R, "run_epochs", fake_run_epochs)
    monkeypatch.setattr(R, "rmt_step", lambda *a: steps.append(("one", a)) or {"ce": 1.0})
    monkeypatch.setattr(R, "rmt_step_distributed", lambda *a: steps.append(("dist", a)) or {"ce": 2.0})
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    recipe = R.RMTRecipe(lr=0.02, weight_decay=0.1, epochs=4)
    assert R.train_rmt(model, cls, loader, recipe, checkpoint="c.pt", on_epoch_end=print) == ["done"]
    opt = seen["optimizer"]
    assert seen["name"] == "rmt" and seen["epochs"] == 4 and seen["checkpoint"] == "c.pt"
    assert seen["on_epoch_end"] is print and seen["generators"] == [loader.generator]
    assert isinstance(opt, torch.optim.Adam)
    assert opt.defaults["lr"] == 0.02 and opt.defaults["weight_decay"] == 0.1
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(s) for s in score_parameters(model)]
    assert list(seen["tensors"]) == [n for n, _ in masked_layers(model)]
    assert [id(t) for t in seen["tensors"].values()] == [id(s) for s in score_parameters(model)]
    assert seen["lr_at"](0) == pytest.approx(0.02)  # cosine, no warm-up
    assert seen["lr_at"](2) == pytest.approx(0.01)
    assert list(seen["batches"](0)) and seen["ranks"] is None
    metrics, weight = seen["step"]((x, y), 6)
    assert metrics == {"ce": 1.0} and weight == 1
    kind, args = steps[-1]
    assert kind == "one" and args[0] is model and args[3] is cls and args[4] is opt and args[5] is recipe
    assert args[6] == 6 and torch.equal(args[1], x) and torch.equal(args[2], y)

    class Ranks:
        enabled, is_main = True, True

    R.train_rmt(model, cls, loader, recipe, ranks=Ranks())
    seen["step"]((x, y), 1)
    assert steps[-1][0] == "dist"

    class Off:
        enabled, is_main = False, True

    R.train_rmt(model, cls, loader, recipe, ranks=Off())
    seen["step"]((x, y), 1)
    assert steps[-1][0] == "one"
