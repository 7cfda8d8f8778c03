"""Speed-up of `fastvlm tune` under torchrun: N processes against one, each with one thread, on the same
random-init model and images.

    python benchmarks/torchrun_speedup.py [--model ViT-B-32] [--processes 2] [--out speedup.json]

Two figures, each the wall time of one process run divided by that of the N-process run:

- ``taskres_caching``: the feature-caching pass of `tune taskres` (the training images through the frozen
  image encoder, each rank encoding its shard, gathered on every rank);
- ``mask_epoch``: the second epoch of `tune mask` (RMT, gradient dropout on), the first one left out as the
  warm-up; each rank trains on its half of every global batch and the score gradients are averaged.

Each run is a real `fastvlm.cli.main` in processes started by torchrun (``python -m torch.distributed.run``,
``OMP_NUM_THREADS=1``), timed inside by wrapping the caching function and the epoch hook of the training
loop: rank 0 records the times after the pass's gather (the epoch's metrics sum is a collective too), so
they include the communication. One measurement per figure: on a shared machine, say how loaded it was.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(root: str, classes: int, train: int, test: int, size: int = 64) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))


def _worker(spec_path: str) -> None:
    """Inside each torchrun process: run the command of the spec and write rank 0's timings."""
    import importlib

    from fastvlm import cli

    spec = json.load(open(spec_path))
    rank = int(os.environ.get("RANK", "0"))
    timings = {"caching_s": [], "epoch_end_s": []}
    real_cached = cli._cached_features

    def timed_cached(*a, **kw):
        t0 = time.perf_counter()
        out = real_cached(*a, **kw)
        timings["caching_s"].append(time.perf_counter() - t0)
        return out

    cli._cached_features = timed_cached
    rmt = importlib.import_module("fastvlm.train.rmt")
    real_run = rmt.run_epochs

    def timed_run(*a, **kw):
        def on_epoch_end(epoch):
            timings["epoch_end_s"].append(time.perf_counter())

        return real_run(*a, **{**kw, "on_epoch_end": on_epoch_end})

    rmt.run_epochs = timed_run
    rc = cli.main(spec["argv"])
    if rank == 0:
        with open(spec["result"], "w") as fh:
            json.dump({"rc": rc, **timings}, fh)


def _run(processes: int, argv: list[str], work: str, name: str) -> dict:
    spec = os.path.join(work, f"{name}-{processes}.json")
    result = os.path.join(work, f"{name}-{processes}-result.json")
    with open(spec, "w") as fh:
        json.dump({"argv": argv + ["--out", os.path.join(work, f"{name}-{processes}")], "result": result}, fh)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           os.path.abspath(__file__), "--worker", spec]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{name} with {processes} processes failed:\n{p.stderr[-3000:]}")
    with open(result) as fh:
        return json.load(fh)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture, random weights (default ViT-B-32)")
    p.add_argument("--processes", type=int, default=2, help="N, compared with 1 (default 2)")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    with tempfile.TemporaryDirectory(prefix="fastvlm-speedup-") as work:
        data = os.path.join(work, "data")
        _images(data, classes=4, train=16, test=2)
        common = ["--data", data, "--model", args.model, "--pretrained", "none", "--no-progress"]
        taskres = ["tune", "taskres", *common, "--shots", "16", "--epochs", "1"]
        mask = ["tune", "mask", *common, "--shots", "8", "--epochs", "2", "--batch-size", "16"]
        figures = {}
        for name, command in (("taskres_caching", taskres), ("mask_epoch", mask)):
            times = {}
            for n in (1, args.processes):
                r = _run(n, command, work, name)
                # the first cached pass is the training features (64 images); an epoch is between two ends
                ends = r["epoch_end_s"]
                times[n] = r["caching_s"][0] if name == "taskres_caching" else ends[1] - ends[0]
            figures[name] = {"seconds_1": round(times[1], 3),
                             f"seconds_{args.processes}": round(times[args.processes], 3),
                             "speedup": round(times[1] / times[args.processes], 3)}
            print(f"{name}: 1 process {times[1]:.2f} s, {args.processes} processes {times[args.processes]:.2f} s, "
                  f"speed-up {times[1] / times[args.processes]:.2f}x", flush=True)
    report = {"model": args.model, "processes": args.processes, "threads_per_process": 1,
              "cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0], **figures}
    print(json.dumps(report))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
