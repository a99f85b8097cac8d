"""Ship a study's result: ``src/smpo/world/study-summary.json`` (the demo's learning rates and the
rows) and the README's study block, from ``STUDY/study.json``.

    python studies/world/summarise.py study-output --wall-hours 8.5 --status finished
"""

from __future__ import annotations

import argparse
from pathlib import Path

from smpo.world.study.rungs import SUMMARY_FILE
from smpo.world.study.summary import write_summary

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="the study's output folder (with study.json)")
    parser.add_argument("--wall-hours", type=float, required=True, help="the study's wall time in all, hours")
    parser.add_argument("--status", default="finished", help="finished, or what is missing")
    parser.add_argument("--command", default="smpo study --output study-output --workers 2")
    args = parser.parse_args()
    write_summary(args.study, SUMMARY_FILE, ROOT / "README.md", command=args.command,
                  wall_seconds=round(args.wall_hours * 3600), status=args.status)


if __name__ == "__main__":
    main()
