"""Tables and figures from `trainers.cifar` run directories.

Usage:

    python -m trainers.report RUN_DIR [RUN_DIR ...] [--output_dir=DIR]

Writes into `--output_dir` (default: `report/` beside the first run
directory) and prints the table:

- `report.md`: test error (%) by method, like the seed's Table 2: mean and
  sample standard deviation over the runs (seeds) of each method, with the
  number of runs, the final synthetic-gradient cosine and the wall time.
- `error_vs_epoch.png`: validation error against epoch, one line per
  method (mean over seeds), like the seed's Figure 3; the final test
  error of each method is marked at its last epoch. (The test set is only
  used once per run, so the curve is the held-out validation split.)
- `cosine_vs_step.png`: cosine similarity between synthetic and true
  gradients against training step, per method and boundary, from the
  TensorBoard logs: the mean over the steps since the previous logged point
  (`--tensorboard_update_freq`), recovered from Keras's running means.

A directory without `results.json` (a run still going or killed) is left
out of the table but its curves are drawn.
"""

import collections
import csv
import json
import math
import os
import pathlib

from absl import app, flags, logging

METHOD_LABELS = {
    "bp": "backprop (whole network)",
    "half": "bottom half alone, backprop",
    "local": "subnetwork-wise supervised loss",
    "dni_resnet": "Jaderberg small-ResNet synthesizer",
    "dni_linear": "Jaderberg linear synthesizer",
    "vfbn": "VFBN",
}
METHOD_ORDER = ("bp", "half", "local", "dni_resnet", "dni_linear", "vfbn")


def read_flags(run_dir):
    """The run's flags.cfg as a dict of name to string value."""
    path = pathlib.Path(run_dir) / "flags.cfg"
    values = {}
    if not path.exists():
        return values
    for line in path.read_text().splitlines():
        if not line.startswith("--"):
            continue
        key, _, value = line[2:].partition("=")
        values[key] = value
    return values


def method_label(method, alpha_gs=None, vfbn_depth=None, depth=None):
    """A table row label, e.g. `VFBN, alpha_gs = 0.001 (ResNet-110)`."""
    label = METHOD_LABELS.get(method, method)
    if method == "vfbn":
        label += f", alpha_gs = {float(alpha_gs or 0):g}"
        if vfbn_depth not in (None, "", 2, "2"):
            label += f", depth {vfbn_depth}"
    if depth:
        label += f" (ResNet-{depth})"
    return label


def read_metrics_csv(run_dir):
    """Per-epoch metrics from metrics.csv, one row per epoch (last wins)."""
    path = pathlib.Path(run_dir) / "metrics.csv"
    if not path.exists():
        return []
    rows = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                epoch = int(row["epoch"])
            except (KeyError, ValueError):
                continue
            rows[epoch] = {k: _float(v) for k, v in row.items() if k != "epoch"}
    return [dict(rows[e], epoch=e) for e in sorted(rows)]


def _float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_step_scalars(run_dir, suffix="_cosine"):
    """Per-step training scalars from the run's TensorBoard logs.

    Args:
        run_dir: a run directory.
        suffix: keep the tags ending with this (after `batch_`).

    Returns:
        A dict of metric name (e.g. `boundary1_cosine`) to a sorted list of
        `(step, value)`; for a step logged twice (a resumed run), the
        latest value.
    """
    import tensorflow as tf

    log_dir = pathlib.Path(run_dir) / "tensorboard" / "train"
    series = collections.defaultdict(dict)
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        try:
            for record in tf.data.TFRecordDataset(str(path)):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    tag = value.tag
                    if not tag.startswith("batch_") or not tag.endswith(suffix):
                        continue
                    if value.HasField("tensor"):
                        number = float(tf.make_ndarray(value.tensor))
                    else:
                        number = float(value.simple_value)
                    series[tag[len("batch_") :]][event.step] = (
                        event.wall_time,
                        number,
                    )
        except tf.errors.DataLossError:
            # A log cut short by a kill: keep what was read.
            logging.warning("Truncated TensorBoard log %s", path)
    return {
        name: [(step, v[1]) for step, v in sorted(points.items())]
        for name, points in series.items()
    }


def window_means(points, steps_per_epoch):
    """Turns Keras's within-epoch running means into per-window means.

    Keras reports a training metric at step `s` as the mean over the
    epoch's batches so far. With every batch weighted alike, the mean over
    the steps since the previous logged point of the same epoch is
    `(k * m_k - j * m_j) / (k - j)`, `k` and `j` being the positions of
    the two points within their epoch.

    Args:
        points: sorted `(step, running_mean)` pairs, steps counted from 1.
        steps_per_epoch: training steps per epoch; falsy leaves the
            points unchanged.

    Returns:
        `(step, window_mean)` pairs.
    """
    if not steps_per_epoch:
        return list(points)
    out = []
    previous = None
    for step, mean in points:
        epoch, k = divmod(step - 1, steps_per_epoch)
        k += 1
        if previous is not None and previous[0] == epoch and previous[1] < k:
            _, j, prev_mean = previous
            value = (k * mean - j * prev_mean) / (k - j)
        else:
            value = mean
        out.append((step, value))
        previous = (epoch, k, mean)
    return out


def load_run(run_dir):
    """Everything the report needs from one run directory."""
    run_dir = pathlib.Path(run_dir)
    results_path = run_dir / "results.json"
    results = (
        json.loads(results_path.read_text()) if results_path.exists() else None
    )
    flag_values = read_flags(run_dir)
    method = (results or {}).get("method") or flag_values.get("method", "?")
    alpha = (results or {}).get("alpha_gs", flag_values.get("alpha_gs"))
    vfbn_depth = (results or {}).get(
        "vfbn_depth", flag_values.get("vfbn_depth")
    )
    depth = (results or {}).get("depth") or flag_values.get("depth")
    steps_per_epoch = (results or {}).get("steps_per_epoch") or int(
        flag_values.get("steps_per_epoch") or 0
    )
    cosine = {
        name: window_means(points, steps_per_epoch)
        for name, points in read_step_scalars(run_dir).items()
    }
    return {
        "dir": str(run_dir),
        "method": method,
        "alpha_gs": alpha,
        "vfbn_depth": vfbn_depth,
        "depth": depth,
        "results": results,
        "epochs": read_metrics_csv(run_dir),
        "cosine": cosine,
    }


def _group(runs, with_depth):
    groups = collections.OrderedDict()
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    runs = sorted(
        runs,
        key=lambda r: (
            int(r["depth"] or 0),
            order.get(r["method"], 99),
            float(r["alpha_gs"] or 0),
            r["dir"],
        ),
    )
    for run in runs:
        label = method_label(
            run["method"],
            run["alpha_gs"],
            run["vfbn_depth"],
            run["depth"] if with_depth else None,
        )
        groups.setdefault(label, []).append(run)
    return groups


def _mean_std(values):
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)


def _val_error(row):
    for key in ("val_accuracy", "val_logits_accuracy"):
        if key in row and not math.isnan(row[key]):
            return 100.0 * (1.0 - row[key])
    return None


def make_table(groups):
    """The markdown table of test errors by method."""
    lines = [
        "| method | test error (%) | runs | final SG cosine | wall time (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, runs in groups.items():
        done = [r for r in runs if r["results"]]
        if not done:
            continue
        mean, std = _mean_std([r["results"]["test_error"] for r in done])
        error = f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"
        cosines = [
            v
            for r in done
            for k, v in r["results"].get("boundary_diagnostics", {}).items()
            if k.endswith("_cosine")
        ]
        cosine = f"{sum(cosines) / len(cosines):.3f}" if cosines else "-"
        wall = sum(r["results"]["wall_time_s"] for r in done) / len(done)
        lines.append(
            f"| {label} | {error} | {len(done)} | {cosine} | {wall:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_error_vs_epoch(groups, path):
    """Validation error against epoch per method; test error marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in groups.items():
        by_epoch = collections.defaultdict(list)
        for run in runs:
            for row in run["epochs"]:
                error = _val_error(row)
                if error is not None:
                    by_epoch[row["epoch"] + 1].append(error)
        if not by_epoch:
            continue
        epochs = sorted(by_epoch)
        means = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
        (line,) = ax.plot(epochs, means, marker=".", label=label)
        tests = [r["results"]["test_error"] for r in runs if r["results"]]
        if tests:
            ax.plot(
                [epochs[-1]],
                [sum(tests) / len(tests)],
                marker="*",
                markersize=12,
                color=line.get_color(),
                linestyle="none",
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation error (%)")
    ax.set_title("Validation error by epoch (star: final test error)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cosine_vs_step(groups, path):
    """Synthetic-gradient cosine similarity against step, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in groups.items():
        names = sorted({n for r in runs for n in r["cosine"]})
        for name in names:
            by_step = collections.defaultdict(list)
            for run in runs:
                for step, value in run["cosine"].get(name, []):
                    by_step[step].append(value)
            steps = sorted(by_step)
            values = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            suffix = f" [{name[: -len('_cosine')]}]" if len(names) > 1 else ""
            ax.plot(steps, values, label=label + suffix)
    ax.set_xlabel("training step")
    ax.set_ylabel("cosine(synthetic, true gradient)")
    ax.set_title("Synthetic-gradient cosine similarity during training")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(
            0.5,
            0.5,
            "no synthetic-gradient runs",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dirs, output_dir=None):
    """Reads run directories and writes the table and the figures.

    Args:
        run_dirs: `trainers.cifar` run directories.
        output_dir: where to write; default `report/` beside the first run.

    Returns:
        `(table_markdown, output_dir)`.

    Raises:
        FileNotFoundError: if a run directory does not exist or holds no
            run, or if no run has finished.
    """
    runs = []
    for run_dir in run_dirs:
        path = pathlib.Path(run_dir)
        if (
            not (path / "flags.cfg").exists()
            and not (path / "results.json").exists()
        ):
            raise FileNotFoundError(
                f"{run_dir} is not a trainers.cifar run directory (no "
                "flags.cfg or results.json)."
            )
        runs.append(load_run(path))
    unfinished = [r["dir"] for r in runs if r["results"] is None]
    if len(unfinished) == len(runs):
        raise FileNotFoundError(
            "None of the run directories holds a results.json, so there "
            f"is no test error to tabulate ({', '.join(unfinished)}): "
            "finish the runs (relaunching one resumes it) or give finished "
            "ones."
        )
    for run_dir in unfinished:
        logging.warning(
            "%s has no results.json (still running, or stopped before the "
            "end): its curves are drawn, but it is left out of the table.",
            run_dir,
        )
    if output_dir is None:
        first = pathlib.Path(run_dirs[0]).resolve()
        output_dir = first.parent / "report"
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    depths = {r["depth"] for r in runs}
    groups = _group(runs, with_depth=len(depths) > 1)
    table = make_table(groups)
    header = (
        "# CIFAR-10 test error by method\n\n"
        "Mean ± sample standard deviation over runs (seeds); the final SG "
        "cosine is the last epoch's mean cosine similarity between "
        "synthetic and true gradients.\n\n"
    )
    runs_list = "\n".join(f"- {r['dir']}" for r in runs)
    (output_dir / "report.md").write_text(
        header
        + table
        + "\n![validation error](error_vs_epoch.png)\n"
        + "\n![cosine](cosine_vs_step.png)\n"
        + f"\nRuns:\n\n{runs_list}\n"
    )
    plot_error_vs_epoch(groups, output_dir / "error_vs_epoch.png")
    plot_cosine_vs_step(groups, output_dir / "cosine_vs_step.png")
    return table, output_dir


def define_flags(flag_values=None):
    """Defines the report's flags (parses nothing)."""
    fv = flags.FLAGS if flag_values is None else flag_values
    if "output_dir" in fv:
        return
    flags.DEFINE_string(
        "output_dir",
        None,
        "Directory for report.md and the PNG figures (default: report/ "
        "beside the first run directory).",
        flag_values=fv,
    )


def main(argv):
    run_dirs = argv[1:]
    if not run_dirs:
        raise app.UsageError(
            "Give one or more run directories: python -m trainers.report "
            "RUN_DIR [RUN_DIR ...]"
        )
    try:
        table, output_dir = write_report(run_dirs, flags.FLAGS.output_dir)
    except FileNotFoundError as e:
        raise app.UsageError(str(e))
    print(table, end="")
    print(
        f"Wrote {output_dir / 'report.md'}, "
        f"{output_dir / 'error_vs_epoch.png'} and "
        f"{output_dir / 'cosine_vs_step.png'}"
    )


def run():
    """Defines the flags and runs `main` as an absl app."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
