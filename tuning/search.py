"""Searches VFBN depth and alpha_gs (and the learning rate) with keras-tuner.

Usage:

    python -m tuning.search --flagfile=tuning/configs/NAME.cfg \\
        [--flag=value ...]

Every trial trains the trainer's CIFAR ResNet (`trainers.resnet`) cut by
VFBN synthesizers on the trainer's input pipeline (`trainers.data`) under
a `tf.distribute.MirroredStrategy` (all local GPUs, or --num_cpu_devices
logical CPU devices), and is scored by its accuracy on a validation split
carved from the training set (--validation_examples); the test set is
never read. The trainer's flags set everything that is not searched; the
search's own flags choose the tuner, the budget and the ranges.

The search directory (--search_dir) holds keras-tuner's state (one
`trial_*` directory per trial), search.cfg (the effective flags),
search_config.json, tensorboard/ (one run per trial and execution, with
the HParams dashboard), and, at the end, results.md (the trial table,
best first), results.json and best.cfg: the best trial as a flagfile for
`python -m trainers.cifar`. Started again with the same flags, a search
continues where it stopped; with a different search space it refuses.

Distributed over machines with keras-tuner's chief/worker mode: start the
same command on every machine with KERASTUNER_TUNER_ID (chief on one,
a unique id such as worker0 on the others), KERASTUNER_ORACLE_IP and
KERASTUNER_ORACLE_PORT (the chief's address) in the environment.
"""

import dataclasses
import json
import pathlib
import sys

from absl import app, flags, logging

from trainers import cifar, spec

TUNERS = ("random", "bayesian", "hyperband")

# Settings that may change when a search is continued.
RESUME_FREE = (
    "max_trials",
    "retrain_epochs",
    "retrain_steps_per_epoch",
    "chief_linger_seconds",
    "chief_wait_seconds",
    "strategy",
    "num_cpu_devices",
    "progress_bar",
    "model_dir",
    "test_examples",
    "tensorboard_update_freq",
)


@dataclasses.dataclass
class SearchConfig:
    """Everything one search needs; `run_search(config)` runs it.

    Attributes mirror the flags of the same names (see `define_flags`);
    `train` holds the trainer's flags, the recipe of every trial.
    """

    search_dir: str
    train: cifar.TrainConfig
    tuner: str = "random"
    max_trials: int = 10
    executions_per_trial: int = 1
    bayesian_initial_points: int = 0
    hyperband_factor: int = 3
    hyperband_iterations: int = 1
    vfbn_depth_min: int = 0
    vfbn_depth_max: int = 4
    alpha_gs_min: float = 1e-5
    alpha_gs_max: float = 0.1
    alpha_gs_zero: bool = True
    tune_learning_rate: bool = False
    learning_rate_min: float = 0.01
    learning_rate_max: float = 0.5
    max_consecutive_failed_trials: int = 0
    retrain_epochs: int = 0
    retrain_steps_per_epoch: int = -1
    chief_linger_seconds: float = 10.0
    chief_wait_seconds: float = 600.0


SEARCH_FLAG_NAMES = tuple(
    name for name in SearchConfig.__dataclass_fields__ if name != "train"
)


class SearchChangedError(ValueError):
    """A search directory holds a search with other settings."""


class SetupError(RuntimeError):
    """Something the search needs is missing from this machine."""


def define_flags(flag_values=None):
    """Defines the trainer's flags and the search's in `flag_values`.

    Parses nothing. Calling it again on the same `FlagValues` is a no-op.

    Args:
        flag_values: an `absl.flags.FlagValues`; default `flags.FLAGS`.

    Returns:
        The names of the search's own flags.
    """
    fv = flags.FLAGS if flag_values is None else flag_values
    if "tuner" in fv:
        return list(SEARCH_FLAG_NAMES)
    cifar.define_flags(fv)
    fv.set_default("method", "vfbn")
    fv.set_default("strategy", "mirrored")
    d = SearchConfig.__dataclass_fields__

    def default(name):
        return d[name].default

    flags.DEFINE_string(
        "search_dir",
        None,
        "Directory of the search: keras-tuner's state, TensorBoard logs, "
        "results.md and best.cfg. {name} is replaced by the value of flag "
        "name, e.g. tuning_runs/{tuner}-resnet{depth}. Started again with "
        "the same directory, the search continues.",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "tuner",
        default("tuner"),
        TUNERS,
        "random: random search. bayesian: Bayesian optimisation with a "
        "Gaussian process. hyperband: Hyperband, trials of up to --epochs "
        "epochs, the best continued from their checkpoints.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "max_trials",
        default("max_trials"),
        "Trials in all (random, bayesian); for hyperband an optional cap "
        "on its own schedule (0: no cap). May be raised to extend a "
        "finished search.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "executions_per_trial",
        default("executions_per_trial"),
        "Models trained per trial, from different random initialisations; "
        "the trial's score is their mean validation accuracy.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "bayesian_initial_points",
        default("bayesian_initial_points"),
        "Random trials before Bayesian optimisation starts proposing (0: "
        "keras-tuner's default, 3 per hyperparameter).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "hyperband_factor",
        default("hyperband_factor"),
        "Hyperband's reduction factor: each round keeps about 1/factor of "
        "the trials and trains them factor times longer.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "hyperband_iterations",
        default("hyperband_iterations"),
        "Times Hyperband sweeps through all its brackets.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "vfbn_depth_min",
        default("vfbn_depth_min"),
        "Smallest VFBN depth searched (residual blocks before the VFBN's "
        "pooling and dense head; 0: pooling and dense only).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "vfbn_depth_max",
        default("vfbn_depth_max"),
        "Largest VFBN depth searched.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "alpha_gs_min",
        default("alpha_gs_min"),
        "Lower end of the log-uniform range of alpha_gs searched.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "alpha_gs_max",
        default("alpha_gs_max"),
        "Upper end of the log-uniform range of alpha_gs searched.",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "alpha_gs_zero",
        default("alpha_gs_zero"),
        "Also try alpha_gs = 0 (pure gradient matching): the boolean "
        "hyperparameter alpha_gs_nonzero chooses, and alpha_gs is only "
        "searched when it is true.",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "tune_learning_rate",
        default("tune_learning_rate"),
        "Also search the SGD learning rate, log-uniform in "
        "[--learning_rate_min, --learning_rate_max]; otherwise every trial "
        "uses --learning_rate.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "learning_rate_min",
        default("learning_rate_min"),
        "Lower end of the learning rates searched (--tune_learning_rate).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "learning_rate_max",
        default("learning_rate_max"),
        "Upper end of the learning rates searched (--tune_learning_rate).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "max_consecutive_failed_trials",
        default("max_consecutive_failed_trials"),
        "Stop the search after this many failed (diverged) trials in a row "
        "(0: never).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "retrain_epochs",
        default("retrain_epochs"),
        "Epochs written into best.cfg for retraining the best trial in full "
        "(0: the same as --epochs).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "retrain_steps_per_epoch",
        default("retrain_steps_per_epoch"),
        "Steps per epoch written into best.cfg (-1: the same as "
        "--steps_per_epoch; 0: one pass over the training split).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "chief_linger_seconds",
        default("chief_linger_seconds"),
        "In a distributed search, how long the chief keeps telling late "
        "workers to stop after the last trial has ended.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "chief_wait_seconds",
        default("chief_wait_seconds"),
        "In a distributed search, how long a worker waits for the chief to "
        "answer before it gives up with an error.",
        flag_values=fv,
    )
    _register_validators(fv)
    return list(SEARCH_FLAG_NAMES)


def _register_validators(fv):
    def check(name, predicate, message):
        flags.register_validator(name, predicate, message, flag_values=fv)

    check("max_trials", lambda v: v is not None and v >= 0, "must be >= 0")
    for name in (
        "executions_per_trial",
        "hyperband_iterations",
    ):
        check(name, lambda v: v is not None and v >= 1, "must be >= 1")
    check(
        "hyperband_factor", lambda v: v is not None and v >= 2, "must be >= 2"
    )
    for name in (
        "bayesian_initial_points",
        "vfbn_depth_min",
        "max_consecutive_failed_trials",
        "retrain_epochs",
        "chief_linger_seconds",
    ):
        check(name, lambda v: v is not None and v >= 0, "must be >= 0")
    check(
        "chief_wait_seconds",
        lambda v: v is not None and v > 0,
        "must be positive",
    )
    check(
        "retrain_steps_per_epoch",
        lambda v: v is not None and v >= -1,
        "must be >= -1",
    )
    for name in (
        "alpha_gs_min",
        "alpha_gs_max",
        "learning_rate_min",
        "learning_rate_max",
    ):
        check(
            name,
            lambda v: v is not None and v > 0,
            "must be positive (the ends of a log-uniform range)",
        )
    check(
        "validation_examples",
        lambda v: v is not None and v > 0,
        "must be positive: trials are scored on this validation split, "
        "carved from the training set (never on the test set)",
    )

    def ranges_ok(values):
        for low, high in (
            ("vfbn_depth_min", "vfbn_depth_max"),
            ("alpha_gs_min", "alpha_gs_max"),
            ("learning_rate_min", "learning_rate_max"),
        ):
            if (
                values[low] is not None
                and values[high] is not None
                and values[low] > values[high]
            ):
                raise flags.ValidationError(
                    f"--{low}={values[low]} is above --{high}="
                    f"{values[high]}: the range is empty"
                )
        return True

    flags.register_multi_flags_validator(
        [
            "vfbn_depth_min",
            "vfbn_depth_max",
            "alpha_gs_min",
            "alpha_gs_max",
            "learning_rate_min",
            "learning_rate_max",
        ],
        ranges_ok,
        flag_values=fv,
    )

    def budget_ok(values):
        if values["max_trials"] == 0 and values["tuner"] != "hyperband":
            raise flags.ValidationError(
                f"--tuner={values['tuner']} needs --max_trials of at least "
                "1 (0, no cap, is only for --tuner=hyperband)"
            )
        return True

    flags.register_multi_flags_validator(
        ["max_trials", "tuner"], budget_ok, flag_values=fv
    )

    def method_ok(values):
        if values["method"] != "vfbn":
            raise flags.ValidationError(
                f"--method={values['method']}: the search trains VFBN "
                "models only; drop --method or set it to vfbn"
            )
        if values["strategy"] == "multi_worker":
            raise flags.ValidationError(
                "--strategy=multi_worker is not supported by the search; "
                "use --strategy=mirrored on each machine and keras-tuner's "
                "chief/worker mode across machines (KERASTUNER_TUNER_ID, "
                "KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT)"
            )
        return True

    flags.register_multi_flags_validator(
        ["method", "strategy"], method_ok, flag_values=fv
    )


def _int_list(text):
    return tuple(int(part) for part in text.split(",") if part.strip())


def _float_list(text):
    return tuple(float(part) for part in text.split(",") if part.strip())


def config_from_flags(flag_values=None):
    """Builds a `SearchConfig` from parsed flags.

    Raises:
        app.UsageError: for a missing --search_dir, or --vfbn_depth or
            --alpha_gs given (they are what the search chooses).
    """
    fv = flags.FLAGS if flag_values is None else flag_values
    for name, ranges in (
        ("vfbn_depth", "--vfbn_depth_min and --vfbn_depth_max"),
        (
            "alpha_gs",
            "--alpha_gs_min, --alpha_gs_max and --alpha_gs_zero",
        ),
    ):
        if fv[name].present:
            raise app.UsageError(
                f"--{name} is what the search chooses; set its range with "
                f"{ranges} instead."
            )
    cifar.check_no_trailing_comments(
        fv, cifar.FLAG_NAMES + tuple(SEARCH_FLAG_NAMES)
    )
    values = {name: fv[name].value for name in cifar.FLAG_NAMES}
    values["cuts"] = _int_list(values["cuts"] or "")
    values["lr_decay_at"] = _float_list(values["lr_decay_at"] or "")
    train = cifar.TrainConfig(**values)
    search = {name: fv[name].value for name in SEARCH_FLAG_NAMES}
    if not search["search_dir"]:
        raise app.UsageError(
            "--search_dir is required: the directory of the search (an "
            "existing search there is continued)."
        )
    every_flag = {**values, **search}
    search["search_dir"] = cifar.format_model_dir(
        search["search_dir"], every_flag
    )
    return SearchConfig(train=train, **search)


def flagfile_text(flag_values=None, search_dir=None):
    """The search's effective flags (trainer's and its own) as a flagfile."""
    fv = flags.FLAGS if flag_values is None else flag_values
    lines = [
        "# Effective flags of this search; continue it with",
        "# python -m tuning.search --flagfile=THIS_FILE",
    ]
    for name in cifar.FLAG_NAMES + SEARCH_FLAG_NAMES:
        flag = fv[name]
        if name in ("vfbn_depth", "alpha_gs"):
            continue
        if name == "search_dir" and search_dir is not None:
            lines.append(f"--search_dir={search_dir}")
        elif flag.value is not None:
            lines.append(flag.serialize())
    return "\n".join(lines) + "\n"


# The search, without flags.


def search_space(config):
    """The `tuning.hypermodel.SearchSpace` of a `SearchConfig`."""
    from tuning import hypermodel

    learning_rate = None
    if config.tune_learning_rate:
        learning_rate = (config.learning_rate_min, config.learning_rate_max)
    return hypermodel.SearchSpace(
        vfbn_depth=(config.vfbn_depth_min, config.vfbn_depth_max),
        alpha_gs=(config.alpha_gs_min, config.alpha_gs_max),
        alpha_gs_zero=config.alpha_gs_zero,
        learning_rate=learning_rate,
    )


def _comparable(config):
    """The settings that must not change when a search is continued."""
    values = {
        k: v for k, v in dataclasses.asdict(config).items() if k != "train"
    }
    values.update(dataclasses.asdict(config.train))
    for name in RESUME_FREE + ("search_dir", "vfbn_depth", "alpha_gs"):
        values.pop(name, None)
    return json.loads(json.dumps(values))


def check_resume(config, write=True):
    """Refuses to continue a search with different settings.

    Compares `config` with `search_config.json` in the search directory,
    ignoring the settings that may change (`RESUME_FREE`), and writes it
    there when `write` is true.

    Raises:
        SearchChangedError: naming every setting that differs.
    """
    search_dir = pathlib.Path(config.search_dir)
    path = search_dir / "search_config.json"
    new = _comparable(config)
    if path.exists():
        old = json.loads(path.read_text())["settings"]
        changed = sorted(
            k for k in set(old) | set(new) if old.get(k) != new.get(k)
        )
        if changed:
            details = "; ".join(
                f"--{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}"
                for k in changed
            )
            raise SearchChangedError(
                f"--search_dir={search_dir} holds a search with other "
                f"settings ({details}). Continuing it would mix two "
                f"searches: continue it with --flagfile={search_dir}/"
                "search.cfg, or choose a new --search_dir."
            )
    if write:
        search_dir.mkdir(parents=True, exist_ok=True)
        record = {"settings": new, "config": dataclasses.asdict(config)}
        # Written whole, then renamed: workers may read it at any time.
        partial = path.with_suffix(".json.partial")
        partial.write_text(
            json.dumps(record, indent=2, sort_keys=True, default=list) + "\n"
        )
        partial.replace(path)


def check_space(tuner, space):
    """Refuses a tuner whose (reloaded or remote) space is not `space`.

    Raises:
        SearchChangedError: if keras-tuner's recorded search space differs
            from the one `space` declares.
    """
    import keras_tuner

    from tuning import hypermodel

    fresh = keras_tuner.HyperParameters()
    space.declare(fresh)
    recorded = tuner.oracle.get_space()
    expected = hypermodel.space_signature(fresh)
    found = hypermodel.space_signature(recorded)
    if expected != found:
        raise SearchChangedError(
            f"The search in {tuner.project_dir} (or the chief's) has the "
            f"search space {found}, but these settings declare {expected}. "
            "Use the same flags as the search you are continuing or joining, "
            "or choose a new --search_dir."
        )


def _require_tensorboard():
    # keras-tuner imports TensorBoard's HParams plugin in every trial; without
    # it every trial would fail.
    import importlib

    try:
        importlib.import_module("tensorboard.plugins.hparams.api")
    except ImportError as e:
        raise SetupError(
            "keras-tuner needs the tensorboard package, which is missing "
            f"({e}); tensorflow-cpu does not bring it. Install it with: "
            "pip install tensorboard"
        ) from e


def _require_bayesian_dependencies():
    # keras-tuner's Bayesian oracle needs SciPy and scikit-learn, which
    # keras-tuner does not install by itself.
    import importlib

    missing = []
    for module, package in (
        ("scipy.optimize", "scipy"),
        ("sklearn", "scikit-learn"),
    ):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise SetupError(
            f"--tuner=bayesian needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} missing. Install "
            f"{'it' if len(missing) == 1 else 'them'} with: pip install "
            f"{' '.join(missing)} (or pip install keras-tuner[bayesian]), or "
            "choose --tuner=random or --tuner=hyperband."
        )


def summarise(config, oracle):
    """Writes results.md, results.json and best.cfg; fails loudly.

    Args:
        config: the `SearchConfig`.
        oracle: the search's oracle (standalone or the chief's).

    Returns:
        A dict: `rows` (see `tuning.results.trial_rows`), `table`,
        `counts`, `best` (the best row) and `best_flagfile` (its path).

    Raises:
        tuning.results.SearchFailedError: if no trial completed.
    """
    from tuning import results

    search_dir = pathlib.Path(config.search_dir)
    rows = results.trial_rows(oracle)
    table = results.markdown_table(rows)
    counts = results.status_counts(rows)
    (search_dir / "results.md").write_text(
        f"# Search {search_dir}\n\n{config.tuner} search, objective "
        f"val_accuracy on {config.train.validation_examples} held-out "
        "training images, best first.\n\n" + table
    )
    (search_dir / "results.json").write_text(
        json.dumps({"counts": counts, "trials": rows}, indent=2, default=str)
        + "\n"
    )
    failed = [r for r in rows if r["status"] != "COMPLETED"]
    for row in failed:
        logging.warning(
            "Trial %s %s: %s", row["trial_id"], row["status"], row["reason"]
        )
    completed = [r for r in rows if r["objective"] is not None]
    if not completed:
        first = failed[0]["reason"] if failed else "no trial ran"
        raise results.SearchFailedError(
            f"No trial of the search in {search_dir} completed "
            f"({counts or 'none'}); the first failure: {first}. See "
            f"{search_dir / 'results.md'}."
        )
    if failed:
        logging.warning(
            "%d of %d trials did not complete (%s); see %s",
            len(failed),
            len(rows),
            counts,
            search_dir / "results.md",
        )
    best = completed[0]
    train = config.train
    retrain = results.retrain_config(
        train,
        best["settings"],
        epochs=config.retrain_epochs or train.epochs,
        steps_per_epoch=(
            None
            if config.retrain_steps_per_epoch < 0
            else config.retrain_steps_per_epoch
        ),
    )
    if not retrain.model_dir:
        retrain = dataclasses.replace(
            retrain, model_dir=str(search_dir / "best_run")
        )
    path = search_dir / "best.cfg"
    path.write_text(
        results.trainer_flagfile(
            retrain,
            header=(
                f"Best trial {best['trial_id']} of the search in "
                f"{search_dir}: val_accuracy={best['objective']:.4f} "
                f"with {best['settings']}.",
                f"Retrain it: python -m trainers.cifar --flagfile={path}",
                "(flags after --flagfile override it, e.g. --epochs=182).",
            ),
        )
    )
    logging.info("Wrote %s and %s", search_dir / "results.md", path)
    return {
        "rows": rows,
        "table": table,
        "counts": counts,
        "best": best,
        "best_flagfile": path,
    }


def run_search(config, strategy=None, callbacks=()):
    """Runs (or continues, or joins) a search. No flags are read.

    Args:
        config: a `SearchConfig`.
        strategy: the `tf.distribute.Strategy` given to the tuner; `None`
            makes one from `config.train.strategy` (the tuner opens its
            scope; nothing else does).
        callbacks: extra Keras callbacks for every trial.

    Returns:
        The summary of `summarise`, or `None` on a keras-tuner worker (the
        chief writes the results).

    Raises:
        SearchChangedError: when continuing a search with other settings.
        tuning.results.SearchFailedError: when no trial completed.
        keras_tuner.errors.FatalError: when a trial fails for a reason
            other than divergence or memory.
        tuning.tuners.ChiefUnreachableError: on a keras-tuner worker, when
            the chief does not answer within `config.chief_wait_seconds`.
    """
    from tuning import tuners

    role = tuners.distributed_role()
    train = config.train
    space = search_space(config)
    check_resume(config, write=role != "worker")
    _require_tensorboard()
    if config.tuner == "bayesian":
        _require_bayesian_dependencies()
    logging.info(
        "Search %s: %s tuner (%s), %s",
        config.search_dir,
        config.tuner,
        role,
        space,
    )
    tuner_args = dict(
        kind=config.tuner,
        search_dir=config.search_dir,
        max_trials=config.max_trials,
        executions_per_trial=config.executions_per_trial,
        max_epochs=train.epochs,
        hyperband_factor=config.hyperband_factor,
        hyperband_iterations=config.hyperband_iterations,
        bayesian_initial_points=config.bayesian_initial_points,
        max_consecutive_failed_trials=config.max_consecutive_failed_trials,
        seed=train.seed,
        chief_linger_seconds=config.chief_linger_seconds,
    )
    verbose = 1 if train.progress_bar else 2

    from tuning import hypermodel

    if role == "chief":
        # The chief only serves the search: no data, no models.
        tuner = tuners.make_tuner(
            hypermodel=hypermodel.VFBNHyperModel(space, train), **tuner_args
        )
        check_space(tuner, space)
        tuner.search(verbose=verbose)
        return summarise(config, tuner.oracle)

    import keras

    if role == "worker":
        tuners.wait_for_chief(config.chief_wait_seconds)
    if strategy is None:
        cifar.configure_devices(train.strategy, train.num_cpu_devices)
        strategy = cifar.make_strategy(train.strategy, train.num_cpu_devices)
    replicas = strategy.num_replicas_in_sync
    if train.batch_size % replicas:
        raise spec.ConfigurationError(
            f"--batch_size={train.batch_size} must be a multiple of the "
            f"{replicas} replicas of --strategy={train.strategy}."
        )
    logging.info(
        "Strategy %s: %d replica(s), global batch %d",
        type(strategy).__name__,
        replicas,
        train.batch_size,
    )
    keras.utils.set_random_seed(train.seed)
    # The test split is loaded too (limited by --test_examples) but never
    # read: trials are scored on the validation split.
    train_ds, val_ds, _, info = cifar.load_data(train)
    steps_per_epoch = train.steps_per_epoch or info.steps_per_epoch
    logging.info(
        "Data: %s; %d train, %d validation images (the objective), %d "
        "classes; %d steps per epoch, up to %d epochs per trial",
        info.source,
        info.train_examples,
        info.validation_examples,
        info.num_classes,
        steps_per_epoch,
        train.epochs,
    )
    model_builder = hypermodel.VFBNHyperModel(
        space,
        train,
        num_classes=info.num_classes,
        input_shape=info.image_shape,
        steps_per_epoch=steps_per_epoch,
        epochs=train.epochs,
    )
    tuner = tuners.make_tuner(
        hypermodel=model_builder,
        distribution_strategy=strategy,
        **tuner_args,
    )
    check_space(tuner, space)
    trial_callbacks = [
        # keras-tuner gives each trial and execution its own log directory
        # and adds the HParams dashboard.
        keras.callbacks.TensorBoard(
            log_dir=str(pathlib.Path(config.search_dir) / "tensorboard"),
            update_freq=train.tensorboard_update_freq or "epoch",
            write_graph=False,
        ),
        *callbacks,
    ]
    tuner.search(
        train_ds,
        epochs=train.epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=val_ds,
        shuffle=False,  # the pipeline shuffles
        callbacks=trial_callbacks,
        verbose=verbose,
    )
    if role == "worker":
        logging.info(
            "Worker %s: no more trials; the chief writes the results.",
            tuner.tuner_id,
        )
        return None
    return summarise(config, tuner.oracle)


def main(argv):
    """absl entry point: checks, then searches with the parsed flags."""
    cifar.check_positional_arguments(argv)
    run_from_flags(flags.FLAGS)


def run_from_flags(flag_values):
    """Runs the search from parsed flags, as `main` does after its checks.

    Writes the effective flags to `<search_dir>/search.cfg`, searches, and
    prints the trial table and one summary line.

    Returns:
        The summary of `run_search` (`None` on a worker).

    Raises:
        app.UsageError: for flags that cannot make a search.
        SystemExit: with one message when the search cannot continue (other
            settings in --search_dir, no completed trial, missing data).
    """
    from trainers import data
    from tuning import results, tuners

    config = config_from_flags(flag_values)
    try:
        role = tuners.distributed_role()
    except ValueError as e:
        raise app.UsageError(str(e))
    if role != "chief" and config.train.dataset == "image_folder":
        cifar._preflight_image_folder(config.train)
    if role != "worker":
        try:
            check_resume(config, write=False)
        except SearchChangedError as e:
            sys.exit(f"Error: {e}")
        search_dir = pathlib.Path(config.search_dir)
        search_dir.mkdir(parents=True, exist_ok=True)
        (search_dir / "search.cfg").write_text(
            flagfile_text(flag_values, search_dir=config.search_dir)
        )
    # A trial's bug (keras_tuner.errors.FatalError) is left to stop the
    # program with its traceback.
    try:
        summary = run_search(config)
    except (
        SearchChangedError,
        SetupError,
        results.SearchFailedError,
        data.DatasetUnavailableError,
        data.CorruptImageError,
        spec.ConfigurationError,
        tuners.ChiefUnreachableError,
    ) as e:
        logging.error("%s", e)
        sys.exit(f"Error: {e}")
    if summary is None:
        return None
    best = summary["best"]
    print(summary["table"], flush=True)
    print(
        f"tuner={config.tuner} trials={len(summary['rows'])} "
        + " ".join(f"{k.lower()}={v}" for k, v in summary["counts"].items())
        + f" best_trial={best['trial_id']} "
        f"best_val_accuracy={best['objective']:.4f} "
        f"results={pathlib.Path(config.search_dir) / 'results.md'} "
        f"best_flagfile={summary['best_flagfile']}",
        flush=True,
    )
    return summary


def run():
    """Defines the flags and runs `main` as an absl app."""
    define_flags()
    flags.mark_flag_as_required("search_dir")
    app.run(main)


if __name__ == "__main__":
    run()
