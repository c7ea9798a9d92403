"""The ``clipforge`` command line: demo, train, eval, embed, data.

Each subcommand lives in its own module and is imported only when it runs, so ``--help``
answers instantly.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("clipforge.cli.demo", "train the tiny model on the built-in shapes data and show what it learned (~2.5 min)"),
    "train": ("clipforge.cli.train", "train a model from a config file and key=value overrides"),
    "eval": ("clipforge.cli.evaluate", "evaluate a model with a suite (quick or full): JSON and an HTML report"),
    "embed": ("clipforge.cli.embed", "turn images or texts into embeddings (.npy or .parquet)"),
    "export": ("clipforge.cli.export", "write a model in another format: Hugging Face CLIPModel, ONNX, clipforge"),
    "pivot": ("clipforge.cli.pivot", "give an English CLIP a multilingual text side (uCLIP), trained on English text only"),
    "data": ("clipforge.cli.data", "build image-caption corpora into shards (openclipart, emoji) and inspect them"),
    "adapt": ("clipforge.cli.adapt", "fit a few-shot adapter (Tip-Adapter(-F), CoOp, GDA, CLIPN) and report accuracy before/after"),
    "index": ("clipforge.cli.index", "embed an image folder or a corpus split into a search index (incremental)"),
    "serve": ("clipforge.cli.serve", "a search web page and JSON API over an index, on 127.0.0.1"),
    "caption": ("clipforge.cli.caption", "caption images with a CoCa decoder (greedy/beam) or a MacCap decoder directory"),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipforge",
        description="clipforge: contrastive language-image pre-training (CLIP) and the methods that improved it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from clipforge import __version__

    parser.add_argument("--version", action="version", version=f"clipforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, ConnectionError) as e:
        # user errors: one clear line instead of a traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"clipforge {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
