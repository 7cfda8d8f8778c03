"""PVP: VPT, LoRA and adapter tuners, module packs, and the upstream -> downstream pipeline."""

import json

import pytest
import torch

from fastvlm import cli
from fastvlm.models import TINY, load_clip
from fastvlm.tuners.adapter import AdapterConfig
from fastvlm.tuners.lora import LoRAConfig, merge_lora, unmerge_lora
from fastvlm.tuners.pack import apply_method, load_pack, method_parameters, read_pack, save_pack
from fastvlm.tuners.vpt import VPTConfig

from .synthetic import make_image_folder


def _model(seed=0):
    torch.manual_seed(seed)
    return load_clip(TINY, None)[0]


def _images(n=4, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _perturb(params, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method,cfg", [
    ("lora", LoRAConfig(targets=("attn_in", "attn_out", "mlp_fc", "mlp_proj"))),
    ("adapter", AdapterConfig()),
])
def test_lora_and_adapter_start_as_identity(method, cfg):
    ref, model = _model(), _model()
    names = apply_method(model, method, cfg)
    x = _images()
    torch.testing.assert_close(model.encode_image(x), ref.encode_image(x), rtol=1e-5, atol=1e-6)
    assert names and all(p.requires_grad == (n in names) for n, p in model.named_parameters())
    _perturb(method_parameters(model, method))
    assert not torch.allclose(model.encode_image(x), ref.encode_image(x), atol=1e-4)


def test_vpt_prompts_are_seeded_and_change_the_output():
    ref = _model()
    a, b, c = _model(), _model(), _model()
    apply_method(a, "vpt", VPTConfig(tokens=3, seed=5))
    apply_method(b, "vpt", VPTConfig(tokens=3, seed=5))
    apply_method(c, "vpt", VPTConfig(tokens=3, deep=False, seed=6))
    pa = a.visual.transformer.prompts
    assert pa.shape == (2, 3, 64) and torch.equal(pa, b.visual.transformer.prompts)
    v = (6.0 / (3 * 8 * 8 + 64)) ** 0.5  # VPT's uniform init bound for patch 8, width 64
    assert pa.abs().max() <= v and pa.abs().max() > 0.5 * v
    assert c.visual.transformer.prompts.shape == (1, 3, 64)
    x = _images()
    out = a.encode_image(x)
    assert out.shape == ref.encode_image(x).shape
    assert not torch.allclose(out, ref.encode_image(x), atol=1e-4)
    # deep prompts are replaced block to block: every block's prompts get a gradient
    out.sum().backward()
    assert (pa.grad.abs().sum(dim=(1, 2)) > 0).all()


def test_lora_merge_unmerge_and_no_merged_weight_while_training():
    model = _model()
    apply_method(model, "lora", LoRAConfig(targets=("attn_in", "mlp_fc")))
    _perturb(method_parameters(model, "lora"))
    x = _images()
    want = model.encode_image(x)
    blk = model.visual.transformer.resblocks[0]
    w0 = blk.attn.mha.in_proj_weight.detach().clone()
    assert torch.equal(blk.attn.mha.in_proj_weight, w0)  # training keeps W untouched (low-rank path beside)
    merge_lora(model)
    assert not torch.equal(blk.attn.mha.in_proj_weight, w0)
    torch.testing.assert_close(model.encode_image(x), want, rtol=1e-4, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(blk.attn.mha.in_proj_weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.encode_image(x), want, rtol=1e-5, atol=1e-6)


def test_tuners_compose_and_only_their_parameters_train():
    from fastvlm.tuners.mask import apply_masks, score_parameters
    from fastvlm.tuners.taskres import TaskResHead

    model = _model()
    apply_masks(model)
    apply_method(model, "vpt", VPTConfig(tokens=2))  # masks + prompts
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if "scores" in n or "prompts" in n}
    x = _images()
    model.encode_image(x).sum().backward()
    assert all(s.grad is not None for s in score_parameters(model))
    # pre-trained LoRA + a TaskRes head on its features
    m2 = _model()
    apply_method(m2, "lora")
    head = TaskResHead(torch.randn(3, 32))
    loss = head.loss(m2.encode_image(x), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert head.residual.grad is not None and all(p.grad is not None for p in method_parameters(m2, "lora"))


def test_pack_round_trip_and_refusals(tmp_path):
    model = _model()
    apply_method(model, "lora", LoRAConfig(rank=4))
    _perturb(method_parameters(model, "lora"))
    x = _images()
    want = model.encode_image(x)
    folder = save_pack(str(tmp_path / "pack"), model, "lora", TINY)
    meta = json.loads((tmp_path / "pack" / "pack.json").read_text())
    assert meta["method"] == "lora" and meta["backbone"] == TINY and meta["tuners"]["lora"]["config"]["rank"] == 4
    assert meta["parameters"] == sum(p.numel() for p in method_parameters(model, "lora"))
    fresh = _model(seed=9)  # other random init: only the pack's tensors must carry over
    fresh.load_state_dict(_model().state_dict())
    apply_method(fresh, "lora", LoRAConfig(rank=4))
    load_pack(fresh, folder, backbone=TINY)
    torch.testing.assert_close(fresh.encode_image(x), want, rtol=0, atol=0)

    other = _model()
    apply_method(other, "lora", LoRAConfig(rank=2))
    with pytest.raises(ValueError, match=r"pack .* does not fit the model: .*attn.in_proj.lora.A: file \(4, 64\), model \(2, 64\)"):
        load_pack(other, folder)
    with pytest.raises(ValueError, match="backbone: pack 'fastvlm-tiny-vit', model 'ViT-B-16'"):
        load_pack(fresh, folder, backbone="ViT-B-16")
    vpt = _model()
    apply_method(vpt, "vpt")
    with pytest.raises(ValueError, match=r"kind: the file holds 'lora' tuners, the model has \['vpt'\] attached"):
        load_pack(vpt, folder)
    fewer = _model()
    apply_method(fewer, "lora", LoRAConfig(rank=4, targets=("attn_in",)))
    with pytest.raises(ValueError, match="not in model: "):
        load_pack(fewer, folder)


@pytest.mark.parametrize("method", ["lora", "vpt", "adapter"])
def test_stage1_then_stage2_starts_from_stage1(tmp_path, capsys, method):
    make_image_folder(tmp_path / "up", classes=3, per_class=4, split_dirs=True, seed=1)
    make_image_folder(tmp_path / "down", classes=2, per_class=3, split_dirs=True, seed=2)
    common = ["--model", TINY, "--pretrained", "none", "--no-progress", "--batch-size", "6"]
    up = tmp_path / "stage1"
    assert cli.main(["tune", method, "--data", str(tmp_path / "up"), "--shots", "0", "--epochs", "3", "--lr", "1e-2",
                     "--head", "linear", "--out", str(up), *common]) == 0
    stage1, meta1 = read_pack(str(up / "pack"))
    assert meta1["method"] == method and json.loads((up / "metrics.json").read_text())["history"]
    # stage 2 with no epochs: its pack must be exactly stage 1's modules (it started from them)
    down = tmp_path / "stage2"
    assert cli.main(["tune", method, "--data", str(tmp_path / "down"), "--shots", "1", "--epochs", "0",
                     "--init-from", str(up / "pack"), "--out", str(down), *common]) == 0
    stage2, _ = read_pack(str(down / "pack"))
    assert stage1.keys() == stage2.keys() and all(torch.equal(stage1[k], stage2[k]) for k in stage1)
    scratch = tmp_path / "scratch"
    assert cli.main(["tune", method, "--data", str(tmp_path / "down"), "--shots", "1", "--epochs", "0",
                     "--out", str(scratch), *common]) == 0
    fresh, _ = read_pack(str(scratch / "pack"))
    assert any(not torch.equal(stage1[k], fresh[k]) for k in stage1)
    assert "from " + str(up / "pack") in capsys.readouterr().out
    assert cli.main(["pack", str(up / "pack")]) == 0


def test_frozen_weights_unchanged_by_training(tmp_path):
    from fastvlm.train.pvp import PVPRecipe, ZeroShotHead, train_modules

    model = _model()
    apply_method(model, "adapter")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = [(_images(4, s), torch.tensor([0, 1, 0, 1])) for s in range(3)]
    hist = train_modules(model, method_parameters(model, "adapter"), ZeroShotHead(torch.randn(2, 32)), data,
                         PVPRecipe(epochs=8, lr=1e-2))
    assert hist[-1] < hist[0]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
