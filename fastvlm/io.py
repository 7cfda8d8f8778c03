"""Small, atomic checkpoints: tensors in one safetensors file with the config as JSON metadata."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

META_KEY = "fastvlm"


#: the signals a user or a scheduler stops a run with; held back while a file is written (atomic_write)
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _signals_held():
    """Hold Ctrl-C and SIGTERM back inside the block and deliver them when it ends: a KeyboardInterrupt
    raised inside a writer (torch.save's zip writer turns it into a RuntimeError on its way out) would
    otherwise end the run with a traceback and lose the file being saved. The signals' Python handlers are
    swapped for a recorder meanwhile (a signal mask would not do: any other thread, such as a BLAS worker,
    takes a signal the main thread blocks); only the main thread can, elsewhere nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if caught:
            signal.raise_signal(caught[0])  # now the run's own handler acts on it, after the save


def atomic_write(path: str, write) -> str:
    """``write(tmp_path)`` into a temporary file in the same folder, fsync it, then rename it over ``path``:
    an interrupted save never leaves a partial file at ``path`` (the old one stays). Ctrl-C and SIGTERM
    arriving meanwhile take effect once the file is in place."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    with _signals_held():
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        os.close(fd)
        try:
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def save_checkpoint(path: str, tensors: dict[str, torch.Tensor], config: dict) -> str:
    """Tensors and a JSON config in one safetensors file, written atomically (see atomic_write)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(config, sort_keys=True)}))


def load_checkpoint(path: str, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (tensors, config). A missing, corrupt or foreign file fails with a clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path!r} is not a readable safetensors file ({e})") from None
    if META_KEY not in meta:
        raise ValueError(f"checkpoint {path!r} has no fastvlm config: not written by fastvlm")
    config = json.loads(meta[META_KEY])
    if kind is not None and config.get("kind") != kind:
        raise ValueError(f"checkpoint {path!r} holds a {config.get('kind')!r} checkpoint, expected {kind!r}")
    return tensors, config


def save_train_state(path: str, state: dict) -> str:
    """A resumable training state (tensors, optimizer state, counters, RNG states), written atomically."""
    def write(tmp):
        with open(tmp, "wb") as fh:  # a handle: torch's zip writer rejects dotted temporary names
            torch.save({"fastvlm_train_state": 1, **state}, fh)

    return atomic_write(path, write)


def peek_train_state(path: str) -> dict:
    """The counters of a saved training state ({'kind', 'epoch', 'step'}) without reading its tensors into
    memory (the file is memory-mapped); {} when it is missing or unreadable."""
    if not os.path.isfile(path):
        return {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        return {}
    if not isinstance(state, dict) or state.get("fastvlm_train_state") != 1:
        return {}
    return {k: state.get(k) for k in ("kind", "epoch", "step")}


def load_train_state(path: str, kind: str | None = None) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training state {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise ValueError(f"training state {path!r} is not readable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("fastvlm_train_state") != 1:
        raise ValueError(f"training state {path!r} was not written by fastvlm")
    if kind is not None and state.get("kind") != kind:
        raise ValueError(f"training state {path!r} is for {state.get('kind')!r}, expected {kind!r}")
    return state
