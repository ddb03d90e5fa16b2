"""The benchmark harness and the PyTorch/Keras ResNet twins."""

import time

import pytest

from benchmarks import timing


def _sleeper(seconds):
    return lambda: time.sleep(seconds)


def _make_counter(start):
    state = [start]

    def step():
        state[0] += 1
        return state[0]

    return step


def _allocate(mebibytes):
    block = bytearray(mebibytes * 1024 * 1024)
    return len(block)


def _nothing():
    return 0


def test_interleave_runs_in_alternation_and_orders_medians():
    calls = []
    steps = {
        "fast": lambda: (calls.append("fast"), time.sleep(0.001)),
        "slow": lambda: (calls.append("slow"), time.sleep(0.01)),
    }
    results = timing.interleave(steps, rounds=5, warmup=1)
    assert calls == ["fast", "slow"] * 6
    assert list(results) == ["fast", "slow"]
    assert len(results["fast"].samples) == 5
    assert results["slow"].median > results["fast"].median
    assert timing.ratios(results, "fast")["slow"] > 2
    assert "fast" in timing.format_table(results, "fast")


def test_interleave_records_other_load_per_sample():
    results = timing.interleave({"a": _sleeper(0.001)}, rounds=3, warmup=0)
    assert len(results["a"].others) == 3
    quiet = timing.quiet_rounds(results, max_others=float("inf"))
    assert quiet["a"].samples == results["a"].samples


def test_interleave_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        timing.interleave({})
    with pytest.raises(ValueError, match="rounds=0"):
        timing.interleave({"a": _nothing}, rounds=0)


def test_in_process_step_keeps_state_and_reports_errors():
    with timing.InProcess(_make_counter, 10, env={"X_BENCH": "1"}) as step:
        assert step() == 11
        assert step() == 12
    with pytest.raises(RuntimeError, match="failed in its process"):
        timing.InProcess(_make_counter, "not a number")()


def test_peak_rss_sees_a_large_allocation():
    base, _ = timing.peak_rss(_nothing)
    peak, result = timing.peak_rss(_allocate, 200)
    assert result == 200 * 1024 * 1024
    assert peak - base > 150


@pytest.mark.parametrize("n, trainable, moving", [(3, 269722, 1376)])
def test_torch_and_keras_resnets_have_equal_parameter_counts(
    n, trainable, moving
):
    pytest.importorskip("torch")
    from benchmarks import torch_resnet
    from trainers import resnet

    model = resnet.build_model(6 * n + 2)
    keras_counts = (
        sum(int(w.numpy().size) for w in model.trainable_weights),
        sum(int(w.numpy().size) for w in model.non_trainable_weights),
    )
    torch_counts = torch_resnet.count_params(torch_resnet.resnet(n))
    assert keras_counts == torch_counts == (trainable, moving)
