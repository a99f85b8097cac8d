"""The miniature world: a procedural text-to-image world in which the whole SmPO pipeline runs on
a CPU in minutes (docs/world.md).

``grammar`` (prompts and the train / held-out split), ``render`` (prompt -> image), ``reward``
(the world's reward model, ``smpo.rewards`` name ``world``), ``model`` (the SD1.5-family base
model and its shipped weights), ``pretrain`` (``smpo world pretrain``), ``raters`` (simulated
raters and the Pick-a-Pic-schema pair dataset), ``pairset`` (the shipped pair set), ``stages``
(the pipeline stages the demo and the study share), ``demo`` and ``demo_report`` (``smpo demo``)
and the ``study`` package (``smpo study``).
"""
