"""Small C kernels for the CPU path: built once with the system C compiler, cached on disk, run on threads.

A family that has a one-pass formulation of work torch would do in several elementwise ops (each op one
pass over memory and one parallel region) writes it as C source and loads it with :class:`Library`; the
torch ops stay as the fallback and the reference of the same arithmetic, and the family's tests run both.

* Build: ``cc -O3 -shared -fPIC -ffp-contract=off -fno-fast-math`` (``$CC`` overrides the compiler), so no
  multiply-add is fused and no operation is reordered: fp32 results are those of the IEEE operations in
  the source's order. The library lands in ``$FASTVLM_CACHE`` (default ``~/.cache/fastvlm``) under a name
  that hashes the source, compiler and flags, written to a temporary folder first and moved into place
  (a concurrent build writes the same bytes).
* None instead of a library: no compiler, a failed build, inside ``torch.compile`` (ctypes calls cannot be
  traced), or ``FASTVLM_NATIVE=torch`` (every family's torch fallback, e.g. to compare the two).
* Threads: :func:`in_pieces` runs a kernel over [0, n) in pieces on up to ``torch.get_num_threads()``
  threads (this one and a pool; ctypes releases the GIL). Each thread takes the next piece when it
  finishes one, so a thread the OS deschedules holds up at most the piece it is on: one join per call,
  where a chain of torch ops waits for every thread at every op.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch

FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math")


def cache_dir() -> str:
    base = os.environ.get("FASTVLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastvlm")
    os.makedirs(base, mode=0o700, exist_ok=True)
    return base


def build(name: str, source: str, signatures: dict[str, list]) -> Optional[ctypes.CDLL]:
    """Compile ``source`` into ``<cache>/<name>_<hash>.so`` (once per source and compiler) and load it, with
    ``signatures`` {function: ctypes argument types} declared (every function returns void); None when
    there is no C compiler or it fails."""
    found = [c for c in map(shutil.which, ("cc", "gcc", "clang")) if c]
    cc = shlex.split(os.environ.get("CC", "")) or found[:1]
    if not cc:
        return None
    tag = hashlib.sha256("\0".join([source, *cc, *FLAGS]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"{name}_{tag}.so")
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
            src, so = os.path.join(tmp, f"{name}.c"), os.path.join(tmp, f"{name}.so")
            with open(src, "w") as f:
                f.write(source)
            r = subprocess.run([*cc, *FLAGS, src, "-o", so], capture_output=True, timeout=120)
            if r.returncode != 0:
                return None
            os.replace(so, path)  # atomic: a concurrent build of the same source writes the same bytes
    lib = ctypes.CDLL(path)
    for fn, argtypes in signatures.items():
        f = getattr(lib, fn)
        f.argtypes, f.restype = argtypes, None
    return lib


class Library:
    """One family's C kernels, built on first use (thread-safe) and kept; ``get()`` is the library or None
    (see the module docstring for when). ``env``: a family's own variable that also selects its torch
    fallback when set to ``torch``."""

    def __init__(self, name: str, source: str, signatures: dict[str, list], env: Optional[str] = None):
        self.name, self.source, self.signatures, self.env = name, source, signatures, env
        self._lib = None  # the loaded library, False once building or loading it failed
        self._lock = threading.Lock()

    def disabled(self) -> bool:
        return (os.environ.get("FASTVLM_NATIVE", "c") == "torch" or torch.compiler.is_compiling()
                or (self.env is not None and os.environ.get(self.env, "c") == "torch"))

    def get(self) -> Optional[ctypes.CDLL]:
        if self.disabled():
            return None
        if self._lib is None:
            with self._lock:
                if self._lib is None:
                    try:
                        self._lib = build(self.name, self.source, self.signatures) or False
                    except (OSError, subprocess.SubprocessError):
                        self._lib = False
        return self._lib or None

    def reset(self) -> None:
        """Forget the loaded library (the next ``get()`` builds or loads it again)."""
        self._lib = None


_pool = (None, 0, -1)  # (executor, workers, pid that created it)


def in_pieces(n: int, piece: int, run: Callable[[int, int], object]) -> None:
    """``run(i, j)`` over [0, n) in pieces of ``piece``, on up to ``torch.get_num_threads()`` threads, each
    taking the next piece when it finishes one (see the module docstring)."""
    global _pool
    workers = min(torch.get_num_threads(), -(-n // piece))
    if workers <= 1:
        run(0, n)
        return
    ex, size, pid = _pool
    if ex is None or size < workers - 1 or pid != os.getpid():  # a forked child has none of the threads
        ex = ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="fastvlm-native")
        _pool = (ex, workers - 1, os.getpid())
    starts = itertools.count(0, piece)

    def work():
        for i in starts:
            if i >= n:
                return
            run(i, min(i + piece, n))

    futures = [ex.submit(work) for _ in range(workers - 1)]
    work()
    for f in futures:
        f.result()
