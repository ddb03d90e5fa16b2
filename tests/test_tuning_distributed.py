"""tuning: keras-tuner's chief/worker mode, as separate processes.

One chief and two workers, each started with the same command as a
standalone search plus keras-tuner's environment variables, on 127.0.0.1:
a ResNet-8 search of 3 trials of 1 epoch of 2 steps on 200 real CIFAR-10
training images. Every process has a deadline and is killed if the test
fails, so a stuck search cannot hang CI.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICK = REPO / "tuning" / "configs" / "quick.cfg"
DEADLINE_SECONDS = 900
TRIAL_LINE = re.compile(
    r"Trial (\w+) finished on tuner (\w+): (\w+)(?:, val_accuracy=(\S+))?"
)


@pytest.fixture(scope="module")
def small_cifar(cifar_subset):
    """20 training and 2 test images of each class, real CIFAR-10 JPEGs."""
    return cifar_subset(train=20, test=2)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command, tuner_id, port, log_dir):
    env = dict(os.environ)
    env.update(
        KERASTUNER_TUNER_ID=tuner_id,
        KERASTUNER_ORACLE_IP="127.0.0.1",
        KERASTUNER_ORACLE_PORT=str(port),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    log = open(log_dir / f"{tuner_id}.log", "w")
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return process


def wait_all(processes, deadline):
    """Exit codes by tuner id; raises if any process outlives `deadline`."""
    codes = {}
    while len(codes) < len(processes):
        for tuner_id, process in processes.items():
            if tuner_id not in codes and process.poll() is not None:
                codes[tuner_id] = process.returncode
        if time.monotonic() > deadline:
            running = sorted(set(processes) - set(codes))
            pytest.fail(f"still running after {DEADLINE_SECONDS}s: {running}")
        time.sleep(1)
    return codes


def test_chief_and_two_workers_record_every_trial_once(small_cifar, tmp_path):
    search_dir = tmp_path / "search"
    logs = tmp_path / "logs"
    logs.mkdir()
    command = [
        sys.executable,
        "-m",
        "tuning.search",
        f"--flagfile={QUICK}",
        "--depth=8",
        "--batch_size=16",
        "--epochs=1",
        "--steps_per_epoch=2",
        "--validation_examples=32",
        "--dataset=image_folder",
        f"--image_folder={small_cifar}",
        f"--search_dir={search_dir}",
        "--tensorboard_update_freq=0",
        "--noprogress_bar",
        "--max_trials=3",
        "--vfbn_depth_max=1",
        "--num_cpu_devices=2",
        "--chief_linger_seconds=5",
        "--chief_wait_seconds=300",
    ]
    port = free_port()
    deadline = time.monotonic() + DEADLINE_SECONDS
    processes = {}
    try:
        processes["chief"] = start(command, "chief", port, logs)
        for worker in ("worker0", "worker1"):
            processes[worker] = start(command, worker, port, logs)
        codes = wait_all(processes, deadline)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    output = {t: (logs / f"{t}.log").read_text() for t in processes}
    for tuner_id, code in codes.items():
        assert code == 0, (
            f"{tuner_id} exited {code}:\n{output[tuner_id][-3000:]}"
        )

    # The chief holds the search: 3 trials, each completed once.
    summary = json.loads((search_dir / "results.json").read_text())
    ids = sorted(t["trial_id"] for t in summary["trials"])
    assert ids == ["0", "1", "2"]
    assert summary["counts"] == {"COMPLETED": 3}
    records = [
        json.loads(p.read_text())
        for p in sorted(search_dir.glob("trial_*/trial.json"))
    ]
    assert sorted(r["trial_id"] for r in records) == ids
    assert all(r["status"] == "COMPLETED" for r in records)
    assert all(0 <= r["score"] <= 1 for r in records)
    assert re.search(
        r"tuner=random trials=3 completed=3 best_trial=\d", output["chief"]
    )
    assert (search_dir / "results.md").read_text().count("| COMPLETED |") == 3
    assert "--method=vfbn" in (search_dir / "best.cfg").read_text()

    # The workers trained them, each trial on exactly one worker, and both
    # workers took a share; the chief trained none.
    assert not TRIAL_LINE.search(output["chief"])
    ran = []
    for worker in ("worker0", "worker1"):
        lines = TRIAL_LINE.findall(output[worker])
        assert lines, f"{worker} ran no trial:\n{output[worker][-3000:]}"
        assert all(t == worker and s == "COMPLETED" for _, t, s, _ in lines)
        ran += [(trial_id, float(score)) for trial_id, _, _, score in lines]
    assert sorted(trial_id for trial_id, _ in ran) == ids
    # Each worker logged the score the chief recorded for its trial.
    scores = {r["trial_id"]: r["score"] for r in records}
    assert all(score == pytest.approx(scores[i], abs=1e-4) for i, score in ran)


def test_a_worker_without_a_chief_gives_up_with_a_clear_error():
    from tuning import tuners

    port = free_port()
    environ = {
        "KERASTUNER_TUNER_ID": "worker0",
        "KERASTUNER_ORACLE_IP": "127.0.0.1",
        "KERASTUNER_ORACLE_PORT": str(port),
    }
    start = time.monotonic()
    with pytest.raises(tuners.ChiefUnreachableError) as error:
        tuners.wait_for_chief(1.0, environ=environ)
    assert time.monotonic() - start < 30
    assert f"127.0.0.1:{port}" in str(error.value)
    assert "Start the chief first" in str(error.value)


def test_distributed_roles_come_from_keras_tuners_variables():
    from tuning import tuners

    assert tuners.distributed_role({}) == "standalone"
    chief = {
        "KERASTUNER_TUNER_ID": "chief",
        "KERASTUNER_ORACLE_IP": "127.0.0.1",
        "KERASTUNER_ORACLE_PORT": "8000",
    }
    assert tuners.distributed_role(chief) == "chief"
    assert tuners.distributed_role({**chief, "KERASTUNER_TUNER_ID": "w1"}) == (
        "worker"
    )
    del chief["KERASTUNER_ORACLE_PORT"]
    with pytest.raises(ValueError, match="KERASTUNER_ORACLE_PORT is not"):
        tuners.distributed_role(chief)
