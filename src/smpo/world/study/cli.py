"""``smpo study``'s command line: the run's options, and the study's settings read from
:class:`~smpo.world.study.rungs.StudyConfig` (field docstrings are the help) over ``--quick``."""

from __future__ import annotations

import argparse
from dataclasses import replace

from smpo.options import ConfigError, add_dataclass_arguments, check_known, dataclass_from_args
from smpo.world.study.protocol import run_study
from smpo.world.study.rungs import QUICK, RUNG_BY_KEY, StudyConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="study-output", help="output folder (default: study-output); "
                        "an existing study there is resumed")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing --output first")
    parser.add_argument("--quick", action="store_true", help="a tiny study (3 rungs, 2 seeds) for tests; "
                        "the options below override it")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes of one thread (default 2)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report the runs that have finished (after the tuning)")
    parser.add_argument("--base", default=None, help="world pipeline folder (default: the shipped base)")
    parser.add_argument("--dataset", default=None,
                        help="labelled pair set (smpo label output; default: the shipped pair set, labelled)")
    add_dataclass_arguments(parser.add_argument_group("study settings"), StudyConfig)


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """``--quick`` or the defaults, overlaid with the settings given; ``--seeds N`` (one number)
    means the seeds 0..N-1."""
    cfg = dataclass_from_args(StudyConfig, args, base=QUICK if args.quick else StudyConfig())
    check_known("--rungs", cfg.rungs, list(RUNG_BY_KEY))
    check_known("--curve-rungs", cfg.curve_rungs, list(RUNG_BY_KEY))
    if len(cfg.seeds) == 1 and "seeds" in vars(args):
        cfg = replace(cfg, seeds=tuple(range(cfg.seeds[0])))
    if len(cfg.seeds) < 2:
        raise ConfigError("--seeds: at least 2 (an interval needs two seeds)")
    return cfg


def run(args: argparse.Namespace) -> int:
    run_study(args.output, config_from_args(args), base=args.base, dataset=args.dataset, workers=args.workers,
              overwrite=args.overwrite, report_only=args.report_only)
    return 0
