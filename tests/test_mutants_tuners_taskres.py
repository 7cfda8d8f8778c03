"""Exact tests of the TaskRes head (fastvlm/tuners/taskres.py, docs/methods.md section 1) against its formula
written out here, ``logits = s * norm(f) @ norm(base + alpha * residual).T``, at a non-trivial residual (zero
at init, where the head is the zero-shot classifier: moved first): logits, loss and its exact gradient,
bypass, the config checks, attaching to a model, the file round trip, and the base classifier built from
prompt templates (with a fake tokenizer and text encoder whose features are written out by hand)."""

import pytest
import torch
import torch.nn.functional as F

from fastvlm.tuners.common import read_tuners, tuner_layers, tuners_of
from fastvlm.tuners.taskres import (TaskResConfig, TaskResHead, apply_taskres, build_base_classifier,
                                    taskres_config_of)

from .test_tuner_pairs import tiny_model


def formula(f, base, residual, alpha, scale):
    return scale * F.normalize(f, dim=-1) @ F.normalize(base + alpha * residual, dim=-1).T


def moved_head(alpha=0.5, scale=100.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 6, generator=g)
    head = TaskResHead(base, TaskResConfig(alpha=alpha, logit_scale=scale))
    with torch.no_grad():
        head.residual.copy_(torch.randn(4, 6, generator=g))
    f = torch.randn(5, 6, generator=g)
    y = torch.tensor([0, 3, 1, 1, 2])
    return head, base, f, y


def test_config_defaults_are_the_papers():
    assert (TaskResConfig().alpha, TaskResConfig().logit_scale) == (0.5, 100.0)


def test_head_starts_as_the_zero_shot_classifier_and_owns_a_copy_of_the_base():
    base = torch.randn(3, 4)
    head = TaskResHead(base)
    assert head.config == TaskResConfig() and not head.bypass
    assert torch.equal(head.base, base) and head.base.data_ptr() != base.data_ptr()
    base.add_(1.0)  # the caller's tensor changing later does not move the head
    assert not torch.equal(head.base, base)
    assert "base" in dict(head.named_buffers()) and [n for n, _ in head.named_parameters()] == ["residual"]
    assert torch.equal(head.residual.detach(), torch.zeros(3, 4)) and head.residual.requires_grad
    assert head.kind == "taskres" and head.wraps == ""
    assert [id(p) for p in head.tuner_parameters()] == [id(head.residual)]
    f = torch.randn(2, 4)
    torch.testing.assert_close(head(f), formula(f, head.base, 0 * head.base, 0.0, 100.0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(4,), (0, 4), (2, 3, 4)])
def test_head_refuses_a_base_that_is_not_k_by_d(shape):
    with pytest.raises(ValueError, match=r"^base must be a K x D classifier with K >= 1, got shape \("):
        TaskResHead(torch.zeros(shape))
    TaskResHead(torch.zeros(1, 4))  # one class is fine


@pytest.mark.parametrize("alpha,scale", [(0.5, 100.0), (1.0, 20.0), (0.25, 1.0)])
def test_logits_loss_and_gradient_at_a_moved_residual(alpha, scale):
    head, base, f, y = moved_head(alpha, scale)
    want = formula(f, base, head.residual.detach(), alpha, scale)
    torch.testing.assert_close(head(f), want, rtol=1e-5, atol=1e-5 * scale)
    res = head.residual.detach().clone().requires_grad_()
    ref_loss = F.cross_entropy(formula(f, base, res, alpha, scale), y)
    ref_loss.backward()
    loss = head.loss(f, y)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.residual.grad, res.grad, rtol=1e-4, atol=1e-6)
    assert float(res.grad.abs().max()) > 1e-4  # the gradient is not trivially zero
    per_row = head.loss(f, y, reduction="none")
    torch.testing.assert_close(per_row, F.cross_entropy(want, y, reduction="none"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.loss(f, y, "sum"), per_row.sum(), rtol=1e-5, atol=1e-5)


def test_bypass_is_alpha_zero():
    head, base, f, y = moved_head(alpha=1.0, scale=10.0)
    head.bypass = True
    zs = formula(f, base, torch.zeros_like(base), 0.0, 10.0)
    torch.testing.assert_close(head(f), zs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.loss(f, y), F.cross_entropy(zs, y), rtol=1e-5, atol=1e-6)
    head.bypass = False
    assert not torch.allclose(head(f), zs, atol=1e-2)


def test_head_cannot_merge_and_says_why():
    head, *_ = moved_head()
    with pytest.raises(NotImplementedError, match="^taskres layers cannot be merged: the head is one matmul"):
        head.merge()


def test_save_and_load_residual_round_trip(tmp_path):
    head, base, f, _ = moved_head(alpha=0.75, scale=30.0)
    path = head.save(str(tmp_path / "h.safetensors"), note="x")
    tensors, meta = read_tuners(path)
    assert set(tensors) == {"residual"} and meta["note"] == "x"  # the base is not stored
    assert meta["tuners"]["taskres"]["config"] == {"alpha": 0.75, "logit_scale": 30.0}
    assert taskres_config_of(meta) == TaskResConfig(0.75, 30.0)
    other = TaskResHead(base)
    got = other.load_residual(path)
    assert got["note"] == "x" and other.config == TaskResConfig(0.75, 30.0)
    assert torch.equal(other.residual.detach(), head.residual.detach())
    torch.testing.assert_close(other(f), head(f))


def test_config_of_a_file_without_taskres_is_refused():
    with pytest.raises(ValueError, match=r"^the file holds \['masks'\] tuners, not 'taskres'$"):
        taskres_config_of({"tuners": {"masks": {}}})
    with pytest.raises(ValueError, match="^the file holds no tuners, not 'taskres'$"):
        taskres_config_of({})


def test_apply_taskres_attaches_a_registered_head():
    model = tiny_model()
    base = torch.randn(3, 16)
    cfg = TaskResConfig(alpha=0.2)
    head = apply_taskres(model, base, cfg)
    assert model.taskres is head and head.config is cfg and tuners_of(model).config("taskres") is cfg
    assert head.__dict__["_registry"] is tuners_of(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["taskres.residual"]
    assert [n for n, _ in tuner_layers(model, "taskres")] == ["taskres"]
    assert torch.equal(head.base, base)
    h2 = apply_taskres(tiny_model(), base)
    assert h2.config == TaskResConfig()


def test_loading_into_a_standalone_head_has_no_registry_to_update(tmp_path):
    head, base, *_ = moved_head(alpha=0.3)
    path = head.save(str(tmp_path / "h"))
    other = TaskResHead(base)
    assert "_registry" not in other.__dict__
    other.load_residual(path)
    assert other.config.alpha == 0.3


class FakeText(torch.nn.Module):
    """encode_text: the feature of prompt id i is [len(prompt), number of 'a's, i] of the tokenizer's list."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok

    def encode_text(self, tokens):
        self.batches = getattr(self, "batches", []) + [tokens.shape[0]]
        self.modes = getattr(self, "modes", []) + [self.training]
        rows = [[len(self.tok.seen[i]), self.tok.seen[i].count("a"), float(i)] for i in tokens[:, 0].tolist()]
        return torch.tensor(rows, dtype=torch.float64)


class FakeTokenizer:
    def __init__(self):
        self.seen = []

    def __call__(self, prompts):
        start = len(self.seen)
        self.seen.extend(prompts)
        return torch.arange(start, start + len(prompts)).unsqueeze(1)


def test_build_base_classifier_averages_each_classes_templates():
    tok = FakeTokenizer()
    model = FakeText(tok)
    model.train()
    base = build_base_classifier(model, tok, ["big_cat", "ox"], ["a {}.", "the {} here", "{}"], batch_size=2)
    assert tok.seen == ["a big cat.", "the big cat here", "big cat", "a ox.", "the ox here", "ox"]
    assert model.batches == [2, 1, 2, 1] and model.modes == [False] * 4 and model.training
    assert base.dtype == torch.float32 and base.shape == (2, 3)
    want = torch.tensor([[(10 + 16 + 7) / 3, (2 + 1 + 1) / 3, 1.0], [(5 + 11 + 2) / 3, (1 + 0 + 0) / 3, 4.0]])
    torch.testing.assert_close(base, want)
    model.eval()
    build_base_classifier(model, FakeTokenizer(), ["x"], ["a {}"])
    assert not model.training


def test_build_base_classifier_templates_by_name_or_default():
    tok = FakeTokenizer()
    model = FakeText(tok)
    build_base_classifier(model, tok, ["dog"])
    assert tok.seen == ["a photo of a dog."]
    tok2 = FakeTokenizer()
    model2 = FakeText(tok2)
    base = build_base_classifier(model2, tok2, ["dog"], "ImageNet")
    assert len(tok2.seen) == 8 and all("dog" in p for p in tok2.seen)  # the 8-template ensemble
    assert base.shape == (1, 3)


def test_build_base_classifier_refusals():
    tok = FakeTokenizer()
    with pytest.raises(ValueError, match="^classnames must not be empty$"):
        build_base_classifier(FakeText(tok), tok, [])
    for bad in ("a photo", "{} and {}"):
        with pytest.raises(ValueError, match=r"^each template must contain one '\{\}', got "):
            build_base_classifier(FakeText(tok), tok, ["x"], ["fine {}", bad])
    assert tok.seen == []  # checked before any prompt is encoded


def test_build_base_classifier_restores_the_mode_when_the_encoder_raises():
    class Broken(FakeText):
        def encode_text(self, tokens):
            raise RuntimeError("boom")

    tok = FakeTokenizer()
    model = Broken(tok)
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        build_base_classifier(model, tok, ["x"])
    assert model.training
