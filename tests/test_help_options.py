"""Every command's ``--help`` still lists each option it listed before the refactor of issue 18.

``golden/cli_options_before_issue18.json`` holds the option strings of every command and
subcommand as ``smpo COMMAND --help`` listed them at commit ea73841 (the last one before that
issue's work); a renamed option keeps its old spelling as an alias, so none may go missing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from smpo.cli import main

BEFORE = json.loads((Path(__file__).parent / "golden" / "cli_options_before_issue18.json").read_text())


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*command.split(), "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _listed(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)", text))


@pytest.mark.parametrize("command", sorted(BEFORE))
def test_help_keeps_every_earlier_option(command, capsys):
    listed = _listed(_help(command, capsys))
    missing = sorted(set(BEFORE[command]) - listed)
    assert not missing, f"smpo {command} --help no longer lists {missing}"


def test_the_check_reads_option_strings_only():
    text = "usage: smpo x [-h] [--out OUT]\n  --no-land-on-t, --land-on-t  per-sample t (e.g. 0.5-1.0); see --out\n"
    assert _listed(text) == {"-h", "--out", "--no-land-on-t", "--land-on-t"}
    assert "--land-on-t" not in _listed(text.replace("--land-on-t", "--land"))
