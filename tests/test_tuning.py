"""tuning: keras-tuner searches over VFBN depth and alpha_gs on real CIFAR-10.

Tiny searches: ResNet-8, 200 real training images (32 of them held out for
validation), 2 trials of 1 epoch of 2 steps. The distributed chief/worker
search is in test_tuning_distributed.py.
"""

import json
import pathlib
import subprocess
import sys

import keras
import keras_tuner
import pytest
import tensorflow as tf
from absl import flags
from absl.app import UsageError

from trainers import cifar
from tuning import hypermodel, results, search, tuners

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICK = REPO / "tuning" / "configs" / "quick.cfg"


@pytest.fixture(scope="module")
def small_cifar(cifar_subset):
    """20 training and 2 test images of each class, real CIFAR-10 JPEGs."""
    return cifar_subset(train=20, test=2)


def tiny_args(image_folder, search_dir, *extra):
    return [
        f"--flagfile={QUICK}",
        "--depth=8",
        "--batch_size=16",
        "--epochs=1",
        "--steps_per_epoch=2",
        "--validation_examples=32",
        "--dataset=image_folder",
        f"--image_folder={image_folder}",
        f"--search_dir={search_dir}",
        "--tensorboard_update_freq=0",
        "--noprogress_bar",
        "--max_trials=2",
        "--vfbn_depth_max=1",
        "--num_cpu_devices=2",
        *extra,
    ]


def parse(args):
    fv = flags.FlagValues()
    search.define_flags(fv)
    rest = fv(["search", *args])
    cifar.check_positional_arguments(rest)
    return fv


def config_for(args):
    return search.config_from_flags(parse(args))


def default_strategy():
    return tf.distribute.get_strategy()


def trial_records(search_dir):
    """Every trial.json of a search, by trial id."""
    records = {}
    for path in sorted(pathlib.Path(search_dir).glob("trial_*/trial.json")):
        record = json.loads(path.read_text())
        records[record["trial_id"]] = record
    return records


# Flags and imports: no TensorFlow work.


def test_importing_the_search_parses_no_flags():
    code = (
        "import sys; sys.argv = ['prog', '--no_such_flag', '--tuner=x'];"
        "import tuning, tuning.search, tuning.results, tuning.tuners, "
        "tuning.hypermodel;"
        "from absl import flags;"
        "assert not flags.FLAGS.is_parsed();"
        "assert 'tuner' not in flags.FLAGS and 'method' not in flags.FLAGS;"
        "print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_quick_config_parses(tmp_path):
    config = config_for([f"--flagfile={QUICK}"])
    assert config.search_dir == "tuning_runs/quick-random-resnet14"
    assert config.train.method == "vfbn"
    assert config.train.validation_examples == 2000
    assert (config.vfbn_depth_min, config.vfbn_depth_max) == (0, 4)
    config = config_for(
        [f"--flagfile={REPO / 'tuning' / 'configs' / 'resnet110.cfg'}"]
    )
    assert config.tuner == "bayesian" and config.tune_learning_rate
    assert config.train.depth == 110 and config.retrain_epochs == 182


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method=bp"], "VFBN models only"),
        (["--validation_examples=0"], "never on the test set"),
        (["--alpha_gs_min=0.1", "--alpha_gs_max=0.01"], "range is empty"),
        (["--vfbn_depth_min=3", "--vfbn_depth_max=1"], "range is empty"),
        (["--alpha_gs_min=0"], "must be positive"),
        (["--max_trials=0"], "at least 1"),
        (["--strategy=multi_worker"], "chief/worker"),
        (["--tuner=grid"], "tuner"),
        (["--hyperband_factor=1"], "must be >= 2"),
    ],
)
def test_bad_flags_are_refused(args, message):
    fv = flags.FlagValues()
    search.define_flags(fv)
    with pytest.raises(flags.Error, match=message):
        fv(["search", f"--flagfile={QUICK}", *args])


@pytest.mark.parametrize("name", ["vfbn_depth", "alpha_gs"])
def test_searched_settings_cannot_be_fixed_by_flag(name):
    with pytest.raises(UsageError, match=f"--{name} is what the search"):
        config_for([f"--flagfile={QUICK}", f"--{name}=1"])


def test_positional_arguments_are_refused():
    with pytest.raises(UsageError, match="positional"):
        parse([f"--flagfile={QUICK}", "--alpha_gs_zero", "False"])


# The search space.


def test_alpha_gs_is_conditional_on_alpha_gs_nonzero():
    space = hypermodel.SearchSpace(vfbn_depth=(0, 4), alpha_gs=(1e-5, 1e-1))
    hp = keras_tuner.HyperParameters()
    space.declare(hp)
    names = {p.name: p for p in hp.space}
    assert set(names) == {"vfbn_depth", "alpha_gs_nonzero", "alpha_gs"}
    (condition,) = names["alpha_gs"].conditions
    assert condition.name == "alpha_gs_nonzero"
    assert list(condition.values) == [True]
    assert names["alpha_gs"].sampling == "log"
    assert (names["vfbn_depth"].min_value, names["vfbn_depth"].max_value) == (
        0,
        4,
    )

    settings = hypermodel.SearchSpace.settings
    assert settings(
        {"vfbn_depth": 3, "alpha_gs_nonzero": False, "alpha_gs": 0.01}
    ) == {"vfbn_depth": 3, "alpha_gs": 0.0}
    assert settings(
        {"vfbn_depth": 0, "alpha_gs_nonzero": True, "alpha_gs": 0.01}
    ) == {"vfbn_depth": 0, "alpha_gs": 0.01}

    with_lr = hypermodel.SearchSpace(
        alpha_gs_zero=False, learning_rate=(0.01, 1.0)
    )
    hp = keras_tuner.HyperParameters()
    with_lr.declare(hp)
    assert {p.name for p in hp.space} == {
        "vfbn_depth",
        "alpha_gs",
        "learning_rate",
    }


@pytest.mark.parametrize(
    "values",
    [
        {"vfbn_depth": 0, "alpha_gs_nonzero": False},
        {"vfbn_depth": 2, "alpha_gs_nonzero": True, "alpha_gs": 0.03},
    ],
)
def test_the_hypermodel_builds_what_the_hyperparameters_say(values):
    space = hypermodel.SearchSpace(learning_rate=(0.01, 0.5))
    hp = keras_tuner.HyperParameters()
    space.declare(hp)
    for name, value in {**values, "learning_rate": 0.2}.items():
        hp.values[name] = value
    recipe = config_for([f"--flagfile={QUICK}", "--depth=8"]).train
    model = hypermodel.VFBNHyperModel(
        space, recipe, num_classes=10, steps_per_epoch=10, epochs=2
    ).build(hp)

    synthesizer = model.get_layer("boundary1").synthesizer
    assert synthesizer.depth == values["vfbn_depth"]
    assert synthesizer.alpha_gs == values.get("alpha_gs", 0.0)
    assert model.name == "resnet8_vfbn"
    assert model.output_shape == (None, 10)
    # The searched learning rate starts the recipe's schedule (no warm-up
    # in quick.cfg), divided by 10 at half and at 3/4 of the 20 steps.
    schedule = model.optimizer._learning_rate
    assert isinstance(
        schedule, keras.optimizers.schedules.PiecewiseConstantDecay
    )
    assert [float(schedule(step)) for step in (0, 12, 18)] == pytest.approx(
        [0.2, 0.02, 0.002]
    )


def test_space_signature_survives_keras_tuners_copies():
    space = hypermodel.SearchSpace(learning_rate=(0.01, 0.5))
    hp = keras_tuner.HyperParameters()
    space.declare(hp)
    expected = hypermodel.space_signature(hp)
    from_proto = keras_tuner.HyperParameters.from_proto(hp.to_proto())
    from_config = keras_tuner.HyperParameters.from_config(
        json.loads(json.dumps(hp.get_config()))
    )
    assert hypermodel.space_signature(from_proto) == expected
    assert hypermodel.space_signature(from_config) == expected
    other = keras_tuner.HyperParameters()
    hypermodel.SearchSpace(alpha_gs=(1e-4, 1e-1)).declare(other)
    assert hypermodel.space_signature(other) != expected


def test_a_reloaded_search_with_another_space_is_refused(tmp_path):
    def tuner_for(space):
        model = hypermodel.VFBNHyperModel(space, cifar.TrainConfig(None))
        return tuners.make_tuner("random", model, tmp_path / "s", 2)

    first = hypermodel.SearchSpace(vfbn_depth=(0, 4))
    tuner = tuner_for(first)
    tuner.save()
    search.check_space(tuner, first)
    # keras-tuner itself would reload the old space and go on with it.
    second = hypermodel.SearchSpace(vfbn_depth=(0, 2))
    with pytest.raises(search.SearchChangedError, match="search space"):
        search.check_space(tuner_for(second), second)


# Searches.


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("random", []),
        ("bayesian", ["--bayesian_initial_points=1"]),
        # Hyperband's first bracket: 2 trials of 1 of at most 2 epochs.
        ("hyperband", ["--epochs=2", "--hyperband_factor=2"]),
    ],
)
def test_each_tuner_runs_under_mirrored_strategy(
    kind, extra, small_cifar, tmp_path, mirrored_strategy, monkeypatch
):
    # Who opens a strategy scope, and whether one is open already.
    scopes = []
    original_scope = type(mirrored_strategy).scope

    def spy_scope(self):
        caller = sys._getframe(1).f_code
        # The function that asked for the scope, one frame further up for
        # keras-tuner's `maybe_distribute` context manager.
        outer = sys._getframe(3).f_code.co_name
        scopes.append((caller.co_filename, outer, tf.distribute.has_strategy()))
        return original_scope(self)

    monkeypatch.setattr(type(mirrored_strategy), "scope", spy_scope)
    builds = []
    original_build = hypermodel.VFBNHyperModel.build

    def spy_build(self, hp):
        model = original_build(self, hp)
        builds.append(
            (
                tf.distribute.get_strategy() is mirrored_strategy,
                all(
                    isinstance(v.value, tf.distribute.DistributedValues)
                    for v in model.weights
                ),
            )
        )
        return model

    monkeypatch.setattr(hypermodel.VFBNHyperModel, "build", spy_build)

    search_dir = tmp_path / kind
    config = config_for(
        tiny_args(small_cifar, search_dir, f"--tuner={kind}", *extra)
    )
    summary = search.run_search(config, strategy=mirrored_strategy)

    rows = summary["rows"]
    assert [r["status"] for r in rows] == ["COMPLETED", "COMPLETED"]
    assert sorted(r["trial_id"] for r in rows) == ["0", "1"]
    scores = [r["objective"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= s <= 1 for s in scores)
    for row in rows:
        assert row["settings"]["vfbn_depth"] in (0, 1)
        assert row["settings"]["alpha_gs"] == 0 or (
            1e-5 <= row["settings"]["alpha_gs"] <= 0.1
        )
        assert -1 <= row["metrics"]["boundary1_cosine"] <= 1
        if kind == "hyperband":
            assert row["epochs"] == 1

    # Every model was built by the tuner in the one MirroredStrategy scope,
    # with mirrored variables. The tuner's scope around each build was the
    # outermost one (nothing wraps `search()` in another), and no scope was
    # opened by this project's code. (TensorFlow and keras-tuner re-enter
    # the same scope internally; that is not a second scope.)
    assert builds == [(True, True), (True, True)]
    tuner_builds = [s for s in scopes if s[1] == "_build_hypermodel"]
    assert len(tuner_builds) == 2
    assert not any(nested for _, _, nested in tuner_builds)
    project = (REPO / "tuning", REPO / "trainers", REPO / "keras_vfbn")
    assert not [
        f for f, _, _ in scopes if f.startswith(tuple(map(str, project)))
    ]

    table = (search_dir / "results.md").read_text()
    assert "| rank | trial | status | val_accuracy | vfbn_depth |" in table
    assert table.count("| COMPLETED |") == 2
    best = rows[0]
    fv = flags.FlagValues()
    cifar.define_flags(fv)
    fv(["trainer", f"--flagfile={search_dir / 'best.cfg'}"])
    assert fv.method == "vfbn"
    assert fv.vfbn_depth == best["settings"]["vfbn_depth"]
    assert fv.alpha_gs == best["settings"]["alpha_gs"]
    # quick.cfg asks for a longer retraining than the trials' 1 epoch.
    assert (fv.epochs, fv.steps_per_epoch) == (6, 100)
    assert (config.retrain_epochs, config.retrain_steps_per_epoch) == (6, 100)
    assert fv.depth == 8 and fv.validation_examples == 32
    assert list((search_dir / "tensorboard").glob("*/execution0/train"))


class InterruptSecondTrial(keras.callbacks.Callback):
    """Raises KeyboardInterrupt in the first step of the second trial."""

    # Class attributes: keras-tuner deep-copies callbacks for each trial.
    trials_started = 0

    def on_train_begin(self, logs=None):
        type(self).trials_started += 1

    def on_train_batch_end(self, batch, logs=None):
        if type(self).trials_started == 2:
            raise KeyboardInterrupt


class CountTrials(keras.callbacks.Callback):
    trials_started = 0

    def on_train_begin(self, logs=None):
        type(self).trials_started += 1


@pytest.fixture(scope="module")
def resumed_search(small_cifar, tmp_path_factory):
    """A 3-trial random search interrupted in trial 2, then run again."""
    search_dir = tmp_path_factory.mktemp("resume") / "search"
    args = tiny_args(
        small_cifar, search_dir, "--max_trials=3", "--strategy=default"
    )
    with pytest.raises(KeyboardInterrupt):
        search.run_search(
            config_for(args),
            strategy=default_strategy(),
            callbacks=[InterruptSecondTrial()],
        )
    before = trial_records(search_dir)
    first = (search_dir / "trial_0" / "trial.json").read_bytes()
    summary = search.run_search(
        config_for(args), strategy=default_strategy(), callbacks=[CountTrials()]
    )
    return {
        "args": args,
        "search_dir": search_dir,
        "before": before,
        "first_trial_json": first,
        "summary": summary,
        "trials_run_after_resume": CountTrials.trials_started,
    }


def test_interrupted_search_continues_without_rerunning(resumed_search):
    before = resumed_search["before"]
    assert before["0"]["status"] == "COMPLETED"
    assert before["1"]["status"] == "RUNNING"
    assert "2" not in before

    rows = resumed_search["summary"]["rows"]
    assert sorted(r["trial_id"] for r in rows) == ["0", "1", "2"]
    assert all(r["status"] == "COMPLETED" for r in rows)
    # Trial 0 was not run again: its record is untouched, its score kept;
    # only the interrupted trial and the new one trained.
    search_dir = resumed_search["search_dir"]
    assert (search_dir / "trial_0" / "trial.json").read_bytes() == (
        resumed_search["first_trial_json"]
    )
    score = {r["trial_id"]: r["objective"] for r in rows}["0"]
    assert score == before["0"]["score"]
    assert resumed_search["trials_run_after_resume"] == 2
    # The interrupted trial kept its hyperparameters.
    after = trial_records(search_dir)
    assert (
        after["1"]["hyperparameters"]["values"]
        == before["1"]["hyperparameters"]["values"]
    )


def test_continuing_with_a_changed_space_is_refused(resumed_search):
    args = resumed_search["args"]
    with pytest.raises(search.SearchChangedError) as error:
        search.run_search(
            config_for([*args, "--alpha_gs_max=0.01", "--tune_learning_rate"]),
            strategy=default_strategy(),
        )
    message = str(error.value)
    assert "--alpha_gs_max: 0.1 -> 0.01" in message
    assert "--tune_learning_rate: False -> True" in message
    assert "search.cfg" in message
    # Settings that may change do not count (nothing is run here).
    search.check_resume(config_for([*args, "--retrain_epochs=9"]), write=False)


def test_best_flagfile_retrains_with_the_trainer(resumed_search, tmp_path):
    best = resumed_search["summary"]["best"]
    best_cfg = resumed_search["summary"]["best_flagfile"]
    assert best_cfg == resumed_search["search_dir"] / "best.cfg"
    fv = flags.FlagValues()
    cifar.define_flags(fv)
    rest = fv(
        [
            "trainer",
            f"--flagfile={best_cfg}",
            f"--model_dir={tmp_path / 'retrain'}",
        ]
    )
    cifar.check_positional_arguments(rest)
    trained = cifar.run_from_flags(fv)
    assert trained["method"] == "vfbn"
    assert trained["depth"] == 8
    assert trained["vfbn_depth"] == best["settings"]["vfbn_depth"]
    assert trained["alpha_gs"] == best["settings"]["alpha_gs"]
    assert 0 <= trained["test_accuracy"] <= 1
    assert (tmp_path / "retrain" / "model.keras").is_file()


def _seed_with_one_diverging_trial(config):
    """An oracle seed whose 2 trials get a tame and a huge learning rate."""
    space = search.search_space(config)
    for seed in range(100):
        oracle = keras_tuner.oracles.RandomSearchOracle(
            objective=keras_tuner.Objective("val_accuracy", "max"),
            max_trials=2,
            seed=seed,
        )
        hp = oracle.get_space()
        space.declare(hp)
        oracle.update_space(hp)
        rates = [
            oracle.populate_space(str(i))["values"]["learning_rate"]
            for i in range(2)
        ]
        if min(rates) < 0.2 and max(rates) > 1e4:
            return seed, rates
    pytest.fail("no seed gives one tame and one huge learning rate")


def test_a_diverging_trial_fails_and_the_search_goes_on(
    small_cifar, tmp_path, caplog
):
    args = tiny_args(
        small_cifar,
        tmp_path / "search",
        "--strategy=default",
        "--tune_learning_rate",
        "--learning_rate_min=0.001",
        "--learning_rate_max=1e8",
    )
    seed, rates = _seed_with_one_diverging_trial(config_for(args))
    config = config_for([*args, f"--seed={seed}"])
    summary = search.run_search(config, strategy=default_strategy())

    rows = summary["rows"]
    assert [r["status"] for r in rows] == ["COMPLETED", "FAILED"]
    completed, failed = rows
    assert completed["settings"]["learning_rate"] == min(rates)
    assert failed["settings"]["learning_rate"] == max(rates)
    assert "Training diverged" in failed["reason"]
    assert failed["objective"] is None
    assert summary["best"] is completed
    table = summary["table"]
    assert "| FAILED |" in table and "Training diverged" in table
    assert table.index("| COMPLETED |") < table.index("| FAILED |")
    assert "1 of 2 trials did not complete" in caplog.text


def test_a_bug_in_a_trial_stops_the_search(small_cifar, tmp_path, monkeypatch):
    from trainers import resnet

    def broken(*args, **kwargs):
        raise TypeError("simulated bug in the model builder")

    monkeypatch.setattr(resnet, "build_model", broken)
    search_dir = tmp_path / "search"
    config = config_for(
        tiny_args(small_cifar, search_dir, "--strategy=default")
    )
    with pytest.raises(keras_tuner.errors.FatalError) as error:
        search.run_search(config, strategy=default_strategy())
    assert "simulated bug in the model builder" in str(error.value)
    assert isinstance(error.value.__cause__, TypeError)
    # Stopped at the first trial, which is not recorded as failed: the same
    # command runs it again once the bug is fixed.
    records = trial_records(search_dir)
    assert list(records) == ["0"]
    assert records["0"]["status"] == "RUNNING"
    assert not (search_dir / "results.md").exists()


def test_a_search_whose_trials_all_failed_fails_loudly(tmp_path, caplog):
    config = config_for(
        [f"--flagfile={QUICK}", f"--search_dir={tmp_path / 'search'}"]
    )
    space = search.search_space(config)
    trials = {}
    for trial_id in ("0", "1"):
        hp = keras_tuner.HyperParameters()
        space.declare(hp)
        trial = keras_tuner.engine.trial.Trial(
            hp, trial_id=trial_id, status="FAILED"
        )
        trial.message = (
            "Traceback (most recent call last):\n  ...\n"
            "keras_tuner.src.errors.FailedTrialError: Training diverged: "
            f"loss was nan at step {trial_id} of epoch 1"
        )
        trials[trial_id] = trial

    class Oracle:
        pass

    oracle = Oracle()
    oracle.trials = trials
    (tmp_path / "search").mkdir()
    with pytest.raises(results.SearchFailedError, match="No trial") as error:
        search.summarise(config, oracle)
    assert "loss was nan at step 0 of epoch 1" in str(error.value)
    assert "Trial 1 FAILED: Training diverged" in caplog.text
    table = (tmp_path / "search" / "results.md").read_text()
    assert table.count("| FAILED |") == 2
    assert not (tmp_path / "search" / "best.cfg").exists()


def test_a_missing_tensorboard_stops_the_search_before_any_trial(
    small_cifar, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "tensorboard.plugins.hparams.api", None)
    config = config_for(tiny_args(small_cifar, tmp_path / "s"))
    with pytest.raises(search.SetupError, match="pip install tensorboard"):
        search.run_search(config, strategy=default_strategy())


@pytest.mark.parametrize(
    "module, package",
    [("scipy.optimize", "scipy"), ("sklearn", "scikit-learn")],
)
def test_a_missing_bayesian_dependency_is_named(
    module, package, small_cifar, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, module, None)
    config = config_for(
        tiny_args(small_cifar, tmp_path / "s", "--tuner=bayesian")
    )
    with pytest.raises(search.SetupError, match=f"pip install {package}"):
        search.run_search(config, strategy=default_strategy())
    assert not list((tmp_path / "s").glob("trial_*"))


def test_raising_max_trials_extends_a_finished_search(resumed_search):
    # Last in this file: it adds a trial to the shared resumed search.
    CountTrials.trials_started = 0
    args = [*resumed_search["args"], "--max_trials=4"]
    summary = search.run_search(
        config_for(args), strategy=default_strategy(), callbacks=[CountTrials()]
    )
    assert CountTrials.trials_started == 1
    assert sorted(r["trial_id"] for r in summary["rows"]) == [
        "0",
        "1",
        "2",
        "3",
    ]
    assert summary["counts"] == {"COMPLETED": 4}
