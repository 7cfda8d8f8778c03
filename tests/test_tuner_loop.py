"""The one training loop (fastvlm/train/common.py run_epochs) under every recipe: an interrupted run resumed
from its state ends exactly where the uninterrupted run does, the history carries every step's wall time,
and the progress bar is named after the method."""

import pytest
import torch
import torch.nn.functional as F

from .test_tuner_pairs import apply_kind, base_classifier, tiny_model

EPOCHS = 3


class Interrupt(Exception):
    pass


def _loader(seed=4):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 3, (6,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def _cls():
    return F.normalize(base_classifier(), dim=-1)


def _run(method, checkpoint=None, on_epoch_end=None, progress=False):
    """(history, trained tensors) of a fresh, seeded run of ``method``."""
    if method == "taskres":
        from fastvlm.train.taskres import TaskResRecipe, train_taskres
        from fastvlm.tuners.taskres import TaskResHead

        g = torch.Generator().manual_seed(3)
        f, y = torch.randn(10, 16, generator=g), torch.randint(0, 3, (10,), generator=g)
        head = TaskResHead(base_classifier())
        hist = train_taskres(head, f, y, TaskResRecipe(epochs=EPOCHS, batch_size=4, lr=1e-2), 1, seed=2,
                             checkpoint=checkpoint, on_epoch_end=on_epoch_end, progress=progress)
        return hist, [head.residual]
    model = tiny_model()
    if method == "rmt":
        from fastvlm.train.rmt import RMTRecipe, train_rmt

        apply_kind(model, "masks")
        hist = train_rmt(model, _cls(), _loader(), RMTRecipe(epochs=EPOCHS, lr=1e-2, drop_ratio=0.5, seed=1),
                         checkpoint=checkpoint, on_epoch_end=on_epoch_end, progress=progress)
    elif method == "orth":
        from fastvlm.train.orth import OrthRecipe, train_orth

        apply_kind(model, "orth")
        tokens = torch.randint(1, 64, (3, 8), generator=torch.Generator().manual_seed(5))
        hist = train_orth(model, tokens, _loader(), OrthRecipe(epochs=EPOCHS, lr=1e-2), seed=3,
                          checkpoint=checkpoint, on_epoch_end=on_epoch_end, progress=progress)
    else:
        from fastvlm.train.pvp import PVPRecipe, ZeroShotHead, train_modules
        from fastvlm.tuners.pack import method_parameters

        apply_kind(model, "lora")
        hist = train_modules(model, method_parameters(model, "lora"), ZeroShotHead(base_classifier()), _loader(),
                             PVPRecipe(epochs=EPOCHS, lr=1e-2), checkpoint=checkpoint,
                             on_epoch_end=on_epoch_end, progress=progress)
    return hist, [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("method", ["taskres", "rmt", "orth", "pvp"])
def test_interrupted_then_resumed_equals_uninterrupted(method, tmp_path):
    whole, want = _run(method, checkpoint=str(tmp_path / "whole.pt"))
    steps = len(whole.step_times)
    assert len(whole) == EPOCHS and steps % EPOCHS == 0 and steps > 0
    assert all(t > 0 for t in whole.step_times)

    def die(epoch):
        if epoch == 0:
            raise Interrupt

    state = str(tmp_path / "cut.pt")
    with pytest.raises(Interrupt):
        _run(method, checkpoint=state, on_epoch_end=die)
    resumed, got = _run(method, checkpoint=state)  # a fresh process: new model, same seeds, the saved state
    assert resumed == whole  # every epoch's losses, bit for bit
    assert len(resumed.step_times) == steps  # the interrupted epoch's step times came back from the state
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert whole[0] != whole[-1]  # it trained: the epochs' losses differ


@pytest.mark.parametrize("method,name", [("pvp", "lora"), ("rmt", "rmt")])
def test_progress_bar_is_named_after_the_method(method, name, capsys):
    _run(method, progress=True)
    err = capsys.readouterr().err
    assert f"{name}:" in err and "pvp" not in err


def test_progress_counts_every_epochs_steps_and_starts_where_a_resumed_run_stopped(tmp_path, monkeypatch):
    import tqdm.auto

    from fastvlm.train.common import run_epochs

    bars = []

    class Recorder(tqdm.auto.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=0.1)

    def step(batch, i):
        (w - batch).square().sum().backward()
        opt.step()
        opt.zero_grad()
        return {"loss": 1.0}, 1.0

    data = [torch.ones(3)] * 4
    state = str(tmp_path / "state.pt")

    def run(epochs, on_epoch_end=None):
        return run_epochs("demo", epochs=epochs, batches=lambda e: data, step=step, optimizer=opt,
                          tensors={"w": w}, lr_at=lambda e: 0.1, checkpoint=state, progress=True,
                          on_epoch_end=on_epoch_end)

    run(2)  # two epochs done and saved
    assert (bars[-1].total, bars[-1].n) == (8, 8)
    run(5)  # resumed: epochs 3 to 5 of 5, the bar starts at the 8 steps already done
    assert (bars[-1].total, bars[-1].n) == (20, 20)
    assert bars[-1].desc.startswith("demo")


def test_step_time_summary_of_hand_made_times():
    from fastvlm.train.common import step_time_summary

    s = step_time_summary([0.1, 0.3, 0.2, 0.9])
    assert s["steps"] == 4 and s["median"] == pytest.approx(0.25)  # the mean of the middle two, 0.2 and 0.3
    assert s["p95"] == 0.9 and s["max"] == 0.9  # nearest rank: the ceil(3.8) = 4th smallest
    assert s["max_over_median"] == pytest.approx(3.6) and s["seconds"] == [0.1, 0.3, 0.2, 0.9]  # in step order
    s = step_time_summary(range(20, 0, -1))  # 1 ... 20: the median 10.5, the 19th smallest is the p95
    assert (s["median"], s["p95"], s["max"]) == (10.5, 19.0, 20.0)
    assert step_time_summary([2.0])["median"] == 2.0
    assert step_time_summary([]) == {"steps": 0, "median": None, "p95": None, "max": None, "max_over_median": None,
                                     "seconds": []}
