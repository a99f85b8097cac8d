"""Optimizers, the learning-rate schedule, and `smpo train --print-config`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from smpo.cli import main
from smpo.train import TrainConfig, load_config
from smpo.train.setup import make_optimizer, warmup_factor

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_constant_schedule_with_linear_warm_up():
    factor = warmup_factor(3)
    assert [factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0)(0) == 1.0


def test_optimizers():
    params = [torch.nn.Parameter(torch.zeros(3))]
    config = TrainConfig()
    config.optim.weight_decay = 0.5
    adamw = make_optimizer(config, params, 0.1)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["lr"] == 0.1 and adamw.defaults["weight_decay"] == 0.5
    config.optim.optimizer = "adafactor"
    adafactor = make_optimizer(config, params, 0.1)
    assert type(adafactor).__name__ == "Adafactor"
    assert adafactor.defaults["lr"] == 0.1 and adafactor.defaults["relative_step"] is False
    config.optim.optimizer = "adamw8bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match=r"pip install 'smpo\[bnb\]'"):
            make_optimizer(config, params, 0.1)


def test_print_config_resolves_yaml_and_options(tmp_path, capsys):
    code = main(["train", "--config", str(CONFIGS / "sdxl/smpo.yaml"), "--beta", "3000", "--output-dir", "runs/a",
                 "--print-config"])
    assert code == 0
    (tmp_path / "c.yaml").write_text(capsys.readouterr().out)
    config = load_config(tmp_path / "c.yaml")
    assert config.objective.beta == 3000.0 and config.optim.optimizer == "adafactor"
    assert config.run.output_dir == "runs/a"


def test_cli_reports_config_errors(capsys):
    assert main(["train", "--config", str(CONFIGS / "sd15/smpo.yaml"), "--dataset", "d"]) == 2
    assert "run.output_dir is required" in capsys.readouterr().err


def test_trackers_are_optional(tiny_pipelines, labelled, tmp_path, capsys):
    """`--report-to tensorboard` logs through accelerate when tensorboard is installed, and says
    what to install when it is not."""
    run = tmp_path / "run"
    code = main(["train", "--pretrained", str(tiny_pipelines["sd15"]), "--dataset", str(labelled),
                 "--output-dir", str(run), "--method", "sft", "--max-steps", "1", "--batch-size", "2",
                 "--gradient-accumulation-steps", "1", "--report-to", "tensorboard", "--no-progress"])
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        assert code == 2 and "pip install 'smpo[tracking]'" in capsys.readouterr().err
        assert not run.exists()  # nothing half-written
    else:
        assert code == 0 and list((run / "logs").rglob("events.out.tfevents.*"))


def test_prepare_training_builds_what_train_step_runs(tiny_pipelines, labelled, tmp_path):
    """`prepare_training` + `train_step` (what `smpo train` and the benchmark call) make one step."""
    import math

    from smpo.train.loop import train_step
    from smpo.train.setup import load_model, make_accelerator, prepare_training, resolve_config

    config = TrainConfig()
    config.model.pretrained, config.data.dataset, config.run.output_dir = str(tiny_pipelines["sd15"]), str(labelled), str(tmp_path)
    config.model.finetune, config.model.lora_rank, config.objective.method = "lora", 4, "dpo"
    config.optim.batch_size, config.optim.gradient_accumulation_steps = 2, 2
    config = resolve_config(config)
    assert config.objective.beta == config.objective.resolved().beta  # the method's defaults filled in
    accelerator = make_accelerator(config)
    torch.manual_seed(config.run.seed)
    setup = prepare_training(config, accelerator, load_model(config, accelerator.device))
    assert setup.layout.global_batch == 4 and setup.reference is not None
    trainable = [p for p in setup.policy.parameters() if p.requires_grad]  # the LoRA layers' only
    assert len(trainable) < len(list(setup.policy.parameters()))
    assert len(setup.parameters) == len(trainable) and all(a is b for a, b in zip(setup.parameters, trainable))
    record = train_step(setup, 0)
    assert record["step"] == 1 and math.isfinite(record["loss"]) and record["unet_evals"] == 2 * 2 * 2 * 2
    assert math.isfinite(record["grad_norm"]) and setup.scheduler.last_epoch == 1


def test_the_optimizer_step_is_accelerates_outside_the_last_pass_and_the_plain_one_on_it():
    from accelerate import Accelerator

    from smpo.train.sharding import DataParallel

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.5))
    parallel = DataParallel(accelerator)
    seen = []
    for _ in range(2):
        with accelerator.accumulate(model):
            accelerator.backward(model(torch.ones(1, 2)).sum())
            parallel.optimizer_step(optimizer)
            seen.append(model.weight.detach().clone())
    assert torch.equal(seen[0], torch.ones(1, 2))  # the first pass: accelerate's wrapper, which skips it
    assert torch.allclose(seen[1], torch.full((1, 2), 1.0 - 0.5 * 2 * 0.5))  # two half losses' gradient 1, stepped once
