"""The ``kdistill`` command: train, distill, eval, export, recipes, demo.

Every training command takes a YAML recipe (a path or a name under ``recipes/``) plus
``key=value`` overrides; ``--print-config`` shows the resolved config. Configuration mistakes
exit with code 2 and a message naming the key and the allowed values, before any training.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

import yaml

from kdistill.checkpoint import CheckpointError
from kdistill.utils import ConfigError

EXIT_CONFIG = 2  # bad configuration or input files; nothing was trained or written
EXIT_NONFINITE = 3  # a loss became NaN/Inf; the last good checkpoint is kept
EXIT_WRITE = 4  # a file could not be written (full disk, permissions); the previous file is kept
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C); SIGTERM exits 143 (128 + the signal number)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="recipe file or name under recipes/ (optional)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.05 data.batch_size=64")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", action="store_true", help="continue from <output>/checkpoints/last.ckpt")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a folder that holds one: the old folder is moved aside, never deleted")
    p.epilog = "Every configuration key with its type, default and meaning: kdistill config"


def _split_recipe(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:
        overrides.insert(0, recipe)
        recipe = None
    return recipe, overrides


def method_needs_teacher(name: str) -> bool:
    """Whether method ``name`` distils from a teacher (the online methods and ``ce`` do not)."""
    from kdistill.methods import method_class

    return method_class(name).needs_teacher


def _resolve(args: argparse.Namespace, command: str):
    from kdistill.config import build_config

    recipe, overrides = _split_recipe(args)
    base = {"output": f"runs/{command}"}
    if command == "train":
        cfg = build_config(recipe, overrides, base=base)
        from kdistill.methods import list_methods, method_class

        if method_needs_teacher(cfg.method.name):
            free = [m for m in list_methods() if not method_class(m).needs_teacher]
            raise ConfigError(f"kdistill train trains without teachers (methods {', '.join(free)}); use kdistill "
                              f"distill for method {cfg.method.name!r}")
        cfg.teachers = []
        return cfg
    cfg = build_config(recipe, overrides, base=base)
    if command == "distill" and not cfg.teachers and method_needs_teacher(cfg.method.name):
        raise ConfigError("kdistill distill needs at least one teacher: set teachers (or teacher.model=... "
                          "teacher.checkpoint=...)")
    return cfg


def _print_result(result) -> None:
    print(f"top-1 (last epoch): {result.top1_last:.2f}%   best: {result.top1_best:.2f}%   "
          f"top-5: {result.top5_last:.2f}%   train images/s: {result.images_per_s:.0f}   "
          f"time: {result.seconds:.0f}s")
    print(f"student exported to {result.export}")


def cmd_fit(args: argparse.Namespace, command: str) -> int:
    cfg = _resolve(args, command)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    import lightning as L

    from kdistill.engine.build import build_run
    from kdistill.engine.run import fit

    L.seed_everything(cfg.seed, verbose=False)  # model initialisation is part of the run: same on every rank
    built = build_run(cfg)  # every name, file and shape is checked before training starts
    _print_result(fit(cfg, resume=args.resume, built=built, overwrite=getattr(args, "overwrite", False)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kdistill.config import build_config
    from kdistill.engine.run import evaluate

    cfg = build_config(args.recipe, args.overrides) if (args.recipe or args.overrides) else None
    metrics = evaluate(args.checkpoint, cfg)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kdistill.engine.run import export

    for path in export(args.checkpoint, args.out, onnx=args.onnx, onnx_preprocess=args.onnx_preprocess):
        print(f"wrote {path}")
    return 0


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    """Precompute the teachers' logits for K augmented views of every training image (docs/speed.md)."""
    cfg = _resolve(args, "distill")
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    if not cfg.teachers:
        raise ConfigError("kdistill cache-teacher needs a teacher: set teachers (or teacher.model=... teacher.checkpoint=...)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("kdistill cache-teacher runs in one process (it labels every training sample, and every "
                          "rank of a DDP run then reads the same cache); run it without torchrun")
    import lightning as L
    import torch

    from kdistill.engine.build import build_run
    from kdistill.engine.teacher_cache import build_teacher_cache

    cfg.teacher.cache = None  # building a cache never reads one
    L.seed_everything(cfg.seed, verbose=False)  # as kdistill distill does: an untrained teacher initialises alike
    built = build_run(cfg)
    if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda"):
        built.distiller.cuda()
    if getattr(built.data.train, "image_transform", getattr(built.data.train, "transform", None)) is not None:
        # images cut per sample (data.transform=imagenet): K stored random resized crops, top-k labels
        from kdistill.engine.crop_cache import build_crop_cache

        cache = build_crop_cache(built.distiller, built.data.train, built.augment, args.out, views=args.views,
                                 topk=args.topk, storage="fp32" if args.storage == "fp32" else "fp16",
                                 batch_size=args.batch_size, seed=cfg.seed)
    else:
        cache = build_teacher_cache(built.distiller, built.data.train, built.augment, args.out, views=args.views,
                                    storage=args.storage, topk=args.topk, batch_size=args.batch_size, seed=cfg.seed)
    m = cache.manifest
    kind = f"top-{m['topk']} of crops" if "transform" in m else m["storage"]
    print(f"cached {len(cache.params)} images x {m['views']} views x {cache.num_teachers} teacher(s) "
          f"({kind}) in {m['build_seconds']:.0f}s -> {args.out}")
    print(f"use it with: kdistill distill <same recipe and overrides> teacher.cache={args.out}")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    """Pack an image folder into LitData shards (local folder or object-storage URL)."""
    import time

    from kdistill.data.shards import pack_folder

    start = time.perf_counter()
    meta = pack_folder(args.folder, args.out, chunk_mb=args.chunk_mb, workers=args.workers)
    for split, info in meta["splits"].items():
        print(f"{split}: {info['count']} images, {info['bytes'] / 2**20:.1f} MiB -> {args.out}/{split}")
    print(f"{len(meta['classes'])} classes, packed in {time.perf_counter() - start:.0f}s; train with: "
          f"data.name=shards data.root={args.out}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from kdistill.recipes import list_recipes, load_recipe

    rows = []
    for name, path in list_recipes():  # bases (recipes/_base/) are not runnable on their own: not listed
        try:
            desc = str(load_recipe(path).get("description", ""))
        except ConfigError as exc:
            desc = f"(unreadable: {exc})"
        rows.append((name, desc))
    if args.filter:
        rows = [r for r in rows if args.filter in r[0]]
    width = max((len(r[0]) for r in rows), default=10)
    for name, desc in rows:
        print(f"{name:<{width}}  {desc}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Every configuration key with its type, default and meaning (docs/config.md is the --markdown form)."""
    from kdistill.config.reference import render_markdown, render_text

    print(render_markdown() if args.markdown else render_text(), end="\n" if not args.markdown else "")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """A table of finished runs and a PNG of their accuracy and loss curves."""
    from kdistill.compare import format_table, plot_runs, run_summary

    rows = [run_summary(run) for run in args.runs]
    print(format_table(rows))
    print(f"curves: {plot_runs(rows, args.plot)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """The top classes of each image, preprocessed as the export's card says."""
    from kdistill.predict import predict

    for path, top in zip(args.images, predict(args.export, args.images, args.top), strict=True):
        print(f"{path}  " + "  ".join(f"{name} {p:.3f}" for name, p in top))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kdistill.demo import run_demo

    run_demo(data_root=args.data, output=args.output, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdistill", description="Knowledge distillation for PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a teacher or a plain student (cross-entropy)")
    _add_recipe_args(p)
    p = sub.add_parser("distill", help="distill a student from teacher checkpoints with a named method")
    _add_recipe_args(p)
    p = sub.add_parser("eval", help="evaluate a run folder, an export or a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("recipe", nargs="?", help="recipe for the data (default: the run's own)")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("export", help="export the student to safetensors (+ card) and optionally ONNX")
    p.add_argument("checkpoint", help="run folder, student .safetensors or .ckpt")
    p.add_argument("--out", required=True, help="output path, e.g. student.safetensors")
    p.add_argument("--onnx", action="store_true", help="also write <out>.onnx (normalised float input at the card's size)")
    p.add_argument("--onnx-preprocess", action="store_true",
                   help="also write <out>.onnx taking uint8 RGB images of any size (resize and normalisation inside)")
    p = sub.add_parser("cache-teacher", help="precompute teacher logits for K augmented views of every training image")
    _add_recipe_args(p)
    p.add_argument("--views", type=int, default=8, help="augmented views per image (default 8)")
    p.add_argument("--out", required=True, help="cache folder (then distill with teacher.cache=DIR)")
    p.add_argument("--storage", default="fp16", choices=["fp16", "fp32", "topk"], help="logit storage (default fp16)")
    p.add_argument("--topk", type=int, default=10, help="classes kept per view with --storage topk")
    p.add_argument("--batch-size", type=int, default=256, help="teacher batch size while building")
    p = sub.add_parser("pack", help="pack an image folder (train/ and val/ or test/) into LitData shards")
    p.add_argument("folder", help="image folder with train/<class>/<image> and val/ or test/")
    p.add_argument("--out", required=True, help="a new local folder or an object-storage URL (s3://bucket/path)")
    p.add_argument("--chunk-mb", type=float, default=64, help="size of one shard in MiB (default 64)")
    p.add_argument("--workers", type=int, default=1, help="processes reading files while packing (default 1)")
    p = sub.add_parser("recipes", help="list the YAML recipes with their descriptions")
    p.add_argument("filter", nargs="?", help="only names containing this text")
    p = sub.add_parser("compare", help="a table and accuracy/loss curves of finished run folders")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--plot", default="compare.png", help="PNG of the curves (default compare.png)")
    p = sub.add_parser("predict", help="classify image files with a student export")
    p.add_argument("export", help="student .safetensors (with its card), a run folder or a .ckpt")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top", type=int, default=1, help="classes shown per image (default 1)")
    p = sub.add_parser("config", help="every configuration key with its type, default and meaning")
    p.add_argument("--markdown", action="store_true", help="as docs/config.md")
    p = sub.add_parser("demo", help="teacher, plain student and KD student on synthetic (or your) data")
    p.add_argument("--data", help="an image folder with train/ and val/ (default: built-in synthetic data)")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")
    return parser


def quiet_lightning(verbose: bool) -> None:
    """Keep Lightning's banner lines and known-harmless warnings out of the user's way."""
    import warnings

    import lightning  # noqa: F401  (it sets its loggers' levels on import; override them after)

    level = logging.INFO if verbose else logging.WARNING
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        for pattern in (".*LeafSpec.*", ".*overridden `on_after_batch_transfer`.*", ".*smaller than the logging interval.*",
                        ".*litlogger.*", ".*module\\(s\\) in eval mode.*",
                        ".*Checkpoint directory .* exists and is not empty.*",
                        ".*`IterableDataset` has `__len__` defined.*"):  # LitData gives each worker its own share
            warnings.filterwarnings("ignore", message=pattern)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow the options (``--resume trainer.max_epochs=4``)
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    quiet_lightning(args.verbose)
    from kdistill.engine.run import RunAlreadyFinished
    from kdistill.engine.signals import RunInterrupted, resume_hint

    try:
        if args.command in ("train", "distill", "eval", "export"):
            from kdistill.detection import cli as detection_cli

            if detection_cli.handles(args):  # task=detection recipes and detection runs
                return detection_cli.run(args)
        if args.command in ("train", "distill"):
            return cmd_fit(args, args.command)
        commands = {"eval": cmd_eval, "export": cmd_export, "recipes": cmd_recipes, "demo": cmd_demo,
                    "cache-teacher": cmd_cache_teacher, "pack": cmd_pack, "config": cmd_config,
                    "compare": cmd_compare, "predict": cmd_predict}
        return commands[args.command](args)
    except (ConfigError, CheckpointError) as exc:
        print(f"kdistill {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except RunAlreadyFinished as exc:
        print(f"kdistill {args.command}: {exc}")
        return 0
    except RunInterrupted as exc:
        hint = f"; continue with: {resume_hint(argv)}" if exc.checkpoint else "; start it again"
        print(f"kdistill {args.command}: {exc}{hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"kdistill {args.command}: interrupted; continue with --resume from the last checkpoint",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        from kdistill.engine.module import NonFiniteLossError

        if isinstance(exc, NonFiniteLossError):
            print(f"kdistill {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_NONFINITE
        if isinstance(exc, OSError):
            where = f" ({exc.filename})" if exc.filename else ""
            print(f"kdistill {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
            return EXIT_WRITE
        raise


if __name__ == "__main__":
    sys.exit(main())
