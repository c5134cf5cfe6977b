"""Training bookkeeping, split by concern as Stable-Baselines3 splits ``common/callbacks.py``,
``logger.py`` and ``save_util.py``:

- :mod:`qenv.training.episodes`: episode records and the best recipe (``EpisodeTracker``,
  ``EpisodeRecorder`` for agents that step the env themselves);
- :mod:`qenv.training.callbacks`: the SB3 callbacks (episodes, checkpoints, progress bar);
- :mod:`qenv.training.evaluation`: the deterministic evaluation callback (``--eval-freq``);
- :mod:`qenv.training.logger`: TensorBoard output;
- :mod:`qenv.training.plots`: the Pareto figure and the best recipe as a table;
- :mod:`qenv.training.checkpoints`: atomic saves, checkpoint files, resume points.
"""
