"""``smpo online``: rounds of sampling with the current policy, scoring, pairing with smoothed
labels and training, through ``smpo pairs``' and ``smpo train``'s code (:mod:`smpo.online.rounds`).

    from smpo.online import OnlineConfig, run_online
    summary = run_online(OnlineConfig(model="path/to/pipeline", prompts="parti", output="runs/online",
                                      scorer="pickscore", rounds=3, train_steps=50))
"""

from smpo.online.config import OnlineConfig
from smpo.online.rounds import run_online

__all__ = ["OnlineConfig", "run_online"]
