"""Exact tests of the TaskRes recipe (fastvlm/train/taskres.py, docs/methods.md section 1): the paper's
settings, and a training run against a loop written out here from the recipe (seeded permutation batches,
Adam on the residual alone with lr / weight decay, one warm-up epoch at 1e-5 then cosine, the loss from the
head's formula), compared epoch loss by epoch loss and on the final residual; the evaluation's batching."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastvlm.train.taskres import TaskResRecipe, evaluate_head, train_taskres
from fastvlm.tuners.taskres import TaskResConfig, TaskResHead


def data(n=10, k=3, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g), torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def test_recipe_defaults_and_epochs_by_shots():
    r = TaskResRecipe()
    assert (r.lr, r.weight_decay, r.batch_size, r.epochs, r.warmup_epochs, r.warmup_lr) == \
        (2e-3, 5e-4, 256, None, 1, 1e-5)
    assert [r.resolved_epochs(s) for s in (1, 2, 4, 5, 8, 16)] == [100, 100, 100, 200, 200, 200]
    assert TaskResRecipe(epochs=7).resolved_epochs(16) == 7 and TaskResRecipe(epochs=7).resolved_epochs(1) == 7


def by_hand(base, f, y, recipe, epochs, seed, alpha=0.5, scale=20.0):
    """The recipe written out: (per-epoch sample-weighted mean loss, final residual)."""
    residual = torch.zeros_like(base, requires_grad=True)
    opt = torch.optim.Adam([residual], lr=recipe.lr, weight_decay=recipe.weight_decay)
    g = torch.Generator().manual_seed(seed)
    hist = []
    for e in range(epochs):
        if e < recipe.warmup_epochs:
            lr = recipe.warmup_lr
        else:
            lr = 0.5 * recipe.lr * (1 + math.cos(math.pi * (e - recipe.warmup_epochs) / (epochs - recipe.warmup_epochs)))
        for group in opt.param_groups:
            group["lr"] = lr
        perm = torch.randperm(f.shape[0], generator=g)
        total = count = 0.0
        for i in range(0, f.shape[0], recipe.batch_size):
            idx = perm[i:i + recipe.batch_size]
            logits = scale * F.normalize(f[idx], dim=-1) @ F.normalize(base + alpha * residual, dim=-1).T
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
            count += idx.numel()
        hist.append(total / count)
    return hist, residual.detach()


@pytest.mark.parametrize("batch_size,warmup", [(4, 1), (3, 2), (16, 0)])
def test_training_is_the_recipe_written_out(batch_size, warmup):
    base, f, y = data()
    recipe = TaskResRecipe(lr=0.05, weight_decay=0.01, batch_size=batch_size, epochs=4, warmup_epochs=warmup,
                           warmup_lr=0.02)
    head = TaskResHead(base, TaskResConfig(alpha=0.5, logit_scale=20.0))
    hist = train_taskres(head, f, y, recipe, shots=1, seed=3)
    want_hist, want_res = by_hand(base, f, y, recipe, 4, 3)
    assert len(hist) == 4 and hist == pytest.approx(want_hist, rel=1e-5)
    torch.testing.assert_close(head.residual.detach(), want_res, rtol=1e-4, atol=1e-6)
    assert float(want_res.abs().max()) > 1e-3 and hist[0] != hist[-1]  # it trained
    assert len(hist.step_times) == 4 * math.ceil(10 / batch_size)
    assert torch.equal(head.base, base)  # only the residual trains


def test_shots_decide_the_epochs_when_the_recipe_does_not(monkeypatch):
    import fastvlm.train.taskres as TR

    seen = []
    monkeypatch.setattr(TR, "run_epochs", lambda name, **kw: seen.append((name, kw)) or ["ran"])
    base, f, y = data(n=4)
    head = TaskResHead(base)
    for shots in (4, 5):
        assert train_taskres(head, f, y, TaskResRecipe(batch_size=4), shots=shots, ranks="R") == ["ran"]
    assert [kw["epochs"] for _, kw in seen] == [100, 200]
    name, kw = seen[0]
    assert name == "taskres" and kw["scalar"] == "loss" and kw["replicated"] is True and kw["ranks"] == "R"
    assert list(kw["tensors"]) == ["residual"] and kw["tensors"]["residual"] is head.residual
    assert kw["lr_at"](0) == 1e-5 and kw["lr_at"](1) == pytest.approx(2e-3)  # warm-up, then the base lr


def test_features_and_labels_must_pair_up():
    base, f, y = data()
    with pytest.raises(ValueError, match=r"^features \(10\) and labels \(9\) must have one row each$"):
        train_taskres(TaskResHead(base), f, y[:9], TaskResRecipe(epochs=1), 1)
    with pytest.raises(ValueError, match=r"^features \(9\) and labels \(10\) must have one row each$"):
        train_taskres(TaskResHead(base), f[:9], y, TaskResRecipe(epochs=1), 1)


def test_resumed_training_is_the_uninterrupted_one(tmp_path):
    base, f, y = data()
    recipe = TaskResRecipe(lr=0.05, batch_size=4, epochs=3)
    whole = TaskResHead(base)
    want = train_taskres(whole, f, y, recipe, 1, seed=2)

    class Stop(Exception):
        pass

    def stop(epoch):
        if epoch == 0:
            raise Stop

    path = str(tmp_path / "s.pt")
    with pytest.raises(Stop):
        train_taskres(TaskResHead(base), f, y, recipe, 1, seed=2, checkpoint=path, on_epoch_end=stop)
    head = TaskResHead(base)
    got = train_taskres(head, f, y, recipe, 1, seed=2, checkpoint=path)
    assert got == want and torch.equal(head.residual, whole.residual)


def test_evaluate_head_counts_every_batch():
    base = torch.eye(3)
    head = TaskResHead(base)
    f = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]])
    y = torch.tensor([0, 1, 2, 1, 1])  # the 4th is wrong
    assert evaluate_head(head, f, y, batch_size=2) == pytest.approx(80.0)
    assert evaluate_head(head, f, y) == pytest.approx(80.0)
    assert evaluate_head(head, f[:3], y[:3], batch_size=1) == 100.0


def test_evaluate_head_runs_without_autograd_in_chunks_of_1024():
    head = TaskResHead(torch.eye(3))
    calls = []
    real = head.forward

    def spy(f):
        calls.append((f.shape[0], torch.is_grad_enabled()))
        return real(f)

    head.forward = spy
    f = torch.eye(3).repeat(700, 1)[:2050]
    y = torch.arange(3).repeat(700)[:2050]
    assert evaluate_head(head, f, y) == 100.0
    assert calls == [(1024, False), (1024, False), (2, False)]  # no graph kept: inference only
