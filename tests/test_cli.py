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


def _parse(command: str, argv: list[str]):
    import argparse
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(("command", "argv", "dest"), [
    ("cache", ["data", "--model", "p"], "out"),
    ("generate", ["--model", "p", "--prompts", "parti"], "out"),
    ("evaluate", ["folder"], "out"),
    ("compare", ["a", "b"], "out"),
    ("demo", [], "output"),
    ("train", [], "run.output_dir"),
])
def test_every_command_takes_output(command, argv, dest):
    """`--output` names the output folder in every command (the older `--out` still works)."""
    args = vars(_parse(command, [*argv, "--output", "somewhere"]))
    assert args[dest] == "somewhere"
    if dest == "out":
        assert vars(_parse(command, [*argv, "--out", "elsewhere"]))[dest] == "elsewhere"


def test_train_takes_model_like_the_other_commands():
    assert vars(_parse("train", ["--model", "stable-diffusion-v1-5/stable-diffusion-v1-5"]))["model.pretrained"] == \
        "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.mark.parametrize("command, argv, dest", [("train", [], "model.unet"),
                                                 ("generate", ["--model", "p", "--prompts", "parti", "--output", "o"], "unet")])
def test_network_names_the_trained_unet_or_transformer_and_unet_still_works(command, argv, dest):
    assert vars(_parse(command, [*argv, "--network", "runs/a/final/transformer"]))[dest] == "runs/a/final/transformer"
    assert vars(_parse(command, [*argv, "--unet", "runs/a/final/unet"]))[dest] == "runs/a/final/unet"


def test_reference_network_spells_the_reference_unet_or_transformer():
    assert vars(_parse("train", ["--reference-network", "base/transformer"]))["model.reference_unet"] == "base/transformer"
    assert vars(_parse("train", ["--reference-unet", "base/unet"]))["model.reference_unet"] == "base/unet"


def test_label_output_as_argument_or_option(tmp_path, capsys):
    from smpo.data.label import _output

    assert _output(_parse("label", ["src", "out"])) == "out"
    assert _output(_parse("label", ["src", "--output", "out"])) == "out"
    assert main(["label", str(tmp_path / "src"), "--no-progress"]) == 2
    assert "give the output folder once, as OUTPUT or --output" in capsys.readouterr().err
    assert main(["label", str(tmp_path / "src"), "a", "--output", "b", "--no-progress"]) == 2
