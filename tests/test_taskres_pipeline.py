"""TaskRes end to end on a random-init open_clip model and a generated image folder."""

import json
import os

import pytest
import torch

from fastvlm import cli
from fastvlm.data import cache_features, classnames, coop_split, few_shot, image_folder, load_splits
from fastvlm.io import load_checkpoint, save_checkpoint
from fastvlm.models import TINY, freeze, load_clip
from fastvlm.templates import IMAGENET_TEMPLATES, templates_for
from fastvlm.train.common import warmup_cosine
from fastvlm.train.taskres import TaskResRecipe, evaluate_head, train_taskres
from fastvlm.tuners.taskres import TaskResConfig, TaskResHead, build_base_classifier

from .synthetic import make_image_folder


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip(TINY, None)


def _state_digest(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_pipeline_end_to_end(tmp_path, tiny):
    model, _, pre, tok = tiny
    freeze(model)
    make_image_folder(tmp_path / "imgs", classes=4, per_class=12)
    samples = image_folder(str(tmp_path / "imgs"))
    names = classnames(samples)
    assert names == ["class 0", "class 1", "class 2", "class 3"]
    before = _state_digest(model)

    base = build_base_classifier(model, tok, names, ["a photo of a {}.", "a {} picture."])
    # raw text features averaged over templates, not normalised
    one = model.encode_text(tok(["a photo of a class 2.", "a class 2 picture."])).float().mean(0)
    torch.testing.assert_close(base[2], one.detach(), rtol=1e-5, atol=1e-5)

    train = few_shot(samples, 4, seed=1)
    assert len(train) == 16 and sorted(s[1] for s in train) == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    f_tr, y_tr = cache_features(model, train, pre, batch_size=5, progress=False)
    f_te, y_te = cache_features(model, samples, pre, batch_size=16, progress=False)
    assert f_tr.shape == (16, 32) and y_tr.tolist() == [s[1] for s in train]

    head = TaskResHead(base)
    base_before = head.base.clone()
    zs = evaluate_head(head, f_te, y_te)
    hist = train_taskres(head, f_tr, y_tr, TaskResRecipe(lr=1e-2, batch_size=8, epochs=30), shots=4, seed=0)
    acc = evaluate_head(head, f_te, y_te)
    assert hist[-1] < 0.5 * hist[0], f"loss did not fall: {hist[0]:.3f} -> {hist[-1]:.3f}"
    assert acc >= zs and acc > 40.0  # 4 classes: chance is 25%
    assert head.residual.abs().sum() > 0
    assert torch.equal(head.base, base_before), "the frozen base changed"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"encoder tensor {k} changed"

    # the checkpoint holds just the residual and its config, and restores the head exactly
    path = head.save(str(tmp_path / "taskres.safetensors"), classnames=names)
    tensors, cfg = load_checkpoint(path, kind="tuners")
    assert set(tensors) == {"residual"} and cfg["tuners"]["taskres"]["config"]["alpha"] == 0.5
    assert cfg["classnames"] == names
    fresh = TaskResHead(base)
    fresh.load_residual(path)
    torch.testing.assert_close(fresh(f_te), head(f_te))


def test_cli_tune_and_eval(tmp_path, capsys):
    make_image_folder(tmp_path / "data", classes=3, per_class=6, split_dirs=True)
    out = tmp_path / "run"
    rc = cli.main(["tune", "taskres", "--model", TINY, "--pretrained", "none", "--data", str(tmp_path / "data"),
                   "--shots", "4", "--seed", "2", "--out", str(out), "--epochs", "5", "--no-progress"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 5 and metrics["train_samples"] == 12 and metrics["test_samples"] == 18
    assert (out / "features_train.safetensors").exists()
    text = capsys.readouterr().out
    assert "TaskRes top-1" in text
    rc = cli.main(["eval", "--checkpoint", str(out / "taskres.safetensors"), "--data", str(tmp_path / "data"),
                   "--shots", "4", "--no-progress"])
    assert rc == 0
    assert f"top-1 {metrics['top1']:.2f}%" in capsys.readouterr().out


def test_coop_split_file(tmp_path):
    make_image_folder(tmp_path / "imgs", classes=2, per_class=3)
    rows = [[f"class_{c}/{i}.png", c, f"class {c}"] for c in range(2) for i in range(3)]
    split = {"train": rows[:4], "val": rows[4:5], "test": rows[5:]}
    p = tmp_path / "split_zhou_Toy.json"
    p.write_text(json.dumps(split))
    s = coop_split(str(p), str(tmp_path / "imgs"))
    assert [len(s[k]) for k in ("train", "val", "test")] == [4, 1, 1]
    assert os.path.exists(s["train"][0][0]) and s["train"][3] [1:] == (1, "class 1")
    assert load_splits(str(tmp_path / "imgs"), str(p))["test"] == s["test"]
    p.write_text(json.dumps({"train": [["a.png", 0]], "val": [], "test": []}))
    with pytest.raises(ValueError, match=r"train\[0\] must be \[path, label, classname\]"):
        coop_split(str(p))


def test_few_shot_is_seeded_and_per_class():
    samples = [(f"{c}-{i}", c, str(c)) for c in range(3) for i in range(10)]
    a, b, c = few_shot(samples, 2, 7), few_shot(samples, 2, 7), few_shot(samples, 2, 8)
    assert a == b and a != c
    assert [s[1] for s in a] == [0, 0, 1, 1, 2, 2]
    assert len(few_shot(samples, 50, 0)) == 30  # a class with fewer images gives them all
    with pytest.raises(ValueError, match="shots must be >= 1"):
        few_shot(samples, 0, 0)


def test_recipe_defaults_follow_the_paper():
    r = TaskResRecipe()
    assert (r.lr, r.weight_decay, r.batch_size, r.warmup_epochs, r.warmup_lr) == (2e-3, 5e-4, 256, 1, 1e-5)
    assert [r.resolved_epochs(s) for s in (1, 2, 4, 8, 16)] == [100, 100, 100, 200, 200]
    assert warmup_cosine(0, 100, 2e-3, 1) == 1e-5
    assert warmup_cosine(1, 100, 2e-3, 1) == pytest.approx(2e-3)
    assert warmup_cosine(99, 100, 2e-3, 1) < 1e-6 + 2e-3 * 0.001
    assert len(IMAGENET_TEMPLATES) == 8 and templates_for("OxfordPets") == ["a photo of a {}, a type of pet."]


def test_load_clip_paths(tmp_path, monkeypatch):
    torch.manual_seed(3)
    m, *_ = load_clip(TINY, None)
    ckpt = tmp_path / "tiny.pt"
    torch.save(m.state_dict(), ckpt)
    m2, *_ = load_clip(TINY, str(ckpt))  # a local checkpoint file
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip(TINY, str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="model must be an open_clip architecture"):
        load_clip("ViT-Nope", None)
    # a pretrained tag is handed to open_clip as is (no download here: open_clip is stubbed)
    seen = {}
    import open_clip

    def fake(name, pretrained=None, device="cpu", **kw):
        seen["args"] = (name, pretrained)
        return m, None, None

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake)
    load_clip("ViT-B-16", "openai")
    assert seen["args"] == ("ViT-B-16", "openai")
    with pytest.raises(ValueError, match="pretrained must be a file or one of"):
        load_clip("ViT-B-16", "no-such-tag")


def test_checkpoint_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_checkpoint(str(bad))
    p = save_checkpoint(str(tmp_path / "x.safetensors"), {"a": torch.ones(2)}, {"kind": "mask"})
    with pytest.raises(ValueError, match="holds a 'mask' checkpoint, expected 'taskres'"):
        load_checkpoint(p, kind="taskres")
    head = TaskResHead(torch.randn(3, 4))
    head.save(str(tmp_path / "h.safetensors"))
    with pytest.raises(ValueError, match=r"checkpoint .* does not fit the model: residual: file \(3, 4\), model \(5, 4\)"):
        TaskResHead(torch.randn(5, 4)).load_residual(str(tmp_path / "h.safetensors"))
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")] == []  # no temporaries left behind


def test_eval_rebuilds_the_random_init_model_tune_trained_on(tmp_path, capsys):
    """A --pretrained none run: eval builds the model from the checkpoint's seed, as tune did, so its own
    features of the test images are tune's to the bit (before, eval built an unseeded model: its classifier
    and features were another network's, and its top-1 moved from run to run)."""
    make_image_folder(tmp_path / "data", classes=3, per_class=6, split_dirs=True)
    out = tmp_path / "run"
    assert cli.main(["tune", "taskres", "--model", TINY, "--pretrained", "none", "--data", str(tmp_path / "data"),
                     "--shots", "4", "--seed", "3", "--out", str(out), "--epochs", "2", "--no-progress"]) == 0
    top1 = json.loads((out / "metrics.json").read_text())["top1"]
    torch.manual_seed(12345)  # whatever the global generator holds, eval must not depend on it
    assert cli.main(["eval", "--checkpoint", str(out), "--data", str(tmp_path / "data"), "--no-progress"]) == 0
    assert f"top-1 {top1:.2f}%" in capsys.readouterr().out
    tune_features, _ = load_checkpoint(str(out / "features_test.safetensors"), kind="features")
    eval_features, _ = load_checkpoint(str(out / "features_eval.safetensors"), kind="features")
    assert torch.equal(eval_features["features"], tune_features["features"])
