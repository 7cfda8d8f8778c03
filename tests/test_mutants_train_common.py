"""Exact tests of the pieces every recipe shares (fastvlm/train/common.py): the epoch schedule at hand-computed
points, seeding, top-1 accuracy, the evaluation and training loaders, the Checkpointer's state and every
refusal, and the one loop's weighted epoch means, learning rates, hooks and rank sums, each against values
written out here from the docstrings (docs/tuners.md describes the loop)."""

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from fastvlm import dist as D
from fastvlm.train import common as T


class Boom(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------
# schedule, seeding, accuracy
# ---------------------------------------------------------------------------------------------------------


def test_warmup_cosine_at_hand_computed_epochs():
    lr = lambda e: T.warmup_cosine(e, 10, 1.0, warmup_epochs=2, warmup_lr=1e-5)  # noqa: E731
    assert lr(0) == 1e-5 and lr(1) == 1e-5  # the warm-up epochs: constant
    assert lr(2) == pytest.approx(1.0, abs=1e-15)  # cosine starts at base_lr
    assert lr(4) == pytest.approx(0.5 * (1 + math.sqrt(0.5)), abs=1e-15)  # (4 - 2) / 8 = 1/4 of the way
    assert lr(6) == pytest.approx(0.5, abs=1e-15)  # half way: cos(pi / 2) = 0
    assert lr(10) == pytest.approx(0.0, abs=1e-15)  # the end
    assert T.warmup_cosine(0, 4, 2e-3) == pytest.approx(2e-3, abs=0)  # no warm-up: epoch 0 is the base lr
    assert T.warmup_cosine(1, 4, 2e-3) == pytest.approx(1e-3 * (1 + math.sqrt(0.5)), rel=1e-14)
    assert T.warmup_cosine(3, 4, 2e-3) == pytest.approx(1e-3 * (1 - math.sqrt(0.5)), rel=1e-14)
    # the warm-up covers every epoch: the span is at least 1, no division by zero
    assert T.warmup_cosine(2, 2, 1.0, warmup_epochs=2) == pytest.approx(1.0, abs=1e-15)
    assert T.warmup_cosine(3, 2, 1.0, warmup_epochs=2) == pytest.approx(0.0, abs=1e-15)
    assert T.warmup_cosine(1, 2, 1.0, warmup_epochs=2, warmup_lr=0.25) == 0.25
    # one warm-up epoch of 6: the cosine spans the other 5, (3 - 1) / 5 of the way at epoch 3
    assert T.warmup_cosine(3, 6, 1.0, warmup_epochs=1) == pytest.approx(0.5 * (1 + math.cos(0.4 * math.pi)), abs=1e-15)


def test_seed_everything_seeds_every_generator():
    g = T.seed_everything(7)
    a = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    b = (random.random(), np.random.rand(), torch.rand(1).item(),
         torch.rand(1, generator=torch.Generator().manual_seed(7)).item())
    assert a == b
    T.seed_everything(2**32 + 3)  # numpy takes seeds below 2^32: the seed modulo 2^32
    x = np.random.rand()
    np.random.seed(3)
    assert x == np.random.rand()


def test_set_lr_sets_every_group():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 2.0}])
    T.set_lr(opt, 0.125)
    assert [g["lr"] for g in opt.param_groups] == [0.125, 0.125]


def test_accuracy_is_top1_in_percent():
    logits = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0], [0.0, 1.0, 5.0], [0.0, 4.0, 1.0]])
    assert T.accuracy(logits, torch.tensor([1, 0, 1, 1])) == 75.0
    assert T.accuracy(logits, torch.tensor([1, 0, 2, 1])) == 100.0
    assert T.accuracy(logits, torch.tensor([0, 1, 0, 0])) == 0.0


# ---------------------------------------------------------------------------------------------------------
# loaders and evaluation
# ---------------------------------------------------------------------------------------------------------


def image_samples(tmp_path, n):
    """n PNG images whose mean red value encodes their index, labels i % 3."""
    from PIL import Image

    out = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (4, 4), (10 * i, 0, 0)).save(p)
        out.append((str(p), i % 3, f"c{i % 3}"))
    return out


class RedModel(nn.Module):
    """encode_image: a one-hot of round(red * 25.5) % 3 (the index of the images above modulo 3), but class
    0 for every image whose index is 4 or more (so that exactly those with label != 0 are wrong)."""

    def encode_image(self, x):
        idx = torch.round(x[:, 0].mean(dim=(1, 2)) * 25.5).long()
        cls = torch.where(idx >= 4, torch.zeros_like(idx), idx % 3)
        return nn.functional.one_hot(cls, 3).float() + 0.01


def test_evaluate_model_counts_every_batch_and_restores_the_mode(tmp_path):
    from torchvision import transforms

    samples = image_samples(tmp_path, 7)  # labels 0 1 2 0 1 2 0; indices 4 and 5 are predicted 0: wrong
    classifier = torch.eye(3)
    model = RedModel()
    model.train()
    acc = T.evaluate_model(model, classifier, samples, transforms.ToTensor(), batch_size=3)
    assert acc == pytest.approx(100.0 * 5 / 7, rel=1e-12)  # 3 batches (3, 3, 1): all 7 counted
    assert model.training  # the mode it had
    model.eval()
    assert T.evaluate_model(model, classifier, samples[:4], transforms.ToTensor(), batch_size=2) == 100.0
    assert not model.training
    # the scale multiplies the cosines: a negative one turns the ranking round
    assert T.evaluate_model(model, classifier, samples[:3], transforms.ToTensor(), scale=-1.0) == 0.0
    assert T.evaluate_model(model, classifier, [], transforms.ToTensor()) == 0.0
    sizes = []

    def encode(x):
        sizes.append(x.shape[0])
        return RedModel.encode_image(model, x)

    model.encode_image = encode
    many = [samples[i % 4] for i in range(65)]  # labels 0 1 2 0, all right
    assert T.evaluate_model(model, classifier, many, transforms.ToTensor()) == 100.0
    assert sizes == [64, 1]  # the default batch size


def test_evaluate_model_restores_the_mode_when_an_image_cannot_be_read(tmp_path):
    """An unreadable image raises out of the evaluation; the model must come back in training mode (a run that
    catches the error and trains on would otherwise train with dropout and the like off)."""
    from torchvision import transforms

    from fastvlm.data import UnreadableImage

    samples = image_samples(tmp_path, 3)
    (tmp_path / "1.png").write_bytes(b"not a png")
    model = RedModel()
    model.train()
    with pytest.raises(UnreadableImage):
        T.evaluate_model(model, torch.eye(3), samples, transforms.ToTensor(), batch_size=1)
    assert model.training


def test_train_loader_is_seeded_shuffled_and_keeps_the_last_batch(tmp_path):
    from torchvision import transforms

    samples = image_samples(tmp_path, 7)
    order = lambda seed: [y.tolist() for _, y in T.train_loader(samples, transforms.ToTensor(), 3, seed)]  # noqa
    a = order(1)
    assert a == order(1) and [len(b) for b in a] == [3, 3, 1]
    assert sorted(sum(a, [])) == sorted(s[1] for s in samples)
    assert any(order(s) != a for s in range(2, 6))  # shuffled by the seed
    loader = T.train_loader(samples, transforms.ToTensor(), 3, 1)
    assert T.loader_generator(loader) is loader.generator


def test_train_transform_is_the_rmt_augmentation():
    from torchvision import transforms as TV
    from PIL import Image

    t = T.train_transform(8, (0.5, 0.25, 0.0), (0.5, 0.5, 1.0))
    crop, flip, _, norm = t.transforms
    assert isinstance(crop, TV.RandomResizedCrop) and crop.size == (8, 8) and crop.scale == (0.5, 1.0)
    assert crop.interpolation == TV.InterpolationMode.BICUBIC
    assert isinstance(flip, TV.RandomHorizontalFlip) and flip.p == 0.5
    assert list(norm.mean) == [0.5, 0.25, 0.0] and list(norm.std) == [0.5, 0.5, 1.0]
    out = t(Image.new("RGB", (20, 12), (255, 255, 255)))  # white: (1 - mean) / std per channel
    assert out.shape == (3, 8, 8)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, 1.5, 1.0]))


def test_set_epoch_and_epochs_of_tell_sampler_and_dataset():
    class Part:
        def __init__(self):
            self.epochs = []

        def set_epoch(self, e):
            self.epochs.append(e)

    class Loader(list):
        pass

    loader = Loader([1, 2])
    loader.sampler, loader.dataset = Part(), Part()
    T.set_epoch(loader, 4)
    assert loader.sampler.epochs == [4] and loader.dataset.epochs == [4]
    assert T.epochs_of(loader)(6) is loader and loader.sampler.epochs == [4, 6] and loader.dataset.epochs == [4, 6]
    bare = Loader()
    bare.sampler, bare.dataset = None, object()  # nothing to tell: no error
    T.set_epoch(bare, 1)
    T.set_epoch([], 1)
    assert isinstance(T.loader_generator([]), torch.Generator)
    bare.generator = "not a generator"
    assert isinstance(T.loader_generator(bare), torch.Generator)


def test_step_time_summary_odd_count_and_zero_median():
    s = T.step_time_summary([3, 1, 2])  # the middle one of three
    assert (s["steps"], s["median"], s["p95"], s["max"]) == (3, 2.0, 3.0, 3.0)
    assert s["max_over_median"] == 1.5 and s["seconds"] == [3.0, 1.0, 2.0]
    s = T.step_time_summary([0.0, 0.0, 5.0])
    assert s["median"] == 0.0 and s["max_over_median"] is None
    s = T.step_time_summary([float(i) for i in range(1, 21)] + [100.0])  # 21 steps: ceil(19.95) = 20th smallest
    assert s["p95"] == 20.0 and s["median"] == 11.0 and s["max"] == 100.0


# ---------------------------------------------------------------------------------------------------------
# the Checkpointer
# ---------------------------------------------------------------------------------------------------------


def ckpt_parts(seed=0):
    w = nn.Parameter(torch.arange(3.0) + seed)
    opt = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    return w, opt


def test_checkpointer_saves_and_restores_everything(tmp_path):
    from fastvlm.io import load_train_state

    path = str(tmp_path / "s.pt")
    w, opt = ckpt_parts()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    torch.rand(3, generator=g1)  # move g1 off its seed
    torch.manual_seed(9)
    rng = torch.get_rng_state()
    hist = T.History([1.5, 2.5], [0.1, 0.2, 0.3])
    T.Checkpointer(path, "demo", {"w": w}, opt, [g1, g2]).save(4, 17, hist)
    st = load_train_state(path, "demo")
    assert (st["epoch"], st["step"], st["history"], st["step_times"]) == (4, 17, [1.5, 2.5], [0.1, 0.2, 0.3])
    assert torch.equal(st["tensors"]["w"], w.detach()) and st["tensors"]["w"].grad_fn is None
    want_g1 = torch.rand(4, generator=g1)
    torch.set_rng_state(rng)
    want_torch = torch.rand(4)  # what torch's global generator draws next from the saved state

    w2, opt2 = ckpt_parts(seed=10)
    h1, h2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    torch.manual_seed(123)
    epoch, step, history = T.Checkpointer(path, "demo", {"w": w2}, opt2, (h1, h2)).restore()
    assert (epoch, step) == (5, 17)  # the next epoch
    assert isinstance(history, T.History) and history == [1.5, 2.5] and history.step_times == [0.1, 0.2, 0.3]
    assert torch.equal(w2.detach(), w.detach())
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(4, generator=h1), want_g1)
    assert torch.equal(torch.rand(4, generator=h2), torch.rand(4, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(torch.rand(4), want_torch)


def test_checkpointer_without_a_path_or_a_file_starts_fresh(tmp_path):
    w, opt = ckpt_parts()
    c = T.Checkpointer(None, "demo", {"w": w}, opt, torch.Generator())
    c.save(0, 1, [1.0])  # nothing to write
    assert c.restore() == (0, 0, [])
    assert isinstance(c.restore()[2], T.History) and len(c.generators) == 1
    missing = T.Checkpointer(str(tmp_path / "none.pt"), "demo", {"w": w}, opt, [])
    start, step, hist = missing.restore()
    assert (start, step, hist, hist.step_times) == (0, 0, [], [])
    assert list(tmp_path.iterdir()) == []


def test_only_the_main_rank_writes(tmp_path):
    w, opt = ckpt_parts()
    path = tmp_path / "s.pt"
    T.Checkpointer(str(path), "demo", {"w": w}, opt, [], ranks=D.Dist(rank=1, world_size=2)).save(0, 1, [])
    assert not path.exists()
    T.Checkpointer(str(path), "demo", {"w": w}, opt, [], ranks=D.Dist(rank=0, world_size=1)).save(0, 1, [])
    assert path.exists()


def test_checkpointer_refuses_a_state_of_another_run(tmp_path):
    path = str(tmp_path / "s.pt")
    w, opt = ckpt_parts()
    T.Checkpointer(path, "demo", {"w": w}, opt, [torch.Generator()]).save(0, 1, [])
    with pytest.raises(ValueError, match=r"does not fit this run: tensors differ at \['v', 'w'\]$"):
        T.Checkpointer(path, "demo", {"v": w}, opt, [torch.Generator()]).restore()
    w3 = nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match=r": w has shape \(3,\), this run needs \(4,\)$"):
        T.Checkpointer(path, "demo", {"w": w3}, torch.optim.Adam([w3]), [torch.Generator()]).restore()
    with pytest.raises(ValueError, match="holds 1 random generators, this run has 2$"):
        T.Checkpointer(path, "demo", {"w": w}, opt, [torch.Generator(), torch.Generator()]).restore()
    with pytest.raises(ValueError, match="holds 1 random generators, this run has 0$"):
        T.Checkpointer(path, "demo", {"w": w}, opt, []).restore()
    with pytest.raises(ValueError, match="is for 'demo', expected 'other'"):
        T.Checkpointer(path, "other", {"w": w}, opt, [torch.Generator()]).restore()


def test_checkpointer_reads_the_one_generator_format(tmp_path):
    """States written before the generator list hold one ``generator``; a state with neither holds none."""
    from fastvlm.io import load_train_state, save_train_state

    path = str(tmp_path / "s.pt")
    w, opt = ckpt_parts()
    src = torch.Generator().manual_seed(3)
    T.Checkpointer(path, "demo", {"w": w}, opt, [src]).save(2, 5, [0.5])
    st = load_train_state(path)
    st.pop("fastvlm_train_state")
    st["generator"] = st.pop("generators")[0]
    save_train_state(path, st)
    g = torch.Generator().manual_seed(99)
    assert T.Checkpointer(path, "demo", {"w": w}, opt, [g]).restore()[:2] == (3, 5)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(3)))
    st.pop("generator")
    st.pop("step_times")
    save_train_state(path, st)
    _, _, hist = T.Checkpointer(path, "demo", {"w": w}, opt, []).restore()
    assert hist == [0.5] and hist.step_times == []


# ---------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------


def loop_parts():
    w = nn.Parameter(torch.zeros(1))
    return w, torch.optim.SGD([w], lr=0.0)


def test_run_epochs_weighted_means_lrs_and_hooks(tmp_path):
    w, opt = loop_parts()
    lrs, ends, steps = [], [], []

    def step(batch, index):
        lrs.append(opt.param_groups[0]["lr"])
        steps.append(index)
        value, weight = batch
        return {"loss": value, "acc": 2 * value}, weight

    data = {0: [(1.0, 1.0), (4.0, 3.0)], 1: [(2.0, 2.0)], 2: []}
    hist = T.run_epochs("demo", epochs=3, batches=lambda e: data[e], step=step, optimizer=opt, tensors={"w": w},
                        lr_at=lambda e: 0.5 ** e, on_epoch_end=ends.append)
    assert hist == [{"loss": 13.0 / 4, "acc": 26.0 / 4}, {"loss": 2.0, "acc": 4.0}, {}]  # (1*1 + 4*3) / 4
    assert lrs == [1.0, 1.0, 0.5] and ends == [0, 1, 2] and steps == [0, 1, 2]
    assert opt.param_groups[0]["lr"] == 0.25  # set before the epoch with no batches too
    assert len(hist.step_times) == 3 and all(t >= 0 for t in hist.step_times)
    import time

    def slow(batch, index):
        time.sleep(0.02)
        return {"loss": 1.0}, 1

    timed = T.run_epochs("demo", epochs=1, batches=lambda e: [0, 0], step=slow, optimizer=opt, tensors={"w": w},
                         lr_at=lambda e: 1.0)
    assert all(0.02 <= t < 5.0 for t in timed.step_times)  # each step's own duration, not a clock reading
    # scalar: the value of one metric per epoch; an epoch of zero weight gives 0
    hist = T.run_epochs("demo", epochs=2, batches=lambda e: [(3.0, 0.0)] if e else [(1.0, 2.0), (3.0, 2.0)],
                        step=step, optimizer=opt, tensors={"w": w}, lr_at=lambda e: 1.0, scalar="acc")
    assert hist == [4.0, 0.0]
    hist = T.run_epochs("demo", epochs=1, batches=lambda e: [(1.0, 1.0)], step=step, optimizer=opt,
                        tensors={"w": w}, lr_at=lambda e: 1.0, scalar="missing")
    assert hist == [0.0]


def test_run_epochs_resumes_at_the_saved_epoch_and_step(tmp_path):
    w, opt = loop_parts()
    path = str(tmp_path / "s.pt")
    seen = []

    def step(batch, index):
        seen.append(index)
        return {"loss": float(index)}, 1

    def die(epoch):
        if epoch == 1:
            raise Boom

    with pytest.raises(Boom):
        T.run_epochs("demo", epochs=4, batches=lambda e: [0, 0], step=step, optimizer=opt, tensors={"w": w},
                     lr_at=lambda e: 1.0, checkpoint=path, on_epoch_end=die, scalar="loss")
    assert seen == [0, 1, 2, 3]
    seen.clear()
    hist = T.run_epochs("demo", epochs=4, batches=lambda e: [0, 0], step=step, optimizer=opt, tensors={"w": w},
                        lr_at=lambda e: 1.0, checkpoint=path, scalar="loss")
    assert seen == [4, 5, 6, 7]  # epochs 2 and 3 only, the step counter carried on
    assert hist == [0.5, 2.5, 4.5, 6.5] and len(hist.step_times) == 8


class FakeRanks:
    """Rank 0 of 2 for the loop: enabled, main."""

    enabled, is_main, rank, world_size = True, True, 0, 2


def test_run_epochs_sums_over_the_ranks_unless_replicated(monkeypatch):
    calls = []

    def all_sum(values, d):
        calls.append(list(values))
        return [3 * v for v in values[:-1]] + [values[-1] + 2.0]  # the other rank: twice the sums, weight 2

    monkeypatch.setattr(D, "all_sum", all_sum)
    w, opt = loop_parts()
    step = lambda batch, i: ({"a": batch, "b": 1.0}, 1.0)  # noqa: E731
    hist = T.run_epochs("demo", epochs=1, batches=lambda e: [1.0, 3.0], step=step, optimizer=opt, tensors={"w": w},
                        lr_at=lambda e: 1.0, ranks=FakeRanks())
    assert calls == [[4.0, 2.0, 2.0]]  # the sums in the metrics' order, then the weight
    assert hist == [{"a": 12.0 / 4, "b": 6.0 / 4}]
    calls.clear()
    hist = T.run_epochs("demo", epochs=1, batches=lambda e: [1.0, 3.0], step=step, optimizer=opt, tensors={"w": w},
                        lr_at=lambda e: 1.0, ranks=FakeRanks(), replicated=True)
    assert calls == [] and hist == [{"a": 2.0, "b": 1.0}]


def test_run_epochs_progress_bar_closes_when_a_step_raises(monkeypatch):
    import tqdm.auto

    bars = []

    class Recorder(tqdm.auto.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.asked_disable = kw["disable"]  # close() disables a bar: keep what the loop asked for
            self.postfixes = []
            bars.append(self)

        def set_postfix(self, *a, **kw):
            self.postfixes.append(kw)
            super().set_postfix(*a, **kw)

        def close(self):
            self.closed_by_loop = True
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    w, opt = loop_parts()

    def step(batch, i):
        raise Boom

    with pytest.raises(Boom):
        T.run_epochs("demo", epochs=2, batches=lambda e: [1], step=step, optimizer=opt, tensors={"w": w},
                     lr_at=lambda e: 1.0, progress=True)
    assert bars and bars[-1].closed_by_loop
    # a rank other than 0, or progress off: the bar is disabled
    T.run_epochs("x", epochs=1, batches=lambda e: [], step=step, optimizer=opt, tensors={"w": w},
                 lr_at=lambda e: 1.0, progress=True, ranks=D.Dist(rank=1, world_size=1))
    assert bars[-1].asked_disable is True
    T.run_epochs("x", epochs=1, batches=lambda e: [], step=step, optimizer=opt, tensors={"w": w},
                 lr_at=lambda e: 1.0, progress=False)
    assert bars[-1].asked_disable is True
    T.run_epochs("x", epochs=4, batches=lambda e: [], step=step, optimizer=opt, tensors={"w": w},
                 lr_at=lambda e: 1.0, progress=True)
    assert bars[-1].asked_disable is False and bars[0].asked_disable is False
    assert bars[-1].postfixes == [{"epoch": "1/4"}, {"epoch": "2/4"}, {"epoch": "3/4"}, {"epoch": "4/4"}]
