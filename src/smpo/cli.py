"""The `smpo` command line.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``. Only the module of the chosen subcommand is imported, so `smpo --help`
stays fast and a missing optional dependency of one command never breaks another.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import sys
from pathlib import Path

from smpo import __version__

# name -> (module, one-line help). The order is the order of `smpo --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("smpo.world.demo", "run the whole pipeline on the built-in miniature world (CPU, minutes)"),
    "pairs": ("smpo.data.make_pairs", "make a preference set: images from generators, scored by a reward model, paired"),
    "label": ("smpo.data.label", "score preference pairs with a reward model and write smoothed labels (p_win)"),
    "cache": ("smpo.data.cache", "precompute VAE latents and text embeddings of a labelled dataset"),
    "train": ("smpo.train.cli", "train SmPO, Diffusion-DPO, Diffusion-KTO, MaPO or SFT"),
    "online": ("smpo.online.cli", "rounds of sampling with the current policy, scoring, pairing and training"),
    "generate": ("smpo.evaluation.generate", "generate images for a prompt set with a fixed seed per prompt"),
    "evaluate": ("smpo.evaluation.evaluate", "score generated images with the reward models"),
    "compare": ("smpo.evaluation.compare", "win rates and a report comparing evaluated models"),
    "world": ("smpo.world.cli", "the miniature world: pretrain its base model, make its pair set, list its prompts"),
    "study": ("smpo.world.study", "the paper's ablation ladder and baselines over seeds in the miniature world"),
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
    debug = "--debug" in rest or os.environ.get("SMPO_DEBUG", "") not in ("", "0")
    rest = [a for a in rest if a != "--debug"]
    quiet_dependencies()
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"smpo {name}", description=text,
                                     epilog="--debug (or SMPO_DEBUG=1) shows the traceback of an error.")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    new_outputs = [p for p in _outputs(args) if not p.exists()]
    try:
        return int(module.run(args) or 0)
    except EXPECTED_ERRORS as err:
        for path in new_outputs:  # nothing half-written: an output this call created goes
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if debug:
            raise
        print(f"smpo {name}: error: {one_line(err)}", file=sys.stderr)
        return 2


class _DropMessages(logging.Filter):
    def __init__(self, *needles: str) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(needle in record.getMessage() for needle in self.needles)


def quiet_dependencies() -> None:
    """No dependency output a user cannot act on, filtered narrowly: transformers' and diffusers'
    per-file loading bars, and transformers' notice that CLIP/SigLIP image processors fall back to
    PIL without torchvision (smpo avoids torchvision on purpose). Warnings that matter still show."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    library_logger = logging.getLogger("transformers")
    for handler in library_logger.handlers or [library_logger]:
        handler.addFilter(_DropMessages("requires torchvision (not installed); falling back"))


def _outputs(args: argparse.Namespace) -> list[Path]:
    """The output paths a command was given (``--output`` and its spellings)."""
    found = []
    for attr in ("output", "output_option", "output_dir", "run.output_dir", "out"):
        value = vars(args).get(attr)
        if isinstance(value, (str, Path)) and str(value):
            found.append(Path(value))
    return found


EXPECTED_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, LookupError, ImportError)
"""What a user's input can cause (missing or unreadable files, wrong values or columns, an output
that exists): one line and exit status 2. Anything else is a bug and keeps its traceback."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (``KeyError`` quotes its key; an empty message names the type)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(text.split()) or type(err).__name__
    return text


if __name__ == "__main__":
    sys.exit(main())
