"""Training-step time and peak memory of synthetic gradients against backprop.

    python -m benchmarks.step_cost

builds the CIFAR ResNets of `trainers.resnet.build_model`, cut in the
middle, once per method (`bp`, `dni_linear`, `dni_resnet`, VFBN of depth
0, 1 and 2), compiled as the trainer compiles them
(`trainers.cifar.compile_model`), and times their training step on a
fixed batch: each method in its own process (`benchmarks.timing.InProcess`,
so no method inherits another's memory or thread pools), steps run in
alternation after warm-up (`benchmarks.timing.interleave`), medians, and
every ratio to `bp` taken in the same run. With `--torch` the same
ResNet's backprop step in PyTorch (`benchmarks.torch_resnet`) joins the
alternation, so the ratio of our `bp` to PyTorch's is measured side by
side too. Inference (`predict_on_batch`) of a model with a boundary is
timed against the same model without one.

Memory is each process's peak resident set (VmHWM): `peak` is the whole
process (interpreter, frameworks, graph tracing included), `step` is the
peak minus the resident set after the model was built and compiled,
i.e. what training steps added.

Writes `step_cost.json` and `step_cost.md` to `--output_dir`.
"""

import json
import os
import pathlib
import time

from absl import app, flags, logging

# Name -> build_model arguments.
METHODS = {
    "bp": {"method": "bp"},
    "dni_linear": {"method": "dni_linear"},
    "dni_resnet": {"method": "dni_resnet"},
    "vfbn_d0": {"method": "vfbn", "vfbn_depth": 0},
    "vfbn_d1": {"method": "vfbn", "vfbn_depth": 1},
    "vfbn_d2": {"method": "vfbn", "vfbn_depth": 2},
}
# Targets of the step-time ratio to `bp`, by method and depth.
TARGETS = {
    ("vfbn_d2", 110): 1.10,
    ("vfbn_d2", 20): 1.25,
    ("dni_linear", 110): 1.05,
    ("dni_linear", 20): 1.05,
}
TORCH_TARGET = 1.2

FLAGS = flags.FLAGS


def define_flags():
    """Defines this script's flags (parses nothing)."""
    flags.DEFINE_list("depths", ["20", "110"], "ResNet depths, 6n+2.")
    flags.DEFINE_list(
        "methods",
        list(METHODS),
        f"Training methods to time, from: {', '.join(METHODS)}.",
    )
    flags.DEFINE_integer("batch_size", 128, "Examples per step.")
    flags.DEFINE_integer("rounds", 12, "Timed steps of every method.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps of every method first.")
    flags.DEFINE_integer(
        "threads",
        0,
        "Intra-op threads of every process, TensorFlow's and PyTorch's "
        "alike (0: each framework's default, all cores). With 1, each "
        "method computes on one core, which compares the frameworks' "
        "arithmetic when other jobs keep a core busy: PyTorch's OpenMP "
        "threads wait for the slowest of them at every op, so a shared "
        "core slows its multi-threaded step far more than TensorFlow's.",
        lower_bound=0,
    )
    flags.DEFINE_boolean(
        "torch",
        True,
        "Also time the same backprop step in PyTorch (needs the `bench` "
        "extra).",
    )
    flags.DEFINE_list(
        "inference_methods",
        ["vfbn_d2", "dni_linear"],
        "Models with boundaries whose predict_on_batch is timed against "
        "bp's (empty: no inference timing).",
    )
    flags.DEFINE_string(
        "output_dir",
        "benchmarks/results",
        "Directory for step_cost.json and step_cost.md.",
    )


def _memory_kib():
    """`(VmRSS, VmHWM)` of this process in KiB (0 where unreadable)."""
    values = {"VmRSS:": 0, "VmHWM:": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(maxsplit=1)[0] if line.strip() else ""
                if key in values:
                    values[key] = int(line.split()[1])
    except OSError:
        pass
    return values["VmRSS:"], values["VmHWM:"]


def _set_tf_threads(threads):
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def _keras_model(depth, method, batch_size, threads=0):
    import keras
    import numpy as np
    import tensorflow as tf

    from trainers import cifar, resnet

    _set_tf_threads(threads)

    keras.utils.set_random_seed(0)
    model = resnet.build_model(depth, **METHODS[method])
    cifar.compile_model(model, cifar.make_optimizer(0.1))
    rng = np.random.default_rng(0)
    images = tf.constant(rng.standard_normal((batch_size, 32, 32, 3), "f4"))
    labels = tf.constant(rng.integers(0, 10, batch_size), tf.int32)
    return model, images, labels


def keras_train_step(depth, method, batch_size, threads=0):
    """Builds one method's model; returns a function running one step.

    The step is the function `fit` runs (`model.train_function`) on a
    fixed batch repeated by `tf.data`, so it measures model, loss and
    optimizers only. It returns `{"loss", "built_kib", "peak_kib"}`.
    """
    import tensorflow as tf

    model, images, labels = _keras_model(depth, method, batch_size, threads)
    iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
    model.make_train_function()
    built_kib = _memory_kib()[0]

    def step():
        logs = model.train_function(iterator)
        return {
            "loss": float(logs["loss"]),
            "built_kib": built_kib,
            "peak_kib": _memory_kib()[1],
        }

    return step


def keras_predict_step(depth, method, batch_size, threads=0):
    """Builds one method's model; returns a function predicting a batch."""
    model, images, _ = _keras_model(depth, method, batch_size, threads)
    built_kib = _memory_kib()[0]

    def step():
        model.predict_on_batch(images)
        return {"built_kib": built_kib, "peak_kib": _memory_kib()[1]}

    return step


def torch_train_step(depth, batch_size, threads=0):
    """The same ResNet's backprop step in PyTorch (see `torch_resnet`)."""
    import torch

    from benchmarks import torch_resnet

    if threads:
        torch.set_num_threads(threads)
    step_fn = torch_resnet.make_train_step(
        n=(depth - 2) // 6, batch_size=batch_size
    )
    built_kib = _memory_kib()[0]

    def step():
        return {
            "loss": step_fn(),
            "built_kib": built_kib,
            "peak_kib": _memory_kib()[1],
        }

    return step


def _call(factory, args):
    return factory(*args)


def time_group(factories, rounds, warmup, separate_processes=True):
    """Times steps built in their own processes, interleaved.

    Args:
        factories: dict from name to `(factory, args)`.
        rounds: timed steps of each.
        warmup: untimed steps of each first.
        separate_processes: build each step in a process of its own. If
            False, all are built in this process (quick checks only: the
            memory figures are then shared and cumulative).

    Returns:
        A dict from name to `{"timing": Timing, "memory": last step's
        return value}`.
    """
    from benchmarks import timing

    steps = {}
    try:
        for name, (factory, args) in factories.items():
            logging.info("Building %s", name)
            if separate_processes:
                steps[name] = timing.InProcess(
                    _call, factory, args, env={"TF_CPP_MIN_LOG_LEVEL": "2"}
                )
            else:
                steps[name] = factory(*args)
        results = timing.interleave(steps, rounds=rounds, warmup=warmup)
        memory = {name: step() for name, step in steps.items()}
    finally:
        for step in steps.values():
            if hasattr(step, "close"):
                step.close()
    return {
        name: {"timing": results[name], "memory": memory[name]}
        for name in factories
    }


def _median_or_none(values):
    import statistics

    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _timing_row(name, result, reference, paired):
    t = result["timing"]
    memory = result["memory"]
    peak = memory["peak_kib"] / 1024
    step_mib = (memory["peak_kib"] - memory["built_kib"]) / 1024
    return {
        "method": name,
        "median_ms": t.median * 1e3,
        "q1_ms": t.q1 * 1e3,
        "q3_ms": t.q3 * 1e3,
        "spread": t.spread,
        "ratio": t.median / reference.median,
        "paired_ratio": paired[name][0],
        "paired_q1": paired[name][1],
        "paired_q3": paired[name][2],
        "peak_mib": peak,
        "step_mib": step_mib,
        "samples_ms": [s * 1e3 for s in t.samples],
        "other_load": list(t.others),
        "other_load_median": _median_or_none(t.others),
    }


def measure_depth(
    depth,
    methods,
    batch_size,
    rounds,
    warmup,
    torch,
    separate_processes=True,
    threads=0,
):
    """Training-step timings of one depth; returns JSON rows."""
    from benchmarks import timing

    factories = {
        m: (keras_train_step, (depth, m, batch_size, threads)) for m in methods
    }
    if torch:
        factories["torch_bp"] = (torch_train_step, (depth, batch_size, threads))
    load = os.getloadavg()
    results = time_group(factories, rounds, warmup, separate_processes)
    timings = {name: r["timing"] for name, r in results.items()}
    reference = "bp" if "bp" in timings else next(iter(timings))
    paired = timing.paired_ratios(timings, reference)
    rows = [
        _timing_row(name, results[name], timings[reference], paired)
        for name in results
    ]
    for row in rows:
        row["memory_ratio"] = (
            row["peak_mib"] / rows[0]["peak_mib"] if rows else None
        )
        row["target"] = TARGETS.get((row["method"], depth))
    torch_ratio = None
    if torch and "bp" in timings:
        torch_paired = timing.paired_ratios(timings, "torch_bp")
        torch_ratio = {
            "ratio": timings["bp"].median / timings["torch_bp"].median,
            "paired_ratio": torch_paired["bp"][0],
            "target": TORCH_TARGET,
        }
    return {
        "depth": depth,
        "batch_size": batch_size,
        "rounds": rounds,
        "warmup": warmup,
        "loadavg_start": load,
        "loadavg_end": os.getloadavg(),
        "train": rows,
        "bp_vs_torch": torch_ratio,
    }


def measure_inference(
    depth,
    methods,
    batch_size,
    rounds,
    warmup,
    separate_processes=True,
    threads=0,
):
    """`predict_on_batch` with boundaries against without; JSON rows."""
    from benchmarks import timing

    args = (batch_size, threads)
    factories = {"bp": (keras_predict_step, (depth, "bp") + args)}
    for m in methods:
        factories[m] = (keras_predict_step, (depth, m) + args)
    load = os.getloadavg()
    results = time_group(factories, rounds, warmup, separate_processes)
    timings = {name: r["timing"] for name, r in results.items()}
    paired = timing.paired_ratios(timings, "bp")
    return {
        "depth": depth,
        "loadavg_start": load,
        "loadavg_end": os.getloadavg(),
        "predict": [
            _timing_row(name, results[name], timings["bp"], paired)
            for name in results
        ],
    }


def _cores(value):
    return "-" if value is None else f"{value:.1f}"


def format_markdown(report):
    """The report as Markdown tables."""
    lines = [
        f"Measured {report['date']} on {report['cpu_count']} CPU cores "
        f"(load average at start {report['loadavg'][0]:.1f}), batch "
        f"{report['batch_size']}, "
        f"{report.get('threads') or 'default'} intra-op threads, "
        f"{report['rounds']} interleaved rounds "
        f"after {report['warmup']} warm-up steps; ratios to `bp` of the "
        "same run (ratio of medians; paired: median of per-round ratios). "
        "Memory: peak resident set of the method's process, and what the "
        "steps added to it after the model was built. Other load: median "
        "CPU (cores) that processes outside the benchmark used during the "
        "method's timed steps.",
        "",
    ]
    for entry in report["depths"]:
        depth = entry["depth"]
        lines += [
            f"**ResNet-{depth}** (load {entry['loadavg_start'][0]:.1f} -> "
            f"{entry['loadavg_end'][0]:.1f})",
            "",
            "| method | step (ms) | x bp | paired x bp | target | "
            "peak MiB | step MiB | other load |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in entry["train"]:
            target = row["target"]
            mark = ""
            if target is not None:
                met = row["paired_ratio"] <= target
                mark = f"<= {target:.2f} ({'met' if met else 'missed'})"
            lines.append(
                f"| {row['method']} | {row['median_ms']:.0f} "
                f"[{row['q1_ms']:.0f}, {row['q3_ms']:.0f}] "
                f"| {row['ratio']:.2f} | {row['paired_ratio']:.2f} "
                f"| {mark} | {row['peak_mib']:.0f} | {row['step_mib']:.0f} "
                f"| {_cores(row['other_load_median'])} |"
            )
        torch = entry.get("bp_vs_torch")
        if torch:
            met = torch["paired_ratio"] <= torch["target"]
            lines += [
                "",
                f"Our `bp` step / PyTorch's: {torch['ratio']:.2f}x "
                f"(paired {torch['paired_ratio']:.2f}x; target <= "
                f"{torch['target']:.1f}, {'met' if met else 'missed'}).",
            ]
        lines.append("")
    for entry in report.get("inference", []):
        lines += [
            f"**Inference, ResNet-{entry['depth']}** (`predict_on_batch`, "
            f"load {entry['loadavg_start'][0]:.1f})",
            "",
            "| model | predict (ms) | x bp | paired x bp |",
            "| --- | --- | --- | --- |",
        ]
        for row in entry["predict"]:
            lines.append(
                f"| {row['method']} | {row['median_ms']:.1f} | "
                f"{row['ratio']:.3f} | {row['paired_ratio']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def run(
    depths,
    methods,
    batch_size,
    rounds,
    warmup,
    torch,
    inference_methods,
    output_dir,
    separate_processes=True,
    threads=0,
):
    """Measures everything and writes JSON and Markdown; returns the dict.

    Args:
        depths: ResNet depths.
        methods: names from `METHODS` to time training steps of.
        batch_size: examples per step.
        rounds: timed steps of each method.
        warmup: untimed steps of each method first.
        torch: also time PyTorch's backprop step.
        inference_methods: names from `METHODS` whose `predict_on_batch`
            is timed against `bp`'s.
        output_dir: where `step_cost.json` and `step_cost.md` go.
        separate_processes: see `time_group`.
        threads: intra-op threads of every framework (0: their default).

    Returns:
        The report, as written to `step_cost.json`.
    """
    unknown = [
        m for m in list(methods) + list(inference_methods) if m not in METHODS
    ]
    if unknown:
        raise ValueError(
            f"Unknown methods {unknown}; expected names from {list(METHODS)}."
        )
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "batch_size": batch_size,
        "rounds": rounds,
        "warmup": warmup,
        "threads": threads,
        "depths": [],
        "inference": [],
    }
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    def write():
        (output_dir / "step_cost.json").write_text(json.dumps(report, indent=1))
        text = format_markdown(report)
        (output_dir / "step_cost.md").write_text(text)
        return text

    for depth in depths:
        logging.info("ResNet-%d: training steps", depth)
        report["depths"].append(
            measure_depth(
                depth,
                methods,
                batch_size,
                rounds,
                warmup,
                torch,
                separate_processes,
                threads,
            )
        )
        write()
    for depth in depths if inference_methods else ():
        logging.info("ResNet-%d: inference", depth)
        report["inference"].append(
            measure_inference(
                depth,
                inference_methods,
                batch_size,
                rounds,
                warmup,
                separate_processes,
                threads,
            )
        )
        write()
    print(write())
    return report


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run(
        depths=[int(d) for d in FLAGS.depths],
        methods=FLAGS.methods,
        batch_size=FLAGS.batch_size,
        rounds=FLAGS.rounds,
        warmup=FLAGS.warmup,
        torch=FLAGS.torch,
        inference_methods=FLAGS.inference_methods,
        output_dir=FLAGS.output_dir,
        threads=FLAGS.threads,
    )


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    define_flags()
    app.run(main)
