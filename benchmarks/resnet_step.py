"""Step factories and a driver comparing Keras and PyTorch ResNet steps.

Each factory builds a model and returns a zero-argument function running
training steps on it; `benchmarks.timing.InProcess` runs each factory in
its own process, so thread settings and environment variables can differ
between methods measured side by side.

    python -m benchmarks.resnet_step --rounds 15 baseline threads bn

runs the named experiment groups (see `EXPERIMENTS`) and prints medians,
spreads and ratios to the PyTorch step of the same run.
"""

import argparse
import os
import time

BATCH = 128


def torch_factory(n=3, channels_last=False, threads=None):
    """PyTorch ResNet-(6n+2) step (see `benchmarks.torch_resnet`)."""
    import torch

    from benchmarks import torch_resnet

    if threads:
        torch.set_num_threads(threads)
    return torch_resnet.make_train_step(
        n=n, batch_size=BATCH, channels_last=channels_last
    )


def keras_factory(
    n=3,
    mode="fit",
    batch_norm="keras",
    weight_decay="l2",
    data="tensor",
    jit_compile=False,
    steps_per_execution=1,
    intra_op=None,
    inter_op=None,
    logical_devices=1,
    calls=1,
    report=None,
):
    """Keras ResNet-(6n+2) step, in one of several ways of running it.

    Args:
        n: basic blocks per stage.
        mode: "fit" runs the function `model.fit` runs each step
            (`model.train_function` on a dataset iterator); "fit_loop"
            runs `model.fit` itself for 10 steps a call (callbacks and
            progress bookkeeping included); "custom" runs a hand-written
            `tf.function` step on the same layers, loss and optimizer.
        batch_norm: "keras" for the trainer's model as it is
            (`trainers.resnet.build_model`), "fused" for the same model
            with `benchmarks.fused_bn.FusedBatchNormalization`.
        weight_decay: "l2" for `kernel_regularizer=L2(5e-5)` on kernels,
            "optimizer" for `SGD(weight_decay=1e-4)` (decoupled, all
            weights), "none".
        data: "tensor" repeats one batch already in memory on the device
            (`from_tensors(...).repeat()`); "pipeline" slices batches
            from 50,000 in-memory images with `tf.data`, shuffling and
            prefetching (AUTOTUNE); "augment" adds the recipe's 4-pixel
            pad, random crop and flip to "pipeline" (parallel map);
            "numpy" passes the NumPy arrays to `model.fit` (mode "fit_loop"
            only) and lets Keras batch them.
        jit_compile: compile the step with XLA.
        steps_per_execution: steps per call of the train function; the
            returned function then runs that many steps.
        intra_op: `tf.config.threading` intra-op threads (None: default).
        inter_op: `tf.config.threading` inter-op threads (None: default).
        logical_devices: split the CPU into this many logical devices, as
            the test suite does (the model runs on the first).
        calls: for modes "fit" and "custom", calls of the train function
            per step call, so that methods that run several steps per
            call can be compared at equal call lengths.
        report: if "traces", the step returns how often the step function
            was traced so far instead of the loss.

    Returns:
        A zero-argument function running `steps_per_execution` steps (10
        for "fit_loop") and returning the last loss.
    """
    import tensorflow as tf

    if intra_op is not None:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    if inter_op is not None:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    if logical_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * logical_devices
        )
    import keras
    import numpy as np

    from benchmarks import fused_bn
    from trainers import resnet

    keras.utils.set_random_seed(0)
    model = resnet.build_model(
        6 * n + 2, weight_decay=1e-4 if weight_decay == "l2" else 0.0
    )
    if batch_norm == "fused":
        model = fused_bn.with_fused_batch_norm(model)
    optimizer = keras.optimizers.SGD(
        0.1,
        momentum=0.9,
        weight_decay=1e-4 if weight_decay == "optimizer" else None,
    )
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(0)
    if data == "tensor":
        images = tf.constant(rng.standard_normal((BATCH, 32, 32, 3), "f4"))
        labels = tf.constant(rng.integers(0, 10, BATCH), tf.int32)
        dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    else:
        all_images = rng.standard_normal((50_000, 32, 32, 3), "f4")
        all_labels = rng.integers(0, 10, 50_000).astype("i4")
        dataset = (
            tf.data.Dataset.from_tensor_slices((all_images, all_labels))
            .shuffle(10_000)
            .repeat()
        )
        if data == "augment":
            dataset = dataset.map(_augment, tf.data.AUTOTUNE)
        dataset = dataset.batch(BATCH, drop_remainder=True).prefetch(
            tf.data.AUTOTUNE
        )
    traces = [0]

    if mode == "custom":
        variables = model.trainable_variables

        def step_fn(x, y):
            traces[0] += 1
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = loss_fn(y, logits)
                if model.losses:
                    loss = loss + tf.add_n(model.losses)
            grads = tape.gradient(loss, variables)
            optimizer.apply(grads, variables)
            return loss

        step_fn = tf.function(step_fn, jit_compile=jit_compile)
        iterator = iter(dataset)

        @tf.function
        def run(iterator):
            loss = tf.constant(0.0)
            for _ in tf.range(steps_per_execution):
                loss = step_fn(*next(iterator))
            return loss

        if steps_per_execution == 1:

            def step():
                for _ in range(calls):
                    loss = step_fn(*next(iterator))
                return traces[0] if report == "traces" else float(loss)

        else:

            def step():
                loss = run(iterator)
                return traces[0] if report == "traces" else float(loss)

        return step

    model.compile(
        optimizer=optimizer,
        loss=loss_fn,
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    original = model.train_step

    def counted_train_step(data):
        traces[0] += 1
        return original(data)

    model.train_step = counted_train_step
    if mode == "fit_loop":
        fit_args = dict(x=dataset)
        if data == "numpy":
            fit_args = dict(
                x=all_images[:1280], y=all_labels[:1280], batch_size=BATCH
            )

        def step():
            history = model.fit(**fit_args, steps_per_epoch=10, verbose=0)
            loss = history.history["loss"][-1]
            return traces[0] if report == "traces" else loss

        return step

    model.make_train_function()
    iterator = iter(dataset)

    def step():
        for _ in range(calls):
            logs = model.train_function(iterator)
        loss = float(logs["loss"])
        return traces[0] if report == "traces" else loss

    return step


def _augment(images, labels):
    """The recipe's augmentation of one image: pad 4, crop 32x32, flip."""
    import tensorflow as tf

    padded = tf.pad(images, [[4, 4], [4, 4], [0, 0]])
    cropped = tf.image.random_crop(padded, [32, 32, 3])
    return tf.image.random_flip_left_right(cropped), labels


def _k(**kwargs):
    return (keras_factory, kwargs, {})


def _t(**kwargs):
    return (torch_factory, kwargs, {})


# Each group: name -> (factory, kwargs, environment). Every group has the
# PyTorch step and the current Keras default, so each run carries its own
# reference. Steps that do several steps a call carry "per_call".
EXPERIMENTS = {
    "baseline": {
        "torch": _t(),
        "keras_fit": _k(),
        "keras_custom": _k(mode="custom"),
    },
    "threads": {
        "torch": _t(),
        "keras_fit": _k(),
        "intra2_inter1": _k(intra_op=2, inter_op=1),
        "intra1_inter2": _k(intra_op=1, inter_op=2),
        "intra2_inter2": _k(intra_op=2, inter_op=2),
    },
    "onednn": {
        "torch": _t(),
        "keras_fit": _k(),
        "onednn_off": (
            keras_factory,
            {},
            {"TF_ENABLE_ONEDNN_OPTS": "0"},
        ),
    },
    "bn": {
        "torch": _t(),
        "keras_fit": _k(),
        "fused_bn": _k(batch_norm="fused"),
    },
    "data": {
        "torch": _t(),
        "keras_fit": _k(),
        "pipeline": _k(data="pipeline"),
        "augment": _k(data="augment"),
        "fit_numpy": _k(mode="fit_loop", data="numpy"),
        "two_devices": _k(logical_devices=2),
    },
    "decay": {
        "torch": _t(),
        "keras_fit": _k(),
        "wd_optimizer": _k(weight_decay="optimizer"),
        "wd_none": _k(weight_decay="none"),
    },
    "loop": {
        "torch": _t(),
        "keras_fit": _k(),
        "keras_custom": _k(mode="custom"),
        "fit_loop": _k(mode="fit_loop"),
        "spe10": _k(steps_per_execution=10),
    },
    "xla": {
        "torch": _t(),
        "keras_fit": _k(),
        "jit": _k(jit_compile=True),
        "fused_jit": _k(batch_norm="fused", jit_compile=True),
    },
    "loop10": {
        "keras_fit": _k(calls=10),
        "keras_custom": _k(mode="custom", calls=10),
        "fit_loop": _k(mode="fit_loop"),
        "spe10": _k(steps_per_execution=10),
    },
    "final": {
        "torch": _t(),
        "torch_passive": (torch_factory, {}, {"OMP_WAIT_POLICY": "PASSIVE"}),
        "keras_fit": _k(),
        "fused_bn": _k(batch_norm="fused"),
    },
    # One intra-op thread each: compares the frameworks' arithmetic while
    # other jobs keep a core busy (see `benchmarks.step_cost --threads`).
    "one_thread": {
        "torch": _t(threads=1),
        "keras_fit": _k(intra_op=1, inter_op=1),
        "fused_bn": _k(batch_norm="fused", intra_op=1, inter_op=1),
    },
    "one_thread_causes": {
        "torch": _t(threads=1),
        "keras_fit": _k(intra_op=1, inter_op=1),
        "keras_custom": _k(mode="custom", intra_op=1, inter_op=1),
        "wd_none": _k(weight_decay="none", intra_op=1, inter_op=1),
        "jit": _k(jit_compile=True, intra_op=1, inter_op=1),
        "onednn_off": (
            keras_factory,
            {"intra_op": 1, "inter_op": 1},
            {"TF_ENABLE_ONEDNN_OPTS": "0"},
        ),
    },
    "layout": {
        "torch": _t(),
        "torch_nhwc": _t(channels_last=True),
        "keras_fit": _k(),
    },
}


def per_step(name, spec, timing):
    """Per-step seconds of one method's median (calls may run several)."""
    _, kwargs, _ = spec
    if kwargs.get("mode") == "fit_loop":
        return timing.median / 10
    return timing.median / (
        kwargs.get("steps_per_execution", 1) * kwargs.get("calls", 1)
    )


def run_group(methods, rounds, warmup):
    from benchmarks import timing

    steps = {}
    try:
        for name, (factory, kwargs, env) in methods.items():
            steps[name] = timing.InProcess(_call, factory, kwargs, env=env)
        results = timing.interleave(steps, rounds=rounds, warmup=warmup)
    finally:
        for step in steps.values():
            step.close()
    return results


def _call(factory, kwargs):
    return factory(**kwargs)


def main(argv=None):
    from benchmarks import timing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", default=["baseline"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument(
        "--max_others",
        type=float,
        default=0.25,
        help="Also report rounds where other processes used at most this "
        "many cores.",
    )
    parser.add_argument(
        "--samples", action="store_true", help="Print every sample."
    )
    parser.add_argument(
        "--no_torch",
        action="store_true",
        help="Leave out the PyTorch step; ratios are then to keras_fit.",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for group in args.groups:
        methods = {
            name: (factory, dict(kwargs, n=args.n), env)
            for name, (factory, kwargs, env) in EXPERIMENTS[group].items()
            if not (args.no_torch and name.startswith("torch"))
        }
        start = time.perf_counter()
        results = run_group(methods, args.rounds, args.warmup)
        print(
            f"== {group} (n={args.n}, {args.rounds} rounds, "
            f"{time.perf_counter() - start:.0f} s)"
        )
        report(methods, results, "all rounds", args.samples)
        quiet = timing.quiet_rounds(results, args.max_others)
        if quiet:
            kept = len(next(iter(quiet.values())).samples)
            report(
                methods,
                quiet,
                f"{kept} rounds with other load <= {args.max_others} cores",
                False,
            )
        print(flush=True)


def report(methods, results, title, samples):
    from benchmarks import timing

    reference = "torch" if "torch" in results else "keras_fit"
    base = per_step(reference, methods[reference], results[reference])
    paired = timing.paired_ratios(results, reference)
    print(
        f"-- {title}; ratios to {reference}: of medians, and per round "
        "(median [q1, q3])"
    )
    for name, result in results.items():
        step = per_step(name, methods[name], result)
        scale = step / result.median / (base / results[reference].median)
        mid, low, high = (r * scale for r in paired[name])
        print(
            f"{name:<16} {step * 1e3:7.1f} ms/step  spread "
            f"{result.spread:4.0%}  {step / base:.2f}x  paired "
            f"{mid:.2f}x [{low:.2f}, {high:.2f}]"
        )
        if samples:
            print("    ", " ".join(f"{t * 1e3:.0f}" for t in result.samples))
            print(
                "     others:",
                " ".join(
                    "?" if o is None else f"{o:.1f}" for o in result.others
                ),
            )


if __name__ == "__main__":
    main()
