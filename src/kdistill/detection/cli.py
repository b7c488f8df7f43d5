"""``kdistill train|distill|eval|export`` for detection (recipes with ``task: detection``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def _split(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    recipe, overrides = args.recipe, list(args.overrides or [])
    if recipe is not None and "=" in recipe:
        recipe, overrides = None, [recipe, *overrides]
    return recipe, overrides


def is_detection_run(path: str | Path) -> bool:
    """True for a detection run folder, export or checkpoint (its card says ``task: detection``)."""
    path = Path(path)
    for card in (path / "run.json", path.with_suffix(".json"), path.parent.parent / "run.json"):
        try:
            if card.is_file():
                content = json.loads(card.read_text())
                if isinstance(content, dict) and content.get("task") == "detection":
                    return True
        except (OSError, ValueError):
            continue
    return False


def handles(args: argparse.Namespace) -> bool:
    """True when the command line is about a detection recipe or a detection run."""
    if args.command in ("train", "distill"):
        from kdistill.detection.config import wants_detection

        return wants_detection(*_split(args))
    if args.command in ("eval", "export"):
        return is_detection_run(args.checkpoint)
    return False


def run(args: argparse.Namespace) -> int:
    """Run a detection command; configuration errors raise ``ConfigError`` (exit 2 in the CLI)."""
    from kdistill.detection.config import build_detection_config
    from kdistill.utils import ConfigError

    if args.command in ("train", "distill"):
        recipe, overrides = _split(args)
        cfg = build_detection_config(recipe, overrides, base={"output": f"runs/{args.command}"})
        if args.command == "train" and cfg.method.name != "ce":
            raise ConfigError(f"kdistill train trains without a teacher (method ce); use kdistill distill for "
                              f"method {cfg.method.name!r}")
        if args.command == "distill" and cfg.method.name == "ce":
            raise ConfigError("kdistill distill needs method.name=reviewkd and teacher.model=... teacher.checkpoint=...")
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        from kdistill.detection.engine import fit_detection

        result = fit_detection(cfg, resume=args.resume, overwrite=getattr(args, "overwrite", False))
        if result.export is None:  # not the global-zero process of a DDP run: it prints nothing
            return 0
        shown = "   ".join(f"{k} {100 * v:.2f}" for k, v in result.metrics.items() if k.endswith(("_AP", "_AP50")))
        print(f"{shown}   time: {result.seconds:.0f}s")
        print(f"student exported to {result.export}")
        return 0
    if args.command == "eval":
        from kdistill.detection.engine import evaluate_detection

        recipe, overrides = _split(args)
        # a recipe replaces the run's own; bare overrides change the run's own recipe
        cfg = build_detection_config(recipe, overrides) if recipe else None
        metrics = evaluate_detection(args.checkpoint, cfg, overrides)
        print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        return 0
    if args.command == "export":
        if getattr(args, "onnx", False):
            raise ConfigError("--onnx is not available for detectors; export writes safetensors + card")
        from kdistill.detection.engine import export_detection

        for path in export_detection(args.checkpoint, args.out):
            print(f"wrote {path}")
        return 0
    raise ConfigError(f"kdistill {args.command} does not support task=detection")
