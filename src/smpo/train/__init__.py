"""Training: config dataclasses + YAML recipes, the one loop of every method, checkpoints.

``train(config) -> TrainResult`` is the Python API (``smpo train`` and ``smpo demo`` call it);
see :mod:`smpo.train.loop` and docs/training.md.
"""

from smpo.train.config import ConfigError, TrainConfig, dump_config, load_config, save_config
from smpo.train.loop import NonFiniteLossError, TrainResult, train

__all__ = ["ConfigError", "NonFiniteLossError", "TrainConfig", "TrainResult", "dump_config", "load_config",
           "save_config", "train"]
