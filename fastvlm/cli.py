"""Command line: ``fastvlm tune <method> ...``, ``fastvlm eval ...``, ``fastvlm bench``, ``fastvlm kernels``."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys


def _add_model_data(p: argparse.ArgumentParser, data_required=True) -> None:
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture (default ViT-B-16)")
    p.add_argument("--pretrained", default="openai",
                   help="open_clip pretrained tag, a local checkpoint file, or 'none' for random init")
    p.add_argument("--data", required=data_required,
                   help="image folder (root/<class>/<img>, or with train/ and test/), or a CoOp split json")
    p.add_argument("--split", default=None, help="CoOp split_zhou_<Dataset>.json; paths relative to --data")
    p.add_argument("--dataset", default=None, help="dataset name for prompt templates (e.g. ImageNet, OxfordPets)")
    p.add_argument("--shots", type=int, default=16, help="images per class (0: every training image)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")


def _add_training(p: argparse.ArgumentParser, lr: float, epochs: int | None, resume: bool = False) -> None:
    p.add_argument("--out", required=True, help="folder for the result, metrics.json and cached features")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--epochs", type=int, default=epochs,
                   help="default: 100 for <= 4 shots, 200 above" if epochs is None else None)
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt (saved every epoch)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _resolve_data(args):
    from .data import classnames, few_shot, load_splits, split_holdout

    splits = load_splits(args.data, args.split)
    if "all" in splits:
        if args.shots <= 0:
            raise ValueError("--shots 0 (every training image) needs a train/ and test/ split or a split file")
        train, test = split_holdout(splits["all"], args.shots, args.seed)
        names = classnames(splits["all"])
    else:
        train = splits["train"] if args.shots <= 0 else few_shot(splits["train"], args.shots, args.seed)
        test = splits["test"]
        names = classnames(splits["train"])
    return train, test, names


def _cached_features(model, samples, transform, path, args):
    """Image features of ``samples``, read from ``path`` when it was made from the same model and images."""
    import torch

    from .data import cache_features
    from .io import load_checkpoint, save_checkpoint

    key = hashlib.sha256(json.dumps([args.model, args.pretrained, [s[0] for s in samples]]).encode()).hexdigest()
    if os.path.exists(path):
        try:
            t, cfg = load_checkpoint(path, kind="features")
            if cfg.get("key") == key:
                return t["features"], t["labels"]
        except ValueError:
            pass  # unreadable cache: recompute it
    f, y = cache_features(model, samples, transform, batch_size=args.batch_size or 64, device=args.device,
                          progress=not args.no_progress)
    save_checkpoint(path, {"features": f, "labels": y}, {"kind": "features", "key": key})
    return f, y


def cmd_tune_taskres(args) -> int:
    from .models import freeze, load_clip
    from .train.common import seed_everything
    from .train.taskres import TaskResRecipe, evaluate_head, train_taskres
    from .tuners.taskres import TaskResConfig, TaskResHead, build_base_classifier

    seed_everything(args.seed)
    os.makedirs(args.out, exist_ok=True)
    model, _, pre_eval, tok = load_clip(args.model, args.pretrained, args.device)
    freeze(model)
    train, test, names = _resolve_data(args)
    templates = args.dataset
    base = build_base_classifier(model, tok, names, templates, device=args.device)
    f_tr, y_tr = _cached_features(model, train, pre_eval, os.path.join(args.out, "features_train.safetensors"), args)
    f_te, y_te = _cached_features(model, test, pre_eval, os.path.join(args.out, "features_test.safetensors"), args)
    head = TaskResHead(base.to(args.device), TaskResConfig(alpha=args.alpha)).to(args.device)
    zs = evaluate_head(head, f_te.to(args.device), y_te.to(args.device))
    recipe = TaskResRecipe(lr=args.lr, batch_size=args.batch_size or 256, epochs=args.epochs)
    hist = train_taskres(head, f_tr.to(args.device), y_tr.to(args.device), recipe, args.shots, args.seed,
                         progress=not args.no_progress, checkpoint=_state_path(args))
    acc = evaluate_head(head, f_te.to(args.device), y_te.to(args.device))
    ckpt = head.save(os.path.join(args.out, "taskres.safetensors"), model=args.model, pretrained=args.pretrained,
                     classnames=names, templates=templates, shots=args.shots, seed=args.seed)
    metrics = {"zero_shot_top1": zs, "top1": acc, "final_loss": hist[-1], "epochs": len(hist),
               "train_samples": len(train), "test_samples": len(test), "checkpoint": ckpt}
    with open(os.path.join(args.out, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)
    print(f"zero-shot top-1 {zs:.2f}%  ->  TaskRes top-1 {acc:.2f}%  ({len(hist)} epochs, {len(train)} shots total)")
    print(f"checkpoint: {ckpt}")
    return 0


def _zero_shot_setup(args):
    """Model, transforms, data and the normalised zero-shot text classifier shared by the image tuners."""
    import torch.nn.functional as F

    from .models import load_clip
    from .train.common import seed_everything
    from .tuners.taskres import build_base_classifier

    seed_everything(args.seed)
    os.makedirs(args.out, exist_ok=True)
    model, _, pre_eval, tok = load_clip(args.model, args.pretrained, args.device)
    train, test, names = _resolve_data(args)
    classifier = F.normalize(build_base_classifier(model, tok, names, args.dataset, device=args.device), dim=-1)
    return model, pre_eval, train, test, names, classifier


def _state_path(args) -> str:
    """OUT/train_state.pt, saved after every epoch; an earlier run's state is resumed with --resume and
    discarded without it."""
    path = os.path.join(args.out, "train_state.pt")
    if not getattr(args, "resume", False) and os.path.exists(path):
        os.unlink(path)
    return path


def _write_metrics(out, metrics) -> None:
    with open(os.path.join(out, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)


def cmd_tune_mask(args) -> int:
    from .train.common import evaluate_model, image_norm, train_loader
    from .train.common import train_transform
    from .train.rmt import RMTRecipe, train_rmt
    from .tuners.mask import MaskConfig, apply_masks, export_masks, sparsity

    model, pre_eval, train, test, names, cls = _zero_shot_setup(args)
    zs = evaluate_model(model, cls, test, pre_eval, device=args.device)
    apply_masks(model, MaskConfig(mlp=args.mlp))
    recipe = RMTRecipe(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size or 32, drop_ratio=args.drop_ratio,
                       seed=args.seed)
    size, mean, std = image_norm(model)
    loader = train_loader(train, train_transform(size, mean, std), recipe.batch_size, args.seed)
    hist = train_rmt(model, cls, loader, recipe, device=args.device, progress=not args.no_progress,
                     checkpoint=_state_path(args))
    acc = evaluate_model(model, cls, test, pre_eval, device=args.device)
    path = export_masks(model, os.path.join(args.out, "masks.safetensors"), model_name=args.model,
                        pretrained=args.pretrained, classnames=names)
    metrics = {"zero_shot_top1": zs, "top1": acc, "sparsity": sparsity(model), "history": hist, "masks": path}
    _write_metrics(args.out, metrics)
    print(f"zero-shot top-1 {zs:.2f}%  ->  RMT top-1 {acc:.2f}%  (sparsity {100 * metrics['sparsity']:.2f}%)")
    print(f"masks: {path}")
    return 0


def cmd_tune_orth(args) -> int:
    import torch

    from .models import load_clip
    from .templates import templates_for
    from .train.common import evaluate_model, image_norm, seed_everything, train_loader, train_transform
    from .train.orth import OrthRecipe, base_to_new, harmonic_mean, text_classifier, train_orth
    from .tuners.orth import OrthConfig, apply_orth, save_orth

    seed_everything(args.seed)
    os.makedirs(args.out, exist_ok=True)
    model, _, pre_eval, tok = load_clip(args.model, args.pretrained, args.device)
    train, test, names = _resolve_data(args)
    template = templates_for(args.dataset)[0]

    def tokens(class_names):
        return tok([template.format(c) for c in class_names]).to(args.device)

    splits = {"all": (test, names)}
    train_names = names
    if args.base_to_new:
        (train, train_names), _ = base_to_new(train, names)
        (b_test, b_names), (n_test, n_names) = base_to_new(test, names)
        splits = {"base": (b_test, b_names), "new": (n_test, n_names)}
    apply_orth(model, OrthConfig(block_size=args.block_size, attention=args.attention,
                                 neumann_terms=args.neumann_terms))
    recipe = OrthRecipe(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size or 32)
    size, mean, std = image_norm(model)
    loader = train_loader(train, train_transform(size, mean, std), recipe.batch_size, args.seed)
    hist = train_orth(model, tokens(train_names), loader, recipe, args.device, args.seed, progress=not args.no_progress)
    acc = {}
    with torch.no_grad():
        for k, (samples, cn) in splits.items():
            acc[k] = evaluate_model(model, text_classifier(model, tokens(cn)), samples, pre_eval, device=args.device)
    if args.base_to_new:
        acc["hm"] = harmonic_mean(acc["base"], acc["new"])
    path = save_orth(model, os.path.join(args.out, "orth.safetensors"), model_name=args.model,
                     pretrained=args.pretrained, classnames=names)
    _write_metrics(args.out, {"top1": acc, "history": hist, "rotations": path})
    print("OrthCR top-1: " + ", ".join(f"{k} {v:.2f}%" for k, v in acc.items()))
    print(f"rotations: {path}")
    return 0


def cmd_tune_pvp(args) -> int:
    """vpt / lora / adapter: stage 1 (upstream, --save-pack implied) or stage 2 (--init-from PACK)."""
    import torch

    from .train.common import image_norm, train_loader, train_transform
    from .train.pvp import PVPRecipe, ZeroShotHead, evaluate_head_on_images, train_modules
    from .tuners.adapter import AdapterConfig
    from .tuners.lora import LoRAConfig
    from .tuners.pack import apply_method, config_of_pack, load_pack, method_parameters, save_pack
    from .tuners.vpt import VPTConfig

    model, pre_eval, train, test, names, cls = _zero_shot_setup(args)
    if args.init_from:
        method, cfg = config_of_pack(args.init_from)
        if method != args.method:
            raise ValueError(f"--init-from holds a {method!r} pack, not {args.method!r}")
    else:
        cfg = {"vpt": lambda: VPTConfig(tokens=args.tokens, deep=not args.shallow, seed=args.seed),
               "lora": lambda: LoRAConfig(rank=args.rank, alpha=args.lora_alpha, seed=args.seed),
               "adapter": lambda: AdapterConfig(bottleneck=args.bottleneck, seed=args.seed)}[args.method]()
    apply_method(model, args.method, cfg)
    if args.init_from:
        load_pack(model, args.init_from, backbone=args.model)
    if args.head == "zeroshot":
        head = ZeroShotHead(cls)
    else:
        head = torch.nn.Linear(cls.shape[1], len(names)).to(args.device)
    recipe = PVPRecipe(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size or 32)
    size, mean, std = image_norm(model)
    loader = train_loader(train, train_transform(size, mean, std), recipe.batch_size, args.seed)
    params = method_parameters(model, args.method)
    hist = train_modules(model, params, head, loader, recipe, args.device, progress=not args.no_progress)
    acc = evaluate_head_on_images(model, head, test, pre_eval, device=args.device)
    pack = save_pack(os.path.join(args.out, "pack"), model, args.method, args.model, pretrained=args.pretrained,
                     classes=len(names), init_from=args.init_from)
    _write_metrics(args.out, {"top1": acc, "history": hist, "pack": pack, "init_from": args.init_from,
                              "trainable_parameters": sum(p.numel() for p in params)})
    print(f"{args.method} top-1 {acc:.2f}% ({'from ' + args.init_from if args.init_from else 'from scratch'})")
    print(f"pack: {pack}")
    return 0


def cmd_pack(args) -> int:
    from .tuners.pack import read_pack

    tensors, meta = read_pack(args.pack)
    print(json.dumps({k: v for k, v in meta.items() if k != "shapes"}, indent=2, sort_keys=True))
    print(f"{len(tensors)} tensors, {sum(t.numel() for t in tensors.values())} parameters")
    return 0


def cmd_eval(args) -> int:
    from .io import load_checkpoint
    from .models import load_clip
    from .train.taskres import evaluate_head
    from .tuners.taskres import TaskResHead, build_base_classifier, taskres_config_of

    _, cfg = load_checkpoint(args.checkpoint)
    if "taskres" not in cfg.get("tuners", {}):
        raise SystemExit(f"fastvlm eval: {args.checkpoint} holds no taskres head; eval reads taskres")
    model_name = args.model or cfg["model"]
    pretrained = args.pretrained or cfg["pretrained"]
    model, _, pre_eval, tok = load_clip(model_name, pretrained, args.device)
    args.model, args.pretrained = model_name, pretrained
    _, test, names = _resolve_data(args)
    if names != cfg["classnames"]:
        raise SystemExit("fastvlm eval: the data's class names differ from the checkpoint's")
    base = build_base_classifier(model, tok, names, cfg.get("templates"), device=args.device)
    head = TaskResHead(base, taskres_config_of(cfg)).to(args.device)
    head.load_residual(args.checkpoint)
    f, y = _cached_features(model, test, pre_eval, os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                                                "features_eval.safetensors"), args)
    acc = evaluate_head(head, f.to(args.device), y.to(args.device))
    print(f"top-1 {acc:.2f}% on {len(test)} images")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvlm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    tune = sub.add_parser("tune", help="few-shot fine-tuning of a CLIP model")
    tsub = tune.add_subparsers(dest="method", required=True)
    t = tsub.add_parser("taskres", help="TaskRes: a residual on the text classifier, trained on cached features")
    _add_model_data(t)
    _add_training(t, lr=2e-3, epochs=None, resume=True)
    t.add_argument("--alpha", type=float, default=0.5)
    t.set_defaults(func=cmd_tune_taskres)

    t = tsub.add_parser("mask", help="RMT: binary masks over the image encoder's weights, gradient dropout")
    _add_model_data(t)
    _add_training(t, lr=8e-5, epochs=30, resume=True)
    t.add_argument("--drop-ratio", type=float, default=1.0, help="lambda of gradient dropout (0 turns it off)")
    t.add_argument("--mlp", action="store_true", help="mask the MLP layers too")
    t.set_defaults(func=cmd_tune_mask)

    t = tsub.add_parser("orth", help="OrthCR: Cayley rotations of the MLP weights of both encoders")
    _add_model_data(t)
    _add_training(t, lr=1e-3, epochs=10)
    t.add_argument("--block-size", type=int, default=32)
    t.add_argument("--attention", action="store_true", help="rotate the attention projections too")
    t.add_argument("--neumann-terms", type=int, default=None, help="use the truncated series instead of exact")
    t.add_argument("--base-to-new", action="store_true", help="train on the base half of the classes, report both")
    t.set_defaults(func=cmd_tune_orth)

    for method, text in (("vpt", "VPT: learnable prompt tokens in the image encoder"),
                         ("lora", "LoRA on the image encoder's attention projections"),
                         ("adapter", "bottleneck adapters after each block's attention and MLP")):
        t = tsub.add_parser(method, help=text + " (PVP: --init-from a pack trained upstream)")
        _add_model_data(t)
        _add_training(t, lr=1e-3, epochs=10)
        t.add_argument("--init-from", default=None, help="a pack folder from an upstream run (stage 2)")
        t.add_argument("--head", choices=["zeroshot", "linear"], default="zeroshot",
                       help="classification head: the zero-shot text classifier, or a linear head")
        t.add_argument("--tokens", type=int, default=10, help="vpt: prompt tokens")
        t.add_argument("--shallow", action="store_true", help="vpt: first block only")
        t.add_argument("--rank", type=int, default=8, help="lora: rank")
        t.add_argument("--lora-alpha", type=float, default=16.0, help="lora: alpha")
        t.add_argument("--bottleneck", type=int, default=64, help="adapter: bottleneck width")
        t.set_defaults(func=cmd_tune_pvp, method=method)

    pk = sub.add_parser("pack", help="show what a PVP module pack holds")
    pk.add_argument("pack")
    pk.set_defaults(func=cmd_pack)

    e = sub.add_parser("eval", help="top-1 accuracy of a TaskRes checkpoint on the test split")
    _add_model_data(e)
    e.set_defaults(model=None, pretrained=None)
    e.add_argument("--checkpoint", required=True)
    e.set_defaults(func=cmd_eval)
    from . import aot, bench, selfcheck

    b = sub.add_parser("bench", help="benchmark every op and tuner step against its baselines")
    bench.add_arguments(b)
    b.set_defaults(func=bench.main)
    aot.add_parser(sub)
    selfcheck.add_parser(sub)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastvlm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
