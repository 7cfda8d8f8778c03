"""The command line as a user meets it: every expected failure is one line ``fastvlm: error: ...`` with exit
status 2 (usage) or 1 (failure), work in --out is never lost, and the output says what it means.

Each subprocess pays the torch import (seconds), so the cases run in a few child processes: ``_drive`` runs
a list of command lines through ``fastvlm.cli.main`` in one fresh interpreter and reports each one's exit
status, stdout and stderr; the ``python -m fastvlm`` entry point and a real Ctrl-C run on their own.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from .synthetic import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "fastvlm-tiny-vit"
MODEL = ["--model", TINY, "--pretrained", "none", "--no-progress"]


def _env(tmp_path, **extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FASTVLM_TRACEBACK", None)
    env.update(extra)
    return env


def _drive():
    """Child process: read {"cases": [{"argv": [...], "interrupt_at": epoch?, "probe_ok": bool?}]} from stdin,
    run each through cli.main, print a JSON list of {rc, out, err, seconds}. interrupt_at raises
    KeyboardInterrupt at the end of that TaskRes epoch (Ctrl-C, deterministically); probe_ok makes the image
    check pass every file, so that an unreadable one fails later, while the images are decoded."""
    import logging

    import fastvlm.data
    import fastvlm.train.taskres as taskres
    from fastvlm import cli

    logged = io.StringIO()
    logging.basicConfig(stream=logged)  # open_clip's warnings go to the root logger
    real_train, real_probe = taskres.train_taskres, fastvlm.data._probe
    spec = json.load(sys.stdin)
    results = []
    for case in spec["cases"]:
        stop = case.get("interrupt_at")

        def train(*a, **k):
            def on_epoch_end(epoch):
                if epoch == stop:
                    raise KeyboardInterrupt

            return real_train(*a, **{**k, "on_epoch_end": on_epoch_end})

        taskres.train_taskres = train if stop is not None else real_train
        fastvlm.data._probe = (lambda path: None) if case.get("probe_ok") else real_probe
        out, err = io.StringIO(), io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(case["argv"])
            except SystemExit as e:  # --help
                rc = e.code
            except BaseException as e:  # noqa: BLE001 - reported to the test, which fails on it
                rc = f"raised {type(e).__name__}: {e}"
        results.append({"rc": rc, "out": out.getvalue(), "err": err.getvalue(),
                        "seconds": time.perf_counter() - t0})
    print(json.dumps({"results": results, "log": logged.getvalue()}))


def drive(tmp_path, cases, timeout=600):
    cases = [c if isinstance(c, dict) else {"argv": c} for c in cases]
    p = subprocess.run([sys.executable, "-c", "from tests.test_cli import _drive; _drive()"], cwd=ROOT,
                       input=json.dumps({"cases": cases}), capture_output=True, text=True, env=_env(tmp_path),
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    return got["results"], got["log"]


def one_error_line(r, code, *needles):
    """r failed with exit status ``code`` and exactly one stderr line, ``fastvlm: error: ...``, holding every
    needle."""
    assert r["rc"] == code, r
    lines = r["err"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastvlm: error: "), r["err"]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Folders for the cases: flat (3 classes x 6), split, one class, bad images, a CoOp split with no train
    list, a LoRA pack, a stray file and a folder holding something else."""
    root = tmp_path_factory.mktemp("cli-data")
    make_image_folder(root / "flat", classes=3, per_class=6)
    make_image_folder(root / "split", classes=3, per_class=3, split_dirs=True)
    make_image_folder(root / "one", classes=1, per_class=4)
    make_image_folder(root / "bad", classes=3, per_class=6)
    (root / "bad" / "class_1" / "0.png").write_bytes(b"")  # zero bytes
    (root / "bad" / "class_2" / "3.png").write_bytes(b"not a png at all")
    (root / "empty_split.json").write_text(json.dumps({"train": [], "val": [], "test": []}))
    (root / "afile.txt").write_text("x")
    (root / "busy").mkdir()
    (root / "busy" / "notes.txt").write_text("mine")
    import torch

    from fastvlm.models import load_clip
    from fastvlm.tuners.pack import apply_method, save_pack

    torch.manual_seed(0)
    model, *_ = load_clip(TINY, None)
    apply_method(model, "lora")
    save_pack(str(root / "uprun" / "pack"), model, "lora", TINY, pretrained="none", classes=3)
    return root


def test_usage_mistakes_and_failures_before_any_model(tmp_path, data):
    """Each mistake is refused in one line, naming the argument, before a model is built; nothing is written."""
    d = str(data)
    out = str(tmp_path / "out")
    base = ["tune", "mask", "--data", f"{d}/split", "--out", out, *MODEL]
    cases = [
        base + ["--shots", "-1"],
        base + ["--batch-size", "0"],
        base + ["--epochs", "-2"],
        base + ["--lr", "0"],
        base + ["--dataset", "imagenet"],
        base + ["--dataset", "Pets"],
        ["tune", "mask", "--data", f"{d}/split", "--out", out, "--model", "vit-b-32", "--pretrained", "none"],
        base + ["--device", "cuda:99"],
        base + ["--device", "gpu0"],
        ["tune", "mask", "--data", f"{d}/split", "--out", f"{d}/afile.txt", *MODEL],
        ["tune", "mask", "--data", f"{d}/split", "--out", f"{d}/busy", *MODEL],
        base + ["--resume", "--overwrite"],
        base + ["--resume"],
        ["tune", "mask", "--data", f"{d}/flat", "--out", out, "--shots", "6", *MODEL],
        ["tune", "mask", "--data", f"{d}/flat", "--out", out, "--shots", "0", *MODEL],
        ["tune", "mask", "--data", f"{d}/one", "--out", out, "--shots", "1", *MODEL],
        ["tune", "mask", "--data", f"{d}/bad", "--out", out, "--shots", "2", *MODEL],
        ["tune", "mask", "--data", f"{d}/empty_split.json", "--out", out, *MODEL],
        ["tune", "vpt", "--data", f"{d}/split", "--out", out, "--init-from", f"{d}/uprun/pack", *MODEL],
        ["tune", "lora", "--data", f"{d}/split", "--out", out, "--init-from", f"{d}/uprun", *MODEL],
        ["eval", "--checkpoint", f"{d}/uprun/pack", "--data", f"{d}/split"],
        ["eval", "--checkpoint", f"{d}/uprun/pack/pack.json", "--data", f"{d}/split"],
        ["eval", "--checkpoint", f"{d}/nothing.safetensors", "--data", f"{d}/split"],
        ["pack", f"{d}/busy"],
        ["tune", "mask", "--data", f"{d}/split", "--out", out, "--pretrained", "/no/such/weights.bin"],
        # the default --pretrained openai, not cached, hub offline (as with no network): fails in seconds
        ["tune", "mask", "--data", f"{d}/split", "--out", out, "--no-progress"],
        ["tune"],
    ] + [["tune", m, "--help"] for m in ("vpt", "lora", "adapter", "mask")] + [["eval", "--help"]]
    r, _ = drive(tmp_path, cases)
    one_error_line(r[0], 2, "argument --shots", ">= 0", "-1")
    one_error_line(r[1], 2, "argument --batch-size", ">= 1")
    one_error_line(r[2], 2, "argument --epochs", ">= 0")
    one_error_line(r[3], 2, "argument --lr", "> 0")
    one_error_line(r[4], 2, "--dataset", "did you mean 'ImageNet'?", "OxfordPets", "EuroSAT")
    one_error_line(r[5], 2, "--dataset", "'Pets'", "OxfordPets", "Food101")
    one_error_line(r[6], 2, "--model", "did you mean 'ViT-B-32'?")
    one_error_line(r[7], 1, "--device cuda:99")
    one_error_line(r[8], 2, "--device 'gpu0' is not a torch device")
    one_error_line(r[9], 2, "afile.txt' is a file")
    one_error_line(r[10], 2, "is not empty", "notes.txt", "--resume", "--overwrite")
    one_error_line(r[11], 2, "--resume and --overwrite exclude each other")
    one_error_line(r[12], 2, "--resume", "no fastvlm run to resume")
    one_error_line(r[13], 1, "--shots 6 on a flat folder needs at least 7 images per class",
                   "'class 0' 6, 'class 1' 6, 'class 2' 6")
    one_error_line(r[14], 2, "--shots 0", "needs a train/ and test/ split")
    one_error_line(r[15], 1, "has 1 class", "'class 0'", "at least 2 classes")
    one_error_line(r[16], 1, "2 of the 18", "class_1/0.png", "class_2/3.png", "--skip-bad-images")
    one_error_line(r[17], 1, "empty 'train' list")
    one_error_line(r[18], 2, "--init-from", "holds a 'lora' pack", "tune vpt")
    one_error_line(r[19], 2, "--init-from", "is not a pack folder", "its pack is in pack/")
    one_error_line(r[20], 2, "is a PVP pack folder", "taskres.safetensors")
    one_error_line(r[21], 2, "is a PVP pack folder")
    one_error_line(r[22], 2, "--checkpoint", "does not exist")
    one_error_line(r[23], 2, "is not a pack folder")
    one_error_line(r[24], 2, "--pretrained", "does not exist")
    one_error_line(r[25], 1, "--pretrained", "'openai'", "not in the local cache", "--pretrained none",
                   "local checkpoint file")
    assert r[25]["seconds"] < 10, r[25]["seconds"]
    one_error_line(r[26], 2, "required: {taskres,mask,orth,vpt,lora,adapter}")
    assert not os.path.exists(out), "a refused run left --out behind"
    assert sorted(os.listdir(data / "busy")) == ["notes.txt"]
    # --help: each PVP method lists only its own options; eval shows no unused --model default; the default
    # of --pretrained is shown
    vpt, lora, adapter, mask, ev = (" ".join(x["out"].split()) for x in r[27:])
    assert all(x["rc"] == 0 for x in r[27:])
    assert "--tokens" in vpt and "--rank" not in vpt and "--bottleneck" not in vpt
    assert "--rank" in lora and "--lora-alpha" in lora and "--tokens" not in lora and "--bottleneck" not in lora
    assert "--bottleneck" in adapter and "--tokens" not in adapter and "--rank" not in adapter
    assert "default: openai" in mask and "--workers" in mask and "--threads" in mask
    assert "the global batch" in mask and "each of the N processes takes batch / N" in mask
    assert "default: ViT-B-16" not in ev and "default: the checkpoint's" in ev


def test_entry_point(tmp_path):
    """`python -m fastvlm` runs the CLI."""
    p = subprocess.run([sys.executable, "-m", "fastvlm", "--version"], cwd=ROOT, capture_output=True, text=True,
                       env=_env(tmp_path), timeout=300)
    from fastvlm import __version__

    assert p.returncode == 0 and p.stdout.strip() == f"fastvlm {__version__}"


@pytest.mark.slow
def test_runs_keep_work_and_say_what_they_mean(tmp_path, data):
    """Real runs on a random-init tiny model: the output folder's life cycle (refuse, resume, overwrite, clean
    up), eval reading shots and seed from the checkpoint, Ctrl-C, unreadable images, feedback."""
    d, t = str(data), str(tmp_path)
    tr = ["tune", "taskres", "--data", f"{d}/flat", "--shots", "2", "--seed", "5", *MODEL]
    cut = ["tune", "taskres", "--data", f"{d}/split", "--shots", "2", "--epochs", "4", "--out", f"{t}/cut", *MODEL]
    lora = ["tune", "lora", "--data", f"{d}/split", "--shots", "2", "--batch-size", "6", *MODEL]
    cases = [
        tr + ["--epochs", "3", "--out", f"{t}/run"],  # 0
        tr + ["--epochs", "3", "--out", f"{t}/run"],  # 1: not empty
        tr + ["--epochs", "4", "--seed", "6", "--out", f"{t}/run", "--resume"],  # 2: other settings
        ["eval", "--checkpoint", f"{t}/run", "--data", f"{d}/flat", "--no-progress"],  # 3: shots/seed from ckpt
        tr + ["--epochs", "3", "--out", f"{t}/run", "--overwrite"],  # 4
        {"argv": cut, "interrupt_at": 1},  # 5: Ctrl-C after epoch 2 of 4
        cut + ["--resume"],  # 6
        {"argv": ["tune", "taskres", "--data", f"{d}/bad", "--shots", "2", "--out", f"{t}/fails", *MODEL],
         "probe_ok": True},  # 7: an image that fails to decode, once the folder was made
        ["tune", "mask", "--data", f"{d}/bad", "--shots", "2", "--epochs", "1", "--skip-bad-images",
         "--model", TINY, "--pretrained", "none", "--out", f"{t}/mask"],  # 8: with progress bars
        ["tune", "orth", "--data", f"{d}/split", "--shots", "2", "--epochs", "1", "--block-size", "16",
         "--out", f"{t}/orth", *MODEL],  # 9
        lora + ["--epochs", "1", "--out", f"{t}/lora"],  # 10
        ["pack", f"{t}/lora/pack"],  # 11
        lora + ["--epochs", "0", "--init-from", f"{t}/lora/pack/pack.json", "--out", f"{t}/lora2"],  # 12
    ]
    r, log = drive(tmp_path, cases)
    print("seconds per case:", [round(x["seconds"], 1) for x in r])
    assert r[0]["rc"] == 0, r[0]
    m = json.loads(open(f"{t}/run/metrics.json").read())
    assert re.search(r"zero-shot top-1 [\d.]+%  ->  TaskRes top-1 [\d.]+%  on the 12 images of .*flat not drawn for "
                     r"training \(2 per class, seed 5\)", r[0]["out"]), r[0]["out"]
    # after success: the result, its metrics and settings, the feature caches (eval's too); no training state
    assert sorted(os.listdir(f"{t}/run")) == ["features_eval.safetensors", "features_test.safetensors",
                                              "features_train.safetensors", "metrics.json", "run.json",
                                              "taskres.safetensors"]
    one_error_line(r[1], 2, "is not empty", "`fastvlm tune taskres` run, finished", "--overwrite")
    one_error_line(r[2], 2, "other settings", "epochs 3 (now 4)", "seed 5 (now 6)")
    assert r[3]["rc"] == 0 and f"top-1 {m['top1']:.2f}%" in r[3]["out"] and "seed 5" in r[3]["out"], r[3]
    assert r[4]["rc"] == 0, r[4]
    # Ctrl-C: one line with where the state is and the command that resumes
    assert r[5]["rc"] == 130 and "Traceback" not in r[5]["err"], r[5]
    line = r[5]["err"].strip().splitlines()[-1]
    assert line.startswith("fastvlm: interrupted; the resumable state (2 epochs done) is in ")
    assert line.endswith("resume with: " + " ".join(["fastvlm", *cut, "--resume"])), line
    assert r[6]["rc"] == 0 and "resuming from epoch 3 of 4" in r[6]["err"], r[6]
    assert not os.path.exists(f"{t}/cut/train_state.pt")
    cut_metrics = json.loads(open(f"{t}/cut/metrics.json").read())
    assert cut_metrics["epochs"] == 4  # the saved epochs count too
    # one step per epoch (6 training features, batch 256): the interrupted run's two step times came back
    steps = cut_metrics["step_times"]
    assert steps["steps"] == len(steps["seconds"]) == 4 and all(x > 0 for x in steps["seconds"]), steps
    assert steps["median"] <= steps["p95"] <= steps["max"] == max(steps["seconds"])
    assert steps["max_over_median"] == pytest.approx(steps["max"] / steps["median"])
    # a failure once the folder was made: one line naming the file, and no half-made folder left
    one_error_line(r[7], 1, "class_1/0.png", "cannot be read")
    assert not os.path.exists(f"{t}/fails")
    # unreadable images skipped and counted; progress bars say what they do
    assert r[8]["rc"] == 0 and "skipped 2 unreadable folder image(s) of 18" in r[8]["err"], r[8]
    assert "zero-shot evaluation" in r[8]["err"] and "evaluating the masked model" in r[8]["err"]
    assert "zero-shot top-1" in r[8]["out"] and "RMT top-1" in r[8]["out"]
    mask_steps = json.loads(open(f"{t}/mask/metrics.json").read())["step_times"]
    assert mask_steps["steps"] == 1 and len(mask_steps["seconds"]) == 1  # 6 images, batch 32: one step
    assert mask_steps["median"] == mask_steps["max"] == mask_steps["seconds"][0] > 0
    assert re.search(r"zero-shot top-1 [\d.]+%  ->  OrthCR top-1 [\d.]+%  on the 9 images of the test split, all 3 "
                     r"classes", r[9]["out"]), r[9]
    assert re.search(r"zero-shot top-1 [\d.]+%  ->  lora top-1 [\d.]+%", r[10]["out"]), r[10]
    assert r[11]["rc"] == 0 and "attach" not in r[11]["out"] and "transformer" not in r[11]["out"]
    assert "method: lora (alpha=16.0, rank=8, " in r[11]["out"], r[11]["out"]  # the pack's config, not "()"
    assert len(r[11]["out"].strip().splitlines()) <= 6, r[11]["out"]
    assert r[12]["rc"] == 0 and "--epochs 0: nothing is trained" in r[12]["err"], r[12]
    from fastvlm.tuners.pack import read_pack

    a, _ = read_pack(f"{t}/lora/pack")
    b, _ = read_pack(f"{t}/lora2/pack")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # open_clip's random-weights warning: once in the whole process, though ten models were built
    assert log.count("No pretrained weights loaded") == 1, log


def _stop_once_saved(argv, env, state, sig, after=0.0):
    """Run `python -m fastvlm *argv`, send ``sig`` once ``state`` was written after time ``after``; (rc, stderr)."""
    p = subprocess.Popen([sys.executable, "-m", "fastvlm", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            if state.exists() and state.stat().st_mtime > after:
                break
            time.sleep(0.2)
        assert p.poll() is None and state.exists(), "no epoch was saved"
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, err


@pytest.mark.slow
def test_ctrl_c_and_sigterm_print_one_line_and_keep_the_state(tmp_path, data):
    """A real SIGINT to `python -m fastvlm tune taskres` mid-training; the printed command resumes it (and says
    from which epoch), and SIGTERM stops that run the same way."""
    out = tmp_path / "run"
    argv = ["tune", "taskres", "--data", str(data / "split"), "--shots", "2", "--epochs", "1000000",
            "--out", str(out), *MODEL]
    state = out / "train_state.pt"
    rc, err = _stop_once_saved(argv, _env(tmp_path), state, signal.SIGINT)
    assert rc == 130 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    m = re.fullmatch(r"fastvlm: interrupted; the resumable state \((\d+) epochs done\) is in (.*); resume with: "
                     r"fastvlm (tune taskres .* --resume)", line)
    assert m and m.group(2) == str(state), line
    assert m.group(3) == " ".join(argv + ["--resume"])
    done = int(m.group(1))
    rc, err = _stop_once_saved(argv + ["--resume"], _env(tmp_path), state, signal.SIGTERM,
                               after=state.stat().st_mtime)
    assert rc == 130 and "Traceback" not in err, err
    assert f"fastvlm: resuming from epoch {done + 1} of 1000000" in err
    assert re.search(r"fastvlm: interrupted; the resumable state \(\d+ epochs done\)", err.strip().splitlines()[-1])
    assert state.exists() and (out / "run.json").exists()


def test_thread_rule():
    from fastvlm.cli import default_workers, thread_count

    assert [default_workers(c) for c in (1, 2, 4, 8, 16, 64)] == [0, 0, 1, 2, 4, 4]
    assert thread_count(3, 2, 16, env={}) == 3  # --threads wins
    assert thread_count(None, 2, 16, env={"OMP_NUM_THREADS": "5"}) is None  # torch follows the variable
    assert thread_count(None, 4, 16, env={}) == 12  # the cores the workers leave
    assert thread_count(None, 2, 2, env={}) == 1
    assert thread_count(None, 0, 16, env={}) is None  # no workers: torch's default


def test_worker_count_does_not_change_the_order(tmp_path):
    """The shuffled training order comes from the seed alone, with or without worker processes."""
    import torch

    from fastvlm.data import image_folder, shuffled_loader

    make_image_folder(tmp_path / "d", classes=3, per_class=4)
    samples = image_folder(str(tmp_path / "d"))
    resize = lambda im: torch.zeros(1)  # noqa: E731 - the images are not the point here

    def order(workers, seed):
        loader = shuffled_loader(samples, resize, 5, seed, num_workers=workers)
        return [[int(v) for v in y] for epoch in range(2) for _, y in loader]

    a = order(0, 3)
    assert order(1, 3) == a and order(0, 4) != a
    assert sorted(sum(a[:3], [])) == sorted(s[1] for s in samples)  # one epoch holds every sample once


def test_check_images_and_dataset_names(tmp_path):
    from fastvlm.data import check_images, coop_split, image_folder
    from fastvlm.templates import nearest, templates_for

    make_image_folder(tmp_path / "d", classes=2, per_class=3)
    (tmp_path / "d" / "class_0" / "1.png").write_bytes(b"")
    good = tmp_path / "d" / "class_1" / "2.png"
    good.write_bytes(good.read_bytes()[:200])  # truncated
    bad = check_images(image_folder(str(tmp_path / "d")))
    assert [os.path.basename(os.path.dirname(p)) + "/" + os.path.basename(p) for p, _ in bad] == \
        ["class_0/1.png", "class_1/2.png"]
    (tmp_path / "s.json").write_text(json.dumps({"train": [], "val": [], "test": [["a.png", 0, "a"]]}))
    with pytest.raises(ValueError, match="empty 'train' list"):
        coop_split(str(tmp_path / "s.json"))
    assert nearest("imagenet", ["ImageNet", "Food101"]) == "ImageNet"
    assert nearest("food-101", ["ImageNet", "Food101"]) == "Food101"
    assert nearest("zzzz", ["ImageNet", "Food101"]) is None
    with pytest.raises(ValueError, match="did you mean 'OxfordPets'"):
        templates_for("oxfordpets")
