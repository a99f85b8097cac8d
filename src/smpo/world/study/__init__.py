"""``smpo study``: the paper's ablation ladder (Table 3) and the baselines, over seeds, in the world.

The protocol (docs/world.md; :mod:`~smpo.world.study.protocol`): tune every rung's learning rate
on the validation prompts, report every rung on the held-out prompts over seeds. The package by
job, each module importing only those above it in this list:

- :mod:`~smpo.world.study.rungs`: the rungs, :class:`StudyConfig`, :class:`Job`, the shipped summary;
- :mod:`~smpo.world.study.jobs`: one job (train, evaluate, ``results/<job>.json``) and the worker pool;
- :mod:`~smpo.world.study.analysis`: the tuning's choice, the report's rows and tables;
- :mod:`~smpo.world.study.plot`: ``study.png``;
- :mod:`~smpo.world.study.protocol`: :func:`run_study`, the whole study, resumable;
- :mod:`~smpo.world.study.cli`: the command line (``add_arguments``, ``run``).

The stages a job runs (labelling, the train config, exporting a checkpoint, sampling and scoring)
are the demo's too: :mod:`smpo.world.stages`.
"""

from smpo.world.study.analysis import (
    choose_learning_rates,
    lift_and_win,
    report_markdown,
    summarise,
    table_markdown,
    tuning_markdown,
)
from smpo.world.study.cli import add_arguments, config_from_args, run
from smpo.world.study.jobs import (
    build_inversion_cache,
    finished_results,
    inversion_cache_dir,
    run_job,
    run_jobs,
)
from smpo.world.study.plot import plot_study
from smpo.world.study.protocol import run_study
from smpo.world.study.rungs import (
    QUICK,
    RUNG_BY_KEY,
    RUNGS,
    SUMMARY_FILE,
    Job,
    Rung,
    StudyConfig,
    demo_rung,
    shipped_summary,
    split_prompts,
)

__all__ = [
    "QUICK", "RUNGS", "RUNG_BY_KEY", "SUMMARY_FILE", "Job", "Rung", "StudyConfig", "add_arguments",
    "build_inversion_cache", "choose_learning_rates", "config_from_args", "demo_rung", "finished_results",
    "inversion_cache_dir", "lift_and_win", "plot_study", "report_markdown", "run", "run_job", "run_jobs",
    "run_study", "shipped_summary", "split_prompts", "summarise", "table_markdown", "tuning_markdown",
]
