"""Small helpers shared by the CLI commands: result tables, JSON output, the model-loading options and quieting
a library logger."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
from typing import Any, Callable, Iterable, Iterator


@contextlib.contextmanager
def quiet_logger(name: str, quiet: bool = True) -> Iterator[None]:
    """Within the block, the library logger ``name`` reports only warnings and errors when ``quiet``
    (``--quiet``, or ``--json`` whose stdout must be the JSON alone); its level is restored after."""
    logger = logging.getLogger(name)
    level = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def add_overwrite_argument(p: argparse.ArgumentParser, flag: str = "--out") -> None:
    """``--overwrite`` for a command that writes a model directory to ``flag`` (:func:`check_output_dir`)."""
    p.add_argument("--overwrite", action="store_true",
                   help=f"write into a {flag} directory that is not empty (files of the same name are replaced, "
                        "others are left as they are)")


def check_output_dir(path: str | None, overwrite: bool, flag: str = "--out") -> None:
    """Refuse ``path`` as the directory a command writes a model into when it is a file, or a directory that
    holds files and ``overwrite`` is off (a photo folder, another model's directory: writing would mix files in or
    replace config and weights of the same name). Called before the model loads, so nothing is lost or wasted."""
    from pathlib import Path

    from ..errors import ConfigError

    if path is None:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{flag} {target} is a file, not a directory: choose another path")
    present = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if present and not overwrite:
        shown = ", ".join(present[:3]) + (f" and {len(present) - 3} more" if len(present) > 3 else "")
        raise ConfigError(f"{flag} {target} is not empty ({shown}); writing there would replace files of the same "
                          "name. Give a new or empty directory, or add --overwrite to write into it anyway")


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``clipforge.load`` that every command reading a model offers."""
    g = p.add_argument_group("loading the model (clipforge.load)")
    g.add_argument("--model-name", metavar="NAME",
                   help="OpenCLIP model name of an OpenCLIP/OpenAI-layout state dict without a config beside it, e.g. "
                        "ViT-B-32 or ViT-B-32-quickgelu: what its weights cannot show (activation, heads)")
    g.add_argument("--model-config", metavar="JSON", help="OpenCLIP model config JSON for such a state dict")
    g.add_argument("--openai", action="store_true", default=None,
                   help="read such a state dict as OpenAI's original CLIP (QuickGELU, 64-channel heads)")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling and TorchScript archives (OpenAI's .pt files); both run code from the "
                        "file, so only for files you trust")
    g.add_argument("--allow-nonfinite", action="store_true",
                   help="load weights that hold NaN or inf (refused by default) with a warning")


def add_shapes_training_arguments(p: argparse.ArgumentParser, steps: int, batch_size: int, lr: float,
                                  lr_help: str | None = None) -> None:
    """The training-loop options of the commands that train on ``shapes`` scenes with a frozen partner
    (``train-diffusion``, ``diffusion-feedback``): steps, batch size, learning rate, scenes, seed, ``--quiet``."""
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=batch_size, help="shapes scenes per step")
    p.add_argument("--lr", type=float, default=lr, help=lr_help or "AdamW learning rate")
    p.add_argument("--train-size", type=int, default=4096, help="shapes train scenes (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes, their order and new weights")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def step_logger(logger: logging.Logger, steps: int, quiet: bool, what: str = "loss") -> Callable[[int, float], None]:
    """A training loop's ``on_step(step, loss)`` that logs ``what`` ten times over ``steps`` steps (never when
    ``quiet``)."""
    every = max(1, steps // 10)

    def on_step(step: int, loss: float) -> None:
        if not quiet and (step + 1) % every == 0:
            logger.info("step %d/%d  %s %.4f", step + 1, steps, what, loss)

    return on_step


def load_options(args) -> dict[str, Any]:
    """Keyword arguments of ``clipforge.load`` from the options of :func:`add_load_arguments`."""
    return {"model_name": args.model_name, "model_config": args.model_config, "openai": args.openai,
            "trust_pickle": args.trust_pickle, "allow_nonfinite": args.allow_nonfinite}


def table(rows: Iterable[Iterable[Any]], header: Iterable[str]) -> str:
    """A plain-text table with aligned columns (markdown-compatible)."""
    rows = [[_fmt(c) for c in r] for r in rows]
    header = list(header)
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def eval_rows(results: dict) -> list[list[Any]]:
    """Rows (task, metric, value, chance) for a results dict from clipforge.evaluation."""
    rows = []
    for task, r in results.get("zero_shot", {}).items():
        rows.append(
            [
                f"zero-shot {task} ({r['num_classes']} classes)",
                "top-1",
                r["top1"],
                f"{r['chance_top1']:.3f} (majority {r['majority_top1']:.3f})"
                if "majority_top1" in r
                else r["chance_top1"],
            ]
        )
        rows.append(
            [
                f"zero-shot {task} ({r['num_classes']} classes)",
                "balanced accuracy",
                r["balanced_accuracy"],
                r["chance_top1"],
            ]
        )
    for name, r in results.get("retrieval", {}).items():
        rows.append([f"retrieval {name} image->text", "R@1", r["i2t_R@1"], r["i2t_R@1_chance"]])
        rows.append([f"retrieval {name} text->image", "R@1", r["t2i_R@1"], r["t2i_R@1_chance"]])
        rows.append([f"retrieval {name} image->text", "R@5", r["i2t_R@5"], None])
        rows.append([f"retrieval {name} text->image", "R@5", r["t2i_R@5"], None])
    return [[a, b, c, "" if d is None else d] for a, b, c, d in rows]


def dump_json(obj: Any) -> str:
    return json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o))
