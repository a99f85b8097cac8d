"""Config: YAML recipes, command-line overrides, unknown keys, help from the field docstrings."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from smpo.train.config import (
    SECTIONS,
    ConfigError,
    TrainConfig,
    add_config_arguments,
    config_from_args,
    dump_config,
    field_docs,
    load_config,
    save_config,
)

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (REPO / "configs").glob("*/*.yaml") if p.parent.name != "accelerate")


def _parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_every_recipe_is_shipped_and_validates():
    names = {f"{p.parent.name}/{p.stem}" for p in RECIPES}
    assert names == {f"{f}/{m}" for f in ("sd15", "sdxl", "sd3", "flux") for m in ("smpo", "dpo", "kto", "mapo", "sft")}
    for path in RECIPES:
        config = load_config(path)
        assert config.objective.method == path.stem, path
        config.run.output_dir, config.data.dataset = "runs/x", "data/x"  # what a user adds
        config.validate()
        config.objective.resolved()


def test_recipes_carry_the_paper_settings():
    """ALGORITHM.md section 6: AdamW for SD1.5, Adafactor for SDXL; beta 2000 / 5000; 5 / 10-step grid."""
    sd15, sdxl = load_config(REPO / "configs/sd15/smpo.yaml"), load_config(REPO / "configs/sdxl/smpo.yaml")
    assert (sd15.optim.optimizer, sd15.objective.beta, sd15.objective.inversion_steps) == ("adamw", 2000.0, 5)
    assert (sdxl.optim.optimizer, sdxl.objective.beta, sdxl.objective.inversion_steps) == ("adafactor", 5000.0, 10)
    assert sdxl.model.vae == "madebyollin/sdxl-vae-fp16-fix"
    for config in (sd15, sdxl):
        assert config.optim.learning_rate == 1e-8 and config.optim.scale_lr
        assert (config.optim.warmup_steps, config.optim.gradient_accumulation_steps, config.optim.max_steps) == (100, 128, 200)
        assert config.objective.gamma == 10.0 and config.data.empty_prompt_rate == 0.2


def test_yaml_round_trip(tmp_path):
    config = load_config(REPO / "configs/sdxl/smpo.yaml")
    config.optim.max_grad_norm = None
    config.objective.land_on_t = False
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config
    assert dump_config(load_config(tmp_path / "c.yaml")) == dump_config(config)


def test_command_line_overrides_the_yaml():
    recipe = str(REPO / "configs/sd15/smpo.yaml")
    config = _parse(["--config", recipe, "--beta", "5000", "--method", "dpo", "--learning-rate", "2e-6",
                     "--no-random-flip", "--max-grad-norm", "none", "--finetune", "lora"])
    assert config.objective.method == "dpo" and config.objective.beta == 5000.0
    assert config.optim.learning_rate == 2e-6 and config.optim.max_grad_norm is None
    assert config.data.random_flip is False and config.model.finetune == "lora"
    assert config.optim.gradient_accumulation_steps == 128  # untouched: from the YAML
    assert config.objective.inversion_steps == 5


def test_defaults_without_yaml():
    config = _parse(["--pretrained", "m", "--dataset", "d", "--output-dir", "o"])
    assert (config.model.pretrained, config.data.dataset, config.run.output_dir) == ("m", "d", "o")
    assert config.optim.learning_rate == 1e-8 and config.objective.method == "smpo"


def test_unknown_keys_name_the_key_and_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rat: 1.0e-6\n")
    with pytest.raises(ConfigError, match=r"unknown key optim\.'learning_rat' in .*bad\.yaml"):
        load_config(bad)
    bad.write_text("optimizer:\n  learning_rate: 1.0e-6\n")
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer' in .*bad\.yaml"):
        load_config(bad)


def test_bad_values_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  batch_size: two\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: optim\.batch_size: 'two' is not a valid int"):
        load_config(bad)
    bad.write_text("objective:\n  method: ppo\n")
    with pytest.raises(ConfigError, match="'ppo' is not one of smpo, dpo, kto, mapo, sft"):
        load_config(bad)
    bad.write_text("optim:\n  learning_rate: 1e-8\n")  # YAML 1.1 reads this as a string
    assert load_config(bad).optim.learning_rate == 1e-8
    with pytest.raises(SystemExit):
        _parse(["--optimizer", "sgd"])
    with pytest.raises(ConfigError, match="model.pretrained is required"):
        TrainConfig().validate()


def test_help_comes_from_the_field_docstrings():
    docs = field_docs(SECTIONS["optim"])
    assert docs["scale_lr"].startswith("Multiply the learning rate by the global batch")
    assert field_docs(SECTIONS["objective"])["gamma"].startswith("SmPO sensitivity")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = parser.format_help()
    for section, cls in SECTIONS.items():
        for name, doc in field_docs(cls).items():
            assert doc, f"{section}.{name} has no documentation"
            assert "--" + name.replace("_", "-") in text
    assert "Multiply the learning rate by the global batch" in " ".join(text.split())
