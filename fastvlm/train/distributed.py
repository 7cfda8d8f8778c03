"""Training with several processes (torch.distributed, e.g. DistributedDataParallel over gloo or nccl).

TaskRes, VPT, LoRA, adapters, OrthCR and RMT without gradient dropout train under plain
``DistributedDataParallel``: their updates are linear in the gradients, so averaging per-rank gradients
equals one process on the whole batch. The recipes do so with ``ranks=`` (:func:`data_parallel` over a loss
module; ``fastvlm tune`` under torchrun passes it), except TaskRes, whose step on cached features is cheaper
than the all-reduce it would need: every rank runs it whole (``train_taskres``).

RMT's gradient dropout is not linear in the gradients: it must act on the gradients averaged over ranks,
with the same random stream on every rank. The fused single-process path (GradSlot, dropout inside the
score-gradient kernel, pass 1's buffer consumed in place) cannot do that inside backward, so
:func:`rmt_step_distributed` takes both gradients with ``autograd.grad``, all-reduces them, and applies
``grad_dropout`` to the averages layer by layer. It holds two gradient buffers per masked layer (g_a and
g_b) where the fused step holds one. DDP's own reducer expects one backward per forward, so this step does
not wrap the model in DDP: it averages the score gradients itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..functional import grad_dropout
from .rmt import RMTRecipe, layer_seed, rmt_losses


def average(tensors, group=None) -> None:
    """All-reduce each tensor in place to its mean over the ranks."""
    world = dist.get_world_size(group)
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        t.div_(world)


def rmt_step_distributed(model, images, labels, classifier, optimizer, recipe: RMTRecipe, step: int,
                         group=None) -> dict:
    """One two-pass RMT step on this rank's part of the batch, with gradient dropout on the rank-averaged
    gradients (identical seeds on every rank, so every rank applies the same update)."""
    ce, l_kl, reg, scores = rmt_losses(model, images, labels, classifier, recipe)
    g_b = list(torch.autograd.grad(l_kl, scores, retain_graph=True))
    g_a = list(torch.autograd.grad(ce + reg, scores))
    average(g_b, group)
    average(g_a, group)  # mean of the ranks' CE gradients + the reg gradient, the same on every rank
    for i, (s, ga, gb) in enumerate(zip(scores, g_a, g_b)):
        s.grad = grad_dropout(ga, gb, recipe.drop_ratio, layer_seed(recipe.seed, step, i)) if recipe.drop_ratio else ga
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"ce": ce.item(), "kl": l_kl.item(), "reg": reg.item(), "loss_a": ce.item() + reg.item()}


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
