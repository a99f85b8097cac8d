"""The `smpo` command line.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``. Only the module of the chosen subcommand is imported, so `smpo --help`
stays fast and a missing optional dependency of one command never breaks another.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from smpo import __version__

# name -> (module, one-line help). The order is the order of `smpo --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("smpo.world.demo", "run the whole pipeline on the built-in miniature world (CPU, minutes)"),
    "label": ("smpo.data.label", "score preference pairs with a reward model and write smoothed labels (p_win)"),
    "cache": ("smpo.data.cache", "precompute VAE latents and text embeddings of a labelled dataset"),
    "train": ("smpo.train.cli", "train SmPO, Diffusion-DPO, Diffusion-KTO, MaPO or SFT"),
    "generate": ("smpo.evaluation.generate", "generate images for a prompt set with a fixed seed per prompt"),
    "evaluate": ("smpo.evaluation.evaluate", "score generated images with the reward models"),
    "compare": ("smpo.evaluation.compare", "win rates and a report comparing evaluated models"),
    "world": ("smpo.world.cli", "the miniature world: pretrain its base model, sample its prompts"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smpo",
        description="Align text-to-image diffusion models with human preferences (SmPO-Diffusion).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items())
        + "\n\n`smpo COMMAND --help` shows a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"smpo {__version__}")
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv)  # handles --help / --version, then exits
        top.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    module_name, text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"smpo {name}", description=text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
