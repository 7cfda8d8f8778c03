"""`fastvlm tune` under torchrun: two gloo processes (c10d rendezvous, one machine) end with the trainable
tensors and the metrics of one process on the same global batches, write one set of outputs, resume an
interrupted run with two processes or with one, and end within the timeout when a rank fails or is killed.

Every torchrun start and every torch import costs seconds, so the runs share processes: one torchrun job
runs all the two-process cases in a row (``_drive``, the same ``fastvlm.cli.main`` that ``python -m fastvlm``
runs, with the process group kept between cases), one plain process runs the one-process cases, and one
`torchrun --no-python fastvlm` run (the console script) fails on an image that only rank 1 reads. The driver
records each rank's trainable tensors when the training loop returns, and interrupts (both ranks, as Ctrl-C
does) or kills (one rank, SIGKILL) a run at the end of an epoch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from .synthetic import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--model", "fastvlm-tiny-vit", "--pretrained", "none", "--no-progress"]
TIMEOUT_S = 20  # FASTVLM_DIST_TIMEOUT of these runs: a rank left alone gives up within it
RECIPE_MODULES = ("taskres", "rmt", "orth", "pvp")
#: interrupted with 2 processes, resumed with 2 and with 1: RMT (the dropout seeds follow the step counter)
#: and OrthCR (its cutout generator advances by the global batch whatever the number of processes)
RESUMED = ("mask", "orth")


def _drive(spec_path: str) -> None:
    """One process (or each torchrun rank): run the cases of ``spec_path`` through ``fastvlm.cli.main``.

    A case: {"name", "argv", "interrupt_at": epoch?, "kill_rank_at": [rank, epoch]?, "copy_to": path?}.
    Each rank writes {name: exit status} to results-RANK.json and, when a training loop returns, its
    tensors (name -> tensor) to NAME-rankRANK.pt in the spec's "dump" folder."""
    import importlib

    import torch

    from fastvlm import cli
    from fastvlm import dist as D

    spec = json.load(open(spec_path))
    rank = int(os.environ.get("RANK", "0"))
    shutdown, D.shutdown = D.shutdown, lambda d: None  # one process group for every case
    current = {}

    def recorded(real):
        def run_epochs(*a, **kw):
            case, user_hook = current["case"], kw.get("on_epoch_end")

            def on_epoch_end(epoch):
                if user_hook is not None:
                    user_hook(epoch)
                if case.get("kill_rank_at") == [rank, epoch]:
                    with open(os.path.join(spec["dump"], "killed-at"), "w") as fh:
                        fh.write(repr(time.time()))  # the test times the run's end from here, not from its start
                    os.kill(os.getpid(), signal.SIGKILL)
                if case.get("interrupt_at") == epoch:
                    raise KeyboardInterrupt

            history = real(*a, **{**kw, "on_epoch_end": on_epoch_end})
            torch.save({k: v.detach().cpu().clone() for k, v in kw["tensors"].items()},
                       os.path.join(spec["dump"], f"{case['name']}-rank{rank}.pt"))
            return history

        return run_epochs

    for name in RECIPE_MODULES:
        module = importlib.import_module(f"fastvlm.train.{name}")
        module.run_epochs = recorded(module.run_epochs)
    results = {}
    for case in spec["cases"]:
        current["case"] = case
        results[case["name"]] = cli.main(case["argv"])
        if case.get("copy_to") and rank == 0:
            shutil.copytree(case["argv"][case["argv"].index("--out") + 1], case["copy_to"])
        if "WORLD_SIZE" in os.environ:
            torch.distributed.barrier()
        with open(os.path.join(spec["dump"], f"results-{rank}.json"), "w") as fh:
            json.dump(results, fh)
    if "WORLD_SIZE" in os.environ:
        shutdown(D.Dist(rank, int(os.environ["WORLD_SIZE"])))


def test_cutout_of_a_share_is_that_share_of_the_global_batch_cutout():
    """Rank r of N holds positions r, r + N, ... of the global batch: its holes are those one process
    cuts there, and every rank's generator ends where one process's does (a resume with any N)."""
    import torch

    from fastvlm.dist import Dist
    from fastvlm.train.orth import cutout

    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 1.0  # no zero before the cut
    one_gen = torch.Generator().manual_seed(5)
    whole = cutout(images, 0.5, one_gen)
    for rank in range(2):
        g = torch.Generator().manual_seed(5)
        share = cutout(images[rank::2], 0.5, g, Dist(rank, 2))
        assert torch.equal(share, whole[rank::2])
        assert torch.equal(g.get_state(), one_gen.get_state())
    assert not torch.equal(cutout(images[1::2], 0.5, torch.Generator().manual_seed(5)), whole[1::2])


def test_an_images_augmentation_depends_on_seed_epoch_and_index_alone(tmp_path):
    """The same augmented image whichever order (or process) reads it, another one in another epoch, and the
    caller's random generator left where it was."""
    import torch

    from fastvlm.data import ImageDataset, image_folder
    from fastvlm.train.common import train_transform

    make_image_folder(tmp_path, classes=2, per_class=2, size=16)
    ds = ImageDataset(image_folder(str(tmp_path)), train_transform(16, (0.5,) * 3, (0.25,) * 3), augment_seed=3)
    forward = [ds[i][0] for i in range(4)]
    torch.manual_seed(11)
    before = torch.get_rng_state()
    backward = [ds[i][0] for i in reversed(range(4))][::-1]
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    ds.set_epoch(1)
    assert not torch.equal(ds[0][0], forward[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"),
               FASTVLM_CPU_GEMM="torch", FASTVLM_DIST_TIMEOUT=str(TIMEOUT_S), TRITON_INTERPRET="0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FASTVLM_TRACEBACK", None)
    return env


def _torchrun(tmp_path, program: list[str], timeout=300):
    """torchrun with the flags a two-node run uses (c10d rendezvous), one node, two processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--max-restarts", "0",
           *program]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env(tmp_path))
    return p, time.monotonic() - t0


def _spec(tmp_path, name, cases):
    dump = tmp_path / f"dump-{name}"
    dump.mkdir()
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"dump": str(dump), "cases": cases}))
    return str(path), dump


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 classes, 4 training and 4 test images each."""
    root = tmp_path_factory.mktemp("torchrun-data")
    make_image_folder(root, classes=4, per_class=4, split_dirs=True)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Every run of this file, made once: the two-process job, then the one-process runs (including the
    resumes, with one process, of states the two-process job saved)."""
    t = tmp_path_factory.mktemp("torchrun")
    common = ["--data", str(data), "--shots", "4", *MODEL]
    methods = {
        # TaskRes: 2 epochs of 2 steps (batch 8 of the 16 cached features)
        "taskres": ["tune", "taskres", *common, "--epochs", "2", "--batch-size", "8"],
        # RMT with gradient dropout (lambda 0.7): 3 epochs of 2 steps
        "mask": ["tune", "mask", *common, "--epochs", "3", "--batch-size", "8", "--drop-ratio", "0.7"],
        "orth": ["tune", "orth", *common, "--epochs", "2", "--batch-size", "8", "--block-size", "16"],
        "lora": ["tune", "lora", *common, "--epochs", "2", "--batch-size", "8"],
    }
    two = [{"name": m, "argv": argv + ["--out", str(t / f"two-{m}")]} for m, argv in methods.items()]
    for m in RESUMED:
        # interrupted after epoch 1 (both ranks, as Ctrl-C), kept for the one-process resume, resumed here
        two += [{"name": f"{m}-cut", "argv": methods[m] + ["--out", str(t / f"cut-{m}")], "interrupt_at": 0,
                 "copy_to": str(t / f"cut-{m}-for-one")},
                {"name": f"{m}-resumed", "argv": methods[m] + ["--out", str(t / f"cut-{m}"), "--resume"]}]
    two += [
        # rank 1 killed at the end of epoch 1: the last case, it ends the job
        {"name": "mask-killed", "argv": methods["mask"] + ["--out", str(t / "killed")], "kill_rank_at": [1, 0]},
    ]
    spec, dump2 = _spec(t, "two", two)
    job, _ = _torchrun(t, ["-m", "tests.test_tune_torchrun", spec], timeout=600)
    after_kill = time.time() - float((dump2 / "killed-at").read_text())
    one = [{"name": m, "argv": argv + ["--out", str(t / f"one-{m}")]} for m, argv in methods.items()]
    one += [{"name": f"{m}-resumed", "argv": methods[m] + ["--out", str(t / f"cut-{m}-for-one"), "--resume"]}
            for m in RESUMED]
    spec, dump1 = _spec(t, "one", one)
    single = subprocess.run([sys.executable, "-m", "tests.test_tune_torchrun", spec], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=_env(t))
    assert single.returncode == 0, single.stderr[-3000:]
    return {"t": t, "job": job, "after_kill": after_kill, "two": dump2, "one": dump1, "single": single}


def _results(dump, rank):
    return json.loads((dump / f"results-{rank}.json").read_text())


def _tensors(dump, name, rank):
    import torch

    return torch.load(dump / f"{name}-rank{rank}.pt")


def _compare(a: dict, b: dict, what: str, flips_allowed: bool = False) -> int:
    """Elements of b that differ from a beyond float order; asserts there are none (or, where gradient
    dropout may flip a boundary element, at most 1 in 1000). Returns the count.

    Tolerance: the two runs differ only in the order of float32 sums (each rank's half-batch mean, then
    the average of two), a relative 1e-7 in each gradient. Adam divides a step by sqrt(v), so the parameters
    move by lr x (that relative difference) per step, far below 1e-4 x the largest magnitude, while a wrong
    sharding, batch split or averaging moves them by whole steps (lr per element per step)."""
    assert a.keys() == b.keys() and a, what
    flips = total = 0
    for k in a:
        scale = max(a[k].abs().max().item(), 1e-3)
        bad = int(((a[k] - b[k]).abs() > 1e-4 * scale).sum())
        flips += bad
        total += a[k].numel()
        if not flips_allowed:
            assert bad == 0, f"{what}: {k} differs in {bad} of {a[k].numel()} elements"
    if flips_allowed:
        # gradient dropout keeps an element when P > U; P from gradients equal up to float order can land on
        # the other side of U for an element at the boundary, and Adam then moves it a whole step
        assert flips <= max(1, total // 1000), f"{what}: {flips} of {total} elements differ"
    return flips


def _same_metrics(one_dir, two_dir, what):
    """Both metrics.json hold the same keys and values: numbers within 1e-5 relative (the loss means differ
    by float order only), the rest equal once the --out folder is read as a placeholder."""
    a = json.loads((one_dir / "metrics.json").read_text().replace(str(one_dir), "OUT"))
    b = json.loads((two_dir / "metrics.json").read_text().replace(str(two_dir), "OUT"))
    # wall-clock step times differ from run to run; the number of steps may not
    steps_a, steps_b = a.pop("step_times"), b.pop("step_times")
    assert steps_a["steps"] == steps_b["steps"] == len(steps_a["seconds"]) > 0, (what, steps_a, steps_b)

    def close(x, y, where):
        if isinstance(x, dict):
            assert isinstance(y, dict) and list(x) == list(y), (what, where, x, y)
            for k in x:
                close(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, list):
            assert isinstance(y, list) and len(x) == len(y), (what, where)
            for i, (u, v) in enumerate(zip(x, y)):
                close(u, v, f"{where}[{i}]")
        elif isinstance(x, float):
            assert y == pytest.approx(x, rel=1e-5, abs=1e-7), (what, where, x, y)
        else:
            assert x == y, (what, where, x, y)

    close(a, b, "metrics")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["taskres", "mask", "orth", "lora"])
def test_two_processes_equal_one_process(runs, method):
    two, one = runs["two"], runs["one"]
    assert _results(two, 0)[method] == 0 and _results(two, 1)[method] == 0, runs["job"].stderr[-3000:]
    r0, r1, single = (_tensors(two, method, 0), _tensors(two, method, 1), _tensors(one, method, 0))
    for k in r0:  # every rank applies the same averaged update
        assert (r0[k] == r1[k]).all(), f"{method}: ranks disagree on {k}"
    flips = _compare(single, r0, f"{method}: 2 processes vs 1", flips_allowed=method == "mask")
    print(f"{method}: {flips} elements beyond float order")
    if method == "taskres":  # every rank trains the whole head on the same gathered features: exactly one process
        assert all((single[k] == r0[k]).all() for k in single)
    t = runs["t"]
    _same_metrics(t / f"one-{method}", t / f"two-{method}", method)
    # one set of outputs: the same files as one process, no temporary file of a second writer
    assert sorted(os.listdir(t / f"two-{method}")) == sorted(os.listdir(t / f"one-{method}"))


@pytest.mark.slow
def test_one_summary_line_per_run(runs):
    """Rank 0 speaks for the run: each two-process run that finished printed its summary once."""
    finished = [n for n, rc in _results(runs["two"], 0).items() if rc == 0]
    assert len(finished) == 4 + len(RESUMED), _results(runs["two"], 0)
    assert runs["job"].stdout.count("zero-shot top-1") == len(finished), runs["job"].stdout


@pytest.mark.slow
@pytest.mark.parametrize("method", RESUMED)
def test_an_interrupted_two_process_run_resumes_with_two_or_one(runs, method):
    two, one, t = runs["two"], runs["one"], runs["t"]
    assert _results(two, 0)[f"{method}-cut"] == 130 and _results(two, 0)[f"{method}-resumed"] == 0
    uninterrupted = _tensors(two, method, 0)
    resumed = _tensors(two, f"{method}-resumed", 0)
    for k in uninterrupted:  # the same processes, the state restored bit for bit: the same run
        assert (uninterrupted[k] == resumed[k]).all(), k
    _same_metrics(t / f"two-{method}", t / f"cut-{method}", "resumed with 2")
    # resumed by one process from the state two saved: nothing in the state depends on the number of processes
    assert _results(one, 0)[f"{method}-resumed"] == 0, runs["single"].stderr[-2000:]
    epochs = 3 if method == "mask" else 2
    assert f"resuming from epoch 2 of {epochs}" in runs["single"].stderr
    _compare(_tensors(one, method, 0), _tensors(one, f"{method}-resumed", 0), "resumed with 1",
             flips_allowed=method == "mask")
    _same_metrics(t / f"one-{method}", t / f"cut-{method}-for-one", "resumed with 1")


def _root_cause_rank(stderr: str) -> int | None:
    """The rank torchrun's failure report names as the root cause (the first rank that exited)."""
    m = re.search(r"Root Cause.*?rank\s*:\s*(\d+) \(local_rank", stderr, re.S)
    return int(m.group(1)) if m else None


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_within_the_timeout(runs):
    job, err = runs["job"], runs["job"].stderr
    assert job.returncode != 0
    assert "mask-killed" not in _results(runs["two"], 1)  # rank 1 died inside that case
    # rank 0's collective loses rank 1: one line saying so, where the state is and how to resume
    line = next((ln for ln in err.splitlines() if ln.startswith("fastvlm: rank 0 of 2 stopped")), None) or next(
        ln for ln in err.splitlines() if ln.startswith("fastvlm: interrupted; the resumable state"))
    assert "--resume" in line and str(runs["t"] / "killed") in line, line
    assert not any(ln.startswith("fastvlm: error:") for ln in err.splitlines()), err[-3000:]
    assert _root_cause_rank(err) == 1, err[-3000:]  # torchrun's report names it
    # from the kill to the job's end: rank 0's collective gives up within the timeout (or torchrun stops it
    # sooner), then torchrun's 3 s grace and report; the whole job's time would also count the earlier cases
    assert runs["after_kill"] < 3 * TIMEOUT_S, runs["after_kill"]


@pytest.mark.slow
def test_a_failing_rank_ends_the_run_with_one_line_naming_it(tmp_path, data):
    """The console script under torchrun; an image that passes the check (its header reads) but cannot be
    decoded (its second half is missing), in rank 1's shard."""
    import numpy as np
    from PIL import Image

    from fastvlm.data import check_images

    shutil.copytree(data, tmp_path / "data")
    data = tmp_path / "data"
    bad = data / "train" / "class_0" / "0b.jpg"  # after 0.png: training image 1, which rank 1 encodes
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(bad)
    bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])
    assert check_images([(str(bad), 0, "class 0")]) == []
    fastvlm = os.path.join(os.path.dirname(sys.executable), "fastvlm")
    p, took = _torchrun(tmp_path, ["--no-python", fastvlm, "tune", "taskres", "--data", str(data), "--shots", "0",
                                   "--epochs", "1", *MODEL, "--out", str(tmp_path / "out")], timeout=300)
    assert p.returncode != 0
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("fastvlm: error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    assert errors[0].startswith("fastvlm: error: rank 1 of 2: image ") and "0b.jpg" in errors[0], errors
    assert "cannot be read" in errors[0] and "remove or replace that file" in errors[0]
    assert _root_cause_rank(p.stderr) == 1, p.stderr[-3000:]
    assert took < 120 + TIMEOUT_S, took
    assert not (tmp_path / "out").exists()  # nothing was saved to resume: rank 0 removed what the run made


if __name__ == "__main__":
    _drive(sys.argv[1])
