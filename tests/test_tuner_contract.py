"""The tuner contract (fastvlm/tuners/common.py): any apply_* alone freezes the backbone, tuner state lives in
one registry, merge/unmerge follow the stacking rule or refuse with the reason, and every context manager
that changes model state restores it when its body raises."""

import pytest
import torch

from fastvlm.tuners.common import Tuners, bypass, merge, save_tuners, tuner_layers, tuners_of, unmerge

from .test_tuner_pairs import KINDS, apply_kind, base_classifier, images, perturb, tiny_model


class Boom(Exception):
    pass


@pytest.mark.parametrize("kind", KINDS)
def test_any_apply_alone_freezes_the_backbone(kind):
    model = apply_kind(tiny_model(), kind)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable and trainable == {id(p) for p in tuners_of(model).parameters(kind)}
    assert not any(p.requires_grad for p in tiny_model().parameters() if id(p) in trainable)
    backbone = [p for n, p in model.named_parameters() if n.startswith(("visual.conv1.weight", "token_embedding"))]
    assert backbone and not any(p.requires_grad for p in backbone)


def test_state_lives_in_one_registry():
    model = apply_kind(apply_kind(tiny_model(), "masks"), "lora")
    own = [k for k in vars(model) if k.startswith("_fastvlm")]
    assert own == [Tuners.ATTR], own
    reg = tuners_of(model)
    assert reg.kinds() == ["masks", "lora"] and reg.config("lora").rank == 2
    assert not any(k.startswith(Tuners.ATTR) for k in model.state_dict())
    with pytest.raises(ValueError, match="already carries a 'lora' tuner"):
        apply_kind(model, "lora")
    with pytest.raises(ValueError, match=r"carries no 'orth' tuner \(attached: \['masks', 'lora'\]\)"):
        reg.parameters("orth")


@pytest.mark.parametrize("kind,reason", [("vpt", "extra tokens"), ("adapter", "nonlinear"),
                                         ("taskres", "one matmul")])
def test_kinds_without_merge_say_why(kind, reason):
    model = apply_kind(tiny_model(), kind)
    with pytest.raises(NotImplementedError, match=f"{kind} layers cannot be merged: .*{reason}"):
        merge(model, kind)


def test_merge_follows_the_stacking_rule():
    """LoRA on a masked projection merges only after the mask; unmerging goes last-in first-out; the merged
    model computes what the unmerged one did."""
    model = apply_kind(apply_kind(tiny_model(), "masks"), "lora")
    perturb(model, "masks")
    perturb(model, "lora")
    x = images()
    with torch.no_grad():
        want = model.encode_image(x)
    with pytest.raises(RuntimeError, match="the masks layer under it is not merged"):
        merge(model, "lora")
    merge(model, "masks")
    merge(model, "lora")
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(NotImplementedError, match="masks layers cannot be merged or unmerged: merging zeroes"):
        unmerge(model, "masks")
    with pytest.raises(RuntimeError, match="cannot bypass a merged lora layer"):
        with bypass(model, "lora"):
            pass
    unmerge(model, "lora")
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), want, rtol=1e-4, atol=1e-5)


def test_unmerge_is_last_in_first_out():
    model = apply_kind(apply_kind(tiny_model(), "orth"), "lora")  # LoRA wraps the rotation
    perturb(model, "orth", seed=1)
    perturb(model, "lora", seed=2)
    w = model.visual.transformer.resblocks[0].mlp.c_fc.weight
    w0 = w.detach().clone()
    merge(model, "orth")
    merge(model, "lora")
    with pytest.raises(RuntimeError, match="the lora layer merged into the same weight after it"):
        unmerge(model, "orth")
    unmerge(model, "lora")
    unmerge(model, "orth")
    torch.testing.assert_close(w, w0, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# context managers restore state when the body raises
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_bypass_restores_when_the_body_raises(kind):
    model = apply_kind(tiny_model(), kind)
    layers = [m for _, m in tuner_layers(model, kind)]
    layers[0].bypass = True  # a layer bypassed before the block stays bypassed after it
    with pytest.raises(Boom):
        with bypass(model, kind):
            assert all(m.bypass for m in layers)
            raise Boom
    assert layers[0].bypass and not any(m.bypass for m in layers[1:])


def test_named_bypasses_restore_when_the_body_raises():
    from fastvlm.tuners.mask import bypass_masks
    from fastvlm.tuners.orth import bypass_rotations

    model = apply_kind(apply_kind(tiny_model(), "masks"), "orth")
    for cm in (bypass_masks, bypass_rotations):
        with pytest.raises(Boom):
            with cm(model):
                raise Boom
        assert not any(m.bypass for _, m in tuner_layers(model))


def test_gradient_dropout_hand_off_is_undone_when_the_body_raises():
    """An exception in pass 2 leaves no slot holding pass 1's gradient, a ratio or a regulariser: the next
    backward gives plain straight-through gradients."""
    from fastvlm.tuners.mask import _slots_empty, gradient_dropout, score_parameters

    model = apply_kind(tiny_model(), "masks")
    perturb(model, "masks")
    x = images()
    loss = model.encode_image(x).square().sum()
    loss.backward(retain_graph=True)
    with pytest.raises(Boom):
        with gradient_dropout(model, 1.0, lambda i: i, reg=1e-2):
            assert not _slots_empty(model)
            raise Boom
    assert _slots_empty(model)
    scores = score_parameters(model)
    for s in scores:
        s.grad = None
    model.encode_image(x).square().sum().backward()
    got = [s.grad.clone() for s in scores]
    ref = apply_kind(tiny_model(), "masks")
    for a, b in zip(score_parameters(ref), scores):
        a.data.copy_(b.data)
    ref.encode_image(x).square().sum().backward()
    for a, b in zip(got, score_parameters(ref)):
        torch.testing.assert_close(a, b.grad, rtol=0, atol=0)


def test_loop_state_is_saved_before_an_interrupt(tmp_path):
    """The loop's exception path: an interrupt after epoch 1 leaves the state of epoch 1 and a closed bar."""
    from fastvlm.io import load_train_state
    from fastvlm.train.taskres import TaskResRecipe, train_taskres
    from fastvlm.tuners.taskres import TaskResHead

    head = TaskResHead(base_classifier())
    f, y = torch.randn(8, 16), torch.randint(0, 3, (8,))

    def die(epoch):
        if epoch == 1:
            raise Boom

    with pytest.raises(Boom):
        train_taskres(head, f, y, TaskResRecipe(epochs=4, batch_size=4), 1, checkpoint=str(tmp_path / "s.pt"),
                      on_epoch_end=die)
    st = load_train_state(str(tmp_path / "s.pt"), "taskres")
    assert st["epoch"] == 1 and len(st["history"]) == 2 and len(st["step_times"]) == 4
    assert torch.equal(st["tensors"]["residual"], head.residual.detach())


def test_loading_a_taskres_residual_keeps_the_models_config_in_step(tmp_path):
    """load_residual replaces the head's config with the file's; the model's registry must follow, else a
    model-wide save after the load writes the old alpha beside the new residual."""
    from fastvlm.tuners.common import read_tuners
    from fastvlm.tuners.taskres import TaskResConfig, TaskResHead, apply_taskres

    base = base_classifier()
    source = TaskResHead(base, TaskResConfig(alpha=1.0, logit_scale=50.0))
    with torch.no_grad():
        source.residual.normal_()
    path = source.save(str(tmp_path / "head.safetensors"))
    model = tiny_model()
    head = apply_taskres(model, base)  # alpha 0.5 by default
    head.load_residual(path)
    assert tuners_of(model).config("taskres") is head.config
    assert (head.config.alpha, head.config.logit_scale) == (1.0, 50.0)
    _, meta = read_tuners(save_tuners(model, str(tmp_path / "model.safetensors")))
    assert meta["tuners"]["taskres"]["config"] == {"alpha": 1.0, "logit_scale": 50.0}
