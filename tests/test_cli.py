import subprocess
import sys

import pytest

import smpo
from smpo.cli import COMMANDS, main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"smpo {smpo.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_console_script_module_runs():
    out = subprocess.run([sys.executable, "-m", "smpo", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"smpo {smpo.__version__}"
