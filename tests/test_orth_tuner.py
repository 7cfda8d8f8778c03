"""OrthCR tuner and recipe on a random-init open_clip model."""

import json

import pytest
import torch

from fastvlm.models import TINY, TINY_RN, load_clip
from fastvlm.train.orth import OrthRecipe, base_to_new, cutout, harmonic_mean, orthcr_loss
from fastvlm.tuners.orth import (OrthConfig, apply_orth, bypass_rotations, load_orth, merge_rotations,
                                 rotated_layers, rotation_parameters, save_orth, unmerge_rotations)


def _model(name=TINY, seed=0):
    torch.manual_seed(seed)
    m, _, _, tok = load_clip(name, None)
    return m, tok


def _data(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("attention", [False, True])
def test_patched_model_equals_original_at_start(backend, attention):
    (ref, tok), (model, _) = _model(), _model()
    apply_orth(model, OrthConfig(block_size=16, attention=attention))
    names = [n for n, _ in rotated_layers(model)]
    assert "visual.transformer.resblocks.0.mlp.c_fc" in names and "transformer.resblocks.1.mlp.c_proj" in names
    assert all("params" in n for n, p in model.named_parameters() if p.requires_grad)
    images, _ = _data()
    text = tok(["a photo of a cat", "a dog"])
    torch.testing.assert_close(model.encode_image(images), ref.encode_image(images), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.encode_text(text), ref.encode_text(text), rtol=1e-4, atol=1e-5)


def test_training_lowers_loss_and_merge_roundtrip(tmp_path):
    model, tok = _model()
    ref, _ = _model()
    apply_orth(model, OrthConfig(block_size=16))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    images, labels = _data()
    tokens = tok([f"a photo of class {i}" for i in range(4)])
    recipe = OrthRecipe()
    opt = torch.optim.Adam(rotation_parameters(model), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(15):
        loss, parts = orthcr_loss(model, images, labels, tokens, recipe, torch.Generator().manual_seed(0))
        first = first or parts
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["ce"] < first["ce"] - 0.05, (first, parts)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    with torch.no_grad():
        tuned = model.encode_image(images)
        assert not torch.allclose(tuned, ref.encode_image(images), atol=1e-4)
        with bypass_rotations(model):  # the zero-shot teacher: no second copy
            torch.testing.assert_close(model.encode_image(images), ref.encode_image(images), rtol=1e-4, atol=1e-5)
        merge_rotations(model)
        w = model.visual.transformer.resblocks[0].mlp.c_fc.base.weight
        assert not torch.equal(w, frozen["visual.transformer.resblocks.0.mlp.c_fc.base.weight"])
        torch.testing.assert_close(model.encode_image(images), tuned, rtol=1e-4, atol=1e-5)
        unmerge_rotations(model)
        torch.testing.assert_close(w, frozen["visual.transformer.resblocks.0.mlp.c_fc.base.weight"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.encode_image(images), tuned, rtol=1e-4, atol=1e-5)
    path = save_orth(model, str(tmp_path / "orth.safetensors"))
    fresh, _ = _model()
    apply_orth(fresh, OrthConfig(block_size=16))
    load_orth(fresh, path)
    torch.testing.assert_close(fresh.encode_image(images), tuned, rtol=1e-5, atol=1e-6)
    other, _ = _model()
    apply_orth(other, OrthConfig(block_size=32))
    with pytest.raises(ValueError, match=r"rotation file .* does not fit the model: .*params: file \(4, 120\), model \(2, 496\)"):
        load_orth(other, path)


def test_bad_configs_are_refused():
    model, _ = _model()
    with pytest.raises(ValueError, match="block_size=48 must divide the input width 64 of visual.transformer.resblocks.0.mlp.c_fc"):
        apply_orth(model, OrthConfig(block_size=48))
    rn, _ = _model(TINY_RN)
    with pytest.raises(ValueError, match="cannot patch an image encoder of type ModifiedResNet"):
        apply_orth(rn)
    apply_orth(rn, OrthConfig(towers=("text",), block_size=16))  # the text tower alone works
    assert rotated_layers(rn)
    with pytest.raises(ValueError, match="towers must name 'visual' and/or 'text'"):
        apply_orth(_model()[0], OrthConfig(towers=("audio",)))


def test_cutout_makes_one_square_hole():
    x = torch.ones(5, 3, 20, 20)
    out = cutout(x, 0.5, torch.Generator().manual_seed(0))
    holes = (out[:, 0] == 0).sum(dim=(1, 2))
    assert (holes <= 100).all() and (holes > 0).all()  # side 10, clipped at the border
    assert torch.equal(out[:, 0] == 0, out[:, 2] == 0)
    assert torch.equal(x, torch.ones(5, 3, 20, 20))  # input untouched
    with pytest.raises(ValueError, match="cutout ratio must be in"):
        cutout(x, 0.0)


def test_base_to_new_split():
    samples = [(f"{c}-{i}", c, f"c{c}") for c in range(5) for i in range(2)]
    (b, bn), (n, nn_) = base_to_new(samples, [f"c{c}" for c in range(5)])
    assert bn == ["c0", "c1", "c2"] and nn_ == ["c3", "c4"]
    assert sorted({y for _, y, _ in n}) == [0, 1] and len(b) == 6
    assert harmonic_mean(80.0, 60.0) == pytest.approx(68.5714, rel=1e-4)


def test_cli_tune_orth_base_to_new(tmp_path, capsys):
    from fastvlm import cli

    from .synthetic import make_image_folder

    make_image_folder(tmp_path / "data", classes=4, per_class=3, split_dirs=True)
    out = tmp_path / "run"
    rc = cli.main(["tune", "orth", "--model", TINY, "--pretrained", "none", "--data", str(tmp_path / "data"),
                   "--shots", "2", "--epochs", "2", "--block-size", "16", "--base-to-new", "--batch-size", "4",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["top1"]) == {"base", "new", "hm"} and len(m["history"]) == 2
    assert m["top1"]["hm"] == pytest.approx(harmonic_mean(m["top1"]["base"], m["top1"]["new"]))
    assert "OrthCR top-1: base" in capsys.readouterr().out


def test_unmerge_restores_the_weight_of_a_series_rotation():
    """The series R of neumann_terms is not orthogonal: unmerging must solve with R, not multiply by it."""
    model, _ = _model()
    apply_orth(model, OrthConfig(block_size=16, neumann_terms=3, towers=("visual",)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in rotation_parameters(model):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    w = model.visual.transformer.resblocks[0].mlp.c_fc.weight
    w0 = w.detach().clone()
    merge_rotations(model)
    assert (w - w0).abs().max() > 1e-2 * w0.abs().max()  # the merge moved W
    unmerge_rotations(model)
    err = ((w - w0).abs().max() / w0.abs().max()).item()
    assert err < 1e-5, f"W restored with relative error {err:.1e}"
