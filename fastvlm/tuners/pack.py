"""PVP module packs: the trained tensors of a parameter-efficient method plus its config (method, where the
modules attach, shapes, backbone), as ``modules.safetensors`` + ``pack.json`` in a folder. A pack loads
without the upstream data; loading checks that it fits the model and says exactly what does not.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch
from torch import nn

from ..io import load_checkpoint, save_checkpoint
from .adapter import AdapterConfig, apply_adapters
from .common import attach, names_of
from .lora import LoRAConfig, apply_lora
from .vpt import VPTConfig, apply_vpt

METHODS = {"vpt": (VPTConfig, apply_vpt), "lora": (LoRAConfig, apply_lora), "adapter": (AdapterConfig, apply_adapters)}


def _config_from(method: str, cfg: dict):
    cls = METHODS[method][0]
    cfg = dict(cfg)
    for k, v in cfg.items():
        if isinstance(v, list):
            cfg[k] = tuple(v)
    return cls(**cfg)


def apply_method(model: nn.Module, method: str, config=None) -> list[str]:
    """Attach ``method``'s modules (only tuner parameters train, see attach); returns the names of the new
    parameters, which the model remembers (by identity) for packing."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    cls, apply = METHODS[method]
    cfg = config or cls()
    if not isinstance(cfg, cls):
        raise TypeError(f"config for {method} must be a {cls.__name__}, got {type(cfg).__name__}")
    new = attach(model, lambda: apply(model, cfg))
    model.__dict__.setdefault("_fastvlm_packs", {})[method] = (cfg, new)
    return names_of(model, new)


def method_parameters(model: nn.Module, method: str) -> list[nn.Parameter]:
    return list(model._fastvlm_packs[method][1])


def save_pack(folder: str, model: nn.Module, method: str, backbone: str, **extra) -> str:
    if method not in getattr(model, "_fastvlm_packs", {}):
        raise ValueError(f"the model carries no {method!r} modules (apply_method first)")
    cfg, params = model._fastvlm_packs[method]
    named = dict(model.named_parameters())
    tensors = {n: named[n] for n in names_of(model, params)}
    meta = {"kind": "pack", "method": method, "config": asdict(cfg), "backbone": backbone,
            "attach": sorted(tensors), "shapes": {n: list(t.shape) for n, t in tensors.items()},
            "parameters": int(sum(t.numel() for t in tensors.values())), **extra}
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(os.path.join(folder, "modules.safetensors"), tensors, meta)
    tmp = os.path.join(folder, ".pack.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(folder, "pack.json"))
    return folder


def read_pack(folder: str) -> tuple[dict, dict]:
    path = os.path.join(folder, "modules.safetensors") if os.path.isdir(folder) else folder
    tensors, meta = load_checkpoint(path, kind="pack")
    return tensors, meta


def config_of_pack(folder: str):
    _, meta = read_pack(folder)
    return meta["method"], _config_from(meta["method"], meta["config"])


@torch.no_grad()
def load_pack(model: nn.Module, folder: str, backbone: str | None = None) -> dict:
    """Copy a pack's tensors into ``model``'s modules of the same method; refuse with the exact misfits."""
    tensors, meta = read_pack(folder)
    method = meta["method"]
    problems = []
    if backbone is not None and meta.get("backbone") != backbone:
        problems.append(f"backbone: pack {meta.get('backbone')!r}, model {backbone!r}")
    have = getattr(model, "_fastvlm_packs", {})
    if method not in have:
        problems.append(f"method: the pack holds {method!r} modules, the model has {sorted(have) or 'none'} attached")
        raise ValueError("pack does not fit the model: " + "; ".join(problems))
    params = dict(model.named_parameters())
    names = set(names_of(model, have[method][1]))
    missing = sorted(names - set(tensors))
    extra = sorted(set(tensors) - names)
    if missing:
        problems.append(f"missing in pack: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if extra:
        problems.append(f"not in model: {extra[:4]}{' ...' if len(extra) > 4 else ''}")
    for n in sorted(names & set(tensors)):
        if tuple(tensors[n].shape) != tuple(params[n].shape):
            problems.append(f"{n}: pack {tuple(tensors[n].shape)}, model {tuple(params[n].shape)}")
    if problems:
        raise ValueError("pack does not fit the model: " + "; ".join(problems))
    for n in names:
        params[n].copy_(tensors[n])
    return meta
