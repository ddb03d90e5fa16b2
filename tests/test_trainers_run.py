"""trainers.cifar end to end on a real CIFAR-10 subset, and trainers.report.

Each method trains ResNet-8 for a few steps on a few hundred real images;
a run is killed with SIGKILL and resumed; the report reads the runs.
"""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import keras
import pytest
from absl import flags

from trainers import cifar, report, resnet

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICK = REPO / "trainers" / "configs" / "quick.cfg"
RESULT_KEYS = {
    "method", "depth", "cuts", "vfbn_depth", "alpha_gs", "seed",
    "test_accuracy", "test_error", "test_loss", "wall_time_s",
    "train_time_s", "epochs", "resumed_from_epoch", "steps_per_epoch",
    "total_steps", "batch_size", "replicas", "strategy", "dataset",
    "train_examples", "validation_examples", "test_examples", "parameters",
    "final_epoch_metrics", "boundary_diagnostics",
}  # fmt: skip


@pytest.fixture(scope="module")
def small_cifar(cifar_subset):
    """24 training and 8 test images of each class, real CIFAR-10 JPEGs."""
    return cifar_subset(train=24, test=8)


def tiny_args(image_folder, model_dir, *extra):
    return [
        f"--flagfile={QUICK}",
        "--depth=8",
        "--batch_size=32",
        "--epochs=2",
        "--steps_per_epoch=2",
        "--validation_examples=32",
        "--dataset=image_folder",
        f"--image_folder={image_folder}",
        f"--model_dir={model_dir}",
        "--tensorboard_update_freq=1",
        "--noprogress_bar",
        *extra,
    ]


def run_trainer(args):
    fv = flags.FlagValues()
    cifar.define_flags(fv)
    rest = fv(["trainer", *args])
    cifar.check_positional_arguments(rest)
    return cifar.run_from_flags(fv)


@pytest.fixture(scope="module")
def method_runs(small_cifar, tmp_path_factory):
    """One tiny run of every method; returns {method: run_dir}."""
    base = tmp_path_factory.mktemp("runs")
    runs = {}
    for method in resnet.METHODS:
        keras.backend.clear_session()
        run_dir = base / method
        run_trainer(tiny_args(small_cifar, run_dir, f"--method={method}"))
        runs[method] = run_dir
    return runs


@pytest.mark.parametrize("method", resnet.METHODS)
def test_each_method_writes_every_output(method_runs, method):
    run_dir = method_runs[method]
    # The effective flags relaunch the same run.
    text = (run_dir / "flags.cfg").read_text()
    assert f"--method={method}" in text
    assert f"--model_dir={run_dir}" in text
    fv = flags.FlagValues()
    cifar.define_flags(fv)
    fv(["trainer", f"--flagfile={run_dir / 'flags.cfg'}"])
    assert cifar.config_from_flags(fv).depth == 8

    assert (run_dir / "checkpoints" / "last.weights.h5").is_file()
    assert (run_dir / "backup" / "training_metadata.json").is_file()
    assert (run_dir / "model.keras").is_file()
    assert list((run_dir / "tensorboard" / "train").glob("events.*"))
    assert list((run_dir / "tensorboard" / "validation").glob("events.*"))

    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    accuracy = "val_logits_accuracy" if method == "local" else "val_accuracy"
    assert accuracy in rows[0]

    results = json.loads((run_dir / "results.json").read_text())
    assert set(results) == RESULT_KEYS
    assert results["method"] == method
    assert results["test_examples"] == 80
    assert results["validation_examples"] == 32
    assert 0 <= results["test_accuracy"] <= 1
    assert results["test_error"] == pytest.approx(
        100 * (1 - results["test_accuracy"])
    )
    assert results["wall_time_s"] > 0

    if method in resnet.SYNTHETIC_GRADIENT_METHODS:
        assert "boundary1_cosine" in rows[0]
        assert "boundary1_sg_loss" in rows[0]
        cosine = report.read_step_scalars(run_dir)["boundary1_cosine"]
        assert [step for step, _ in cosine] == [1, 2, 3, 4]
        assert "boundary1_cosine" in results["boundary_diagnostics"]
    else:
        assert not results["boundary_diagnostics"]


def test_saved_model_reloads_with_equal_predictions(method_runs):
    import numpy as np

    run_dir = method_runs["vfbn"]
    model = keras.models.load_model(run_dir / "model.keras")
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3))
    x = x.astype("float32")
    again = keras.models.load_model(run_dir / "model.keras")
    np.testing.assert_allclose(
        model.predict(x, verbose=0), again.predict(x, verbose=0), atol=1e-6
    )
    assert [b.name for b in model.boundaries] == ["boundary1"]


def test_report_table_and_figures(method_runs, tmp_path):
    table, out = report.write_report(
        [str(p) for p in method_runs.values()], tmp_path / "report"
    )
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(resnet.METHODS)
    assert "backprop (whole network)" in table
    assert "VFBN, alpha_gs = 0" in table
    assert (out / "report.md").read_text().count("|") > 20
    for name in ("error_vs_epoch.png", "cosine_vs_step.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_mean_and_spread_over_seeds(tmp_path):
    for seed, error in ((0, 10.0), (1, 12.0), (2, 14.0)):
        run = tmp_path / f"bp-{seed}"
        run.mkdir()
        (run / "flags.cfg").write_text("--method=bp\n--depth=20\n")
        (run / "results.json").write_text(json.dumps({
            "method": "bp", "depth": 20, "alpha_gs": None,
            "vfbn_depth": None, "test_error": error, "wall_time_s": 1.0,
            "boundary_diagnostics": {},
        }))  # fmt: skip
    table, _ = report.write_report(sorted(tmp_path.glob("bp-*")))
    assert "| backprop (whole network) | 12.00 ± 2.00 | 3 |" in table


def test_report_of_runs_that_never_finished_is_an_error(tmp_path):
    run = tmp_path / "bp-0"
    run.mkdir()
    (run / "flags.cfg").write_text("--method=bp\n--depth=20\n")
    with pytest.raises(FileNotFoundError, match="None of the run dir"):
        report.write_report([run], tmp_path / "report")
    assert not (tmp_path / "report" / "report.md").exists()


def test_mirrored_strategy_on_two_logical_cpus(small_cifar, tmp_path):
    results = run_trainer(
        tiny_args(
            small_cifar,
            tmp_path / "run",
            "--method=vfbn",
            "--strategy=mirrored",
            "--num_cpu_devices=2",
            "--epochs=1",
        )
    )
    assert results["replicas"] == 2
    cosine = results["boundary_diagnostics"]["boundary1_cosine"]
    assert -1 <= cosine <= 1
    assert 0 < results["final_epoch_metrics"]["loss"] < 10


def test_a_second_mirrored_run_in_one_process_reuses_the_strategy(
    small_cifar, tmp_path, mirrored_strategy
):
    # A second MirroredStrategy over the same devices would abort the
    # all-reduces of the first; the trainer hands out one per process.
    assert cifar.make_strategy("mirrored", 2) is mirrored_strategy
    for name in ("first", "second"):
        results = run_trainer(
            tiny_args(
                small_cifar,
                tmp_path / name,
                "--method=bp",
                "--strategy=mirrored",
                "--num_cpu_devices=2",
                "--epochs=1",
            )
        )
        assert results["replicas"] == 2
    with mirrored_strategy.scope():
        value = mirrored_strategy.reduce(
            "SUM",
            mirrored_strategy.run(lambda: keras.ops.ones((3,))),
            axis=None,
        )
    assert float(keras.ops.sum(value)) == 6.0


def test_killed_run_resumes_at_the_next_epoch(small_cifar, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_args(
        small_cifar, run_dir, "--method=vfbn", "--epochs=3",
        "--steps_per_epoch=6", "--tensorboard_update_freq=0",
    )  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-m", "trainers.cifar", *args]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metadata = run_dir / "backup" / "training_metadata.json"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if metadata.exists():
                try:
                    if json.loads(metadata.read_text())["epoch"] >= 1:
                        break
                except (ValueError, KeyError):
                    pass
            time.sleep(0.02)
        assert process.poll() is None, "run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not (run_dir / "results.json").exists()
    done = json.loads(metadata.read_text())["epoch"]
    assert 1 <= done < 3

    # The same command again (here through the run's own flags.cfg).
    result = subprocess.run(
        [sys.executable, "-m", "trainers.cifar",
         f"--flagfile={run_dir / 'flags.cfg'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"after epoch {done} of 3" in result.stderr
    assert "test_accuracy=" in result.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results) == RESULT_KEYS
    assert results["resumed_from_epoch"] == done
    with open(run_dir / "metrics.csv") as f:
        epochs = [row["epoch"] for row in csv.DictReader(f)]
    assert epochs[-(3 - done) :] == [str(e) for e in range(done, 3)]
    assert sorted(set(epochs)) == ["0", "1", "2"]


def test_multi_worker_strategy_from_tf_config(small_cifar, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    tf_config = {
        "cluster": {"worker": [f"localhost:{port}"]},
        "task": {"type": "worker", "index": 0},
    }
    run_dir = tmp_path / "run"
    args = tiny_args(
        small_cifar, run_dir, "--strategy=multi_worker", "--epochs=1"
    )
    env = dict(
        os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_CONFIG=json.dumps(tf_config)
    )
    result = subprocess.run(
        [sys.executable, "-m", "trainers.cifar", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["strategy"] == "multi_worker"
    assert results["replicas"] == 1


def test_window_means_undo_keras_running_means():
    # Per-step values 1..6 in epochs of 3 steps, logged every step and
    # every 2 steps, as Keras's running means within each epoch.
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    running = [1.0, 1.5, 2.0, 4.0, 4.5, 5.0]
    points = list(zip(range(1, 7), running))
    assert report.window_means(points, 3) == list(zip(range(1, 7), values))
    every_other = [p for p in points if p[0] % 2 == 0]
    assert report.window_means(every_other, 3) == [
        (2, 1.5),
        (4, 4.0),
        (6, 5.5),
    ]
