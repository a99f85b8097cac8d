"""`smpo demo` and `smpo study` read their settings from DemoConfig and StudyConfig (fast: no run)."""

import argparse
import dataclasses

import pytest

from smpo.options import ConfigError, field_docs
from smpo.world import demo, study
from smpo.world.stages import DemoConfig


def _parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("cls", [DemoConfig, study.StudyConfig])
def test_every_setting_is_an_option_with_its_docstring_as_help(cls):
    docs = field_docs(cls)
    module = demo if cls is DemoConfig else study
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions}
    for f in dataclasses.fields(cls):
        assert docs[f.name], f.name
        assert helps[f.name].startswith(docs[f.name]), f.name


def test_demo_options_override_the_preset():
    assert demo.config_from_args(_parse(demo, [])) == DemoConfig()
    cfg = demo.config_from_args(_parse(demo, ["--quick", "--train-steps", "6", "--methods", "smpo, kto", "--seed",
                                              "3", "--learning-rate", "1e-4", "--smpo-noising", "forward"]))
    assert cfg == dataclasses.replace(demo.QUICK, train_steps=6, methods=("smpo", "kto"), seed=3,
                                      learning_rate=1e-4, smpo_noising="forward")
    assert demo.config_from_args(_parse(demo, ["--methods", "dpo", "sft"])).methods == ("dpo", "sft")
    with pytest.raises(ConfigError, match=r"--methods: unknown \['ppo'\]"):
        demo.config_from_args(_parse(demo, ["--methods", "smpo,ppo"]))


def test_study_seeds_are_a_count_or_a_list():
    def seeds(*argv: str) -> tuple[int, ...]:
        return study.config_from_args(_parse(study, ["--seeds", *argv])).seeds

    assert seeds("3") == (0, 1, 2)  # one number N: the seeds 0..N-1, as before
    assert seeds("0,1,2") == seeds("0", "1", "2") == (0, 1, 2)
    assert seeds("4,7") == (4, 7)
    assert study.config_from_args(_parse(study, ["--quick"])).seeds == study.QUICK.seeds
    with pytest.raises(ConfigError, match="--seeds: at least 2"):
        seeds("1")


def test_study_options_override_the_preset_and_check_rung_names():
    cfg = study.config_from_args(_parse(study, ["--quick", "--rungs", "dpo, sft", "--lr-grid", "1e-5,3e-5"]))
    assert cfg == dataclasses.replace(study.QUICK, rungs=("dpo", "sft"), lr_grid=(1e-5, 3e-5))
    with pytest.raises(ConfigError, match=r"--rungs: unknown \['bogus'\]"):
        study.config_from_args(_parse(study, ["--rungs", "dpo,bogus"]))
    with pytest.raises(ConfigError, match=r"--curve-rungs: unknown \['bogus'\]"):
        study.config_from_args(_parse(study, ["--curve-rungs", "bogus"]))
