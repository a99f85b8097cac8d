"""The paper's evaluation (ALGORITHM.md section 7): generate, score, compare.

- :mod:`smpo.evaluation.generate`: images for a prompt set, a fixed seed per image (`smpo generate`).
- :mod:`smpo.evaluation.evaluate`: scores with the reward models, medians, means, intervals (`smpo evaluate`).
- :mod:`smpo.evaluation.compare`: win rates between models, Table-2-style tables, plot, page (`smpo compare`).
- :mod:`smpo.evaluation.stats`: the statistics (median, mean, bootstrap intervals, win rate).

Submodules are imported on use so `import smpo.evaluation` stays light.
"""
