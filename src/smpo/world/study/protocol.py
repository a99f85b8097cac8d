"""The study's protocol (docs/world.md): tune every rung's learning rate on the validation
prompts, then report every rung on the held-out prompts over seeds, and write the report.

1. One budget for every method (the demo's: pairs, steps, batch; ``StudyConfig``).
2. Tuning: each rung's learning rate, on the same grid for every rung, is chosen by the median
   world reward on the VALIDATION prompts (carved out of the train prompts), mean lift over the
   base across ``tune_seeds``. Nothing here looks at the held-out prompts.
3. Report: every rung at the paper's default settings (its objective defaults at ``paper_lr``)
   and at its tuned learning rate, over ``seeds`` training seeds never used for tuning, on the
   HELD-OUT prompts: median reward lift over the base and win rate against the base (same
   prompts and image seeds), mean over seeds with a 95% t-interval; the held-out reward at every
   checkpoint against training steps, UNet evaluations and seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from smpo.io import atomic_path, prepare_output_dir, read_json, refuse_changed_settings, write_json
from smpo.world.study.analysis import (
    choose_learning_rates,
    extend_grids,
    report_markdown,
    summarise,
    table_markdown,
)
from smpo.world.study.jobs import build_inversion_cache, finished_results, run_jobs
from smpo.world.study.plot import plot_study
from smpo.world.study.rungs import Job, StudyConfig

SETTINGS_FILE = "study-settings.json"
RESUMABLE_SETTINGS = ("rungs", "seeds", "curve_rungs", "lr_bounds")
"""Settings a study may be resumed with changed: they add or drop jobs, not change any (``lr_bounds``:
how far the tuning may extend a grid)."""


def run_study(output: str | Path, cfg: StudyConfig = StudyConfig(), *, base: str | Path | None = None,
              dataset: str | Path | None = None, workers: int = 2, overwrite: bool = False,
              report_only: bool = False, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Tune, report, write ``study.json``, ``table.md``, ``study.png`` and ``report.md``; return the data.

    ``dataset``: a labelled pair set (``smpo label`` output); default: the shipped pair set,
    labelled into ``output/labelled`` first. ``report_only``: run nothing, report the held-out runs
    that have finished (the tuning must be complete); each row says how many seeds it holds.
    """
    from smpo.world.model import base_path
    from smpo.world.pairset import pair_set_path
    from smpo.world.stages import label

    root = prepare_output_dir(output, overwrite=overwrite, resume=True)
    settings = {**json.loads(json.dumps(asdict(cfg))), "base": str(base or base_path()),
                "dataset": str(dataset or pair_set_path())}
    settings_path = root / SETTINGS_FILE
    if settings_path.is_file():
        saved = read_json(settings_path)
        # A setting the saved study does not have is one its smpo did not know: none of its jobs used it.
        new = tuple(k for k in settings if k not in saved)
        refuse_changed_settings(root, saved, settings, what="a study", ignore=(*RESUMABLE_SETTINGS, *new))
    write_json(settings_path, settings)
    base = Path(base) if base else base_path()
    if dataset is None:
        label(pair_set_path(), root / "labelled")
        dataset = root / "labelled"
    dataset = Path(dataset)
    started = time.time()
    if not report_only:
        build_inversion_cache(cfg, root, base, dataset, threads=max(workers, 1), progress=progress)

    progress("smpo study: tuning learning rates on the validation prompts")
    grids = {r: sorted(cfg.lr_grid) for r in cfg.rungs}
    results: dict[str, Any] = {}
    while True:  # extend each rung's grid past the edge its best lies on, until every best is inside
        tune = [Job("base", 0.0, s, "validation") for s in cfg.tune_seeds]
        tune += [Job(r, lr, s, "validation") for r in cfg.rungs for lr in grids[r] for s in cfg.tune_seeds]
        if report_only:
            results.update(finished_results(tune, root))
            missing = [j.name for j in tune if j.name not in results]
            if missing:
                raise ValueError(f"{root}: the tuning is not finished ({len(missing)} runs missing, e.g. "
                                 f"{missing[0]}); run the study without --report-only")
        else:
            results.update(run_jobs(tune, cfg, root, base, dataset, workers=workers, progress=progress))
        chosen = choose_learning_rates(cfg, results, grids)
        extended = extend_grids(cfg, chosen, grids)
        if not extended:
            break
        progress("smpo study: best rate at an edge of the grid, extended: " + ", ".join(
            f"{r} ({chosen[r]['learning_rate']:g} -> tries {', '.join(f'{lr:g}' for lr in grids[r])})"
            for r in extended))

    progress("smpo study: held-out runs (paper defaults and tuned rates)")
    report = [Job("base", 0.0, s, "held_out") for s in cfg.seeds]
    # Every rung at its tuned rate first (in ladder order, Diffusion-DPO first), then the paper's
    # rate where it differs: a study stopped early has the tuned rows complete.
    for r in cfg.rungs:
        report += [Job(r, chosen[r]["learning_rate"], s, "held_out", curve=r in cfg.curve_rungs) for s in cfg.seeds]
    for r in cfg.rungs:
        if cfg.paper_lr != chosen[r]["learning_rate"]:
            report += [Job(r, cfg.paper_lr, s, "held_out") for s in cfg.seeds]
    if report_only:
        results.update(finished_results(report, root))
    else:
        results.update(run_jobs(report, cfg, root, base, dataset, workers=workers, progress=progress))
    rows = summarise(cfg, results, chosen)

    data = {"config": asdict(cfg), "base": str(base), "dataset": str(dataset), "chosen": chosen, "rows": rows,
            "seconds_this_call": round(time.time() - started, 1)}
    write_json(root / "study.json", data)
    table = table_markdown(rows, cfg)
    with atomic_path(root / "table.md") as tmp:
        tmp.write_text(table)
    plot_study(root / "study.png", rows, cfg)
    text = report_markdown(cfg, data, table)
    with atomic_path(root / "report.md") as tmp:
        tmp.write_text(text)
    progress(text)
    return data
