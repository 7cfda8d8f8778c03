"""torch.compile: the ops are torch custom ops with fake implementations; models using them compile with
fullgraph=True (no graph breaks) on CPU with the torch backend and give the eager results and gradients."""

import pytest
import torch

import fastvlm
import fastvlm.functional as FV
from fastvlm.ops.orth import n_params


@pytest.fixture(autouse=True)
def torch_backend():
    torch._dynamo.reset()
    with fastvlm.backend("torch"):
        yield


def _check(fn, inputs):
    eager = fn(*inputs)
    g_eager = torch.autograd.grad(eager.sum(), [t for t in inputs if t.requires_grad])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(*inputs)
    g_got = torch.autograd.grad(got.sum(), [t for t in inputs if t.requires_grad])
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_got, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_residual_ops_compile_without_graph_breaks():
    g = torch.Generator().manual_seed(0)
    f, t = torch.randn(6, 16, generator=g).requires_grad_(), torch.randn(5, 16, generator=g)
    x = torch.zeros(5, 16).requires_grad_()
    y = torch.tensor([0, 1, 2, 3, 4, -100])
    _check(lambda f, x: FV.residual_logits(f, t, x) * 2.0, [f, x])
    for red in ("mean", "sum", "none"):
        _check(lambda f, x: FV.residual_cross_entropy(f, t, x, y, reduction=red), [f, x])


def test_masked_and_orth_ops_compile_without_graph_breaks():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 32, generator=g).requires_grad_()
    w = torch.randn(12, 32, generator=g)
    s = (0.01 * torch.rand(12, 32, generator=g)).requires_grad_()
    b = torch.randn(12, generator=g).requires_grad_()
    ref = torch.randn(12, 32, generator=g)
    _check(lambda x, s, b: FV.masked_linear(x, w, s, b).relu(), [x, s, b])
    _check(lambda x, s, b: FV.masked_linear(x, w, s, b, ref_grad=ref, drop_ratio=0.5, seed=3), [x, s, b])
    p = (0.1 * torch.randn(2, n_params(16), generator=g)).requires_grad_()
    _check(lambda x, p: FV.orthogonal_linear(x, w, p, None, 16), [x, p])


def test_patched_model_compiles():
    """A whole open_clip ViT with masks compiles (fullgraph) and matches eager."""
    from fastvlm.models import TINY, load_clip
    from fastvlm.tuners.mask import apply_masks

    torch.manual_seed(0)
    model, *_ = load_clip(TINY, None)
    apply_masks(model)
    images = torch.randn(2, 3, 32, 32)
    eager = model.encode_image(images)
    compiled = torch.compile(model.encode_image, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(images), eager, rtol=1e-5, atol=1e-5)


def test_compiled_layers_never_skip_gradient_dropout_silently():
    import torch.nn.functional as F

    from fastvlm.models import TINY, load_clip
    from fastvlm.train.rmt import RMTRecipe, rmt_step
    from fastvlm.tuners.mask import apply_masks, score_parameters

    torch.manual_seed(0)
    model, *_ = load_clip(TINY, None)
    apply_masks(model)
    model.visual = torch.compile(model.visual, backend="aot_eager")
    opt = torch.optim.Adam(score_parameters(model), lr=1e-3)
    cls = F.normalize(torch.randn(3, 32), dim=-1)
    with pytest.raises(RuntimeError, match="gradient dropout was not applied in"):
        rmt_step(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), cls, opt, RMTRecipe(drop_ratio=0.5), 0)


def test_compiled_ops_take_the_eager_paths_and_only_the_gradients_asked_for(monkeypatch):
    """Under torch.compile the custom ops run the same forward/backward functions as eager: the TaskRes base
    (frozen) gets no gradient, the one-chunk cross-entropy keeps its softmax, and the weight side of a
    training rotation takes dR from dx."""
    import fastvlm.ops.orth as O
    import fastvlm.ops.residual as R

    seen = []

    def spy(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen.append((name, args, kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    spy(R, "residual_backward")
    spy(R, "residual_ce_forward")
    spy(O, "orthogonal_linear_backward")
    g = torch.Generator().manual_seed(2)
    f, t = torch.randn(6, 16, generator=g), torch.randn(5, 16, generator=g)
    x = torch.zeros(5, 16).requires_grad_()
    y = torch.tensor([0, 1, 2, 3, 4, 1])
    loss = torch.compile(lambda x: FV.residual_cross_entropy(f, t, x, y), fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    forward = [a for n, a, _ in seen if n == "residual_ce_forward"]
    backward = [a for n, a, _ in seen if n == "residual_backward"]
    assert forward and forward[-1][-1] is True  # keep_softmax
    assert backward and tuple(backward[-1][7]) == (False, False, True, False)  # only the residual's gradient
    seen.clear()
    xs = torch.randn(40, 32, generator=g)
    w = torch.randn(4, 32, generator=g)
    p = (0.1 * torch.randn(2, n_params(16), generator=g)).requires_grad_()
    torch.compile(lambda p: FV.orthogonal_linear(xs, w, p, None, 16), fullgraph=True,
                  backend="aot_eager")(p).sum().backward()
    (args,) = [a for n, a, _ in seen if n == "orthogonal_linear_backward"]
    dy2, x2, r, weight, side, orthogonal, needs = args
    assert side == "weight" and orthogonal and tuple(needs) == (False, True, False, False)
