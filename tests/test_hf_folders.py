"""``hf:<folder>`` models (fastvlm/models.py, docs/cli.md): a transformers CLIPModel / SiglipModel folder written
by ``save_pretrained`` loads offline as the same 4-tuple as an open_clip model, TaskRes and the command line
run on it, and a wrong folder or argument is refused naming it. Random-init tiny models (tests/hf_tiny.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from .hf_tiny import TEXT, VISION, clip_tokenizer, save_tiny_clip, tiny_clip

pytest.importorskip("transformers")

from fastvlm.models import HFTokenizer, encode_image, image_norm, load_clip  # noqa: E402
from fastvlm.tuners.taskres import build_base_classifier  # noqa: E402

PROMPTS = ["a photo of a cat.", "a photo of a " + "very " * 20 + "big dog."]  # the second is cut at 16 tokens


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"tok": save_tiny_clip(root / "with-tokenizer"), "bare": save_tiny_clip(root / "bare", tokenizer=False),
            "root": root}


def _open_clip_tokens(texts, length=16):
    import open_clip

    return open_clip.tokenize(texts, context_length=length)


def test_folder_loads_as_the_saved_model_with_its_tokenizer(folders):
    model, pre_train, pre_eval, tok = load_clip("hf:" + folders["tok"])
    assert type(model).__name__ == "CLIPModel" and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    saved = tiny_clip()  # the same seed: the weights that were saved
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(encode_image(model, images), encode_image(saved, images))
    img = Image.new("RGB", (48, 40), (200, 30, 90))
    assert pre_eval(img).shape == pre_train(img).shape == (3, 32, 32)
    assert image_norm(model)[0] == 32
    # the folder's tokenizer, padded / truncated to max_position_embeddings = 16, as open_clip's tokenizer
    assert isinstance(tok, HFTokenizer)
    got, ref = tok(PROMPTS), _open_clip_tokens(PROMPTS)
    assert got.dtype == torch.long and got.shape == (2, 16)
    assert torch.equal(got[1], ref[1])  # cut: both keep <|endoftext|> (49407) last
    end = int((ref[0] == 49407).nonzero()[0])
    assert torch.equal(got[0, :end + 1], ref[0, :end + 1]) and (got[0, end:] == 49407).all()  # pads with 49407
    assert tok("one").shape == (1, 16)


def test_taskres_classifier_is_the_text_features_of_the_prompts(folders):
    """build_base_classifier on an hf: model: each row is get_text_features of "a photo of a {}." tokenized by
    open_clip's tokenizer, an independent implementation (its padding differs: CLIP pools at the first
    end-of-text token behind a causal mask, so padding cannot change the features)."""
    model, _, _, tok = load_clip("hf:" + folders["tok"])
    base = build_base_classifier(model, tok, ["cat", "dog"])
    with torch.no_grad():
        want = model.get_text_features(input_ids=_open_clip_tokens(["a photo of a cat.", "a photo of a dog."]))
    want = want if isinstance(want, torch.Tensor) else want.pooler_output
    assert base.shape == (2, 32)
    torch.testing.assert_close(base, want, atol=1e-5, rtol=0)
    assert (base[0] - base[1]).abs().max() > 1e-3


def test_folder_without_a_tokenizer(folders, tmp_path):
    """A CLIP folder without one gets open_clip's CLIP tokenizer (the same ids up to the padding); a SigLIP
    folder without one is refused, naming what to save."""
    model, _, _, tok = load_clip("hf:" + folders["bare"])
    assert torch.equal(tok(PROMPTS), _open_clip_tokens(PROMPTS))
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    siglip = SiglipModel(SiglipConfig(text_config={**TEXT, "vocab_size": 49408}, vision_config=VISION)).eval()
    siglip.save_pretrained(tmp_path / "siglip")
    with pytest.raises(ValueError, match=r"has no tokenizer .*tokenizer\.save_pretrained"):
        load_clip(f"hf:{tmp_path / 'siglip'}")
    clip_tokenizer().save_pretrained(tmp_path / "siglip")  # any tokenizer the folder names loads
    model, _, _, tok = load_clip(f"hf:{tmp_path / 'siglip'}")
    assert type(model).__name__ == "SiglipModel" and image_norm(model) == (32, (0.5,) * 3, (0.5,) * 3)
    base = build_base_classifier(model, tok, ["cat", "dog"])
    assert base.shape == (2, 64) and torch.isfinite(base).all()  # SigLIP: text features = hidden width
    with torch.no_grad():  # TaskRes on SigLIP: the classifier is its text features, and the residual trains
        want = model.get_text_features(input_ids=tok(["a photo of a cat.", "a photo of a dog."]))
    torch.testing.assert_close(base, want if isinstance(want, torch.Tensor) else want.pooler_output, atol=1e-5, rtol=0)
    from fastvlm.tuners.taskres import TaskResHead

    head = TaskResHead(base)
    with torch.no_grad():
        feats = encode_image(model, torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    opt = torch.optim.SGD([head.residual], lr=0.05)
    before = head.loss(feats, labels)
    before.backward()
    opt.step()
    assert head.loss(feats, labels) < before


def test_wrong_folders_and_arguments_are_refused(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip(f"hf:{tmp_path / 'missing'}")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="holds a 'bert' model, not a CLIP-style one"):
        load_clip(f"hf:{tmp_path / 'bert'}")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="no weights"):
        load_clip(f"hf:{tmp_path / 'noweights'}")
    with pytest.raises(ValueError, match="no config.json"):
        load_clip(f"hf:{tmp_path}")
    with pytest.raises(ValueError, match="pretrained must be None for an hf: model"):
        load_clip("hf:" + folders["tok"], "openai")


def test_command_line_tunes_and_evaluates_taskres_on_a_folder(folders, tmp_path):
    from .synthetic import make_image_folder
    from .test_cli import drive, one_error_line

    data, t = str(tmp_path / "data"), str(tmp_path)
    make_image_folder(data, classes=3, per_class=5)
    hf = "hf:" + folders["tok"]
    tune = ["tune", "taskres", "--data", data, "--shots", "2", "--epochs", "2", "--no-progress"]
    cases = [
        tune + ["--model", hf, "--out", f"{t}/run"],  # 0
        ["eval", "--checkpoint", f"{t}/run", "--data", data, "--no-progress"],  # 1: model from the checkpoint
        tune + ["--model", "hf:" + folders["bare"], "--out", f"{t}/bare"],  # 2: open_clip's tokenizer
        tune + ["--model", hf, "--pretrained", "openai", "--out", f"{t}/x"],  # 3
        tune + ["--model", f"hf:{t}/missing", "--out", f"{t}/x"],  # 4
        tune + ["--model", f"hf:{data}", "--out", f"{t}/x"],  # 5: an image folder, not a model
        ["eval", "--checkpoint", f"{t}/run", "--data", data, "--pretrained", "none"],  # 6
    ]
    image_tuners = {"mask": "RMT", "orth": "OrthCR", "lora": "lora"}
    one_epoch = ["--data", data, "--shots", "2", "--epochs", "1", "--batch-size", "4", "--no-progress"]
    cases += [["tune", m, "--model", hf, *one_epoch, "--out", f"{t}/{m}"] for m in image_tuners]  # 7...
    r, _ = drive(tmp_path, cases)
    assert len(r) == len(cases)
    assert r[0]["rc"] == 0 and "TaskRes top-1" in r[0]["out"], r[0]
    run = json.load(open(f"{t}/run/run.json"))["settings"]
    assert run["model"] == "hf:" + os.path.abspath(folders["tok"]) and run["pretrained"] is None
    top1 = json.load(open(f"{t}/run/metrics.json"))["top1"]
    assert r[1]["rc"] == 0 and f"top-1 {top1:.2f}%" in r[1]["out"], r[1]
    assert r[2]["rc"] == 0, r[2]
    assert "Loading weights" not in r[0]["err"] + r[1]["err"]  # --no-progress: no bar from transformers either
    one_error_line(r[3], 2, "--pretrained 'openai'", "hf: folder holds its own weights")
    one_error_line(r[4], 2, "--model", "does not exist")
    one_error_line(r[5], 2, "--model", "no config.json")
    one_error_line(r[6], 2, "--pretrained 'none'", "hf: folder holds its own weights")
    assert not os.path.exists(f"{t}/x")
    for res, label in zip(r[7:], image_tuners.values()):  # the image tuners, through their transformers presets
        assert res["rc"] == 0 and f"->  {label} top-1" in res["out"], res


def test_feature_cache_is_not_reused_for_weights_saved_again(tmp_path):
    """The command line's feature cache is keyed by the model's name and its files' size and time: weights
    saved again into the same hf: folder are encoded again, not read from the old cache."""
    from argparse import Namespace

    from fastvlm.cli import _cached_features

    from .synthetic import make_image_folder

    make_image_folder(tmp_path / "data", classes=2, per_class=2)
    from fastvlm.data import image_folder

    samples = image_folder(str(tmp_path / "data"))
    folder = save_tiny_clip(tmp_path / "m", tokenizer=False, seed=0)
    args = Namespace(model="hf:" + folder, pretrained=None, batch_size=None, device="cpu", workers=0,
                     no_progress=True)
    cache = str(tmp_path / "features.safetensors")
    first, _, pre_eval, _ = load_clip(args.model)
    f0, _ = _cached_features(first, samples, pre_eval, cache, args)
    assert torch.equal(_cached_features(None, samples, pre_eval, cache, args)[0], f0)  # read back: no model used
    save_tiny_clip(tmp_path / "m", tokenizer=False, seed=1)
    second = load_clip(args.model)[0]
    f1, _ = _cached_features(second, samples, pre_eval, cache, args)
    assert (f1 - f0).abs().max() > 1e-3
    images = torch.stack([pre_eval(Image.open(p).convert("RGB")) for p, *_ in samples])
    with torch.no_grad():
        torch.testing.assert_close(f1, encode_image(second, images), atol=1e-6, rtol=0)
