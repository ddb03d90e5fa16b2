"""How close synthetic gradients come to the true one, and how they train.

    python -m benchmarks.gradient_quality --steps=250

trains a CIFAR ResNet cut in the middle (`trainers.resnet.build_model`)
once per method, from the same initial weights (the layers all methods
share start equal) on the same batches (drawn once from
`trainers.data.load_datasets` and replayed), for a fixed number of steps
of `SyntheticGradientModel.fit`'s own training step. Every
`--probe_every` steps, before that step, a probe runs the forward pass of
the model on the step's batch inside `keras_vfbn.step_context` and takes
the true gradient at the boundary from the same tape, then restores the
batch-norm moving statistics the probe touched. From the synthetic
gradient `s` and the true per-example gradient `t` it records:

- `cosine`: per-example cosine similarity of `s_i` and `t_i`, batch mean
  (the library's `_cosine` metric);
- `norm_ratio`: `|s| / |t|` over the batch;
- `rel_error`: `|s - t| / |t|` over the batch, measured directly;
- `step_gain`: `<s, t> / |t|^2` over the batch (`norm_ratio` times the
  batch-level cosine), the length of the lower section's step along the
  true gradient relative to backprop's. Below 1 the lower section trains
  as if at a lower learning rate. A synthesizer fitted by least squares
  shrinks its prediction towards zero as far as it cannot explain the
  target, which makes `step_gain` close to `norm_ratio ** 2`.

The table's `applied gain` is `step_gain` times the boundary's
`gradient_scale` (the factor on what is handed down; the probe measures
the synthesizer's unscaled prediction).

It also records the training loss of every step and the test accuracy
at the end, and writes a Markdown table, JSON and a PNG plot to
`--output_dir`. Methods are named variants (`VARIANTS`), e.g.
`vfbn_d2_a1e-3` is VFBN with two residual blocks and alpha_gs = 1e-3.
"""

import json
import os
import pathlib
import time

from absl import app, flags, logging

DEFAULT_ARCHIVE = (
    pathlib.Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "cifar10-jpeg.tar.gz"
)

# Name -> (build_model arguments, compile arguments).
VARIANTS = {
    "bp": ({"method": "bp"}, {}),
    "dni_linear": ({"method": "dni_linear"}, {}),
    "dni_resnet": ({"method": "dni_resnet"}, {}),
    "vfbn_d0": ({"method": "vfbn", "vfbn_depth": 0}, {}),
    "vfbn_d2": ({"method": "vfbn", "vfbn_depth": 2}, {}),
    "vfbn_d2_a1e-3": (
        {"method": "vfbn", "vfbn_depth": 2, "alpha_gs": 1e-3},
        {},
    ),
    "vfbn_d2_a0.1": ({"method": "vfbn", "vfbn_depth": 2, "alpha_gs": 0.1}, {}),
    "vfbn_d2_a1e-3_warmup50": (
        {"method": "vfbn", "vfbn_depth": 2, "alpha_gs": 1e-3},
        {"synthesizer_warmup_steps": 50},
    ),
    "vfbn_d2_a0.1_warmup50": (
        {"method": "vfbn", "vfbn_depth": 2, "alpha_gs": 0.1},
        {"synthesizer_warmup_steps": 50},
    ),
    "vfbn_d2_a1e-3_scale2": (
        {
            "method": "vfbn",
            "vfbn_depth": 2,
            "alpha_gs": 1e-3,
            "gradient_scale": 2.0,
        },
        {},
    ),
    "vfbn_d2_a1e-3_slr1e-2": (
        {"method": "vfbn", "vfbn_depth": 2, "alpha_gs": 1e-3},
        {"synthesizer_learning_rate": 1e-2},
    ),
}
DEFAULT_METHODS = (
    "bp",
    "dni_linear",
    "vfbn_d2_a1e-3",
    "vfbn_d2",
    "vfbn_d2_a0.1",
    "vfbn_d0",
    "dni_resnet",
)

FLAGS = flags.FLAGS


def define_flags():
    """Defines this script's flags (parses nothing)."""
    flags.DEFINE_list(
        "methods",
        list(DEFAULT_METHODS),
        f"Variants to train, from: {', '.join(VARIANTS)}.",
    )
    flags.DEFINE_integer("steps", 250, "Training steps of every method.")
    flags.DEFINE_integer("batch_size", 128, "Examples per step.")
    flags.DEFINE_integer("depth", 20, "ResNet depth, 6n+2.")
    flags.DEFINE_integer(
        "probe_every",
        5,
        "Measure the synthetic against the true gradient every this many "
        "steps (and at the first and last step).",
    )
    flags.DEFINE_float("learning_rate", 0.1, "SGD learning rate.")
    flags.DEFINE_boolean(
        "lr_decay",
        True,
        "Divide the learning rate by 10 at 50% and 75% of the steps.",
    )
    flags.DEFINE_integer(
        "test_examples",
        2000,
        "Test images (drawn by --seed) for the final accuracy; 0: all.",
    )
    flags.DEFINE_integer("seed", 0, "Seed of weights, batches and subsets.")
    flags.DEFINE_string(
        "image_folder",
        str(DEFAULT_ARCHIVE),
        "CIFAR-10 image folder or .tar.gz of one (train/<class>/, "
        "test/<class>/).",
    )
    flags.DEFINE_string(
        "cache_dir", None, "Where an archive is extracted (see trainers)."
    )
    flags.DEFINE_string(
        "output_dir",
        "benchmarks/results/gradient_quality",
        "Directory for gradient_quality.json, .md and .png.",
    )
    flags.DEFINE_boolean(
        "reuse",
        False,
        "Keep the records of methods already in --output_dir's JSON that "
        "this run does not train, when that run had the same steps, "
        "batch size, depth, learning rate and seed; the table then holds "
        "both. Methods train on the same replayed batches either way.",
    )


def _batches(train_ds, steps):
    """The first `steps` batches of the pipeline, as NumPy, for replay."""
    batches = []
    for x, y in train_ds.take(steps):
        batches.append((x.numpy(), y.numpy()))
    return batches


def _reference_weights(depth, seed):
    """Initial weights of a backprop model, by layer name."""
    import keras

    from trainers import resnet

    keras.utils.set_random_seed(seed)
    model = resnet.build_model(depth, method="bp")
    weights = {layer.name: layer.get_weights() for layer in model.layers}
    keras.backend.clear_session()
    return weights


def _make_probe(model):
    """A function measuring synthetic against true gradient on a batch."""
    import keras
    import tensorflow as tf

    import keras_vfbn

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    state = list(model.non_trainable_variables)

    @tf.function
    def probe(x, y):
        saved = [tf.identity(v) for v in state]
        with tf.GradientTape() as tape:
            with keras_vfbn.step_context(y, tape=tape) as step:
                logits = model(x, training=True)
            loss = loss_fn(y, logits)
        record = step.records[0]
        batch = tf.cast(tf.shape(x)[0], tf.float32)
        target = tape.gradient(loss, record.outputs) * batch
        synthetic = record.synthetic
        t = tf.reshape(target, [tf.shape(x)[0], -1])
        s = tf.reshape(synthetic, [tf.shape(x)[0], -1])
        eps = 1e-12
        per_example = tf.reduce_sum(s * t, 1) / tf.maximum(
            tf.norm(s, axis=1) * tf.norm(t, axis=1), eps
        )
        t_norm = tf.maximum(tf.norm(t), eps)
        result = {
            "cosine": tf.reduce_mean(per_example),
            "norm_ratio": tf.norm(s) / t_norm,
            "rel_error": tf.norm(s - t) / t_norm,
            "step_gain": tf.reduce_sum(s * t) / tf.square(t_norm),
        }
        for v, value in zip(state, saved):
            v.assign(value)
        return result

    return probe


def train_one(name, batches, test_ds, weights, config):
    """Trains one variant; returns its per-step record and test accuracy."""
    import keras
    import numpy as np

    from trainers import cifar, resnet

    build_args, compile_args = VARIANTS[name]
    keras.backend.clear_session()
    keras.utils.set_random_seed(config["seed"])
    model = resnet.build_model(config["depth"], **build_args)
    for layer in model.layers:
        if layer.name in weights and layer.weights:
            layer.set_weights(weights[layer.name])
    steps = len(batches)
    schedule = cifar.make_learning_rate_schedule(
        config["learning_rate"],
        steps,
        decay_at=(0.5, 0.75) if config["lr_decay"] else (),
    )
    cifar.compile_model(model, cifar.make_optimizer(schedule), **compile_args)
    probe = _make_probe(model) if hasattr(model, "boundaries") else None
    probe_steps = set(range(0, steps, config["probe_every"])) | {steps - 1}

    record = {"loss": [], "probe_step": [], "cosine": [], "norm_ratio": []}
    record.update(rel_error=[], step_gain=[], metric_cosine=[])
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        if probe is not None and step in probe_steps:
            measured = probe(x, y)
            record["probe_step"].append(step)
            for key, value in measured.items():
                record[key].append(float(value))
        logs = model.train_on_batch(x, y, return_dict=True)
        record["loss"].append(float(logs["loss"]))
        if probe is not None and step in probe_steps:
            # The library's own metric of the same step, as a cross-check.
            record["metric_cosine"].append(float(logs["boundary1_cosine"]))
        if not np.isfinite(record["loss"][-1]):
            logging.warning("%s: loss is not finite at step %d", name, step)
        if step % 50 == 0 or step == steps - 1:
            logging.info(
                "%s step %d/%d loss %.3f%s",
                name,
                step + 1,
                steps,
                record["loss"][-1],
                f" cosine {record['cosine'][-1]:.3f}"
                if record["cosine"]
                else "",
            )
    record["train_seconds"] = time.perf_counter() - start
    results = model.evaluate(test_ds, verbose=0, return_dict=True)
    record["test_accuracy"] = float(results["accuracy"])
    logging.info("%s: test accuracy %.4f", name, record["test_accuracy"])
    return record


def _tail_mean(values, count):
    values = values[-count:]
    return sum(values) / len(values) if values else float("nan")


def summarize(records):
    """One row per method: late-training gradient quality and accuracy."""
    rows = {}
    for name, r in records.items():
        row = {
            "loss_last20": _tail_mean(r["loss"], 20),
            "test_accuracy": r["test_accuracy"],
        }
        for key in ("cosine", "norm_ratio", "rel_error", "step_gain"):
            # The last five probes (25 steps at the default spacing).
            row[key] = _tail_mean(r[key], 5) if r[key] else None
        rows[name] = row
    for name, row in rows.items():
        scale = VARIANTS.get(name, ({}, {}))[0].get("gradient_scale", 1.0)
        row["gradient_scale"] = scale
        row["applied_gain"] = (
            None if row["step_gain"] is None else row["step_gain"] * scale
        )
    base = rows.get("dni_linear", {}).get("cosine")
    for row in rows.values():
        row["cosine_vs_dni_linear"] = (
            row["cosine"] / base if row["cosine"] and base else None
        )
    return rows


def format_table(rows):
    """The summary as a Markdown table."""

    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [
        "| method | cosine | x dni_linear | norm ratio | rel. error "
        "| step gain | applied gain | train loss | test acc. (%) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {cell(row['cosine'], '.3f')} "
            f"| {cell(row['cosine_vs_dni_linear'], '.2f')} "
            f"| {cell(row['norm_ratio'], '.3f')} "
            f"| {cell(row['rel_error'], '.3f')} "
            f"| {cell(row['step_gain'], '.3f')} "
            f"| {cell(row['applied_gain'], '.3f')} "
            f"| {row['loss_last20']:.3f} "
            f"| {100 * row['test_accuracy']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(records, path):
    """Cosine, relative error, norm ratio and loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = (
        ("cosine", "cosine(synthetic, true)"),
        ("rel_error", "|synthetic - true| / |true|"),
        ("norm_ratio", "|synthetic| / |true|"),
    )
    for ax, (key, label) in zip(axes.flat, panels):
        for color, (name, r) in enumerate(records.items()):
            if r[key]:
                ax.plot(r["probe_step"], r[key], label=name, color=f"C{color}")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax = axes.flat[3]
    for color, (name, r) in enumerate(records.items()):
        loss = np.asarray(r["loss"])
        window = min(10, len(loss))
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(
            np.arange(len(smooth)) + window - 1,
            smooth,
            label=name,
            color=f"C{color}",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.grid(alpha=0.3)
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


# Settings that must agree for records of two runs to share a table.
_COMPARABLE = (
    "steps",
    "batch_size",
    "depth",
    "probe_every",
    "learning_rate",
    "lr_decay",
    "test_examples",
    "seed",
)


def _previous_records(output_dir, config, methods):
    """Records of other methods from an earlier run with the same config."""
    path = pathlib.Path(output_dir) / "gradient_quality.json"
    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    mismatch = [
        key
        for key in _COMPARABLE
        if previous["config"].get(key) != config.get(key)
    ]
    if mismatch:
        logging.warning(
            "Not reusing %s: its run differs in %s", path, ", ".join(mismatch)
        )
        return {}
    kept = {
        name: record
        for name, record in previous["records"].items()
        if name not in methods
    }
    logging.info("Reusing the records of %s from %s", list(kept), path)
    return kept


def run(config, methods, image_folder, cache_dir, output_dir, reuse=False):
    """Trains every method and writes the table, JSON and plot.

    Args:
        config: dict with `steps`, `batch_size`, `depth`, `probe_every`,
            `learning_rate`, `lr_decay`, `test_examples` and `seed`.
        methods: names from `VARIANTS`.
        image_folder: the CIFAR-10 image folder or archive.
        cache_dir: where an archive is extracted.
        output_dir: where to write.
        reuse: keep other methods' records from an earlier run written to
            `output_dir` with the same settings.

    Returns:
        `(rows, records)`: the summary and the per-step records.
    """
    from trainers import data

    unknown = [m for m in methods if m not in VARIANTS]
    if unknown:
        raise ValueError(
            f"Unknown methods {unknown}; expected names from {list(VARIANTS)}."
        )
    start = time.perf_counter()
    config = dict(config, loadavg_start=os.getloadavg())
    train_ds, _, test_ds = data.load_datasets(
        dataset="image_folder",
        image_folder=image_folder,
        cache_dir=cache_dir,
        validation_examples=0,
        test_examples=config["test_examples"],
        batch_size=config["batch_size"],
        seed=config["seed"],
    )
    batches = _batches(train_ds, config["steps"])
    logging.info("Replaying %d batches for every method", len(batches))
    weights = _reference_weights(config["depth"], config["seed"])
    records = _previous_records(output_dir, config, methods) if reuse else {}
    for name in methods:
        records[name] = train_one(name, batches, test_ds, weights, config)
        # Written after every method, so a long run keeps what it has.
        rows, table = write_outputs(records, config, output_dir, start)
    print(table, end="")
    return rows, records


def write_outputs(records, config, output_dir, start):
    """Writes the table, JSON and plot of the methods trained so far."""
    rows = summarize(records)
    table = format_table(rows)
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(
        config,
        methods=list(records),
        date=time.strftime("%Y-%m-%d %H:%M"),
        cpu_count=os.cpu_count(),
        loadavg_start=config.get("loadavg_start"),
        loadavg_end=os.getloadavg(),
        wall_seconds=time.perf_counter() - start,
    )
    (output_dir / "gradient_quality.json").write_text(
        json.dumps(
            {"config": meta, "summary": rows, "records": records}, indent=1
        )
    )
    (output_dir / "gradient_quality.md").write_text(
        f"ResNet-{config['depth']}, {config['steps']} steps of batch "
        f"{config['batch_size']}, seed {config['seed']}; gradient columns "
        "are the mean of the last 5 probes, train loss of the last 20 "
        f"steps. {meta['date']}, {meta['cpu_count']} CPU cores, load "
        f"{meta['loadavg_start'][0]:.1f} -> {meta['loadavg_end'][0]:.1f}."
        "\n\n" + table
    )
    plot(records, output_dir / "gradient_quality.png")
    return rows, table


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = dict(
        steps=FLAGS.steps,
        batch_size=FLAGS.batch_size,
        depth=FLAGS.depth,
        probe_every=FLAGS.probe_every,
        learning_rate=FLAGS.learning_rate,
        lr_decay=FLAGS.lr_decay,
        test_examples=FLAGS.test_examples,
        seed=FLAGS.seed,
    )
    run(
        config,
        FLAGS.methods,
        FLAGS.image_folder,
        FLAGS.cache_dir,
        FLAGS.output_dir,
        reuse=FLAGS.reuse,
    )


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    define_flags()
    app.run(main)
