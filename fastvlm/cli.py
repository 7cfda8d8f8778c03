"""Command line: ``fastvlm tune <method> ...``, ``fastvlm eval ...``, ``fastvlm pack``, ``fastvlm bench``,
``fastvlm kernels``. docs/cli.md describes every subcommand, the output folders and the rules below.

Errors: every expected failure ends the command with one line ``fastvlm: error: ...`` on stderr and
exit status 2 when the command line itself is wrong (a value out of range, an unknown name, a path of the
wrong kind, a conflict with what --out holds), 1 when the arguments are right but what they point at or the
machine fails (unreadable images, too few images, no network for the weights, no GPU), 130 on Ctrl-C.
FASTVLM_TRACEBACK=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import sys
import time

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class CLIError(Exception):
    """An expected failure, reported as one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


class UsageError(CLIError):
    """The command line is wrong (exit status 2)."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_USAGE)


class StoppedByAnotherRank(CLIError):
    """Under torchrun: this rank stopped because another one failed (its collective lost the other rank);
    the failing rank prints the error, this one only where the run stands (one line without 'error:').
    After that line it waits :data:`FOLLOWER_EXIT_DELAY_S` before exiting: torchrun names the first rank
    that exits as the root cause of a failed run, and that should be the rank that failed."""


FOLLOWER_EXIT_DELAY_S = 3.0


class QuietExit(CLIError):
    """Under torchrun: a rank other than 0 ends with ``code`` and no message, rank 0 reporting for the run."""


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors raised as UsageError (one line, in main) instead of usage + exit."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _int_at_least(lo: int):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return parse


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _fraction(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


_nonneg, _positive = _int_at_least(0), _int_at_least(1)


# -- threads and workers ------------------------------------------------------------------------------------

def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(cpus: int) -> int:
    """DataLoader worker processes when --workers is not given: a quarter of the CPUs, at most 4 (0 on a
    machine with fewer than 4 CPUs, where a worker would take a core from the model's own threads)."""
    return min(4, cpus // 4)


def thread_count(threads: int | None, workers: int, cpus: int, env=os.environ) -> int | None:
    """torch's intra-op threads for a run: --threads when given; else OMP_NUM_THREADS when set (torch reads it
    itself); else, when DataLoader workers run, the CPUs left to the main process (cpus - workers, at least 1),
    so that the model's threads and the workers do not compete for cores; else torch's own default.
    None: leave torch's setting alone."""
    if threads is not None:
        return threads
    if env.get("OMP_NUM_THREADS"):
        return None
    if workers > 0:
        return max(1, cpus - workers)
    return None


def _set_threads(args) -> None:
    n = thread_count(args.threads, args.workers, available_cpus())
    if n is not None:
        import torch

        torch.set_num_threads(n)


# -- arguments ----------------------------------------------------------------------------------------------

def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _add_model_data(p: argparse.ArgumentParser, for_eval: bool = False) -> None:
    from .templates import DATASET_TEMPLATES

    hf = ", or hf:<folder> (a transformers CLIPModel/SiglipModel folder written by save_pretrained)"
    if for_eval:
        p.add_argument("--model", default=None, help=f"open_clip architecture{hf} (default: the checkpoint's)")
        p.add_argument("--pretrained", default=None, help="open_clip pretrained tag, a local checkpoint file, or "
                       "'none' (default: the checkpoint's; not with hf:)")
    else:
        p.add_argument("--model", default="ViT-B-16", help=f"open_clip architecture{hf} (default: ViT-B-16)")
        p.add_argument("--pretrained", default=None,
                       help="open_clip pretrained tag, a local checkpoint file, or 'none' for random weights "
                            "(default: openai; downloaded on first use, read from the cache after; not with hf:)")
    p.add_argument("--data", required=True,
                   help="image folder (root/<class>/<img>, or with train/ and test/), or a CoOp split json")
    p.add_argument("--split", default=None, help="CoOp split_zhou_<Dataset>.json; paths relative to --data")
    p.add_argument("--dataset", default=None,
                   help="dataset name for the prompt templates, one of: " + ", ".join(sorted(DATASET_TEMPLATES))
                        + (" (default: the checkpoint's)" if for_eval else " (default: the generic 'a photo of a {}.')"))
    if for_eval:
        p.add_argument("--shots", type=_nonneg, default=None,
                       help="default: the checkpoint's (a flat folder's test images are those it did not train on)")
        p.add_argument("--seed", type=int, default=None, help="default: the checkpoint's")
    else:
        p.add_argument("--shots", type=_nonneg, default=16,
                       help="training images per class (default 16; 0: every training image, needs a split)")
        p.add_argument("--seed", type=int, default=1, help="seed of the few-shot draw and of training (default 1)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu",
                   help="torch device (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--batch-size", type=_positive, default=None,
                   help="images per batch (default: the method's recipe)" if for_eval else
                   "the global batch (default: the method's recipe); under torchrun each of the N processes takes "
                   "batch / N of it, so N processes train as one on the whole batch")
    p.add_argument("--workers", type=_nonneg, default=None,
                   help="DataLoader worker processes (default: a quarter of the CPUs, at most 4)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch intra-op threads (default: OMP_NUM_THREADS when set, else the CPUs minus --workers "
                        "when workers run, else torch's default)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be opened (counted and reported) instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_training(p: argparse.ArgumentParser, lr: float, epochs: int | None, resume: bool) -> None:
    p.add_argument("--out", required=True, help="folder for the result, metrics.json and run.json (must be empty "
                   "or new, unless --resume or --overwrite)")
    p.add_argument("--lr", type=_positive_float, default=lr, help=f"learning rate (default {lr:g})")
    p.add_argument("--epochs", type=_nonneg, default=epochs,
                   help=("default: 100 for <= 4 shots, 200 above" if epochs is None else f"default {epochs}")
                        + "; 0 trains nothing and evaluates the starting point")
    if resume:
        p.add_argument("--resume", action="store_true",
                       help="continue the interrupted run in --out (same settings; state saved every epoch)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in a non-empty --out (its result, metrics and saved state)")


def _loop_resumes(train_fn) -> bool:
    """Whether a training loop takes ``checkpoint=`` (saves a resumable state every epoch)."""
    import inspect

    return "checkpoint" in inspect.signature(train_fn).parameters


# -- output folder ------------------------------------------------------------------------------------------

#: the global training batch of the image tuners (mask, orth, vpt, lora, adapter) without --batch-size
IMAGE_BATCH = 32
#: what a tune run writes in --out; --overwrite removes these (feature caches stay: they are keyed by the
#: model and the image list and are recomputed when they do not match)
RUN_FILES = ("run.json", "metrics.json", "train_state.pt", "taskres.safetensors", "masks.safetensors",
             "orth.safetensors", "pack")
STATE = "train_state.pt"
#: settings that do not change the result and may differ on --resume
_NOT_SETTINGS = {"out", "resume", "overwrite", "no_progress", "device", "threads", "func", "run", "argv", "cmd",
                 "init_from_given"}


def _settings(args) -> dict:
    s = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_SETTINGS}
    for k in ("data", "split", "init_from"):
        if s.get(k):
            s[k] = os.path.abspath(s[k])
    if s.get("pretrained") and os.path.exists(s["pretrained"]):
        s["pretrained"] = os.path.abspath(s["pretrained"])
    return json.loads(json.dumps(s))  # as run.json stores them


class OutDir:
    """The --out folder of a tune run: refuses to reuse a non-empty folder unless --resume (same settings) or
    --overwrite; records the settings in run.json; after a failure removes what this run made unless a
    resumable state was saved; after success removes the training state."""

    def __init__(self, args, ranks=None):
        from . import dist as D

        self.args, self.path, self.legacy = args, args.out, False
        self.ranks = ranks if ranks is not None else D.Dist()
        self.state = os.path.join(self.path, STATE)
        self.created, self.before = False, set()
        if not self.ranks.is_main:  # rank 0 alone checks, writes and cleans --out (docs/distributed.md)
            return
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UsageError(f"--out {self.path!r} is a file: give a folder (it is created when missing)")
        if args.resume and args.overwrite:
            raise UsageError("--resume and --overwrite exclude each other: --resume continues the run in --out, "
                             "--overwrite replaces it")
        entries = sorted(os.listdir(self.path)) if os.path.isdir(self.path) else []
        saved = self._saved()
        if args.resume:
            self._check_resume(saved)
        elif entries and not args.overwrite:
            raise UsageError(f"--out {self.path!r} is not empty ({self._describe(saved, entries)}): pass --resume to "
                             "continue the run saved there, --overwrite to replace it, or choose another folder")

    def _saved(self) -> dict | None:
        try:
            with open(os.path.join(self.path, "run.json")) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def _progress(self, saved) -> str:
        from .io import peek_train_state

        st = peek_train_state(self.state)
        total = (saved or {}).get("epochs")
        if st:
            return f"{st['epoch'] + 1} of {total} epochs saved" if total is not None else f"epoch {st['epoch'] + 1} saved"
        return "finished" if os.path.exists(os.path.join(self.path, "metrics.json")) else "no epoch saved"

    def _describe(self, saved, entries) -> str:
        if saved:
            return f"it holds a `{saved.get('command', 'fastvlm')}` run, {self._progress(saved)}"
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        return f"it holds {shown}"

    def _check_resume(self, saved) -> None:
        if saved is None and os.path.exists(self.state):
            _note(f"{self.path} has no run.json (written by an older fastvlm): its settings cannot be compared; "
                  "resuming with the ones given")
            self.legacy = True
            return
        if saved is None:
            raise UsageError(f"--resume: {self.path!r} holds no fastvlm run to resume (no run.json): drop --resume to "
                             "start one")
        now = _settings(self.args)
        before = saved.get("settings", {})
        diff = [f"{k.replace('_', '-')} {before.get(k)!r} (now {now.get(k)!r})" for k in sorted(set(now) | set(before))
                if before.get(k) != now.get(k)]
        if diff:
            raise UsageError(f"--resume: the run in {self.path!r} was made with other settings: {'; '.join(diff)}; "
                             "resume with its settings, or start again with --overwrite")
        if not os.path.exists(self.state) and os.path.exists(os.path.join(self.path, "metrics.json")):
            raise UsageError(f"--resume: the run in {self.path!r} has finished (see its metrics.json): nothing to "
                             "resume; --overwrite runs it again")

    def create(self, epochs: int | None) -> None:
        """Make the folder (after --overwrite removed the previous run's files) and write run.json."""
        from . import __version__

        if not self.ranks.is_main:
            return
        self.created = not os.path.isdir(self.path)
        if self.args.overwrite and not self.created:
            for name in RUN_FILES:
                p = os.path.join(self.path, name)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.unlink(p)
        os.makedirs(self.path, exist_ok=True)
        self.before = set(os.listdir(self.path))
        if not self.args.resume or self.legacy:
            run = {"command": f"fastvlm tune {self.args.method}", "epochs": epochs, "fastvlm": __version__,
                   "argv": self.args.argv, "processes": self.ranks.world_size, "settings": _settings(self.args)}
            with open(os.path.join(self.path, "run.json"), "w") as fh:
                json.dump(run, fh, indent=2)

    def resume_note(self, epochs: int) -> str | None:
        if not self.args.resume or not self.ranks.is_main:
            return None
        from .io import peek_train_state

        st = peek_train_state(self.state)
        if not st:
            return f"no epoch of the run in {self.path} was saved: starting from epoch 1 of {epochs}"
        done = st["epoch"] + 1
        if done >= epochs:
            return f"resuming a run whose {epochs} epochs are all saved (in {self.state}): finishing it"
        return f"resuming from epoch {done + 1} of {epochs} ({done} saved in {self.state})"

    def _clean(self) -> None:
        for name in set(os.listdir(self.path)) - self.before:
            p = os.path.join(self.path, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    os.unlink(p)
                except OSError:
                    pass
        if self.created and not os.listdir(self.path):
            os.rmdir(self.path)

    def resume_command(self) -> str:
        """The command that resumes this run; under torchrun on one machine, the torchrun command (any number
        of processes may resume it, docs/distributed.md)."""
        argv = [a for a in self.args.argv if a != "--overwrite"]
        if "--resume" not in argv:
            argv.append("--resume")
        command = shlex.join(["fastvlm", *argv])
        if not self.ranks.enabled:
            return command
        if int(os.environ.get("LOCAL_WORLD_SIZE", self.ranks.world_size)) == self.ranks.world_size:
            return f"torchrun --nproc-per-node {self.ranks.world_size} -m {command}"
        return f"{command} (under torchrun, as before)"

    def failed(self) -> str:
        """Clean up after a failure; returns what was kept (appended to the error line)."""
        if not self.ranks.is_main:
            return ""
        if os.path.exists(self.state):
            return (f" (the resumable state is kept in {self.state}: fix the cause and run "
                    f"`{self.resume_command()}`)")
        self._clean()
        return ""

    def interrupted(self) -> str:
        from .io import peek_train_state

        if not self.ranks.is_main:
            return ""
        st = peek_train_state(self.state)
        if st:
            return (f"interrupted; the resumable state ({st['epoch'] + 1} epochs done) is in {self.state}; resume "
                    f"with: {self.resume_command()}")
        self._clean()
        where = "left as it was" if not self.created else "removed"
        return f"interrupted before any epoch was saved: nothing to resume ({self.path} {where})"

    def succeeded(self) -> None:
        if self.ranks.is_main and os.path.exists(self.state):
            os.unlink(self.state)


# -- checks done before anything heavy ----------------------------------------------------------------------

def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device (expected cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {device}: torch sees no CUDA GPU here (torch.cuda.is_available() is False); "
                           "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CLIError(f"--device {device}: torch sees no MPS device here; use --device cpu")


def _pack_folder(path: str, option: str) -> str:
    """A pack folder from ``path``: the folder itself, or the folder of its pack.json/modules.safetensors."""
    if os.path.isfile(path) and os.path.basename(path) in ("pack.json", "modules.safetensors"):
        path = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path):
        raise UsageError(f"{option} {path!r} does not exist: give the pack folder of an upstream run (OUT/pack)")
    if not os.path.isfile(os.path.join(path, "modules.safetensors")):
        hint = " (its pack is in pack/)" if os.path.isfile(os.path.join(path, "pack", "modules.safetensors")) else ""
        raise UsageError(f"{option} {path!r} is not a pack folder (no modules.safetensors){hint}")
    return path


def _check_common(args) -> None:
    """Checks that need no model: names (an hf: folder: what it holds), device, pretrained weights (known tag,
    cached or downloadable)."""
    from .models import HF_PREFIX, check_hf_folder, check_model_name, check_pretrained, hf_folder
    from .templates import check_dataset

    try:
        check_dataset(args.dataset)
    except ValueError as e:
        raise UsageError(f"--dataset: {e}") from None
    _check_device(args.device)
    if args.workers is None:
        args.workers = default_workers(available_cpus())
    if args.model is not None and hf_folder(args.model) is not None:
        if args.pretrained is not None:
            raise UsageError(f"--pretrained {args.pretrained!r} with --model {args.model}: an hf: folder holds its "
                             "own weights; drop --pretrained")
        try:
            check_hf_folder(hf_folder(args.model))
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"--model: {e}") from None
        args.model = HF_PREFIX + os.path.abspath(hf_folder(args.model))  # as run.json and checkpoints keep it
    elif args.model is not None:
        try:
            check_model_name(args.model)
        except ValueError as e:
            raise UsageError(f"--model: {e}") from None
        try:
            check_pretrained(args.model, args.pretrained)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"--pretrained: {e}") from None


def _ensure_weights(args) -> None:
    from .models import WeightsUnavailable, ensure_weights_available

    try:
        ensure_weights_available(args.model, args.pretrained)
    except WeightsUnavailable as e:
        raise CLIError(f"--pretrained: {e}") from None


# -- data ---------------------------------------------------------------------------------------------------

def _usable(samples, args, where: str):
    """``samples`` with unreadable images left out (--skip-bad-images) or refused, naming them."""
    from .data import check_images

    bad = check_images(samples, progress=not args.no_progress and len(samples) > 2000)
    if not bad:
        return samples
    shown = "; ".join(f"{p} ({why})" for p, why in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
    if not args.skip_bad_images:
        raise CLIError(f"{len(bad)} of the {len(samples)} {where} images cannot be read: {shown}; remove them or "
                       "pass --skip-bad-images to leave them out")
    print(f"fastvlm: skipped {len(bad)} unreadable {where} image(s) of {len(samples)}: {shown}", file=sys.stderr)
    drop = {p for p, _ in bad}
    return [s for s in samples if s[0] not in drop]


def _counts_text(counts: dict) -> str:
    items = [f"{name!r} {n}" for name, n in counts.items()]
    return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")


def _resolve_data(args, shots: int, seed: int):
    """(train, test, class names, what the test set is) from --data/--split, with every image checked."""
    from .data import classnames, count_per_class, few_shot, load_splits, split_holdout

    try:
        splits = load_splits(args.data, args.split)
    except FileNotFoundError as e:
        raise UsageError(f"--data: {e}") from None
    except ValueError as e:
        raise CLIError(f"--data: {e}") from None
    try:
        if "all" in splits:
            if shots == 0:
                raise UsageError(f"--shots 0 (every training image) needs a train/ and test/ split or a split file; "
                                 f"{args.data!r} is one flat folder, which is split into --shots training images "
                                 "per class and the rest for testing")
            samples = _usable(splits["all"], args, "folder")
            names = classnames(samples)
            counts = count_per_class(samples)
            short = {c: n for c, n in counts.items() if n <= shots}
            if short:
                raise CLIError(f"--shots {shots} on a flat folder needs at least {shots + 1} images per class "
                               f"({shots} to train on, the rest to test on); too few in {len(short)} of "
                               f"{len(counts)} classes: {_counts_text(short)}; lower --shots or give --data a "
                               "train/ and test/ split")
            train, test = split_holdout(samples, shots, seed)
            what = (f"the {len(test)} images of {args.data} not drawn for training ({shots} per class, "
                    f"seed {seed})")
        else:
            tr = _usable(splits["train"], args, "training")
            test = _usable(splits["test"], args, "test")
            names = classnames(tr)
            if shots:
                short = {c: n for c, n in count_per_class(tr).items() if n < shots}
                if short:
                    print(f"fastvlm: note: {len(short)} classes have fewer than --shots {shots} training images, all "
                          f"of theirs are used: {_counts_text(short)}", file=sys.stderr)
            train = tr if shots == 0 else few_shot(tr, shots, seed)
            what = f"the {len(test)} images of the test split"
    except ValueError as e:
        raise CLIError(f"--data: {e}") from None
    if len(names) < 2:
        raise CLIError(f"--data {args.data!r} has {len(names)} class ({', '.join(map(repr, names))}): classification "
                       "needs at least 2 classes (is --data one class's folder? give the folder that holds the "
                       "class folders)")
    if not test:
        raise CLIError(f"--data {args.data!r}: the test set is empty")
    bad = sorted({y for _, y, _ in test if y >= len(names)})
    if bad:
        raise CLIError(f"--data: the test split has labels {bad[:5]} that the training split does not have")
    return train, test, names, what


# -- shared model steps -------------------------------------------------------------------------------------

def _features(model, samples, transform, args, desc, ranks=None):
    """(features, labels) of ``samples``; with several ranks each encodes its :func:`~fastvlm.dist.shard` and
    every rank gets all rows back in order (--batch-size is per process here: nothing is averaged)."""
    from . import dist as D
    from .data import cache_features

    ranks = ranks if ranks is not None else D.Dist()
    per_rank = -(-args.batch_size // ranks.world_size) if args.batch_size else 64
    f, y = cache_features(model, D.shard(samples, ranks), transform, batch_size=per_rank, device=args.device,
                          num_workers=args.workers, progress=not args.no_progress, desc=desc)
    return D.gather_rows(f, len(samples), ranks), D.gather_rows(y, len(samples), ranks)


def _top1(logits, labels) -> float:
    return 100.0 * (logits.argmax(1).cpu() == labels).float().mean().item()


def _cosine_top1(features, labels, classifier) -> float:
    """Top-1 (%) of norm(features) @ classifier.T (the classifier rows normalised)."""
    import torch.nn.functional as F

    return _top1(F.normalize(features, dim=-1) @ F.normalize(classifier.detach().float().cpu(), dim=-1).T, labels)


def _weight_files(args) -> list:
    """(name, size, mtime) of the local files the weights come from (an hf: folder's, a checkpoint file), so
    that a feature cache of weights saved again under the same name is not reused."""
    from .models import hf_folder, weight_files

    folder = hf_folder(args.model)
    if folder:
        paths = [os.path.join(folder, "config.json"), *weight_files(folder)]
    else:
        paths = [args.pretrained] if args.pretrained and os.path.isfile(args.pretrained) else []
    return [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]


def _random_init_seed(args):
    """The seed that built the weights of a random-init model (``--pretrained none``; _load_model seeds before
    building), else None: another seed is another model, whose features a cache must not hand back."""
    from .models import _tag, hf_folder

    return args.seed if _tag(args.pretrained) is None and hf_folder(args.model) is None else None


def _cached_features(model, samples, transform, path, args, desc="caching image features", ranks=None):
    """Image features of ``samples``, read from ``path`` when it was made from the same model and images.
    With several ranks, rank 0 reads the cache and sends it, or all encode their shards and rank 0 writes it."""
    from . import dist as D
    from .io import load_checkpoint, save_checkpoint

    ranks = ranks if ranks is not None else D.Dist()
    key = hashlib.sha256(json.dumps([args.model, args.pretrained, _weight_files(args), _random_init_seed(args),
                                     [s[0] for s in samples]]).encode()).hexdigest()

    def read():
        if os.path.exists(path):
            try:
                t, cfg = load_checkpoint(path, kind="features")
                if cfg.get("key") == key:
                    return t["features"], t["labels"]
            except ValueError:
                pass  # unreadable cache: recompute it
        return None

    cached = D.from_main(ranks, read)
    if cached is not None:
        return cached
    f, y = _features(model, samples, transform, args, desc, ranks)
    D.on_main(ranks, save_checkpoint, path, {"features": f, "labels": y}, {"kind": "features", "key": key})
    return f, y


def _loader(samples, transform, batch_size, args, ranks=None):
    """The training loader; ``batch_size`` is the global batch, of which each rank loads its share."""
    from . import dist as D
    from .data import shuffled_loader

    ranks = ranks if ranks is not None else D.Dist()
    if ranks.enabled and len(samples) % ranks.world_size:
        _note(f"{len(samples)} training images do not split evenly over {ranks.world_size} processes: torch's "
              "DistributedSampler repeats a few of them each epoch, so the run differs slightly from one process")
    return shuffled_loader(samples, transform, D.local_batch(batch_size, ranks), args.seed, num_workers=args.workers,
                           ranks=ranks)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _note(text: str) -> None:
    print(f"fastvlm: {text}", file=sys.stderr)


def _zero_shot_start(args, names, test, ranks=None):
    """The image tuners' start: the model, its eval transform, the normalised zero-shot classifier, and the
    zero-shot top-1 on the test set (the figure every tune prints beside the tuned one)."""
    model, _, pre_eval, tok = _load_model(args)
    cls = _zero_shot_classifier(model, tok, names, args, ranks)
    f, y = _features(model, test, pre_eval, args, "zero-shot evaluation", ranks)
    return model, pre_eval, cls, _cosine_top1(f, y, cls)


def _load_model(args):
    from .models import load_clip
    from .train.common import seed_everything

    seed_everything(args.seed)
    return load_clip(args.model, args.pretrained, args.device)


def _base_classifier(model, tok, names, args, ranks=None):
    """The raw text classifier (one row per class, templates averaged); with several ranks each encodes the
    prompts of its :func:`~fastvlm.dist.shard` of the classes and every rank gets all rows back in order."""
    from . import dist as D
    from .tuners.taskres import build_base_classifier

    ranks = ranks if ranks is not None else D.Dist()
    # more ranks than classes: a rank without classes encodes one anyway, to send rows of the right width
    mine = D.shard(names, ranks) or names[:1]
    rows = build_base_classifier(model, tok, mine, args.dataset, device=args.device)
    return D.gather_rows(rows[:len(D.shard(names, ranks))], len(names), ranks)


def _zero_shot_classifier(model, tok, names, args, ranks=None):
    import torch.nn.functional as F

    return F.normalize(_base_classifier(model, tok, names, args, ranks), dim=-1)


# -- tune ---------------------------------------------------------------------------------------------------

def run_taskres(args, out: OutDir, data) -> int:
    from .models import freeze
    from .train.taskres import TaskResRecipe, evaluate_head, train_taskres
    from .tuners.taskres import TaskResConfig, TaskResHead

    train, test, names, what = data
    ranks = out.ranks
    model, _, pre_eval, tok = _load_model(args)
    freeze(model)
    templates = args.dataset
    base = _base_classifier(model, tok, names, args, ranks)
    f_tr, y_tr = _cached_features(model, train, pre_eval, os.path.join(args.out, "features_train.safetensors"), args,
                                  "caching training features", ranks)
    f_te, y_te = _cached_features(model, test, pre_eval, os.path.join(args.out, "features_test.safetensors"), args,
                                  "caching test features", ranks)
    head = TaskResHead(base.to(args.device), TaskResConfig(alpha=args.alpha)).to(args.device)
    zs = evaluate_head(head, f_te.to(args.device), y_te.to(args.device))
    recipe = TaskResRecipe(lr=args.lr, batch_size=args.batch_size or 256, epochs=args.epochs)
    hist = train_taskres(head, f_tr.to(args.device), y_tr.to(args.device), recipe, args.shots, args.seed,
                         progress=not args.no_progress, checkpoint=out.state, ranks=ranks)
    acc = evaluate_head(head, f_te.to(args.device), y_te.to(args.device))
    ckpt = os.path.join(args.out, "taskres.safetensors")
    _on_main(ranks, head.save, ckpt, model=args.model, pretrained=args.pretrained, classnames=names,
             templates=templates, shots=args.shots, seed=args.seed)
    metrics = {"zero_shot_top1": zs, "top1": acc, "final_loss": hist[-1] if hist else None, "epochs": len(hist),
               "train_samples": len(train), "test_samples": len(test), "checkpoint": ckpt}
    _on_main(ranks, _write_metrics, args.out, metrics, hist)
    print(f"zero-shot top-1 {zs:.2f}%  ->  TaskRes top-1 {acc:.2f}%  on {what}  ({_count(len(hist), 'epoch')}, "
          f"{len(train)} training images)")
    print(f"checkpoint: {ckpt}")
    return 0


def _on_main(ranks, fn, *args, **kwargs):
    """``fn(...)`` (a write into --out) on rank 0 alone, then every rank waits for it (fastvlm.dist.on_main)."""
    from . import dist as D

    return D.on_main(ranks, fn, *args, **kwargs)


def _write_metrics(out, metrics, history) -> None:
    """metrics.json in ``out``: ``metrics`` and the run's ``step_times`` (their distribution and every step's
    seconds, from the training loop's ``history``)."""
    from .io import atomic_write
    from .train.common import step_time_summary

    metrics = {**metrics, "step_times": step_time_summary(getattr(history, "step_times", []))}

    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(metrics, fh, indent=2)

    atomic_write(os.path.join(out, "metrics.json"), write)


def run_mask(args, out: OutDir, data) -> int:
    from .train.common import image_norm, train_transform
    from .train.rmt import RMTRecipe, train_rmt
    from .tuners.mask import MaskConfig, apply_masks, export_masks, sparsity

    train, test, names, what = data
    ranks = out.ranks
    model, pre_eval, cls, zs = _zero_shot_start(args, names, test, ranks)
    apply_masks(model, MaskConfig(mlp=args.mlp))
    recipe = RMTRecipe(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size or IMAGE_BATCH,
                       drop_ratio=args.drop_ratio, seed=args.seed)
    size, mean, std = image_norm(model)
    loader = _loader(train, train_transform(size, mean, std), recipe.batch_size, args, ranks)
    hist = train_rmt(model, cls, loader, recipe, device=args.device, progress=not args.no_progress,
                     checkpoint=out.state, ranks=ranks)
    f, y = _features(model, test, pre_eval, args, "evaluating the masked model", ranks)
    acc = _cosine_top1(f, y, cls)
    path = os.path.join(args.out, "masks.safetensors")
    _on_main(ranks, export_masks, model, path, model_name=args.model, pretrained=args.pretrained, classnames=names)
    metrics = {"zero_shot_top1": zs, "top1": acc, "sparsity": sparsity(model), "history": hist, "masks": path,
               "train_samples": len(train), "test_samples": len(test)}
    _on_main(ranks, _write_metrics, args.out, metrics, hist)
    print(f"zero-shot top-1 {zs:.2f}%  ->  RMT top-1 {acc:.2f}%  on {what}  (sparsity {100 * metrics['sparsity']:.2f}%)")
    print(f"masks: {path}")
    return 0


def run_orth(args, out: OutDir, data) -> int:
    import torch

    from .templates import templates_for
    from .train.common import image_norm, train_transform
    from .train.orth import OrthRecipe, base_to_new, harmonic_mean, text_classifier, train_orth
    from .tuners.orth import OrthConfig, apply_orth, save_orth

    train, test, names, what = data
    ranks = out.ranks
    model, _, pre_eval, tok = _load_model(args)
    template = templates_for(args.dataset)[0]

    def tokens(class_names):
        return tok([template.format(c) for c in class_names]).to(args.device)

    splits = {"all": (test, names)}
    train_names = names
    if args.base_to_new:
        (train, train_names), _ = base_to_new(train, names)
        (b_test, b_names), (n_test, n_names) = base_to_new(test, names)
        splits = {"base": (b_test, b_names), "new": (n_test, n_names)}
        if not b_test or not n_test:
            raise CLIError("--base-to-new: the test set has no images of the " + ("base" if not b_test else "new")
                           + " classes")

    def evaluate(desc):
        acc = {}
        with torch.no_grad():
            for k, (samples, cn) in splits.items():
                f, y = _features(model, samples, pre_eval, args, f"{desc} ({k} classes)", ranks)
                acc[k] = _cosine_top1(f, y, text_classifier(model, tokens(cn)))
        if args.base_to_new:
            acc["hm"] = harmonic_mean(acc["base"], acc["new"])
        return acc

    zs = evaluate("zero-shot evaluation")
    try:
        apply_orth(model, OrthConfig(block_size=args.block_size, attention=args.attention,
                                     neumann_terms=args.neumann_terms, recompute=args.recompute))
    except ValueError as e:
        if "block_size" not in str(e):
            raise
        raise UsageError(f"--block-size {args.block_size}: {e}") from None
    recipe = OrthRecipe(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size or IMAGE_BATCH)
    size, mean, std = image_norm(model)
    loader = _loader(train, train_transform(size, mean, std), recipe.batch_size, args, ranks)
    kw = {"checkpoint": out.state} if _loop_resumes(train_orth) else {}
    hist = train_orth(model, tokens(train_names), loader, recipe, args.device, args.seed,
                      progress=not args.no_progress, ranks=ranks, **kw)
    acc = evaluate("evaluating the rotated model")
    path = os.path.join(args.out, "orth.safetensors")
    _on_main(ranks, save_orth, model, path, model_name=args.model, pretrained=args.pretrained, classnames=names)
    _on_main(ranks, _write_metrics, args.out, {"zero_shot_top1": zs, "top1": acc, "history": hist, "rotations": path,
                                               "train_samples": len(train), "test_samples": len(test)}, hist)
    if args.base_to_new:
        nb = len(splits["base"][1])
        print("OrthCR top-1: " + ", ".join(f"{k} {acc[k]:.2f}%" for k in ("base", "new", "hm"))
              + "  (zero-shot: " + ", ".join(f"{k} {zs[k]:.2f}%" for k in ("base", "new", "hm")) + ")")
        print(f"  base: the first {nb} of {len(names)} classes, trained on; new: the other {len(names) - nb}, unseen "
              f"in training; hm: their harmonic mean; on {what}")
    else:
        print(f"zero-shot top-1 {zs['all']:.2f}%  ->  OrthCR top-1 {acc['all']:.2f}%  on {what}, all "
              f"{len(names)} classes ('all' in metrics.json; --base-to-new reports base and new classes apart)")
    print(f"rotations: {path}")
    return 0


def run_pvp(args, out: OutDir, data) -> int:
    """vpt / lora / adapter: stage 1 (upstream) or stage 2 (--init-from PACK)."""
    import torch

    from .train.common import image_norm, train_transform
    from .train.pvp import PVPRecipe, ZeroShotHead, train_modules
    from .tuners.adapter import AdapterConfig
    from .tuners.lora import LoRAConfig
    from .tuners.pack import apply_method, config_of_pack, load_pack, method_parameters, save_pack
    from .tuners.vpt import VPTConfig

    train, test, names, what = data
    ranks = out.ranks
    model, pre_eval, cls, zs = _zero_shot_start(args, names, test, ranks)
    if args.init_from:
        _, cfg = config_of_pack(args.init_from)
    else:
        cfg = {"vpt": lambda: VPTConfig(tokens=args.tokens, deep=not args.shallow, seed=args.seed),
               "lora": lambda: LoRAConfig(rank=args.rank, alpha=args.lora_alpha, seed=args.seed),
               "adapter": lambda: AdapterConfig(bottleneck=args.bottleneck, seed=args.seed,
                                                recompute=args.recompute)}[args.method]()
    apply_method(model, args.method, cfg)
    if args.init_from:
        load_pack(model, args.init_from, backbone=args.model)
    if args.head == "zeroshot":
        head = ZeroShotHead(cls)
    else:
        head = torch.nn.Linear(cls.shape[1], len(names)).to(args.device)
    recipe = PVPRecipe(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size or IMAGE_BATCH)
    size, mean, std = image_norm(model)
    loader = _loader(train, train_transform(size, mean, std), recipe.batch_size, args, ranks)
    params = method_parameters(model, args.method)
    kw = {"checkpoint": out.state} if _loop_resumes(train_modules) else {}
    hist = train_modules(model, params, head, loader, recipe, args.device, progress=not args.no_progress,
                         ranks=ranks, **kw)
    f, y = _features(model, test, pre_eval, args, f"evaluating the {args.method} model", ranks)
    with torch.no_grad():
        acc = _top1(head(f.to(args.device)), y)
    pack = os.path.join(args.out, "pack")
    _on_main(ranks, save_pack, pack, model, args.method, args.model, pretrained=args.pretrained, classes=len(names),
             init_from=args.init_from)
    _on_main(ranks, _write_metrics, args.out, {"zero_shot_top1": zs, "top1": acc, "history": hist, "pack": pack,
                                               "init_from": args.init_from,
                                               "trainable_parameters": sum(p.numel() for p in params),
                                               "train_samples": len(train), "test_samples": len(test)}, hist)
    head_text = "zero-shot text head" if args.head == "zeroshot" else "linear head"
    print(f"zero-shot top-1 {zs:.2f}%  ->  {args.method} top-1 {acc:.2f}%  on {what}  ({head_text}, "
          f"{'from ' + args.init_from_given if args.init_from else 'from scratch'})")
    print(f"pack: {pack}")
    return 0


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's stop, `kill`) ends a run like Ctrl-C: the state is kept and the resume command
    printed, or what the run wrote is removed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _resumable(args) -> bool:
    return hasattr(args, "resume")


def cmd_tune(args) -> int:
    """One process, or one of torchrun's N ranks (docs/distributed.md): rank 0 checks the command line and
    --out, resolves the data and speaks for the run (notes, progress bars, the summary, every file); every
    rank then trains on its share of each global batch."""
    from . import dist as D
    from .models import hf_folder

    if not _resumable(args):
        args.resume = False
    if args.pretrained is None and hf_folder(args.model) is None:
        args.pretrained = "openai"  # the default; None stays for hf: folders, which hold their weights
    _check_device(args.device)
    ranks = D.from_env(args.device)
    args.device = D.device_of(ranks, args.device)
    try:
        if ranks.is_main:
            return _tune(args, ranks)
        args.no_progress = True
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            return _tune(args, ranks)
    finally:
        D.shutdown(ranks)


def _prepare_tune(args, ranks):
    """Everything before training, on rank 0 alone under torchrun (its result is sent to the others):
    the checks, --out (refused, resumed or overwritten; run.json), the data. Returns (epochs, out, data)."""
    _check_common(args)
    if getattr(args, "init_from", None):
        args.init_from_given = args.init_from
        args.init_from = _pack_folder(args.init_from, "--init-from")
        from .tuners.pack import read_pack

        try:
            _, meta = read_pack(args.init_from)
        except ValueError as e:
            raise UsageError(f"--init-from: {e}") from None
        if meta.get("method") != args.method:
            raise UsageError(f"--init-from {args.init_from_given!r} holds a {meta.get('method')!r} pack: "
                             f"`tune {args.method}` needs a {args.method!r} pack")
        if meta.get("backbone") not in (None, args.model):
            raise UsageError(f"--init-from {args.init_from_given!r} was trained on {meta.get('backbone')!r}, not "
                             f"--model {args.model!r}")
    if args.method == "taskres":
        from .train.taskres import TaskResRecipe

        epochs = TaskResRecipe(epochs=args.epochs).resolved_epochs(args.shots)
    else:
        epochs = args.epochs
    if ranks.enabled and args.method != "taskres":  # TaskRes trains every rank on the whole batch
        from . import dist as D

        try:
            D.local_batch(args.batch_size or IMAGE_BATCH, ranks)
        except ValueError as e:
            raise UsageError(str(e) + ("" if args.batch_size else " (32 is the default: give --batch-size)")) from None
    out = OutDir(args, ranks)
    _ensure_weights(args)
    data = _resolve_data(args, args.shots, args.seed)
    out.create(epochs)
    note = out.resume_note(epochs)
    if note:
        _note(note)
    if epochs == 0:
        _note("--epochs 0: nothing is trained; the result is the starting point, evaluated")
    return epochs, out, data


def _tune(args, ranks) -> int:
    from . import dist as D

    made = {}

    def prepare():
        epochs, made["out"], data = _prepare_tune(args, ranks)
        return {"epochs": epochs, "data": data, "init_from": getattr(args, "init_from", None),
                "init_from_given": getattr(args, "init_from_given", None), "workers": args.workers}

    try:
        prepared = D.from_main(ranks, prepare)
    except D.MainFailed:
        raise QuietExit("", EXIT_FAILURE) from None
    if not ranks.is_main:  # what rank 0 resolved, so that every rank runs the same settings
        for key in ("init_from", "init_from_given", "workers"):
            if prepared[key] is not None:
                setattr(args, key, prepared[key])
    out = made.get("out") or OutDir(args, ranks)
    data = prepared["data"]
    _set_threads(args)
    try:
        with _sigterm_as_interrupt():
            rc = args.run(args, out, data)
    except BaseException as e:  # noqa: BLE001 - each kind is re-raised as the one line it ends with
        if not ranks.enabled:
            _raise_failure(e, out)
        _raise_rank_failure(e, out, ranks)
    out.succeeded()
    return rc


def _raise_failure(e: BaseException, out: OutDir):
    """How a one-process run ends on ``e``: one line, with what was kept of --out."""
    from .data import UnreadableImage

    if isinstance(e, KeyboardInterrupt):
        raise CLIError(out.interrupted(), EXIT_INTERRUPTED) from None
    if isinstance(e, UnreadableImage):
        raise CLIError(f"{_one_line(e)}; remove or replace that file{out.failed()}") from None
    if isinstance(e, CLIError):
        raise CLIError(str(e) + out.failed(), e.code) from None
    kept = out.failed()
    if kept:
        _note(kept.strip(" ()"))
    raise e


def _collective_cause(e: BaseException) -> str:
    """The first sentence of a failed collective's message, without the backend's source location."""
    import re

    text = re.sub(r"^\[[^\]]*\]\s*", "", _one_line(e))
    return text.split(". ")[0].rstrip(".")


def _raise_rank_failure(e: BaseException, out: OutDir, ranks):
    """How a rank of a torchrun run ends on ``e``. The rank where it happened prints one line naming itself
    (``fastvlm: error: rank R of N: ...``) and exits 1; torchrun then stops the others. A rank whose
    collective lost the failed one (its connection closed, or no answer within FASTVLM_DIST_TIMEOUT), or that
    torchrun stopped, prints no error: rank 0 says where the run stands (the resumable state, the command that
    resumes it), the others nothing. FASTVLM_TRACEBACK=1 shows the traceback of an unexpected error."""
    from . import dist as D
    from .data import UnreadableImage

    where = f"rank {ranks.rank} of {ranks.world_size}"
    if isinstance(e, D.MainFailed):  # rank 0 failed reading what it sends, and reports it
        raise QuietExit("", EXIT_FAILURE) from None
    if isinstance(e, KeyboardInterrupt):
        if not ranks.is_main:
            raise QuietExit("", EXIT_INTERRUPTED) from None
        raise CLIError(out.interrupted(), EXIT_INTERRUPTED) from None
    if D.is_collective_failure(e):
        if not ranks.is_main:
            time.sleep(FOLLOWER_EXIT_DELAY_S)
            raise QuietExit("", EXIT_FAILURE) from None
        raise StoppedByAnotherRank(f"{where} stopped: another rank failed or stopped answering "
                                   f"({_collective_cause(e)}){out.failed()}") from None
    if isinstance(e, (SystemExit, GeneratorExit)) or os.environ.get("FASTVLM_TRACEBACK", "") not in ("", "0"):
        raise e
    if isinstance(e, UnreadableImage):
        raise CLIError(f"{where}: {_one_line(e)}; remove or replace that file{out.failed()}") from None
    if isinstance(e, CLIError):
        raise CLIError(f"{where}: {e}{out.failed()}", e.code) from None
    raise CLIError(f"{where}: {type(e).__name__}: {_one_line(e)}{out.failed()}") from None


# -- pack and eval ------------------------------------------------------------------------------------------

def cmd_pack(args) -> int:
    from .tuners.pack import read_pack

    folder = _pack_folder(args.pack, "pack")
    tensors, meta = read_pack(folder)
    saved = meta.get("tuners", {}).get(meta.get("method"), {}).get("config") or {}
    config = ", ".join(f"{k}={v}" for k, v in sorted(saved.items()))
    print(f"pack: {folder}")
    print(f"method: {meta.get('method')} ({config})")
    print(f"backbone: {meta.get('backbone')} (pretrained {meta.get('pretrained')!r})")
    if meta.get("classes") is not None:
        print(f"trained on: {meta['classes']} classes" + (f", starting from {meta['init_from']}"
                                                        if meta.get("init_from") else ""))
    print(f"{len(tensors)} tensors, {sum(t.numel() for t in tensors.values())} parameters")
    return 0


def _taskres_checkpoint(path: str) -> str:
    if os.path.isfile(path) and os.path.basename(path) in ("pack.json", "modules.safetensors"):
        path = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "modules.safetensors")):
            raise UsageError(f"--checkpoint {path!r} is a PVP pack folder: eval reads a TaskRes checkpoint "
                             "(taskres.safetensors from `fastvlm tune taskres`); the accuracy of a pack's run is in "
                             "its metrics.json, and `fastvlm pack` shows what a pack holds")
        inside = os.path.join(path, "taskres.safetensors")
        if os.path.isfile(inside):
            return inside
        raise UsageError(f"--checkpoint {path!r} is a folder without taskres.safetensors: give the file written by "
                         "`fastvlm tune taskres`")
    if not os.path.exists(path):
        raise UsageError(f"--checkpoint {path!r} does not exist")
    return path


def cmd_eval(args) -> int:
    from .io import load_checkpoint
    from .models import hf_folder
    from .train.taskres import evaluate_head
    from .tuners.taskres import TaskResHead, build_base_classifier, taskres_config_of

    path = _taskres_checkpoint(args.checkpoint)
    try:
        _, cfg = load_checkpoint(path)
    except ValueError as e:
        raise UsageError(f"--checkpoint: {e}") from None
    if "taskres" not in cfg.get("tuners", {}):
        held = ", ".join(sorted(cfg.get("tuners", {}))) or cfg.get("kind")
        raise UsageError(f"--checkpoint {path!r} holds {held!r}, no TaskRes head: eval reads TaskRes checkpoints "
                         "(taskres.safetensors); the other methods' accuracy is in their run's metrics.json")
    for opt, key in (("shots", "shots"), ("seed", "seed")):
        given, saved = getattr(args, opt), cfg.get(key)
        if given is not None and saved is not None and given != saved:
            raise UsageError(f"--{opt} {given} differs from the checkpoint's {saved}: the test images of a flat folder "
                             f"are those not drawn for training, so eval uses the checkpoint's; drop --{opt}")
        setattr(args, opt, given if given is not None else saved if saved is not None else {"shots": 16, "seed": 1}[opt])
    args.model = args.model or cfg["model"]
    if args.pretrained is None and hf_folder(args.model) is None:  # an hf: folder holds its weights
        args.pretrained = cfg["pretrained"]
    saved_templates = cfg.get("templates")
    if args.dataset is not None and args.dataset != saved_templates:
        raise UsageError(f"--dataset {args.dataset} differs from the checkpoint's templates ({saved_templates!r}): the "
                         "residual was trained on that classifier; drop --dataset")
    args.dataset = saved_templates if isinstance(saved_templates, str) else None
    _check_common(args)
    _, test, names, what = _resolve_data(args, args.shots, args.seed)
    if names != cfg["classnames"]:
        raise CLIError(f"--data: its classes differ from the checkpoint's ({len(names)} classes here, "
                       f"{len(cfg['classnames'])} in the checkpoint; first difference: "
                       f"{next(((a, b) for a, b in zip(names, cfg['classnames']) if a != b), None)})")
    _ensure_weights(args)
    _set_threads(args)
    model, _, pre_eval, tok = _load_model(args)  # the seed first: a random-init model is the one tune trained on
    base = build_base_classifier(model, tok, names, cfg.get("templates"), device=args.device)
    head = TaskResHead(base, taskres_config_of(cfg)).to(args.device)
    head.load_residual(path)
    f, y = _cached_features(model, test, pre_eval, os.path.join(os.path.dirname(os.path.abspath(path)),
                                                                "features_eval.safetensors"), args,
                            "evaluating")
    acc = evaluate_head(head, f.to(args.device), y.to(args.device))
    print(f"top-1 {acc:.2f}% on {what}")
    return 0


# -- parser -------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .train.orth import train_orth
    from .train.pvp import train_modules

    p = _Parser(prog="fastvlm", description="Few-shot tuning of CLIP models (TaskRes, RMT masks, OrthCR rotations, "
                "PVP modules) on fastvlm's fused ops, and their benchmarks.",
                epilog="docs/cli.md describes every subcommand, the output folders and the exit statuses.")
    p.add_argument("--version", action="version", version=f"fastvlm {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    tune = sub.add_parser("tune", help="few-shot fine-tuning of a CLIP model")
    tsub = tune.add_subparsers(dest="method", required=True)
    t = tsub.add_parser("taskres", help="TaskRes: a residual on the text classifier, trained on cached features")
    _add_model_data(t)
    _add_training(t, lr=2e-3, epochs=None, resume=True)
    t.add_argument("--alpha", type=float, default=0.5, help="residual scale (default 0.5)")
    t.set_defaults(func=cmd_tune, run=run_taskres)

    t = tsub.add_parser("mask", help="RMT: binary masks over the image encoder's weights, gradient dropout")
    _add_model_data(t)
    _add_training(t, lr=8e-5, epochs=30, resume=True)
    t.add_argument("--drop-ratio", type=_fraction, default=1.0,
                   help="lambda of gradient dropout, in [0, 1] (default 1; 0 turns it off)")
    t.add_argument("--mlp", action="store_true", help="mask the MLP layers too")
    t.set_defaults(func=cmd_tune, run=run_mask)

    t = tsub.add_parser("orth", help="OrthCR: Cayley rotations of the MLP weights of both encoders")
    _add_model_data(t)
    _add_training(t, lr=1e-3, epochs=10, resume=_loop_resumes(train_orth))
    t.add_argument("--block-size", type=_positive, default=32, help="rotation block size (default 32)")
    t.add_argument("--attention", action="store_true", help="rotate the attention projections too")
    t.add_argument("--neumann-terms", type=_positive, default=None, help="use the truncated series instead of exact")
    t.add_argument("--base-to-new", action="store_true", help="train on the base half of the classes, report both")
    t.add_argument("--recompute", action="store_true",
                   help="recompute each block's activations in backward: less memory, one more forward per step")
    t.set_defaults(func=cmd_tune, run=run_orth)

    options = {
        "vpt": (("--tokens", dict(type=_positive, default=10, help="prompt tokens (default 10)")),
                ("--shallow", dict(action="store_true", help="prompts in the first block only"))),
        "lora": (("--rank", dict(type=_positive, default=8, help="rank (default 8)")),
                 ("--lora-alpha", dict(type=float, default=16.0, help="alpha (default 16)"))),
        "adapter": (("--bottleneck", dict(type=_positive, default=64, help="bottleneck width (default 64)")),
                    ("--recompute", dict(action="store_true", help="recompute each block's activations in "
                                         "backward: less memory, one more forward per step"))),
    }
    for method, text in (("vpt", "VPT: learnable prompt tokens in the image encoder"),
                         ("lora", "LoRA on the image encoder's attention projections"),
                         ("adapter", "bottleneck adapters after each block's attention and MLP")):
        t = tsub.add_parser(method, help=text + " (PVP: --init-from a pack trained upstream)")
        _add_model_data(t)
        _add_training(t, lr=1e-3, epochs=10, resume=_loop_resumes(train_modules))
        t.add_argument("--init-from", default=None,
                       help="a pack folder from an upstream run (OUT/pack): start from its modules (stage 2); "
                            "the method's options then come from the pack")
        t.add_argument("--head", choices=["zeroshot", "linear"], default="zeroshot",
                       help="classification head: the zero-shot text classifier (default), or a linear head")
        for flag, kw in options[method]:
            t.add_argument(flag, **kw)
        t.set_defaults(func=cmd_tune, run=run_pvp, method=method, tokens=10, shallow=False, rank=8,
                       lora_alpha=16.0, bottleneck=64)

    pk = sub.add_parser("pack", help="show what a PVP module pack holds")
    pk.add_argument("pack", help="a pack folder (OUT/pack of a vpt, lora or adapter run)")
    pk.set_defaults(func=cmd_pack)

    e = sub.add_parser("eval", help="top-1 accuracy of a TaskRes checkpoint on the test split")
    _add_model_data(e, for_eval=True)
    e.add_argument("--checkpoint", required=True, help="taskres.safetensors (or the folder of a `tune taskres` run)")
    e.set_defaults(func=cmd_eval)
    from . import aot, bench, selfcheck

    b = sub.add_parser("bench", help="benchmark every op and tuner step against its baselines")
    bench.add_arguments(b)
    b.set_defaults(func=bench.main)
    aot.add_parser(sub)
    selfcheck.add_parser(sub)
    for parser in (sub, tsub):  # a missing command is named by its choices, not by the parser's dest
        parser.metavar = "{" + ",".join(parser.choices) + "}"
    return p


def _one_line(e: BaseException) -> str:
    msg = str(e) or type(e).__name__
    if "Original Traceback" in msg:  # re-raised from a DataLoader worker: the cause is the last line
        last = [ln for ln in msg.strip().splitlines() if ln.strip()][-1]
        msg = last.split(": ", 1)[1] if ": " in last else last
    return msg.replace("\n", " ").strip()


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0, 1 failure, 2 usage, 130 interrupted)."""
    from .data import UnreadableImage

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("FASTVLM_TRACEBACK", "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        return args.func(args)
    except CLIError as e:
        if debug and not isinstance(e, QuietExit):
            raise
        if isinstance(e, QuietExit):
            pass
        elif e.code == EXIT_INTERRUPTED or isinstance(e, StoppedByAnotherRank):
            print(f"fastvlm: {_one_line(e)}", file=sys.stderr, flush=True)
            if isinstance(e, StoppedByAnotherRank):
                time.sleep(FOLLOWER_EXIT_DELAY_S)
        else:
            print(f"fastvlm: error: {_one_line(e)}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        if debug:
            raise
        print("fastvlm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UnreadableImage as e:
        if debug:
            raise
        print(f"fastvlm: error: {_one_line(e)}; remove or replace that file", file=sys.stderr)
        return EXIT_FAILURE
    except (ValueError, OSError) as e:
        if debug:
            raise
        # a library check that the command line did not catch first: a bad value (2) or a file/system error (1)
        print(f"fastvlm: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, ValueError) else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
