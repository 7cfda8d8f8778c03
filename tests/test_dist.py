"""fastvlm.dist under torchrun: two gloo processes with a c10d rendezvous on this machine (the flags a
two-node run uses, with one node), sharded work gathered back in order, the sampler's shards, rank-0-only
writes, and a failing rank that ends the run with one line naming it instead of hanging."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from fastvlm import dist as D


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, body: str, timeout=120, env=None):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(body))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--max-restarts", "0",
           str(script)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0", **(env or {})}
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=tmp_path)
    return out, time.monotonic() - t0


def test_one_process_is_the_identity():
    d = D.from_env("cpu") if "WORLD_SIZE" not in os.environ else D.Dist()
    assert not d.enabled and d.is_main
    rows = torch.arange(10.0)[:, None]
    assert torch.equal(D.gather_rows(D.shard(rows, d), 10, d), rows)
    assert D.local_batch(32, d) == 32
    assert D.on_main(d, lambda: 7) == 7
    assert list(D.sampler(list(range(6)), d, seed=3)) == torch.randperm(
        6, generator=torch.Generator().manual_seed(3)).tolist()  # DistributedSampler's seed + epoch 0


def test_local_batch_refuses_an_uneven_split():
    with pytest.raises(ValueError, match="--batch-size 33 is the global batch and must be divisible by the number "
                                         r"of processes \(2\)"):
        D.local_batch(33, D.Dist(0, 2, 0))


def test_timeout_setting_is_checked(monkeypatch):
    monkeypatch.setenv("FASTVLM_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="FASTVLM_DIST_TIMEOUT must be a number of seconds"):
        D.timeout_s()
    monkeypatch.setenv("FASTVLM_DIST_TIMEOUT", "0")
    with pytest.raises(ValueError, match="must be > 0"):
        D.timeout_s()


@pytest.mark.slow
def test_two_ranks_shard_gather_sample_and_write_once(tmp_path):
    out, _ = _torchrun(tmp_path, """
        import json, os, torch
        from fastvlm import dist as D
        d = D.from_env("cpu")
        assert d.enabled and d.world_size == 2
        items = list(range(11))                       # 11 rows over 2 ranks: 6 and 5
        mine = D.shard(items, d)
        rows = torch.tensor([[i * 10.0, -i] for i in mine])
        full = D.gather_rows(rows, len(items), d)      # back in the original order on every rank
        assert full.tolist() == [[i * 10.0, -i] for i in items], full
        s = D.sampler(list(range(8)), d, seed=5)
        s.set_epoch(1)
        shard = torch.tensor(list(s))
        parts = [torch.empty_like(shard) for _ in range(2)]
        torch.distributed.all_gather(parts, shard)
        together = torch.stack(parts, 1).reshape(-1).tolist()   # rank 0, rank 1, rank 0, ...
        assert together == torch.randperm(8, generator=torch.Generator().manual_seed(5 + 1)).tolist()
        t = torch.tensor([float(d.rank)])
        D.all_mean([t], d)
        assert t.item() == 0.5
        D.on_main(d, lambda: open("written.txt", "a").write(f"rank {d.rank}\\n"))
        assert open("written.txt").read() == "rank 0\\n"   # every rank sees it after the barrier
        D.shutdown(d)
        """)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_a_failing_rank_ends_the_run_with_one_line_naming_it(tmp_path):
    out, took = _torchrun(tmp_path, """
        import torch
        from fastvlm import dist as D
        d = D.from_env("cpu")
        with D.guarded(d):
            if d.rank == 1:
                raise ValueError("image 3 is unreadable")
            D.barrier(d)                                # rank 0 waits for a rank that never comes
        """, env={"FASTVLM_DIST_TIMEOUT": "20"})
    assert out.returncode != 0
    assert "fastvlm: error: rank 1 of 2: ValueError: image 3 is unreadable" in out.stderr
    assert took < 90  # torchrun stops rank 0 once rank 1 exits; the collective timeout bounds it anyway


@pytest.mark.slow
def test_a_killed_rank_does_not_leave_the_other_hanging(tmp_path):
    out, took = _torchrun(tmp_path, """
        import os, torch
        from fastvlm import dist as D
        d = D.from_env("cpu")
        if d.rank == 1:
            os._exit(9)                                 # killed: no message, no clean shutdown
        with D.guarded(d):
            D.barrier(d)
        """, env={"FASTVLM_DIST_TIMEOUT": "10"})
    assert out.returncode != 0
    assert took < 90
