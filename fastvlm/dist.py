"""Several processes under ``torchrun``: torch's own launcher, rendezvous and process group, nothing of
fastvlm's in between.

``torchrun --nproc-per-node N -m fastvlm tune ...`` starts N processes. Each one reads its place from
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and joins
one process group: gloo for CPU, nccl for CUDA (one device per process, ``cuda:LOCAL_RANK``). Without
torchrun (``WORLD_SIZE`` unset or 1) every function here is the single-process identity, so the same code
runs both ways.

The rules the command line follows (docs/cli.md, "Several processes"):

- The batch size a user gives is the global one; each rank takes ``batch / N`` of it (:func:`local_batch`),
  so N processes run the same optimisation as one process on the whole batch.
- Training data is sharded by :func:`sampler` (torch's ``DistributedSampler``), whose permutation comes from
  the seed and the epoch, the same on every rank: the global batch of step i is the same set of samples
  whatever N is, when N divides the batch size and the dataset (otherwise torch pads the last shard by
  repeating samples).
- Encoding passes (feature caching, evaluation) are split over the ranks (:func:`shard`) and gathered back
  in the original order (:func:`gather_rows`), so each rank encodes 1/N of the images.
- Only rank 0 writes (:func:`on_main`): checkpoints, metrics, resumable state.
- Every collective has a timeout (``FASTVLM_DIST_TIMEOUT`` seconds, default :data:`DEFAULT_TIMEOUT_S`): a rank
  that dies leaves the others blocked at most that long. A rank that fails prints one line naming itself
  (:func:`guarded`) and exits non-zero; torchrun then stops the other ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def timeout_s() -> float:
    raw = os.environ.get("FASTVLM_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"FASTVLM_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"FASTVLM_DIST_TIMEOUT must be > 0 seconds, got {raw!r}")
    return value


def from_env(device: str = "cpu") -> Dist:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA) when ``WORLD_SIZE`` > 1; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = str(device).startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s()))
    if cuda:
        torch.cuda.set_device(local_rank)
    return Dist(rank, world, local_rank)


def device_of(d: Dist, device: str) -> str:
    """The device this rank uses: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process)."""
    return f"cuda:{d.local_rank}" if d.enabled and device == "cuda" else device


def local_batch(global_batch: int, d: Dist) -> int:
    """This rank's share of the global batch size; refuses a batch the ranks cannot split evenly."""
    if global_batch % d.world_size:
        raise ValueError(f"--batch-size {global_batch} is the global batch and must be divisible by the number of "
                         f"processes ({d.world_size})")
    return global_batch // d.world_size


def shard(items, d: Dist):
    """This rank's items: every N-th from its rank on (balanced to within one)."""
    return items[d.rank::d.world_size]


def gather_rows(local: torch.Tensor, total: int, d: Dist) -> torch.Tensor:
    """Every rank's :func:`shard` of rows put back in the original order, on every rank. ``local`` holds the
    rows this rank computed for ``shard(range(total), d)``."""
    if not d.enabled:
        return local
    per = -(-total // d.world_size)
    home = local.device
    if dist.get_backend() == "nccl" and home.type != "cuda":  # nccl sends CUDA tensors only
        local = local.cuda()
    padded = local.new_zeros((per, *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(d.world_size)]
    dist.all_gather(parts, padded.contiguous())
    parts = [part.to(home) for part in parts]
    out = parts[0].new_empty((total, *local.shape[1:]))
    for r, part in enumerate(parts):
        count = len(range(r, total, d.world_size))
        out[r::d.world_size] = part[:count]
    return out


def sampler(dataset, d: Dist, seed: int):
    """Torch's DistributedSampler over ``dataset``: one seeded permutation per epoch, this rank's share of it
    (call ``set_epoch(epoch)`` every epoch). With one process it is the whole permutation."""
    from torch.utils.data import DistributedSampler

    return DistributedSampler(dataset, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=seed,
                              drop_last=False)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def on_main(d: Dist, fn, *args, **kwargs):
    """``fn(...)`` on rank 0 only (writing files), then every rank waits for it; returns fn's result on rank 0
    and None elsewhere."""
    out = fn(*args, **kwargs) if d.is_main else None
    barrier(d)
    return out


def all_mean(tensors, d: Dist) -> None:
    """Each tensor in place to its mean over the ranks."""
    if d.enabled:
        group_mean(tensors)


def group_mean(tensors, group=None) -> None:
    """Each tensor in place to its mean over the ranks of ``group`` (the default group: None), in an
    initialised process group."""
    world = dist.get_world_size(group)
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        t.div_(world)


def from_main(d: Dist, fn, *args, **kwargs):
    """``fn(...)`` on rank 0 only (reading a file that only rank 0 may see), its result sent to every rank.
    When fn raises on rank 0, rank 0 raises that exception and the other ranks raise :class:`MainFailed`,
    so that the failure is reported once, by rank 0."""
    if not d.enabled:
        return fn(*args, **kwargs)
    box, error = [None], None
    if d.is_main:
        try:
            box = [("ok", fn(*args, **kwargs))]
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others were told
            box, error = [("failed", None)], e
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0][0] == "failed":
        raise MainFailed()
    return box[0][1]


class MainFailed(Exception):
    """Raised on the ranks other than 0 when a step that rank 0 does for everyone failed there; rank 0
    reports the failure itself, so these ranks exit without a message."""


def all_sum(values: list[float], d: Dist) -> list[float]:
    """The sum over the ranks of each number (float64, so that a sum of per-rank sums adds no rounding of
    its own beyond the one of float64)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_objects(obj, d: Dist) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def is_collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another rank is gone (its connection closed) or
    did not answer within the timeout: the cause is on another rank, not on this one."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in ("gloo", "NCCL", "Connection closed by peer",
                                                                     "timed out", "Timed out"))


@contextlib.contextmanager
def guarded(d: Dist):
    """Around a rank's work: an exception becomes one line on stderr naming the rank, then exit status 1
    (torchrun stops the other ranks). One process: the exception passes through unchanged."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        if not d.enabled:
            raise
        print(f"fastvlm: error: rank {d.rank} of {d.world_size}: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        raise SystemExit(1) from None


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
