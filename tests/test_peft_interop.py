"""peft interop (fastvlm/peft_interop.py, docs/interop.md): fastvlm LoRA and rotation layers exported to peft
adapter folders that ``PeftModel.from_pretrained`` loads with the same outputs, peft LoRA / OFT adapters
imported into fastvlm layers with the same outputs, round trips bit for bit, and refusals naming the setting.

All on a random-init tiny transformers CLIPModel (tests/hf_tiny.py), fp32, eval mode. Tolerance: the two
sides compute the same math in different orders (peft's ``lora_B(lora_A(x)) * s`` against fastvlm's fused
path; ``linalg.solve`` against fastvlm's Cayley kernel), so they differ by fp32 rounding only: measured at most
2.2e-6 on features up to 3.5 in magnitude (about 9 ulps at that size, after two blocks of width 64-128 with
layer norms). ``ATOL = 2e-5`` is about 10x that, while every adapter here moves some feature by more than 1
(asserted > 0.1 in each case, so a sign error or a missing layer cannot pass).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from .hf_tiny import ATTENTION, MLP, attach_layers, features, tiny_clip

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from fastvlm.peft_interop import check_importable, export_peft, import_peft  # noqa: E402
from fastvlm.tuners.common import tuner_layers  # noqa: E402
from fastvlm.tuners.lora import LoRAConfig, LoRALinear  # noqa: E402
from fastvlm.tuners.orth import OrthConfig, OrthLinear  # noqa: E402

ATOL = 2e-5
TARGETS = ATTENTION + MLP  # every q/k/v/out_proj and fc1/fc2 of both towers: 24 modules
EFFECT = 0.1  # the adapter must move some feature by more than this, or the comparison proves nothing


def _inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 49000, (3, 16), generator=g)
    tokens[:, 0] = 49406  # <|startoftext|>
    for i, end in enumerate((5, 9, 15)):
        tokens[i, end] = 49407  # <|endoftext|>: CLIP pools the text at its first occurrence
    return images, tokens


def assert_same_features(got, want, base):
    for g, w, b in zip(got, want, base):
        assert (w - b).abs().max() > EFFECT, "the adapter has no visible effect: the test would prove nothing"
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


def _fastvlm_lora(seed=0, rank=4, alpha=8.0, per_module=None):
    """LoRA (rank, alpha) on every target; ``per_module``: {module name: LoRAConfig} for exceptions."""
    model = tiny_clip(seed)
    g = torch.Generator().manual_seed(3)
    special = {id(model.get_submodule(n)): c for n, c in (per_module or {}).items()}
    names = attach_layers(model, "lora", TARGETS,
                          lambda m: LoRALinear(m, special.get(id(m), LoRAConfig(rank=rank, alpha=alpha)), g))
    with torch.no_grad():
        for _, layer in tuner_layers(model, "lora"):
            layer.lora.B.normal_(std=0.2, generator=g)  # trained-looking: B = 0 would hide every error
    return model, names


def _fastvlm_orth(neumann_terms=None, block_size=16, seed=0):
    model = tiny_clip(seed)
    cfg = OrthConfig(block_size=block_size, neumann_terms=neumann_terms)
    names = attach_layers(model, "orth", TARGETS, lambda m: OrthLinear(m, cfg))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, layer in tuner_layers(model, "orth"):
            layer.params.normal_(std=0.1, generator=g)
    return model, names


def _peft_model(config, seed=0):
    torch.manual_seed(7)  # peft's own random init (init_lora_weights / init_weights=False)
    return peft.get_peft_model(tiny_clip(seed), config).eval()


# ---------------------------------------------------------------------------------------------------------
# the sign convention, against peft's own Cayley map (fp64)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 4, 5, 7])
def test_peft_cayley_branches_are_fastvlm_transforms(n):
    """docs/methods.md §3: peft's exact branch at p is fastvlm's exact cayley at -p; peft's series with n
    terms is fastvlm's neumann_terms = n - 2 (2 for n = 3) at +p. fp64, so the bound is rounding (1e-12)."""
    from peft.tuners.oft.layer import OFTRotationModule

    from fastvlm.functional import cayley
    from fastvlm.peft_interop import fastvlm_terms

    b = 8
    p = 0.3 * torch.randn(5, b * (b - 1) // 2, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    rot = OFTRotationModule(5, p.shape[1], b, 5 * b).double()
    exact = rot._cayley_batch(p, b, use_cayley_neumann=False)
    series = rot._cayley_batch(p, b, use_cayley_neumann=True, num_neumann_terms=n)
    torch.testing.assert_close(exact, cayley(-p, b), atol=1e-12, rtol=0)
    torch.testing.assert_close(series, cayley(p, b, neumann_terms=fastvlm_terms(True, n)), atol=1e-12, rtol=0)
    assert (exact - cayley(p, b)).abs().max() > 0.1  # the sign matters at this size of Q


# ---------------------------------------------------------------------------------------------------------
# export: fastvlm -> peft
# ---------------------------------------------------------------------------------------------------------


def test_lora_export_loads_in_peft_with_the_same_outputs(tmp_path):
    model, names = _fastvlm_lora()
    assert len(names) == 24
    images, tokens = _inputs()
    folder = export_peft(model, str(tmp_path / "lora"))
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == ("LORA", 4, 8.0,
                                                                                              sorted(names))
    loaded = peft.PeftModel.from_pretrained(tiny_clip(), folder).eval()
    assert_same_features(features(loaded, images, tokens), features(model, images, tokens),
                         features(tiny_clip(), images, tokens))


@pytest.mark.parametrize("neumann_terms", [None, 2, 3])
def test_rotation_export_loads_in_peft_with_the_same_outputs(tmp_path, neumann_terms):
    model, names = _fastvlm_orth(neumann_terms)
    images, tokens = _inputs()
    folder = export_peft(model, str(tmp_path / "oft"))
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert (cfg["peft_type"], cfg["oft_block_size"], cfg["r"], cfg["use_cayley_neumann"]) == \
        ("OFT", 16, 0, neumann_terms is not None)
    if neumann_terms is not None:
        assert cfg["num_cayley_neumann_terms"] == neumann_terms + 2
    loaded = peft.PeftModel.from_pretrained(tiny_clip(), folder).eval()
    assert_same_features(features(loaded, images, tokens), features(model, images, tokens),
                         features(tiny_clip(), images, tokens))


def test_lora_export_with_per_layer_ranks_uses_peft_patterns(tmp_path):
    """Layers of two (rank, alpha) pairs: the common one is the config's, the other goes to rank_pattern and
    alpha_pattern under the module's own name, and peft builds each layer with its own rank and scale."""
    odd = "vision_model.encoder.layers.1.mlp.fc1"
    model, _ = _fastvlm_lora(per_module={odd: LoRAConfig(rank=2, alpha=6.0)})
    images, tokens = _inputs()
    folder = export_peft(model, str(tmp_path / "lora"))
    cfg = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8.0)
    escaped = odd.replace(".", "\\.")
    assert cfg["rank_pattern"] == {escaped: 2} and cfg["alpha_pattern"] == {escaped: 6.0}
    loaded = peft.PeftModel.from_pretrained(tiny_clip(), folder).eval()
    layer = loaded.get_submodule("base_model.model." + odd)
    assert layer.r["default"] == 2 and layer.scaling["default"] == 3.0
    assert_same_features(features(loaded, images, tokens), features(model, images, tokens),
                         features(tiny_clip(), images, tokens))


# ---------------------------------------------------------------------------------------------------------
# import: peft -> fastvlm
# ---------------------------------------------------------------------------------------------------------

LORA_CONFIGS = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),  # scale alpha / sqrt(r) = 4, not alpha / r = 2
    # lora_dropout acts in training only: the eval outputs match without it
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"fc2": 2}, alpha_pattern={"q_proj": 3}, lora_dropout=0.1),
}


@pytest.mark.parametrize("case", sorted(LORA_CONFIGS))
def test_lora_import_gives_peft_outputs(tmp_path, case):
    config = peft.LoraConfig(target_modules=list(TARGETS), init_lora_weights=False, **LORA_CONFIGS[case])
    source = _peft_model(config)
    source.save_pretrained(str(tmp_path / "adapter"))
    images, tokens = _inputs()
    want, base = features(source, images, tokens), features(tiny_clip(), images, tokens)
    from_folder, from_object = tiny_clip(), tiny_clip()
    names = import_peft(from_folder, str(tmp_path / "adapter"))
    assert len(names) == 24 and names == import_peft(from_object, source)
    assert_same_features(features(from_folder, images, tokens), want, base)
    assert_same_features(features(from_object, images, tokens), want, base)
    layers = dict(tuner_layers(from_folder, "lora"))
    fc2 = layers["text_model.encoder.layers.0.mlp.fc2"].lora
    q = layers["vision_model.encoder.layers.1.self_attn.q_proj"].lora
    want_scales = {"plain": (2.0, 2.0), "rslora": (4.0, 4.0), "patterns": (4.0, 0.75)}[case]  # fc2, q_proj
    assert (fc2.scale, q.scale) == want_scales
    assert fc2.A.shape[0] == (2 if case == "patterns" else 4)
    trainable = {n for n, p in from_folder.named_parameters() if p.requires_grad}
    assert len(trainable) == 48 and all(n.endswith((".lora.A", ".lora.B")) for n in trainable)


@pytest.mark.parametrize("case", ["exact", "series5", "series3", "shared"])
def test_oft_import_gives_peft_outputs(tmp_path, case):
    kw = {"exact": dict(use_cayley_neumann=False, module_dropout=0.1), "series5": dict(use_cayley_neumann=True),
          "series3": dict(use_cayley_neumann=True, num_cayley_neumann_terms=3),
          "shared": dict(use_cayley_neumann=False, block_share=True)}[case]
    source = _peft_model(peft.OFTConfig(oft_block_size=16, target_modules=list(TARGETS), init_weights=False, **kw))
    source.save_pretrained(str(tmp_path / "adapter"))
    images, tokens = _inputs()
    model = tiny_clip()
    import_peft(model, str(tmp_path / "adapter"))
    assert_same_features(features(model, images, tokens), features(source, images, tokens),
                         features(tiny_clip(), images, tokens))
    layer = dict(tuner_layers(model, "orth"))["vision_model.encoder.layers.0.mlp.fc2"]
    assert (layer.block_size, layer.neumann_terms) == (16, {"exact": None, "series5": 3, "series3": 2,
                                                            "shared": None}[case])
    assert layer.params.shape == (128 // 16, 120)


def test_import_picks_the_named_adapter(tmp_path):
    """A PeftModel with two adapters: adapter_name picks one, from the object and from the folder (where peft
    saves an adapter other than "default" in its own subfolder)."""
    source = _peft_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"], init_lora_weights=False))
    source.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"],
                                                init_lora_weights=False))
    source.save_pretrained(str(tmp_path / "a"))
    source.set_adapter("other")
    images, tokens = _inputs()
    want, base = features(source, images, tokens), features(tiny_clip(), images, tokens)
    for src in (source, str(tmp_path / "a")):
        model = tiny_clip()
        names = import_peft(model, src, adapter_name="other")
        assert all(n.endswith("q_proj") for n in names) and len(names) == 4
        assert_same_features(features(model, images, tokens), want, base)
    with pytest.raises(ValueError, match="adapter_name 'third' is not in the PeftModel"):
        import_peft(tiny_clip(), source, adapter_name="third")


def test_import_into_layers_the_model_already_carries(tmp_path):
    """fastvlm layers already on the adapter's modules (however they were attached) are filled in place."""
    exported, _ = _fastvlm_lora()
    export_peft(exported, str(tmp_path / "a"))
    model, _ = _fastvlm_lora(rank=4, alpha=8.0)
    before = {n: p for n, p in model.named_parameters()}
    import_peft(model, str(tmp_path / "a"))
    assert {n: p for n, p in model.named_parameters()} == before  # same parameter objects, no new layers
    for (n, a), (m, b) in zip(tuner_layers(exported, "lora"), tuner_layers(model, "lora")):
        assert n == m and torch.equal(a.lora.A, b.lora.A) and torch.equal(a.lora.B, b.lora.B)


def test_imported_layers_bypass_and_merge_like_any_tuner(tmp_path):
    """Layers attached by import_peft are registered tuners: bypass gives the base model, merge gives the
    adapter's outputs from plain linear layers, and the tuner file round-trips them."""
    from fastvlm.tuners.common import bypass, load_tuners, merge, save_tuners

    source = _peft_model(peft.OFTConfig(oft_block_size=16, target_modules=list(MLP), init_weights=False,
                                        use_cayley_neumann=False))
    source.save_pretrained(str(tmp_path / "adapter"))
    images, tokens = _inputs()
    want, base = features(source, images, tokens), features(tiny_clip(), images, tokens)
    model = tiny_clip()
    import_peft(model, str(tmp_path / "adapter"))
    save_tuners(model, str(tmp_path / "orth.safetensors"))
    with bypass(model):
        for f, b in zip(features(model, images, tokens), base):
            assert torch.equal(f, b)
    merge(model, "orth")
    assert_same_features(features(model, images, tokens), want, base)
    again = tiny_clip()
    attach_layers(again, "orth", MLP, lambda m: OrthLinear(m, OrthConfig(block_size=16)))
    load_tuners(again, str(tmp_path / "orth.safetensors"))
    assert_same_features(features(again, images, tokens), want, base)


# ---------------------------------------------------------------------------------------------------------
# round trips: fastvlm -> peft -> fastvlm, bit for bit
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,neumann_terms", [("lora", None), ("orth", None), ("orth", 3)])
def test_round_trip_is_exact(tmp_path, kind, neumann_terms):
    model, _ = _fastvlm_lora() if kind == "lora" else _fastvlm_orth(neumann_terms)
    export_peft(model, str(tmp_path / "a"))
    back = tiny_clip()
    import_peft(back, str(tmp_path / "a"))
    a, b = tuner_layers(model, kind), tuner_layers(back, kind)
    assert [n for n, _ in a] == [n for n, _ in b]
    for (_, x), (_, y) in zip(a, b):
        if kind == "lora":
            assert torch.equal(x.lora.A, y.lora.A) and torch.equal(x.lora.B, y.lora.B)
            assert x.lora.scale == y.lora.scale
        else:
            assert torch.equal(x.params, y.params)
            assert (x.block_size, x.neumann_terms) == (y.block_size, y.neumann_terms)
    images, tokens = _inputs()
    for f, g in zip(features(model, images, tokens), features(back, images, tokens)):
        assert torch.equal(f, g)


# ---------------------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,needle", [
    (dict(type="LoraConfig", use_dora=True), "use_dora=True"),
    (dict(type="LoraConfig", lora_bias=True), "lora_bias=True"),
    (dict(type="LoraConfig", bias="all"), "bias='all'"),
    (dict(type="LoraConfig", fan_in_fan_out=True), "fan_in_fan_out=True"),
    (dict(type="LoraConfig", modules_to_save=["head"]), "modules_to_save"),
    (dict(type="LoraConfig", init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    (dict(type="OFTConfig", coft=True), "coft=True"),
    (dict(type="OFTConfig", bias="oft_only"), "bias='oft_only'"),
    (dict(type="OFTConfig", num_cayley_neumann_terms=2), "num_cayley_neumann_terms=2"),
])
def test_import_refuses_settings_fastvlm_cannot_compute(config, needle):
    kw = dict(config)
    cls = getattr(peft, kw.pop("type"))
    with pytest.raises(ValueError, match=None) as e:
        check_importable(cls(target_modules=["q_proj"], **kw))
    assert needle in str(e.value), str(e.value)
    check_importable(cls(target_modules=["q_proj"]))  # the defaults import


@pytest.mark.parametrize("setting,needle", [
    (dict(use_dora=True), "use_dora=True"),
    (dict(bias="all"), "bias='all'"),
    (dict(modules_to_save=["visual_projection"]), "modules_to_save"),
])
def test_an_adapter_folder_is_refused_by_its_setting_not_by_a_tensor_it_brings(tmp_path, setting, needle):
    """A real peft folder whose setting brings extra tensors (DoRA's magnitudes, biases, saved modules):
    the refusal names the setting, which the user can change, before any tensor is looked at."""
    folder = str(tmp_path / "adapter")
    _peft_model(peft.LoraConfig(target_modules=["q_proj"], **setting)).save_pretrained(folder)
    with pytest.raises(ValueError, match=None) as e:
        import_peft(tiny_clip(), folder)
    assert needle in str(e.value) and "tensor" not in str(e.value), str(e.value)


def test_export_refuses_what_an_adapter_cannot_reproduce(tmp_path):
    out = str(tmp_path / "x")
    model, _ = _fastvlm_orth(neumann_terms=1)
    with pytest.raises(ValueError, match="neumann_terms=1"):
        export_peft(model, out)
    model = tiny_clip()
    attach_layers(model, "lora", ATTENTION, lambda m: LoRALinear(m, LoRAConfig(rank=4), torch.Generator()))
    attach_layers(model, "orth", MLP, lambda m: OrthLinear(m, OrthConfig(block_size=16)))
    with pytest.raises(ValueError, match=r"also carries \['orth'\]"):
        export_peft(model, out, kind="lora")
    with pytest.raises(ValueError, match="kind: the model carries"):
        export_peft(model, out)
    model, _ = _fastvlm_lora()
    from fastvlm.tuners.lora import merge_lora

    merge_lora(model)
    with pytest.raises(ValueError, match="is merged"):
        export_peft(model, out)
    with pytest.raises(ValueError, match="no LoRA or rotation layers"):
        export_peft(tiny_clip(), out)
    assert not os.path.exists(out)  # nothing written by a refused export


def test_import_refuses_a_model_that_does_not_fit(tmp_path):
    source = _peft_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False))
    folder = str(tmp_path / "a")
    source.save_pretrained(folder)
    with pytest.raises(ValueError, match="wrapped by peft"):
        import_peft(source.base_model.model, folder)
    from transformers import CLIPConfig, CLIPModel

    from .hf_tiny import TEXT, VISION

    one_layer = CLIPModel(CLIPConfig(text_config={**TEXT, "num_hidden_layers": 1}, vision_config=VISION,
                                     projection_dim=32))
    with pytest.raises(ValueError, match=r"module 'text_model\.encoder\.layers\.1\..*' is not in the model"):
        import_peft(one_layer, folder)
    model, _ = _fastvlm_lora(rank=8, alpha=16.0)
    with pytest.raises(ValueError, match="rank 8 scale 2 in the model, rank 4 scale 2 in the adapter"):
        import_peft(model, folder)
    with pytest.raises(FileNotFoundError, match="not a peft adapter folder"):
        import_peft(tiny_clip(), str(tmp_path))
