"""PVP module packs (docs/methods.md section 4): the trained tensors of a parameter-efficient method plus its
config (method, where the modules attach, shapes, backbone), as ``modules.safetensors`` (the one tuner file
format of fastvlm/tuners/common.py) + ``pack.json`` (the same metadata, readable) in a folder. A pack loads
without the upstream data; loading checks that it fits the model and says exactly what does not.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .adapter import AdapterConfig, apply_adapters
from .common import config_from_dict, load_tuners, named_tuner_parameters, read_tuners, save_tuners, tuners_of
from .lora import LoRAConfig, apply_lora
from .vpt import VPTConfig, apply_vpt

METHODS = {"vpt": (VPTConfig, apply_vpt), "lora": (LoRAConfig, apply_lora), "adapter": (AdapterConfig, apply_adapters)}


def apply_method(model: nn.Module, method: str, config=None) -> list[str]:
    """Attach ``method``'s modules (only tuner parameters train); returns the names of the new parameters."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    cls, apply = METHODS[method]
    cfg = config or cls()
    if not isinstance(cfg, cls):
        raise TypeError(f"config for {method} must be a {cls.__name__}, got {type(cfg).__name__}")
    apply(model, cfg)
    return list(named_tuner_parameters(model, method))


def method_parameters(model: nn.Module, method: str) -> list[nn.Parameter]:
    return tuners_of(model, create=True).parameters(method)


def save_pack(folder: str, model: nn.Module, method: str, backbone: str, **extra) -> str:
    reg = tuners_of(model)
    if reg is None or method not in reg.kinds():
        raise ValueError(f"the model carries no {method!r} modules (apply_method first)")
    n = sum(p.numel() for p in reg.parameters(method))
    os.makedirs(folder, exist_ok=True)
    path = save_tuners(model, os.path.join(folder, "modules.safetensors"), kinds=[method], method=method,
                       backbone=backbone, parameters=int(n), **extra)
    _, meta = read_tuners(path)
    tmp = os.path.join(folder, ".pack.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(folder, "pack.json"))
    return folder


def read_pack(folder: str) -> tuple[dict, dict]:
    path = os.path.join(folder, "modules.safetensors") if os.path.isdir(folder) else folder
    return read_tuners(path)


def config_of_pack(folder: str):
    _, meta = read_pack(folder)
    method = meta["method"]
    return method, config_from_dict(METHODS[method][0], meta["tuners"][method]["config"])


@torch.no_grad()
def load_pack(model: nn.Module, folder: str, backbone: str | None = None) -> dict:
    """Copy a pack's tensors into ``model``'s modules of the same method; refuse with the exact misfits."""
    _, meta = read_pack(folder)
    problems = []
    if backbone is not None and meta.get("backbone") != backbone:
        problems.append(f"backbone: pack {meta.get('backbone')!r}, model {backbone!r}")
    path = os.path.join(folder, "modules.safetensors") if os.path.isdir(folder) else folder
    return load_tuners(model, path, kinds=[meta["method"]], what="pack", problems=problems)
