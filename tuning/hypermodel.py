"""The search space and the hypermodel of the VFBN search.

The hypermodel builds the trainer's CIFAR ResNet (`trainers.resnet`) cut
into sections by VFBN synthesizers and compiles it with the trainer's
optimizer and learning-rate schedule (`trainers.cifar`); the search varies
the VFBN's depth, its alpha_gs and, optionally, the learning rate.
"""

import dataclasses
import math
import time

import keras
import keras_tuner
import numpy as np

from trainers import cifar, resnet

# Names of the hyperparameters; all but `alpha_gs_nonzero` are also
# trainer flags.
VFBN_DEPTH = "vfbn_depth"
ALPHA_GS = "alpha_gs"
ALPHA_GS_NONZERO = "alpha_gs_nonzero"
LEARNING_RATE = "learning_rate"


def _clip(value, low, high):
    return min(max(value, low), high)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """What the search varies.

    Hyperparameters: `vfbn_depth` (an integer range); `alpha_gs` (a
    log-uniform range) and, when `alpha_gs_zero` is set, the boolean
    `alpha_gs_nonzero`: `alpha_gs` is then conditional on
    `alpha_gs_nonzero=True`, and `False` means alpha_gs = 0 (pure gradient
    matching); `learning_rate` (log-uniform), only when a range is given.

    Args:
        vfbn_depth: `(min, max)` residual blocks in each VFBN, inclusive.
        alpha_gs: `(min, max)` of alpha_gs's log-uniform range, both > 0.
        alpha_gs_zero: also try alpha_gs = 0.
        learning_rate: `(min, max)` of the SGD learning rate's log-uniform
            range, or `None` to keep the recipe's learning rate.

    Raises:
        ValueError: for an empty or invalid range.
    """

    vfbn_depth: tuple = (0, 4)
    alpha_gs: tuple = (1e-5, 1e-1)
    alpha_gs_zero: bool = True
    learning_rate: tuple = None

    def __post_init__(self):
        low, high = self.vfbn_depth
        if not 0 <= low <= high:
            raise ValueError(
                "Expected `vfbn_depth` to be (min, max) with 0 <= min <= "
                f"max. Received: vfbn_depth={self.vfbn_depth}"
            )
        for name in (ALPHA_GS, LEARNING_RATE):
            value = getattr(self, name)
            if value is None and name == LEARNING_RATE:
                continue
            low, high = value
            if not 0 < low <= high:
                raise ValueError(
                    f"Expected `{name}` to be (min, max) with 0 < min <= "
                    f"max (a log-uniform range). Received: {name}={value}"
                )

    def declare(self, hp):
        """Registers the hyperparameters in `hp` and returns their settings.

        Args:
            hp: a `keras_tuner.HyperParameters`.

        Returns:
            The trainer settings of the current values (see `settings`).
        """
        low, high = self.vfbn_depth
        if low == high:
            hp.Fixed(VFBN_DEPTH, low)
        else:
            hp.Int(VFBN_DEPTH, low, high, default=_clip(2, low, high))
        low, high = self.alpha_gs
        default = _clip(1e-3, low, high)

        def alpha_gs():
            if low == high:
                return hp.Fixed(ALPHA_GS, low)
            return hp.Float(
                ALPHA_GS, low, high, sampling="log", default=default
            )

        if self.alpha_gs_zero:
            hp.Boolean(ALPHA_GS_NONZERO, default=True)
            with hp.conditional_scope(ALPHA_GS_NONZERO, [True]):
                alpha_gs()
        else:
            alpha_gs()
        if self.learning_rate is not None:
            low, high = self.learning_rate
            if low == high:
                hp.Fixed(LEARNING_RATE, low)
            else:
                hp.Float(
                    LEARNING_RATE,
                    low,
                    high,
                    sampling="log",
                    default=math.sqrt(low * high),
                )
        return self.settings(hp.values)

    @staticmethod
    def settings(values):
        """The trainer settings that hyperparameter values stand for.

        Args:
            values: a trial's hyperparameter values (name to value).

        Returns:
            A dict with `vfbn_depth`, `alpha_gs` (0.0 when
            `alpha_gs_nonzero` is False) and, when tuned, `learning_rate`:
            the names of the trainer's flags.
        """
        alpha_gs = 0.0
        if values.get(ALPHA_GS_NONZERO, True):
            alpha_gs = float(values[ALPHA_GS])
        settings = {
            VFBN_DEPTH: int(values[VFBN_DEPTH]),
            ALPHA_GS: alpha_gs,
        }
        if LEARNING_RATE in values:
            settings[LEARNING_RATE] = float(values[LEARNING_RATE])
        return settings


def space_signature(hyperparameters):
    """A comparable description of a `HyperParameters` search space.

    Names, kinds, ranges, choices, sampling and conditions; not the current
    values. Equal for a space and its copy through keras-tuner's JSON or
    protobuf form, so a resumed or remote space compares with a fresh one.

    Args:
        hyperparameters: a `keras_tuner.HyperParameters`.

    Returns:
        A sorted list of tuples.
    """
    keys = ("min_value", "max_value", "step", "sampling", "values", "value")
    signature = []
    for hp in hyperparameters.space:
        config = hp.get_config()
        fields = []
        for key in keys:
            if key not in config or config[key] is None:
                continue
            value = config[key]
            if key == "step" and isinstance(value, (int, float)):
                value = float(value)
            if key == "sampling" and value in ("linear", None):
                continue
            if isinstance(value, (list, tuple)):
                value = tuple(value)
            elif isinstance(value, (int, float)) and not isinstance(
                value, bool
            ):
                value = float(value)
            fields.append((key, value))
        conditions = tuple(
            (c.name, tuple(c.values))
            for c in hp.conditions
            if hasattr(c, "name")
        )
        signature.append(
            (type(hp).__name__, hp.name, tuple(fields), conditions)
        )
    return sorted(signature, key=repr)


class DivergenceGuard(keras.callbacks.Callback):
    """Fails the trial as soon as the training loss is not finite.

    Raises `keras_tuner.errors.FailedTrialError`, which keras-tuner records
    as a failed trial before it goes on with the next one.
    """

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._check(logs, f"step {batch + 1} of epoch {self._epoch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        self._check(logs, f"the end of epoch {epoch + 1}")

    def _check(self, logs, where):
        for key in ("loss", "val_loss"):
            value = (logs or {}).get(key)
            if value is None:
                continue
            value = float(np.asarray(value))
            if not math.isfinite(value):
                self.model.stop_training = True
                raise keras_tuner.errors.FailedTrialError(
                    f"Training diverged: {key} was {value} at {where}"
                )


class VFBNHyperModel(keras_tuner.HyperModel):
    """The trainer's CIFAR ResNet with VFBN synthesizers, as a hypermodel.

    `build` creates the model with `trainers.resnet.build_model(...,
    method="vfbn")` and compiles it with `trainers.cifar.compile_model`,
    an SGD optimizer from `trainers.cifar.make_optimizer` and the recipe's
    learning-rate schedule (warm-up, then step decay over
    `epochs * steps_per_epoch` steps). It opens no distribution strategy
    scope: the tuner builds it inside its own.

    Args:
        space: a `SearchSpace`.
        recipe: a `trainers.cifar.TrainConfig` with everything that is not
            searched (depth, cuts, optimizer and schedule settings, ...).
        num_classes: number of classes. May be `None` where no model is
            built (keras-tuner's chief only serves the search space).
        input_shape: image shape, channels last.
        steps_per_epoch: training steps per epoch.
        epochs: epochs of the longest trial (Hyperband's maximum); the
            schedule's decay points are fractions of
            `epochs * steps_per_epoch`.
    """

    def __init__(
        self,
        space,
        recipe,
        num_classes=None,
        input_shape=(32, 32, 3),
        steps_per_epoch=None,
        epochs=None,
    ):
        super().__init__(name=f"resnet{recipe.depth}_vfbn", tunable=True)
        self.space = space
        self.recipe = recipe
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs

    def declare_hyperparameters(self, hp):
        self.space.declare(hp)

    def build(self, hp):
        settings = self.space.declare(hp)
        if not self.num_classes or not self.steps_per_epoch:
            raise ValueError(
                "VFBNHyperModel needs `num_classes` and `steps_per_epoch` "
                "to build a model. Received: "
                f"num_classes={self.num_classes}, "
                f"steps_per_epoch={self.steps_per_epoch}"
            )
        recipe = self.recipe
        model = resnet.build_model(
            recipe.depth,
            num_classes=self.num_classes,
            method="vfbn",
            cuts=tuple(recipe.cuts) or None,
            vfbn_depth=settings[VFBN_DEPTH],
            alpha_gs=settings[ALPHA_GS],
            weight_decay=recipe.weight_decay,
            input_shape=self.input_shape,
        )
        schedule = cifar.make_learning_rate_schedule(
            settings.get(LEARNING_RATE, recipe.learning_rate),
            self.steps_per_epoch * (self.epochs or recipe.epochs),
            decay_at=recipe.lr_decay_at,
            decay_factor=recipe.lr_decay_factor,
            warmup_steps=recipe.warmup_steps,
            warmup_learning_rate=recipe.warmup_learning_rate,
        )
        return cifar.compile_model(
            model,
            cifar.make_optimizer(schedule, recipe.momentum),
            synthesizer_learning_rate=recipe.synthesizer_learning_rate,
            synthesizer_warmup_steps=recipe.synthesizer_warmup_steps,
            synthesizer_loss_weight=recipe.synthesizer_loss_weight,
        )

    def fit(self, hp, model, *args, callbacks=None, **kwargs):
        """Trains one execution; a non-finite loss fails the trial.

        Adds `fit_seconds` (wall time of this `fit`) to the history, so that
        it reaches the trial's metrics.
        """
        callbacks = [DivergenceGuard(), *(callbacks or [])]
        start = time.monotonic()
        history = model.fit(*args, callbacks=callbacks, **kwargs)
        seconds = time.monotonic() - start
        history.history["fit_seconds"] = [seconds] * len(history.epoch)
        return history
