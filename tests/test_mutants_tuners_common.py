"""Exact tests of the tuner contract's helpers (fastvlm/tuners/common.py), written against the contract in
docs/tuners.md and the module docstring, not against the code: where tuners attach, the merge stack and its
refusals, bypass (also when the body raises, and when a merged layer stops it half-way), the registry, the
stacking-independent names, and the one save/load format with every misfit named.

Most tests use a two-parameter fake tuner layer on a plain nn.Linear, so each expected value is written out
by hand; the open_clip tiny model of tests/test_tuner_pairs.py is used where the helper reads open_clip types."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fastvlm.tuners import common as C

from .test_tuner_pairs import tiny_model


class Boom(Exception):
    pass


class Scale(C.WrapsLinear, C.TunerLayer, nn.Module):
    """``inner(x) * (1 + g)`` on a linear chain; merge folds ``(1 + g)`` into the plain weight and bias."""

    kind = "scale"

    def __init__(self, base, g=0.0, kind=None):
        super().__init__()
        self.base = base
        self.g = nn.Parameter(torch.tensor(float(g)))
        if kind is not None:
            self.kind = kind
        self.config = {"g": g}

    def forward(self, x):
        self._check_bypass()
        y = self.base(x)
        return y if (self.merged or self.bypass) else y * (1 + self.g)

    @torch.no_grad()
    def merge(self):
        self._check_can_merge()
        self.weight.mul_(1 + self.g)
        self._push_merge()

    @torch.no_grad()
    def unmerge(self):
        self._pop_merge()
        self.weight.div_(1 + self.g)


class Branch(C.TunerLayer, nn.Module):
    """A layer that wraps its module under ``inner`` (not on a linear chain)."""

    kind = "branch"
    wraps = "inner"
    merge_note = "a branch has nothing to fold into"

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.w = nn.Parameter(torch.ones(2))


def lin(seed=0, n_in=3, n_out=2):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


# ---------------------------------------------------------------------------------------------------------
# where tuners attach
# ---------------------------------------------------------------------------------------------------------


def test_towers_of_names_each_tower_and_refuses_the_rest():
    model = tiny_model()
    got = C.towers_of(model, ["visual", "text"])
    assert [p for p, _ in got] == ["visual.transformer", "transformer"]
    assert got[0][1] is model.visual.transformer and got[1][1] is model.transformer
    assert [p for p, _ in C.towers_of(model, ("text",))] == ["transformer"]
    assert C.towers_of(model, []) == []

    class TextOnly(nn.Module):  # a CustomTextCLIP keeps its text tower under .text
        def __init__(self):
            super().__init__()
            self.text = nn.Module()
            self.text.transformer = nn.Linear(1, 1)

    m = TextOnly()
    assert C.towers_of(m, ["text"]) == [("text.transformer", m.text.transformer)]
    with pytest.raises(ValueError, match="this model has no open_clip text transformer"):
        C.towers_of(nn.Linear(1, 1), ["text"])
    with pytest.raises(ValueError, match="cannot patch an image encoder of type Linear; supported: open_clip"):
        C.towers_of(_with_visual(nn.Linear(1, 1)), ["visual"])
    with pytest.raises(ValueError, match="cannot patch an image encoder of type NoneType"):
        C.towers_of(nn.Module(), ["visual"])
    for bad in ("vision", "bogus", "Text", "texts"):  # names sorting before and after 'text' and 'visual'
        with pytest.raises(ValueError, match=f"^towers must name 'visual' and/or 'text', got '{bad}'$"):
            C.towers_of(model, ["visual", bad])


def _with_visual(v):
    m = nn.Module()
    m.visual = v
    return m


def test_blocks_and_recompute_cover_the_named_towers_only():
    model = tiny_model()  # 2 visual blocks, 1 text block
    names = [n for n, _ in C.blocks_of(model, ["visual", "text"])]
    assert names == ["visual.transformer.resblocks.0", "visual.transformer.resblocks.1", "transformer.resblocks.0"]
    assert C.blocks_of(model, ["text"])[0][1] is model.transformer.resblocks[0]
    model.visual.transformer.grad_checkpointing = model.transformer.grad_checkpointing = False
    C.recompute_towers(model, ["visual"])
    assert model.visual.transformer.grad_checkpointing is True and model.transformer.grad_checkpointing is False


# ---------------------------------------------------------------------------------------------------------
# the layer contract: parameters, chains, the merge stack
# ---------------------------------------------------------------------------------------------------------


def test_tuner_parameters_are_the_layers_own_only():
    base = lin()
    s = Scale(base)
    assert [id(p) for p in s.tuner_parameters()] == [id(s.g)]
    b = Branch(nn.Linear(2, 2))
    assert [id(p) for p in b.tuner_parameters()] == [id(b.w)]

    class Head(C.TunerLayer, nn.Module):  # wraps nothing (the TaskRes head): every parameter is its own
        kind, wraps = "head", ""

        def __init__(self):
            super().__init__()
            self.r = nn.Parameter(torch.zeros(2))

    h = Head()
    assert [id(p) for p in h.tuner_parameters()] == [id(h.r)]
    assert C._chain_depth(h) == 0 and C.innermost(h) is h  # wraps "": not a link of a linear chain


def test_kinds_without_merge_raise_with_their_reason():
    b = Branch(nn.Linear(2, 2))
    with pytest.raises(NotImplementedError, match="^branch layers cannot be merged: a branch has nothing to fold into$"):
        b.merge()
    with pytest.raises(NotImplementedError,
                       match="^branch layers cannot be merged or unmerged: a branch has nothing to fold into$"):
        b.unmerge()
    assert C.TunerLayer.bypass is False and C.TunerLayer.merged is False and C.TunerLayer.wraps == "base"


def test_chain_helpers_walk_base_links_only():
    base = lin()
    a = Scale(base, 0.5)
    b = Scale(a, 1.0, kind="outer")
    assert C.innermost(b) is base and b.plain_linear() is base and C.innermost(base) is base
    assert C.innermost(Branch(base)) is not base  # an "inner" link is not a linear chain
    assert (C._chain_depth(b), C._chain_depth(a), C._chain_depth(base)) == (2, 1, 0)
    assert C._chain_depth(Branch(a)) == 0
    # WrapsLinear exposes the plain linear's weight, bias and widths
    assert b.weight is base.weight and b.bias is base.bias
    assert (b.in_features, b.out_features) == (3, 2)
    assert C.is_plain(base) and not C.is_plain(a) and not C.is_plain(b)


def test_merge_stack_is_last_in_first_out_with_its_messages():
    base = lin()
    w0 = base.weight.detach().clone()
    a = Scale(base, 0.5)
    b = Scale(a, 1.0, kind="outer")
    with pytest.raises(RuntimeError, match="^cannot merge this outer layer: the scale layer under it is not merged"):
        b.merge()
    with pytest.raises(RuntimeError, match="^cannot unmerge this scale layer: the none layer merged into the same"):
        a.unmerge()
    a.merge()
    assert a.merged and C._merge_stack(base) == [a] and not C.is_plain(b) and C.is_plain(a)
    b.merge()
    assert C._merge_stack(base) == [a, b] and C.is_plain(b)
    torch.testing.assert_close(base.weight, w0 * 3.0)
    with pytest.raises(RuntimeError, match="^cannot unmerge this scale layer: the outer layer merged into the same "
                                           "weight after it must be unmerged first$"):
        a.unmerge()
    assert a.merged and C._merge_stack(base) == [a, b]  # a refused unmerge changes nothing
    b.unmerge()
    assert not b.merged and C._merge_stack(base) == [a]
    a.unmerge()
    assert not a.merged and C._merge_stack(base) == []
    torch.testing.assert_close(base.weight, w0)
    # three on one weight: the refusal names the top of the stack, the last merged
    c = Scale(b, 0.25, kind="third")
    a.merge(), b.merge(), c.merge()
    with pytest.raises(RuntimeError, match="^cannot unmerge this scale layer: the third layer merged into the same"):
        a.unmerge()
    with pytest.raises(RuntimeError, match="^cannot unmerge this outer layer: the third layer merged into the same"):
        b.unmerge()
    c.unmerge(), b.unmerge(), a.unmerge()
    torch.testing.assert_close(base.weight, w0)
    # the stack lives on the plain linear itself, not in its parameters or state
    assert "_fastvlm_merge_stack" in vars(base) and set(base.state_dict()) == {"weight", "bias"}


def test_check_bypass_refuses_a_merged_layer_only():
    s = Scale(lin(), 1.0)
    x = torch.randn(4, 3)
    s.bypass = True
    torch.testing.assert_close(s(x), s.base(x))  # bypass: exactly the wrapped module
    s.bypass = False
    torch.testing.assert_close(s(x), 2 * s.base(x))
    s.merge()
    s(x)  # merged, not bypassed: fine
    s.bypass = True
    with pytest.raises(RuntimeError, match="^cannot bypass a merged scale layer: unmerge it first$"):
        s(x)


def test_wrap_site_puts_weight_layers_on_the_plain_linear():
    owner = nn.Module()
    owner.proj = base = lin()
    a = C.wrap_site(owner, "proj", lambda m: Scale(m, 0.5))
    assert owner.proj is a and a.base is base
    b = C.wrap_site(owner, "proj", lambda m: Scale(m, 1.0, kind="outer"))
    assert owner.proj is b and b.base is a
    c = C.wrap_site(owner, "proj", lambda m: Scale(m, 2.0, kind="weight"), innermost_only=True)
    assert owner.proj is b and b.base is a and a.base is c and c.base is base  # under the whole chain
    # innermost_only stops at a non-base link: the new layer goes right under it
    o2 = nn.Module()
    o2.proj = br = Branch(lin())
    d = C.wrap_site(o2, "proj", lambda m: Scale(m), innermost_only=True)
    assert o2.proj is d and d.base is br
    # and refuses to go under a merged layer
    o3 = nn.Module()
    o3.proj = lin()
    e = C.wrap_site(o3, "proj", lambda m: Scale(m, 0.5))
    e.merge()
    with pytest.raises(RuntimeError, match="^cannot put a layer under a merged scale layer: unmerge it first$"):
        C.wrap_site(o3, "proj", lambda m: Scale(m), innermost_only=True)
    assert o3.proj is e and isinstance(e.base, nn.Linear)
    C.wrap_site(o3, "proj", lambda m: Scale(m))  # on top of a merged layer: allowed
    assert o3.proj.base is e


def test_standalone_base_checks_and_freezes():
    m = lin()
    assert C.standalone_base(m, (nn.Linear,), "linear", freeze=False) is m
    assert all(p.requires_grad for p in m.parameters())
    assert C.standalone_base(m, (nn.Linear,), "linear", freeze=True) is m
    assert not any(p.requires_grad for p in m.parameters())
    with pytest.raises(TypeError, match="^conv must be a Conv2d or Linear, got ReLU$"):
        C.standalone_base(nn.ReLU(), (nn.Conv2d, nn.Linear), "conv", freeze=True)
    with pytest.raises(TypeError, match="^linear must be a Linear, got Conv2d$"):
        C.standalone_base(nn.Conv2d(1, 1, 1), (nn.Linear,), "linear", freeze=False)


# ---------------------------------------------------------------------------------------------------------
# the registry, attach, names
# ---------------------------------------------------------------------------------------------------------


def two_site_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    return model


def test_attach_records_the_new_parameters_and_freezes_the_rest():
    model = two_site_model()
    assert C.tuners_of(model) is None
    new = C.attach(model, lambda: C.wrap_site(model, "0", lambda m: Scale(m, 0.1)), "scale", {"g": 0.1})
    reg = C.tuners_of(model)
    assert C.tuners_of(model, create=True) is reg and vars(model)[C.Tuners.ATTR] is reg
    assert [id(p) for p in new] == [id(model[0].g)]
    assert reg.kinds() == ["scale"] and reg.config("scale") == {"g": 0.1}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.g"]
    got = reg.parameters("scale")
    got.clear()  # a copy: the registry keeps its list
    assert len(reg.parameters("scale")) == 1
    with pytest.raises(ValueError, match="^the model already carries a 'scale' tuner; apply each kind once$"):
        C.attach(model, lambda: None, "scale")
    new2 = C.attach(model, lambda: C.wrap_site(model, "1", lambda m: Scale(m, kind="other")), "other")
    assert reg.kinds() == ["scale", "other"] and reg.config("other") is None
    assert reg.trainable_ids() == {id(model[0].g), id(new2[0])}
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == ["0.g", "1.g"]
    with pytest.raises(ValueError, match=r"^the model carries no 'lora' tuner \(attached: \['scale', 'other'\]\)$"):
        reg.config("lora")
    with pytest.raises(ValueError, match=r"carries no 'lora' tuner \(attached: none\)$"):
        C.Tuners().parameters("lora")


def test_tuner_names_leave_out_the_wrapped_segment():
    model = two_site_model()
    C.wrap_site(model, "0", lambda m: Scale(m, 0.1))
    C.wrap_site(model, "0", lambda m: Branch(m))
    names = C.tuner_names(model)
    named = {names[id(p)] for p in model.parameters()}
    assert named == {"0.weight", "0.bias", "0.g", "0.w", "1.weight", "1.bias"}
    mods = C.tuner_names(model, modules=True)
    assert mods[id(model)] == "" and mods[id(model[0])] == "0" and mods[id(model[0].inner)] == "0"
    assert mods[id(model[0].inner.base)] == "0" and mods[id(model[1])] == "1"
    assert C.names_of(model, [model[1].bias, model[0].w]) == ["1.bias", "0.w"]
    layers = C.tuner_layers(model)
    assert [(n, type(m).__name__) for n, m in layers] == [("0", "Branch"), ("0", "Scale")]
    assert [m for _, m in C.tuner_layers(model, "scale")] == [model[0].inner]
    assert C.tuner_layers(model, "lora") == []


def test_tuner_names_keep_a_layers_other_children():
    """Only the wrapped child's segment is left out; a layer's own submodules keep theirs, whatever their name
    sorts before or after the wrapped one's."""

    class WithAux(Scale):
        def __init__(self, base):
            super().__init__(base)
            self.aux = nn.Linear(1, 1)  # 'aux' < 'base'
            self.zed = nn.Linear(1, 1)  # 'zed' > 'base'

    model = nn.Sequential(WithAux(lin()))
    names = C.tuner_names(model)
    assert names[id(model[0].aux.weight)] == "0.aux.weight" and names[id(model[0].zed.bias)] == "0.zed.bias"
    assert names[id(model[0].base.weight)] == "0.weight"
    mods = C.tuner_names(model, modules=True)
    assert mods[id(model[0].aux)] == "0.aux" and mods[id(model[0].base)] == "0"


def test_named_tuner_parameters_of_a_model_and_of_a_standalone_layer():
    model = two_site_model()
    C.attach(model, lambda: C.wrap_site(model, "1", lambda m: Scale(m, 0.1)), "scale")
    assert list(C.named_tuner_parameters(model, "scale")) == ["1.g"]
    s = Scale(lin(), 0.3)  # standalone: its own tuner parameters
    assert {n: p for n, p in C.named_tuner_parameters(s, "scale").items()} == {"g": s.g}
    assert C._kinds_and_configs(s) == {"scale": {"g": 0.3}}
    for other in ("lora", "taskres", "zzz"):  # kinds sorting before and after 'scale'
        with pytest.raises(ValueError, match=f"^this is a 'scale' layer, not '{other}'$"):
            C.named_tuner_parameters(s, other)
    assert C._kinds_and_configs(two_site_model()) == {}
    assert C._kinds_and_configs(model) == {"scale": None}


# ---------------------------------------------------------------------------------------------------------
# bypass and merge, model-wide
# ---------------------------------------------------------------------------------------------------------


def test_bypassed_restores_old_values_also_when_the_body_raises():
    layers = [Scale(lin(i), 1.0) for i in range(3)]
    layers[1].bypass = True
    model = nn.Sequential(*layers)
    with C.bypassed(model, iter(layers)) as got:  # any iterable of layers, listed once
        assert got is model and all(m.bypass for m in layers)
    assert [m.bypass for m in layers] == [False, True, False]
    with pytest.raises(Boom):
        with C.bypassed(model, layers):
            raise Boom
    assert [m.bypass for m in layers] == [False, True, False]


def test_bypassed_refuses_a_merged_layer_and_undoes_what_it_set():
    layers = [Scale(lin(i), 1.0) for i in range(3)]
    layers[2].merge()
    with pytest.raises(RuntimeError, match="^cannot bypass a merged scale layer: unmerge it first$"):
        with C.bypassed(nn.Sequential(*layers), layers):
            pytest.fail("the body must not run")
    assert [m.bypass for m in layers] == [False, False, False]  # the first two were set, then restored


def test_bypass_by_kind_and_model_wide_merge_order():
    model = two_site_model()
    w0 = model[0].weight.detach().clone()
    C.wrap_site(model, "0", lambda m: Scale(m, 1.0, kind="inner"))
    C.wrap_site(model, "0", lambda m: Scale(m, 0.5, kind="outer"))
    C.wrap_site(model, "0", lambda m: Scale(m, 3.0, kind="outer"))  # the same kind twice on one chain
    outer = [m for _, m in C.tuner_layers(model, "outer")]
    inner = C.tuner_layers(model, "inner")[0][1]
    with C.bypass(model, "outer"):
        assert all(m.bypass for m in outer) and not inner.bypass
    with C.bypass(model):
        assert all(m.bypass for m in outer) and inner.bypass
    assert not any(m.bypass for m in outer + [inner])
    C.merge(model, "inner")
    assert C.merge(model, "outer") is model  # the deeper of the two first: the outer one would refuse
    assert all(m.merged for m in outer)
    torch.testing.assert_close(model[0].weight, w0 * 2.0 * 1.5 * 4.0)
    C.merge(model, "outer")  # merged layers are skipped
    assert C.unmerge(model, "outer") is model  # the outermost first
    assert not any(m.merged for m in outer)
    C.unmerge(model, "outer")  # unmerged layers are skipped
    C.unmerge(model, "inner")
    torch.testing.assert_close(model[0].weight, w0)


# ---------------------------------------------------------------------------------------------------------
# save and load
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Cfg:
    size: int = 2
    sites: tuple = ("a", "b")


def test_config_dict_round_trip():
    assert C.config_dict(None) == {}
    assert C.config_dict(Cfg()) == {"size": 2, "sites": ["a", "b"]}
    assert C.config_dict({"x": (1, 2), "y": 3}) == {"x": [1, 2], "y": 3}
    assert C.config_dict([("k", (1,))]) == {"k": [1]}
    assert C.config_from_dict(Cfg, {"size": 4, "sites": ["c"]}) == Cfg(4, ("c",))


def scale_model(n_sites=2, seed=0, kind="scale", g=0.0):
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(n_sites)])

    def patch():
        for i in range(n_sites):
            C.wrap_site(model, str(i), lambda m: Scale(m, g, kind=kind))

    C.attach(model, patch, kind, {"sites": tuple(range(n_sites))})
    return model


def test_save_and_load_round_trip_with_extra_metadata(tmp_path):
    src = scale_model(g=0.0)
    with torch.no_grad():
        src[0].g.fill_(0.25)
        src[1].g.fill_(-0.5)
    path = C.save_tuners(src, str(tmp_path / "t.safetensors"), note="hi", epoch=3)
    tensors, meta = C.read_tuners(path)
    assert set(tensors) == {"0.g", "1.g"} and float(tensors["1.g"]) == -0.5
    assert meta["kind"] == "tuners" and meta["note"] == "hi" and meta["epoch"] == 3
    assert meta["tuners"] == {"scale": {"config": {"sites": [0, 1]}, "encoding": "raw",
                                        "shapes": {"0.g": [], "1.g": []}}}
    dst = scale_model(g=0.0)
    got = C.load_tuners(dst, path)
    assert got["note"] == "hi"
    assert (float(dst[0].g), float(dst[1].g)) == (0.25, -0.5)
    assert [n for n, p in dst.named_parameters() if p.requires_grad] == ["0.g", "1.g"]  # loads in place


def test_save_refuses_what_the_model_does_not_carry(tmp_path):
    with pytest.raises(ValueError, match="^the model carries no tuners to save$"):
        C.save_tuners(two_site_model(), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="^the model carries no tuners to save$"):
        C.save_tuners(scale_model(), str(tmp_path / "x"), kinds=[])
    with pytest.raises(ValueError, match=r"^the model carries no 'lora' tuner \(attached: \['scale'\]\)$"):
        C.save_tuners(scale_model(), str(tmp_path / "x"), kinds=["scale", "lora"])
    assert not (tmp_path / "x").exists()


def test_save_and_load_use_a_registered_codec(tmp_path, monkeypatch):
    monkeypatch.setitem(C._CODECS, "scale", ("times10", lambda model, t: t * 10,
                                             lambda model, stored, target: target.copy_(stored / 10)))
    src = scale_model()
    with torch.no_grad():
        src[0].g.fill_(0.5)
    path = C.save_tuners(src, str(tmp_path / "t.safetensors"))
    tensors, meta = C.read_tuners(path)
    assert float(tensors["0.g"]) == 5.0 and meta["tuners"]["scale"]["encoding"] == "times10"
    dst = scale_model()
    C.load_tuners(dst, path)
    assert float(dst[0].g) == 0.5


def test_load_names_every_misfit(tmp_path):
    path = C.save_tuners(scale_model(n_sites=6), str(tmp_path / "six.safetensors"))
    with pytest.raises(ValueError) as e:
        C.load_tuners(scale_model(n_sites=1), path, what="mask file")
    msg = str(e.value)
    assert msg.startswith(f"mask file {path!r} does not fit the model: ")
    assert "not in model: ['1.g', '2.g', '3.g', '4.g'] ..." in msg and "missing in file" not in msg
    with pytest.raises(ValueError, match=r"missing in file: \['1.g'\]$"):
        C.load_tuners(scale_model(n_sites=2), str(C.save_tuners(scale_model(n_sites=1), str(tmp_path / "1"))))
    p5 = C.save_tuners(scale_model(n_sites=5), str(tmp_path / "five"))
    with pytest.raises(ValueError, match=r"not in model: \['1.g', '2.g', '3.g', '4.g'\]$"):  # exactly 4: no ' ...'
        C.load_tuners(scale_model(n_sites=1), p5)
    with pytest.raises(ValueError, match=r"missing in file: \['1.g', '2.g', '3.g', '4.g'\] \.\.\.$"):
        C.load_tuners(scale_model(n_sites=6), str(C.save_tuners(scale_model(n_sites=1), str(tmp_path / "1b"))))
    with pytest.raises(ValueError, match=r"missing in file: \['1.g', '2.g', '3.g', '4.g'\]$"):
        C.load_tuners(scale_model(n_sites=5), str(C.save_tuners(scale_model(n_sites=1), str(tmp_path / "1c"))))
    # a shape misfit, named with both shapes
    wide = nn.Sequential(nn.Linear(2, 2))

    def patch():
        C.wrap_site(wide, "0", lambda m: Scale(m))
        wide[0].g = nn.Parameter(torch.zeros(3))

    C.attach(wide, patch, "scale")
    pw = C.save_tuners(wide, str(tmp_path / "wide"))
    with pytest.raises(ValueError, match=r"0.g: file \(3,\), model \(\)$"):
        C.load_tuners(scale_model(n_sites=1), pw)
    # kinds the file or the model lacks, and problems handed in by the caller, all in one message
    other = scale_model(n_sites=1, kind="other")
    with pytest.raises(ValueError, match=r"kind: the file holds \['scale'\], not 'other'"):
        C.load_tuners(other, pw, kinds=["other"])
    # a kind the file lacks does not stop the check of the kinds after it: every misfit is named
    with pytest.raises(ValueError, match=r"not 'other'; 0.g: file \(3,\), model \(\)$"):
        C.load_tuners(scale_model(n_sites=1), pw, kinds=["other", "scale"])
    with pytest.raises(ValueError, match=r"the model has \['scale'\] attached; 0.g: file \(3,\), model \(\)$"):
        C.load_tuners(scale_model(n_sites=1), C.save_tuners(_two_kinds(wide), str(tmp_path / "two")),
                      kinds=["zother", "scale"])
    with pytest.raises(ValueError, match=r"kind: the file holds 'scale' tuners, the model has \['other'\] attached"):
        C.load_tuners(other, pw)
    with pytest.raises(ValueError, match=r"does not fit the model: first; kind: the file holds 'scale' tuners, the "
                                         r"model has none attached$"):
        C.load_tuners(two_site_model(), pw, problems=("first",))
    with pytest.raises(ValueError, match=r"does not fit the model: caller's$"):
        C.load_tuners(scale_model(n_sites=1), str(C.save_tuners(scale_model(n_sites=1), str(tmp_path / "ok"))),
                      problems=["caller's"])


def test_a_refused_load_changes_nothing(tmp_path):
    src = scale_model(n_sites=2, g=0.5)
    path = C.save_tuners(src, str(tmp_path / "t"))
    dst = scale_model(n_sites=2)
    with pytest.raises(ValueError, match="not 'other'"):
        C.load_tuners(dst, path, kinds=["scale", "other"])  # 'scale' fits, 'other' does not: nothing is copied
    assert float(dst[0].g) == 0.0 and float(dst[1].g) == 0.0
    C.load_tuners(dst, path, kinds=["scale"])
    assert float(dst[0].g) == 0.5


def _two_kinds(model):
    """``model`` with a second kind, 'zother', attached beside its 'scale' tuner."""
    model.add_module("extra", nn.Linear(2, 2))
    C.attach(model, lambda: C.wrap_site(model, "extra", lambda m: Scale(m, kind="zother")), "zother")
    return model
