"""What a search leaves: the trial table and the best trial as a flagfile.

`trial_rows` reads the trials of a keras-tuner oracle, `markdown_table`
sorts them by the objective (failed trials last, with their reason), and
`trainer_flagfile` writes a `trainers.cifar` configuration as a flagfile,
which is how the best trial is retrained in full with one command.
"""

import dataclasses
import math

from absl import flags

from trainers import cifar
from tuning import hypermodel, tuners


class SearchFailedError(RuntimeError):
    """No trial of the search completed."""


def trial_rows(oracle):
    """One dict per trial of `oracle`, best first, failed trials last.

    Args:
        oracle: a keras-tuner `Oracle` (standalone or the chief's).

    Returns:
        A list of dicts with `trial_id`, `status`, `objective` (None unless
        completed), `settings` (trainer flag values, see
        `SearchSpace.settings`), `hyperparameters`, `epochs` (Hyperband's
        epochs, else None), `metrics` (the best epoch's values) and
        `reason` (the error of a failed trial).
    """
    rows = []
    for trial in oracle.trials.values():
        values = dict(trial.hyperparameters.values)
        metrics = {
            name: trial.metrics.get_last_value(name)
            for name in trial.metrics.metrics
        }
        try:
            settings = hypermodel.SearchSpace.settings(values)
        except KeyError:
            settings = {}
        completed = trial.status == "COMPLETED"
        rows.append(
            {
                "trial_id": trial.trial_id,
                "status": trial.status,
                "objective": trial.score if completed else None,
                "settings": settings,
                "hyperparameters": values,
                "epochs": values.get("tuner/epochs"),
                "metrics": metrics,
                "reason": "" if completed else tuners.failure_reason(trial),
            }
        )

    def key(row):
        score = row["objective"]
        usable = score is not None and math.isfinite(score)
        return (not usable, -(score if usable else 0.0), row["trial_id"])

    return sorted(rows, key=key)


def _number(value, digits=4):
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) < 1e-2:
        return f"{value:.2e}"
    return f"{value:.{digits}g}"


def _cosine(metrics):
    values = [v for k, v in metrics.items() if k.endswith("_cosine")]
    return sum(values) / len(values) if values else None


def markdown_table(rows, objective=tuners.OBJECTIVE):
    """The trials as a markdown table, in the order of `rows`.

    Columns: rank, trial, status, the objective, VFBN depth, alpha_gs, the
    learning rate (when tuned), epochs (Hyperband), validation loss, the
    mean synthetic-gradient cosine over boundaries, fit time per execution
    and, for failed trials, the reason.
    """
    tuned_lr = any(hypermodel.LEARNING_RATE in row["settings"] for row in rows)
    hyperband = any(row["epochs"] is not None for row in rows)
    header = ["rank", "trial", "status", objective, "vfbn_depth", "alpha_gs"]
    if tuned_lr:
        header.append("learning_rate")
    if hyperband:
        header.append("epochs")
    header += ["val_loss", "cosine", "fit time (s)", "note"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
    ]
    rank = 0
    for row in rows:
        settings, metrics = row["settings"], row["metrics"]
        if row["objective"] is not None:
            rank += 1
        cells = [
            str(rank) if row["objective"] is not None else "-",
            row["trial_id"],
            row["status"],
            _number(row["objective"]),
            _number(settings.get(hypermodel.VFBN_DEPTH)),
            _number(settings.get(hypermodel.ALPHA_GS)),
        ]
        if tuned_lr:
            cells.append(_number(settings.get(hypermodel.LEARNING_RATE)))
        if hyperband:
            cells.append(_number(row["epochs"]))
        seconds = metrics.get("fit_seconds")
        cosine = _cosine(metrics)
        cells += [
            _number(metrics.get("val_loss")),
            "" if cosine is None else f"{cosine:.3f}",
            "" if seconds is None else f"{seconds:.0f}",
            row["reason"].replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def status_counts(rows):
    """Trials per status, e.g. `{"COMPLETED": 8, "FAILED": 2}`."""
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


def _list_text(values):
    return ",".join(str(v) for v in values)


def trainer_flagfile(config, header=()):
    """A `trainers.cifar` flagfile that runs `config`.

    Args:
        config: a `trainers.cifar.TrainConfig`.
        header: comment lines (without "# ") put first.

    Returns:
        The flagfile text, in the trainer's own format (`flagfile_text`).
    """
    fv = flags.FlagValues()
    cifar.define_flags(fv)
    fv(["trainer"])
    for name in cifar.FLAG_NAMES:
        value = getattr(config, name)
        if name in ("cuts", "lr_decay_at"):
            value = _list_text(value)
        # Set without validators: the trainer validates the file it reads.
        fv[name].value = value
    lines = [f"# {line}" for line in header]
    lines += [
        line
        for line in cifar.flagfile_text(fv).splitlines()
        if not line.startswith("#")
    ]
    return "\n".join(lines) + "\n"


def retrain_config(recipe, settings, epochs=None, steps_per_epoch=None):
    """The trainer configuration of one trial, for a full retraining.

    Args:
        recipe: the search's `TrainConfig` (what is not searched).
        settings: the trial's settings (`SearchSpace.settings`).
        epochs: epochs of the retraining (`None`: the recipe's).
        steps_per_epoch: steps per epoch of the retraining (`None`: the
            recipe's; 0: one pass over the training split).

    Returns:
        A `TrainConfig` with `method="vfbn"`.
    """
    return dataclasses.replace(
        recipe,
        method="vfbn",
        vfbn_depth=settings[hypermodel.VFBN_DEPTH],
        alpha_gs=settings[hypermodel.ALPHA_GS],
        learning_rate=settings.get(
            hypermodel.LEARNING_RATE, recipe.learning_rate
        ),
        epochs=recipe.epochs if epochs is None else epochs,
        steps_per_epoch=(
            recipe.steps_per_epoch
            if steps_per_epoch is None
            else steps_per_epoch
        ),
    )
