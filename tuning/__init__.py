"""Hyperparameter search over VFBN settings with keras-tuner.

Modules:

- `tuning.hypermodel`: the search space and the keras-tuner `HyperModel`
  that builds the trainer's decoupled ResNet with VFBN synthesizers.
- `tuning.tuners`: random search, Bayesian optimisation and Hyperband, with
  diverged trials marked failed and any other error stopping the search;
  keras-tuner's chief/worker mode.
- `tuning.results`: the trial table and the best trial as a flagfile for
  `python -m trainers.cifar`.
- `tuning.search`: the absl driver, `python -m tuning.search`.

Importing any of them parses no flags and reads no `sys.argv`.
"""
