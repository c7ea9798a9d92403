"""The ``clipforge`` command line: demo, train, eval, embed, data.

Each subcommand lives in its own module and is imported only when it runs, so ``--help``
answers instantly.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

COMMANDS = {
    "demo": (
        "clipforge.cli.demo",
        "train the tiny model on the built-in shapes data and show what it learned (~2.5 min)",
    ),
    "train": ("clipforge.cli.train", "train a model from a config file and key=value overrides"),
    "eval": ("clipforge.cli.evaluate", "evaluate a model with a suite (quick or full): JSON and an HTML report"),
    "embed": ("clipforge.cli.embed", "turn images or texts into embeddings (.npy or .parquet)"),
    "export": ("clipforge.cli.export", "write a model in another format: Hugging Face CLIPModel, ONNX, clipforge"),
    "pivot": (
        "clipforge.cli.pivot",
        "give an English CLIP a multilingual text side (uCLIP), trained on English text only",
    ),
    "data": ("clipforge.cli.data", "build image-caption corpora into shards (openclipart, emoji) and inspect them"),
    "adapt": (
        "clipforge.cli.adapt",
        "fit a few-shot adapter (Tip-Adapter(-F), CoOp, GDA, CLIPN) and report accuracy before/after",
    ),
    "index": ("clipforge.cli.index", "embed an image folder or a corpus split into a search index (incremental)"),
    "serve": ("clipforge.cli.serve", "a search web page and JSON API over an index, on 127.0.0.1"),
    "upcycle": ("clipforge.cli.upcycle", "turn a dense CLIP into a sparse top-k mixture of experts (CLIP-MoE)"),
    "link": (
        "clipforge.cli.link",
        "link records (image + text) that belong together: pooled CLIP embeddings (CLIPPINGS)",
    ),
    "lm-finetune": (
        "clipforge.cli.lm_finetune",
        "fine-tune a causal LM into a caption embedder (LLM2CLIP's first stage)",
    ),
    "lvlm-train": (
        "clipforge.cli.lvlm_train",
        "train the LLaVA-style LVLM (caption) and fine-tune it into an embedder (discriminative, unime)",
    ),
    "caption": (
        "clipforge.cli.caption",
        "caption images with a CoCa decoder (greedy/beam) or a MacCap decoder directory",
    ),
    "train-diffusion": (
        "clipforge.cli.train_diffusion",
        "train a small diffusion model on shapes conditioned on a frozen CLIP (for DIVA, un^2CLIP)",
    ),
    "diffusion-feedback": (
        "clipforge.cli.diffusion_feedback",
        "post-train a CLIP image tower through a frozen diffusion model (DIVA, un^2CLIP)",
    ),
}

EPILOG = """\
first steps:
  clipforge demo                       # train + evaluate a tiny CLIP on procedural shapes, no download
  clipforge train out_dir=runs/a steps=2000
  clipforge eval runs/a --suite full   # every evaluation task; writes results.json and report.html
  clipforge embed runs/a --texts "a red circle" "two blue squares" --out emb.npy
  clipforge index runs/a --images ~/Pictures --out idx && clipforge serve idx   # search page on :8000

Run 'clipforge COMMAND --help' for the options of one command.
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs kept as written (they hold examples), and every option's help ends with its default unless the
    help already names one; defaults that mean "not given" (None, False) are not shown."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not action.option_strings or unset or text == argparse.SUPPRESS or "default" in text.lower():
            return text
        return f"{text} (default %(default)s)" if text else "default %(default)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipforge",
        description="clipforge: contrastive language-image pre-training (CLIP) and the methods that improved it.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    from clipforge import __version__

    parser.add_argument("--version", action="version", version=f"clipforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=HelpFormatter
        )
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


class _ConsoleHandler(logging.Handler):
    """clipforge's log lines for a person at a terminal: INFO on stdout (beside the command's own output) unless
    stdout carries machine-readable output (``--json``), warnings and errors on stderr; the streams are looked up
    per line (they may be replaced, e.g. by tests)."""

    info_to_stderr = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            to_stderr = record.levelno >= logging.WARNING or self.info_to_stderr
            stream = sys.stderr if to_stderr else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001  (logging must never take the command down)
            self.handleError(record)


def configure_logging(json_output: bool = False) -> None:
    """Show clipforge's INFO lines and warnings (one handler per process, however often main() runs);
    with ``json_output`` the INFO lines go to stderr, so that stdout holds the JSON alone."""
    logger = logging.getLogger("clipforge")
    handler = next((h for h in logger.handlers if isinstance(h, _ConsoleHandler)), None)
    if handler is None:
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    handler.info_to_stderr = json_output
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def user_error(e: BaseException) -> str | None:
    """The one-line message of an error the user can fix (None for a bug, which keeps its traceback):
    every :class:`clipforge.errors.ClipforgeError`, a lock held by another process, a full disk, and the
    built-in errors that clipforge raises with a message for bad input."""
    from clipforge.errors import ClipforgeError, is_disk_full
    from clipforge.locking import LockHeld

    if isinstance(e, (ClipforgeError, LockHeld)):
        return str(e)
    if is_disk_full(e):
        where = f" while writing '{e.filename}'" if getattr(e, "filename", None) else ""
        return f"no space left on device{where}; free space on that disk (or write elsewhere) and run again"
    if isinstance(e, KeyError):
        return str(e.args[0]) if e.args else str(e)
    if isinstance(e, (ValueError, FileNotFoundError, ConnectionError)):
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `clipforge train steps=10 --no-eval resume=latest`: argparse ends the key=value positionals at the first
    # option and calls what follows it unrecognized; key=value words anywhere in a train command are overrides
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "train":
        args.overrides = [*args.overrides, *(e for e in extra if "=" in e and not e.startswith("-"))]
        extra = [e for e in extra if e.startswith("-") or "=" not in e]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    configure_logging(json_output=bool(getattr(args, "json", False)))
    # peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model in LoRA
    # (lm-finetune, lvlm-train, COSMO and LLM2CLIP towers); the warning concerns those two libraries, not the user
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        from clipforge import allocator

        allocator.configure()  # keep freed tensor memory for reuse: fewer page faults per step
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        msg = user_error(e)
        if msg is None:
            raise  # a bug: the traceback is what helps
        # user errors: one clear line instead of a traceback
        print(f"clipforge {args.command}: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
