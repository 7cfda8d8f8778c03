"""Determinism, atomic checkpoints and resume, on the torch path."""

import os

import pytest
import torch
import torch.nn.functional as F

import fastvlm
from fastvlm.data import few_shot
from fastvlm.io import load_checkpoint, load_train_state, save_checkpoint
from fastvlm.models import TINY, load_clip
from fastvlm.train.common import train_loader, train_transform
from fastvlm.train.rmt import RMTRecipe, train_rmt
from fastvlm.train.taskres import TaskResRecipe, train_taskres
from fastvlm.tuners.mask import apply_masks, score_parameters
from fastvlm.tuners.taskres import TaskResHead

from .synthetic import make_image_folder


class Interrupt(Exception):
    pass


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(40, 16, generator=g), torch.randint(0, 5, (40,), generator=g), torch.randn(5, 16, generator=g)


def _taskres_run(checkpoint=None, interrupt_at=None):
    f, y, base = _features()
    head = TaskResHead(base)

    def stop(epoch):
        if epoch == interrupt_at:
            raise Interrupt

    hist = train_taskres(head, f, y, TaskResRecipe(batch_size=8, epochs=6), shots=8, seed=3, checkpoint=checkpoint,
                         on_epoch_end=stop)
    return head.residual.detach().clone(), hist


def test_taskres_same_seed_bit_identical_and_resume_equals_uninterrupted(tmp_path):
    with fastvlm.backend("torch"):
        a, ha = _taskres_run()
        b, hb = _taskres_run()
        assert torch.equal(a, b) and ha == hb
        ck = str(tmp_path / "state.pt")
        with pytest.raises(Interrupt):
            _taskres_run(ck, interrupt_at=2)  # dies after epoch 2 was saved
        assert load_train_state(ck, "taskres")["epoch"] == 2
        c, hc = _taskres_run(ck)  # resumes at epoch 3
        assert torch.equal(a, c) and ha == hc


def _rmt_run(root, checkpoint=None, interrupt_at=None):
    torch.manual_seed(0)
    model, *_ = load_clip(TINY, None)
    apply_masks(model)
    from fastvlm.data import image_folder

    samples = few_shot(image_folder(str(root)), 3, seed=1)
    loader = train_loader(samples, train_transform(32, (0.5,) * 3, (0.25,) * 3), batch_size=4, seed=7)
    cls = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(2)), dim=-1)

    def stop(epoch):
        if epoch == interrupt_at:
            raise Interrupt

    hist = train_rmt(model, cls, loader, RMTRecipe(lr=1e-2, epochs=3, drop_ratio=0.7, seed=5), checkpoint=checkpoint,
                     on_epoch_end=stop)
    return [s.detach().clone() for s in score_parameters(model)], hist


def test_rmt_same_seed_bit_identical_and_resume_equals_uninterrupted(tmp_path):
    """Gradient dropout, few-shot sampling, shuffling and augmentation are all seeded."""
    make_image_folder(tmp_path / "imgs", classes=3, per_class=5)
    with fastvlm.backend("torch"):
        a, ha = _rmt_run(tmp_path / "imgs")
        b, hb = _rmt_run(tmp_path / "imgs")
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and ha == hb
        ck = str(tmp_path / "rmt.pt")
        with pytest.raises(Interrupt):
            _rmt_run(tmp_path / "imgs", ck, interrupt_at=0)
        c, hc = _rmt_run(tmp_path / "imgs", ck)
        assert all(torch.equal(x, y) for x, y in zip(a, c)) and ha == hc


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.safetensors")
    save_checkpoint(path, {"a": torch.ones(3)}, {"kind": "x"})
    import fastvlm.io as fio

    def dying_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(fio, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"a": torch.zeros(3)}, {"kind": "x"})
    t, cfg = load_checkpoint(path)
    assert torch.equal(t["a"], torch.ones(3)) and cfg["kind"] == "x"
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")] == []


def test_corrupt_or_mismatched_state_fails_clearly(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="is not readable"):
        load_train_state(str(bad))
    torch.save({"something": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="was not written by fastvlm"):
        load_train_state(str(tmp_path / "foreign.pt"))
    with fastvlm.backend("torch"):
        ck = str(tmp_path / "state.pt")
        _taskres_run(ck)
        f, y, _ = _features()
        with pytest.raises(ValueError, match=r"residual has shape \(5, 16\), this run needs \(7, 16\)"):
            train_taskres(TaskResHead(torch.randn(7, 16)), f, y, TaskResRecipe(epochs=7), 8, checkpoint=ck)
        with pytest.raises(ValueError, match="is for 'taskres', expected 'rmt'"):
            load_train_state(ck, "rmt")


def test_cli_resume_continues_an_interrupted_run(tmp_path, monkeypatch):
    """fastvlm tune taskres dies mid-run; --resume finishes it to the same residual as an uninterrupted run."""
    import fastvlm.train.taskres as T
    from fastvlm import cli

    make_image_folder(tmp_path / "d", classes=3, per_class=4, split_dirs=True)
    args = ["tune", "taskres", "--model", TINY, "--pretrained", "none", "--data", str(tmp_path / "d"), "--shots", "2",
            "--epochs", "6", "--no-progress"]
    assert cli.main(args + ["--out", str(tmp_path / "whole")]) == 0
    real = T.train_taskres

    def dying(*a, **k):
        k["on_epoch_end"] = lambda e: (_ for _ in ()).throw(Interrupt()) if e == 3 else None
        return real(*a, **k)

    monkeypatch.setattr(T, "train_taskres", dying)
    monkeypatch.setattr("fastvlm.train.taskres.train_taskres", dying)
    with pytest.raises(Interrupt):
        cli.main(args + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr("fastvlm.train.taskres.train_taskres", real)
    assert cli.main(args + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    a, _ = load_checkpoint(str(tmp_path / "whole" / "taskres.safetensors"))
    b, _ = load_checkpoint(str(tmp_path / "cut" / "taskres.safetensors"))
    assert torch.equal(a["residual"], b["residual"])


def test_mismatched_devices_are_refused():
    """Tensors on two devices (meta stands in for a second device here) fail with the argument named."""
    import fastvlm.functional as FV

    cpu, meta = torch.randn(3, 8), torch.empty(4, 8, device="meta")
    with fastvlm.backend("torch"):
        with pytest.raises(ValueError, match="base is on meta but features is on cpu"):
            FV.residual_logits(cpu, meta, torch.zeros(4, 8))
        with pytest.raises(ValueError, match="scores is on meta but x is on cpu"):
            FV.masked_linear(cpu, torch.randn(4, 8), torch.empty(4, 8, device="meta"))
        with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
            FV.orthogonal_linear(cpu, torch.empty(4, 8, device="meta"), torch.zeros(2, 6), None, 4)
        with pytest.raises(ValueError, match="g_ref is on meta but g_task is on cpu"):
            FV.grad_dropout(cpu, torch.empty(3, 8, device="meta"), 0.5, 0)


def test_a_stop_signal_during_a_save_takes_effect_once_the_file_is_in_place(tmp_path):
    """Ctrl-C in the middle of writing a training state: the file is completed and renamed, then the
    KeyboardInterrupt comes (before, it was raised inside the writer, and torch.save's zip writer turned it
    into a RuntimeError on its way out: a traceback instead of the interrupted line, and no state)."""
    import os
    import signal

    from fastvlm.io import atomic_write, peek_train_state

    path = str(tmp_path / "state.pt")

    def write(tmp):
        os.kill(os.getpid(), signal.SIGINT)  # arrives mid-save
        with open(tmp, "wb") as fh:  # as save_train_state writes it
            torch.save({"fastvlm_train_state": 1, "kind": "demo", "epoch": 3, "step": 4, "x": torch.ones(1000)}, fh)

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, write)
    assert peek_train_state(path) == {"kind": "demo", "epoch": 3, "step": 4}
