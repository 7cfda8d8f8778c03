"""Training with several processes (torch.distributed, e.g. DistributedDataParallel over gloo or nccl).

TaskRes, VPT, LoRA, adapters, OrthCR and RMT without gradient dropout train under plain
``DistributedDataParallel``: their updates are linear in the gradients, so averaging per-rank gradients
equals one process on the whole batch. The recipes do so with ``ranks=`` (:func:`data_parallel` over a loss
module; ``fastvlm tune`` under torchrun passes it), except TaskRes, whose step on cached features is cheaper
than the all-reduce it would need: every rank runs it whole (``train_taskres``).

RMT's gradient dropout is not linear in the gradients: it must act on the gradients averaged over ranks,
with the same random stream on every rank. The fused single-process path (GradSlot, dropout inside the
score-gradient kernel, pass 1's buffer consumed in place) cannot do that inside backward, so
:func:`~fastvlm.train.rmt.rmt_step_distributed` takes both gradients with ``autograd.grad``, all-reduces them, and applies
``grad_dropout`` to the averages layer by layer. It holds two gradient buffers per masked layer (g_a and
g_b) where the fused step holds one. DDP's own reducer expects one backward per forward, so this step does
not wrap the model in DDP: it averages the score gradients itself.
"""

from __future__ import annotations

import torch

from .rmt import rmt_step_distributed  # noqa: F401  (kept here with the rest of the multi-process API)


def data_parallel(module: torch.nn.Module, ranks) -> torch.nn.Module:
    """``module`` (whose forward is the training loss) under ``DistributedDataParallel`` when ``ranks``
    (a ``fastvlm.dist.Dist``) has several processes, else ``module`` itself. Its buffers (a fixed classifier,
    the frozen model's) are the same on every rank and never change, so they are not re-sent every step."""
    if ranks is None or not ranks.enabled:
        return module
    import inspect

    ddp = torch.nn.parallel.DistributedDataParallel
    device = next(p.device for p in module.parameters() if p.requires_grad)
    # torch >= 2.14 names the option forward_sync_buffers (broadcast_buffers warns there); earlier torch
    # knows only broadcast_buffers
    no_resend = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                 else "broadcast_buffers")
    return ddp(module, device_ids=[device.index] if device.type == "cuda" else None, **{no_resend: False})
