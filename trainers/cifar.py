"""Trains and evaluates one CIFAR-10 experiment of the seed's table.

Usage:

    python -m trainers.cifar --flagfile=trainers/configs/NAME.cfg \\
        --model_dir=runs/NAME [--flag=value ...]

Reads CIFAR-10 from tensorflow-datasets (`--data_dir` for a prepared
offline copy) or from an image folder (`--dataset=image_folder
--image_folder=DIR_OR_TAR_GZ`), trains a CIFAR ResNet-(6n+2) with the
chosen method, evaluates it once on the test set, and writes the run
directory: flags.cfg (the effective flags; relaunches the run), backup/
(resume state), checkpoints/, tensorboard/, metrics.csv, model.keras and
results.json. Started again with the same flags, a run resumes after its
last completed epoch. Boolean flags are written --flag or --noflag (or
--flag=false); a bare word after a flag is rejected.
"""

import dataclasses
import json
import os
import pathlib
import re
import sys
import time

from absl import app, flags, logging

from trainers import spec

STRATEGIES = ("default", "mirrored", "multi_worker")
DATASETS = ("cifar10", "image_folder")

# Flags that may change between the launches of one run directory.
RELAUNCH_FREE_FLAGS = (
    "progress_bar",
    "num_cpu_devices",
    "strategy",
    "model_dir",
)


@dataclasses.dataclass
class TrainConfig:
    """Everything one run needs; `train(config)` runs it without flags.

    Attributes mirror the flags of the same names (see `define_flags`).
    """

    model_dir: str
    method: str = "bp"
    depth: int = 110
    cuts: tuple = ()
    vfbn_depth: int = 2
    alpha_gs: float = 0.0
    dni_depth: int = 2
    dni_output_scale: float = 1e-3
    synthesizer_learning_rate: float = 1e-3
    synthesizer_warmup_steps: int = 0
    synthesizer_loss_weight: float = 1.0
    dataset: str = "cifar10"
    data_dir: str = None
    tfds_download: bool = True
    image_folder: str = None
    cache_dir: str = None
    validation_examples: int = 5000
    train_examples: int = 0
    test_examples: int = 0
    augment: bool = True
    batch_size: int = 128
    epochs: int = 182
    steps_per_epoch: int = 0
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    warmup_learning_rate: float = 0.01
    lr_decay_at: tuple = (0.5, 0.75)
    lr_decay_factor: float = 0.1
    seed: int = 0
    strategy: str = "default"
    num_cpu_devices: int = 2
    tensorboard_update_freq: int = 20
    progress_bar: bool = True


# Flag definition and validation.


def _int_list(text):
    return tuple(int(part) for part in text.split(",") if part.strip())


def _float_list(text):
    return tuple(float(part) for part in text.split(",") if part.strip())


def define_flags(flag_values=None):
    """Defines the trainer's flags in `flag_values` (default: `flags.FLAGS`).

    Parses nothing. Calling it again on the same `FlagValues` is a no-op.

    Args:
        flag_values: an `absl.flags.FlagValues`.

    Returns:
        The names of the trainer's flags, in definition order.
    """
    fv = flags.FLAGS if flag_values is None else flag_values
    if "method" in fv:
        return list(FLAG_NAMES)
    d = TrainConfig.__dataclass_fields__

    def default(name):
        return d[name].default

    # Model and method.
    flags.DEFINE_enum(
        "method",
        default("method"),
        spec.METHODS,
        "Training method: bp (whole network by backprop), half (the bottom "
        "section alone with a classifier head), local (each section below "
        "a cut trained by its own auxiliary classifier, no gradient across "
        "cuts), dni_linear and dni_resnet (Jaderberg synthesizers), vfbn "
        "(virtual forward-backward network synthesizers).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "depth",
        default("depth"),
        "ResNet depth, 6n+2 (20, 32, 44, 56, 110, ...).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "cuts",
        "",
        "Comma-separated residual-block indices after which the network is "
        "cut into sections (blocks are numbered 1..3n from the input). "
        "Empty: one cut after the middle block, 3n//2.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "vfbn_depth",
        default("vfbn_depth"),
        "Residual blocks in each VFBN before its pooling and dense head "
        "(0: pooling and dense only). Used with --method=vfbn.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "alpha_gs",
        default("alpha_gs"),
        "Weight of the VFBN's own classification loss in its training loss "
        "(0: pure gradient matching). Only valid with --method=vfbn.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "dni_depth",
        default("dni_depth"),
        "Convolutional blocks of the Jaderberg small-ResNet synthesizer "
        "(--method=dni_resnet).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "dni_output_scale",
        default("dni_output_scale"),
        "Fixed output scale of the Jaderberg synthesizers; keeps their "
        "zero-initialised regression from diverging.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "synthesizer_learning_rate",
        default("synthesizer_learning_rate"),
        "Adam learning rate of the gradient synthesizers.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "synthesizer_warmup_steps",
        default("synthesizer_warmup_steps"),
        "Steps during which synthesizers are trained but true gradients are "
        "still used below the cuts.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "synthesizer_loss_weight",
        default("synthesizer_loss_weight"),
        "Multiplier of every synthesizer's training loss.",
        flag_values=fv,
    )

    # Data.
    flags.DEFINE_enum(
        "dataset",
        default("dataset"),
        DATASETS,
        "cifar10: CIFAR-10 from tensorflow-datasets (downloaded on first "
        "use where there is a network; see --data_dir). image_folder: a "
        "directory with train/<class>/ and test/<class>/ images, or a "
        ".tar.gz of one (see --image_folder).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "data_dir",
        default("data_dir"),
        "tensorflow-datasets data directory holding a prepared cifar10 "
        f"{_tfds_version()} (default: $TFDS_DATA_DIR or "
        "~/tensorflow_datasets). Must exist if given.",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "tfds_download",
        default("tfds_download"),
        "Let tensorflow-datasets download and prepare cifar10 when it is "
        "not in --data_dir. With --notfds_download a missing copy fails at "
        "once.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "image_folder",
        default("image_folder"),
        "Image-folder dataset for --dataset=image_folder: a directory with "
        "train/<class>/*.jpg and test/<class>/*.jpg, or a .tar.gz of one, "
        "extracted once into --cache_dir.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "cache_dir",
        default("cache_dir"),
        "Where --image_folder archives are extracted (default: "
        "$KERAS_VFBN_CACHE or ~/.cache/keras_vfbn).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "validation_examples",
        default("validation_examples"),
        "Training examples held out as the validation split, evaluated "
        "after every epoch (0: none). The test set is only used once, at "
        "the end.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "train_examples",
        default("train_examples"),
        "Keep only this many training examples, chosen at random by --seed "
        "(0: all).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "test_examples",
        default("test_examples"),
        "Evaluate on only this many test examples, chosen at random by "
        "--seed (0: all).",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "augment",
        default("augment"),
        "Pad by 4 pixels, crop 32x32 at random and flip horizontally.",
        flag_values=fv,
    )

    # Optimisation.
    flags.DEFINE_integer(
        "batch_size",
        default("batch_size"),
        "Global batch size, split evenly over the replicas of --strategy; "
        "must be a multiple of their number.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "epochs", default("epochs"), "Training epochs.", flag_values=fv
    )
    flags.DEFINE_integer(
        "steps_per_epoch",
        default("steps_per_epoch"),
        "Steps per epoch (0: one pass over the training split).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "learning_rate",
        default("learning_rate"),
        "SGD learning rate after warm-up, before any decay, for the global "
        "batch size --batch_size.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "momentum", default("momentum"), "SGD momentum.", flag_values=fv
    )
    flags.DEFINE_float(
        "weight_decay",
        default("weight_decay"),
        "L2 weight decay of convolution and dense kernels: each kernel's "
        "gradient gains weight_decay * w.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "warmup_steps",
        default("warmup_steps"),
        "Steps trained at --warmup_learning_rate before --learning_rate.",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "warmup_learning_rate",
        default("warmup_learning_rate"),
        "Learning rate of the first --warmup_steps steps.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "lr_decay_at",
        "0.5,0.75",
        "Comma-separated fractions of the total steps at which the learning "
        "rate is multiplied by --lr_decay_factor (empty: never).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "lr_decay_factor",
        default("lr_decay_factor"),
        "Factor applied to the learning rate at each --lr_decay_at point.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "seed",
        default("seed"),
        "Seed of the weights, the validation split, the subsets and the "
        "shuffling.",
        flag_values=fv,
    )

    # Distribution and output.
    flags.DEFINE_enum(
        "strategy",
        default("strategy"),
        STRATEGIES,
        "default: one device. mirrored: all local GPUs, or "
        "--num_cpu_devices logical CPU devices where there are none. "
        "multi_worker: MultiWorkerMirroredStrategy configured by TF_CONFIG.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_cpu_devices",
        default("num_cpu_devices"),
        "Logical CPU devices to split the CPU into for --strategy=mirrored "
        "on a machine without GPUs.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "model_dir",
        None,
        "Run directory for flags.cfg, checkpoints, TensorBoard logs, "
        "metrics.csv and results.json; {name} is replaced by the value of "
        "flag name, e.g. runs/quick/{method}-seed{seed}. Relaunching with "
        "the same directory resumes the run.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "tensorboard_update_freq",
        default("tensorboard_update_freq"),
        "Write training metrics to TensorBoard every this many steps, as "
        "well as every epoch (0: every epoch only).",
        flag_values=fv,
    )
    flags.DEFINE_boolean(
        "progress_bar",
        default("progress_bar"),
        "Show the Keras progress bar during training (--noprogress_bar: "
        "one line per epoch).",
        flag_values=fv,
    )
    _register_validators(fv)
    return list(FLAG_NAMES)


FLAG_NAMES = tuple(TrainConfig.__dataclass_fields__)


def _tfds_version():
    return spec.TFDS_VERSION


def _register_validators(fv):
    def check(name, predicate, message):
        flags.register_validator(name, predicate, message, flag_values=fv)

    check(
        "depth",
        lambda v: v is not None and v >= 8 and (v - 2) % 6 == 0,
        "must be 6n+2 with n >= 1: 8, 14, 20, 32, 44, 56, 110, ...",
    )
    for name in ("learning_rate", "batch_size", "epochs"):
        check(name, lambda v: v is not None and v > 0, "must be positive")
    for name in (
        "synthesizer_learning_rate",
        "num_cpu_devices",
    ):
        check(name, lambda v: v is not None and v > 0, "must be positive")
    for name in (
        "vfbn_depth",
        "dni_depth",
        "steps_per_epoch",
        "validation_examples",
        "train_examples",
        "test_examples",
        "warmup_steps",
        "synthesizer_warmup_steps",
        "tensorboard_update_freq",
        "weight_decay",
        "alpha_gs",
        "synthesizer_loss_weight",
    ):
        check(name, lambda v: v is not None and v >= 0, "must be >= 0")
    check(
        "warmup_learning_rate",
        lambda v: v is not None and v > 0,
        "must be positive",
    )
    check(
        "momentum",
        lambda v: v is not None and 0 <= v < 1,
        "must be in [0, 1)",
    )
    check(
        "lr_decay_factor",
        lambda v: v is not None and 0 < v <= 1,
        "must be in (0, 1]",
    )

    def decay_points_ok(text):
        try:
            points = _float_list(text or "")
        except ValueError:
            return False
        return all(0 < p < 1 for p in points) and list(points) == sorted(
            set(points)
        )

    check(
        "lr_decay_at",
        decay_points_ok,
        "must be comma-separated, increasing fractions strictly between "
        "0 and 1, e.g. 0.5,0.75",
    )

    def cuts_ok(values):
        try:
            cuts = _int_list(values["cuts"] or "")
        except ValueError:
            raise flags.ValidationError(
                f"--cuts={values['cuts']!r} must be comma-separated block "
                "indices, e.g. 9 or 6,12"
            ) from None
        depth = values["depth"]
        if depth is None or depth < 8 or (depth - 2) % 6:
            return True  # --depth reports its own error.
        try:
            spec.validate_cuts(depth, cuts)
        except ValueError as e:
            raise flags.ValidationError(f"--cuts: {e}") from None
        return True

    flags.register_multi_flags_validator(
        ["cuts", "depth"], cuts_ok, flag_values=fv
    )

    def alpha_gs_ok(values):
        if values["alpha_gs"] and values["method"] != "vfbn":
            raise flags.ValidationError(
                f"--alpha_gs={values['alpha_gs']} only applies to "
                f"--method=vfbn (received --method={values['method']}); "
                "drop --alpha_gs or set it to 0"
            )
        return True

    flags.register_multi_flags_validator(
        ["alpha_gs", "method"], alpha_gs_ok, flag_values=fv
    )

    def data_dir_ok(values):
        path = values["data_dir"]
        if path and not os.path.isdir(os.path.expanduser(path)):
            raise flags.ValidationError(
                f"--data_dir={path} does not exist; give a directory "
                "holding a prepared tensorflow-datasets copy of cifar10 "
                f"{_tfds_version()}, or omit --data_dir"
            )
        return True

    flags.register_multi_flags_validator(
        ["data_dir"], data_dir_ok, flag_values=fv
    )

    def image_folder_ok(values):
        folder = values["image_folder"]
        if values["dataset"] == "image_folder":
            if not folder:
                raise flags.ValidationError(
                    "--dataset=image_folder needs --image_folder: a "
                    "directory with train/<class>/ and test/<class>/ "
                    "images, or a .tar.gz of one"
                )
            if not os.path.exists(os.path.expanduser(folder)):
                raise flags.ValidationError(
                    f"--image_folder={folder} does not exist (looked for a "
                    "directory with train/<class>/*.jpg and "
                    "test/<class>/*.jpg, or a .tar.gz of one)"
                )
        elif folder:
            raise flags.ValidationError(
                f"--image_folder={folder} is only read with "
                "--dataset=image_folder (received "
                f"--dataset={values['dataset']})"
            )
        return True

    flags.register_multi_flags_validator(
        ["dataset", "image_folder"], image_folder_ok, flag_values=fv
    )


def check_positional_arguments(argv):
    """Rejects anything left on the command line after flag parsing.

    Args:
        argv: what `absl.app` passes to `main`, program name first.

    Raises:
        app.UsageError: naming the leftover arguments.
    """
    leftover = list(argv[1:])
    if leftover:
        raise app.UsageError(
            f"Unexpected positional arguments: {' '.join(leftover)}. "
            "Every setting is a flag; boolean flags are written --flag, "
            "--noflag or --flag=false (not '--flag False'), and values "
            "after '=' (--batch_size=32)."
        )


def check_no_trailing_comments(flag_values, names):
    """Rejects a text flag whose value ends in what looks like a comment.

    absl takes everything after `=` as the value, so a flagfile line
    `--model_dir=runs/a  # note` would silently name a directory
    "runs/a  # note". Numeric and boolean flags already fail to parse.

    Raises:
        app.UsageError: naming the flag and the line to write instead.
    """
    for name in names:
        value = flag_values[name].value
        if isinstance(value, str) and re.search(r"\s#", value):
            kept = re.split(r"\s+#", value, maxsplit=1)[0]
            raise app.UsageError(
                f"--{name}={value!r} holds what looks like a trailing "
                "comment: absl reads the whole rest of the line as the "
                f"value. Write --{name}={kept} and put the comment on a "
                "line of its own."
            )


def config_from_flags(flag_values=None):
    """Builds a `TrainConfig` from parsed flags."""
    fv = flags.FLAGS if flag_values is None else flag_values
    check_no_trailing_comments(fv, FLAG_NAMES)
    values = {name: fv[name].value for name in FLAG_NAMES}
    values["cuts"] = _int_list(values["cuts"] or "")
    values["lr_decay_at"] = _float_list(values["lr_decay_at"] or "")
    if not values["model_dir"]:
        raise app.UsageError(
            "--model_dir is required: the run directory for checkpoints "
            "and results (an existing one is resumed)."
        )
    values["model_dir"] = format_model_dir(values["model_dir"], values)
    return TrainConfig(**values)


def format_model_dir(template, values):
    """Fills `{method}`, `{seed}`, `{depth}`, ... in a --model_dir value.

    Args:
        template: the --model_dir value, e.g. `runs/quick/{method}-{seed}`.
        values: flag names to values.

    Returns:
        The directory path.

    Raises:
        app.UsageError: for a placeholder that names no flag.
    """
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise app.UsageError(
            f"--model_dir={template}: placeholders must name flags, e.g. "
            f"{{method}} or {{seed}} ({e!r})"
        ) from None


def flagfile_text(flag_values=None, model_dir=None):
    """The trainer's effective flags as a flagfile, one flag a line.

    Args:
        flag_values: parsed `FlagValues`; default `flags.FLAGS`.
        model_dir: written instead of the --model_dir value (e.g. with its
            placeholders filled in).

    Returns:
        The flagfile text; `--flagfile=` it to relaunch the run.
    """
    fv = flags.FLAGS if flag_values is None else flag_values
    lines = [
        "# Effective flags of this run; relaunch (or resume) it with",
        "# python -m trainers.cifar --flagfile=THIS_FILE",
    ]
    for name in FLAG_NAMES:
        flag = fv[name]
        if name == "model_dir" and model_dir is not None:
            lines.append(f"--model_dir={model_dir}")
        elif flag.value is not None:
            lines.append(flag.serialize())
    return "\n".join(lines) + "\n"


# Library-style helpers, usable without flags.


def make_learning_rate_schedule(
    learning_rate,
    total_steps,
    decay_at=(0.5, 0.75),
    decay_factor=0.1,
    warmup_steps=0,
    warmup_learning_rate=0.01,
):
    """Warm-up then step decay, as a serializable Keras schedule.

    Args:
        learning_rate: the rate after warm-up.
        total_steps: training steps in all.
        decay_at: fractions of `total_steps` at which the rate is
            multiplied by `decay_factor`.
        decay_factor: the multiplier at each decay point.
        warmup_steps: steps at `warmup_learning_rate` first.
        warmup_learning_rate: the warm-up rate.

    Returns:
        A `keras.optimizers.schedules.PiecewiseConstantDecay`, or the float
        `learning_rate` when there is neither warm-up nor decay.
    """
    import keras

    boundaries, values = [], []
    if warmup_steps:
        boundaries.append(int(warmup_steps))
        values.append(float(warmup_learning_rate))
    rate = float(learning_rate)
    for fraction in decay_at:
        step = int(round(fraction * total_steps))
        if boundaries and step <= boundaries[-1]:
            continue
        boundaries.append(step)
        values.append(rate)
        rate *= decay_factor
    values.append(rate)
    if not boundaries:
        return float(learning_rate)
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def make_optimizer(learning_rate, momentum=0.9):
    """SGD with momentum (weight decay lives in the kernel regularizers)."""
    import keras

    return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)


def compile_model(
    model,
    optimizer,
    synthesizer_learning_rate=1e-3,
    synthesizer_warmup_steps=0,
    synthesizer_loss_weight=1.0,
    jit_compile=False,
):
    """Compiles a model from `resnet.build_model` for its method.

    Cross-entropy on logits for every output, accuracy on the first.
    Synthetic-gradient models also get an Adam synthesizer optimizer. Call
    it inside the strategy scope the model was built in, if any.

    Args:
        model: a model from `trainers.resnet.build_model`.
        optimizer: the main optimizer (see `make_optimizer`).
        synthesizer_learning_rate: Adam learning rate of the synthesizers.
        synthesizer_warmup_steps: steps before synthetic gradients apply.
        synthesizer_loss_weight: multiplier of the synthesizer losses.
        jit_compile: XLA compilation (off: slower on CPU, and fails under
            MirroredStrategy on logical CPU devices).

    Returns:
        The model, compiled.
    """
    import keras

    from trainers import resnet

    def loss():
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def accuracy():
        return keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    names = resnet.output_names(model)
    kwargs = dict(optimizer=optimizer, jit_compile=jit_compile)
    if len(names) > 1:
        kwargs.update(
            loss={name: loss() for name in names},
            metrics={names[0]: [accuracy()]},
        )
    else:
        kwargs.update(loss=loss(), metrics=[accuracy()])
    if hasattr(model, "boundaries"):
        kwargs.update(
            synthesizer_optimizer=keras.optimizers.Adam(
                synthesizer_learning_rate
            ),
            synthesizer_warmup_steps=synthesizer_warmup_steps,
            synthesizer_loss_weight=synthesizer_loss_weight,
        )
    model.compile(**kwargs)
    return model


def accuracy_key(logs, prefix=""):
    """The key of the reported accuracy in `logs` (single or multi-output)."""
    for key in (f"{prefix}accuracy", f"{prefix}logits_accuracy"):
        if key in logs:
            return key
    raise KeyError(f"no accuracy in {sorted(logs)}")


def configure_devices(strategy, num_cpu_devices=2):
    """Splits the CPU into logical devices for a GPU-less mirrored run.

    Must run before TensorFlow initialises its devices. Where they are
    already initialised (e.g. in a test process), the existing logical
    devices are used.

    Args:
        strategy: one of `STRATEGIES`.
        num_cpu_devices: logical CPU devices wanted for "mirrored".
    """
    import tensorflow as tf

    if strategy != "mirrored" or tf.config.list_physical_devices("GPU"):
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices
        )
    except RuntimeError:
        logging.warning(
            "TensorFlow's devices were already initialised; using the "
            "existing logical CPU devices."
        )


# One strategy object per kind and device set in a process. A second
# MirroredStrategy over the same devices starts its collective group and
# instance keys where the first one's began, and the two then abort each
# other's all-reduces ("Shape mismatch in the collective instance ...").
# Reusing the instance lets one process run several experiments in turn.
_STRATEGIES = {}


def make_strategy(strategy, num_cpu_devices=2):
    """Returns the `tf.distribute` strategy named `strategy`.

    Calls with the same arguments in one process return the same instance.

    Args:
        strategy: "default" (one device), "mirrored" (all local GPUs, or
            `num_cpu_devices` logical CPU devices when there are none) or
            "multi_worker" (`MultiWorkerMirroredStrategy` from TF_CONFIG).
        num_cpu_devices: see `configure_devices`.

    Returns:
        A `tf.distribute.Strategy`.
    """
    import tensorflow as tf

    if strategy == "default":
        return tf.distribute.get_strategy()
    if strategy == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            devices = tuple(d.name for d in gpus)
        else:
            cpus = tf.config.list_logical_devices("CPU")[:num_cpu_devices]
            if len(cpus) < num_cpu_devices:
                logging.warning(
                    "Asked for %d logical CPU devices, %d available.",
                    num_cpu_devices,
                    len(cpus),
                )
            devices = tuple(d.name for d in cpus)
        key = (strategy, devices)
        if key not in _STRATEGIES:
            _STRATEGIES[key] = tf.distribute.MirroredStrategy(list(devices))
        return _STRATEGIES[key]
    if strategy == "multi_worker":
        key = (strategy, os.environ.get("TF_CONFIG", ""))
        if key not in _STRATEGIES:
            _STRATEGIES[key] = tf.distribute.MultiWorkerMirroredStrategy()
        return _STRATEGIES[key]
    raise ValueError(
        f"Expected `strategy` to be one of {STRATEGIES}. "
        f"Received: strategy={strategy!r}"
    )


def _is_chief():
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = cluster.get("task", {})
    kind = task.get("type", "chief")
    if kind == "chief":
        return True
    has_chief = "chief" in cluster.get("cluster", {})
    return kind == "worker" and task.get("index", 0) == 0 and not has_chief


def _worker_dir(model_dir):
    """Where this worker writes: model_dir on the chief, else a subdir."""
    if _is_chief():
        return pathlib.Path(model_dir)
    task = json.loads(os.environ["TF_CONFIG"])["task"]
    return (
        pathlib.Path(model_dir)
        / "workers"
        / (f"{task['type']}-{task['index']}")
    )


def _make_tensorboard_callback(log_dir, update_freq):
    import keras

    class StepAlignedTensorBoard(keras.callbacks.TensorBoard):
        """TensorBoard whose step counter continues across resumes."""

        def on_epoch_begin(self, epoch, logs=None):
            # After BackupAndRestore has restored the optimizer.
            if not getattr(self, "_aligned", False):
                self._global_train_batch = int(
                    keras.ops.convert_to_numpy(self.model.optimizer.iterations)
                )
                self._aligned = True
            super().on_epoch_begin(epoch, logs)

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            self._aligned = False

    return StepAlignedTensorBoard(
        log_dir=str(log_dir),
        update_freq=update_freq or "epoch",
        write_graph=False,
    )


def _log_epoch(epoch, logs):
    shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(logs.items()))
    logging.info("epoch %d: %s", epoch + 1, shown)


def _backup_epoch(backup_dir):
    path = pathlib.Path(backup_dir) / "training_metadata.json"
    if not path.exists():
        return 0
    try:
        return int(json.loads(path.read_text())["epoch"])
    except (ValueError, KeyError):
        return 0


def load_data(config):
    """The training, validation and test pipelines a `TrainConfig` asks for.

    Returns:
        `(train, validation, test, info)` as `data.load_datasets` gives
        them with `return_info=True`.
    """
    from trainers import data

    return data.load_datasets(
        dataset=config.dataset,
        image_folder=config.image_folder,
        data_dir=config.data_dir,
        download=config.tfds_download,
        cache_dir=config.cache_dir,
        validation_examples=config.validation_examples,
        train_examples=config.train_examples or None,
        test_examples=config.test_examples or None,
        batch_size=config.batch_size,
        seed=config.seed,
        augment_train=config.augment,
        return_info=True,
    )


def train(config):
    """Trains, evaluates and writes one run. No flags are read.

    Args:
        config: a `TrainConfig`.

    Returns:
        The results dictionary written to `results.json`.
    """
    import keras
    import numpy as np

    from trainers import data, resnet

    start = time.time()
    out_dir = _worker_dir(config.model_dir)
    finished = out_dir / "results.json"
    if finished.exists() and _backup_epoch(out_dir / "backup") >= (
        config.epochs
    ):
        logging.info("%s is a finished run; not training it again.", out_dir)
        return json.loads(finished.read_text())
    configure_devices(config.strategy, config.num_cpu_devices)
    out_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)

    strategy = make_strategy(config.strategy, config.num_cpu_devices)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise spec.ConfigurationError(
            f"--batch_size={config.batch_size} must be a multiple of the "
            f"{replicas} replicas of --strategy={config.strategy}; e.g. "
            f"--batch_size={max(replicas, config.batch_size // replicas * replicas)}."
        )
    logging.info(
        "Strategy %s: %d replica(s), global batch %d (%d per replica)",
        config.strategy,
        replicas,
        config.batch_size,
        config.batch_size // replicas,
    )

    train_ds, val_ds, test_ds, info = load_data(config)
    steps_per_epoch = config.steps_per_epoch or info.steps_per_epoch
    total_steps = steps_per_epoch * config.epochs
    logging.info(
        "Data: %s; %d train, %d validation, %d test images, %d classes; "
        "%d steps per epoch, %d epochs, %d steps",
        info.source,
        info.train_examples,
        info.validation_examples,
        info.test_examples,
        info.num_classes,
        steps_per_epoch,
        config.epochs,
        total_steps,
    )

    # The one strategy scope of the run: model, optimizers and metrics.
    with strategy.scope():
        model = resnet.build_model(
            config.depth,
            num_classes=info.num_classes,
            method=config.method,
            cuts=config.cuts or None,
            vfbn_depth=config.vfbn_depth,
            alpha_gs=config.alpha_gs,
            weight_decay=config.weight_decay,
            input_shape=info.image_shape,
            dni_depth=config.dni_depth,
            dni_output_scale=config.dni_output_scale,
        )
        schedule = make_learning_rate_schedule(
            config.learning_rate,
            total_steps,
            decay_at=config.lr_decay_at,
            decay_factor=config.lr_decay_factor,
            warmup_steps=config.warmup_steps,
            warmup_learning_rate=config.warmup_learning_rate,
        )
        compile_model(
            model,
            make_optimizer(schedule, config.momentum),
            synthesizer_learning_rate=config.synthesizer_learning_rate,
            synthesizer_warmup_steps=config.synthesizer_warmup_steps,
            synthesizer_loss_weight=config.synthesizer_loss_weight,
        )
    cuts = spec.validate_cuts(config.depth, config.cuts or None)
    logging.info(
        "Model %s: %d parameters, cuts after blocks %s",
        model.name,
        model.count_params(),
        list(cuts),
    )

    names = resnet.output_names(model)
    train_ds = data.with_label_per_output(train_ds, names)
    test_ds = data.with_label_per_output(test_ds, names)
    if val_ds is not None:
        val_ds = data.with_label_per_output(val_ds, names)

    backup_dir = out_dir / "backup"
    resumed_from = _backup_epoch(backup_dir)
    if resumed_from:
        logging.info(
            "Resuming %s after epoch %d of %d",
            out_dir,
            resumed_from,
            config.epochs,
        )
    (out_dir / "checkpoints").mkdir(exist_ok=True)
    # BackupAndRestore goes last: an epoch counts as done for a resume
    # only once its CSV row, checkpoint and TensorBoard summaries are out.
    callbacks = [
        keras.callbacks.CSVLogger(str(out_dir / "metrics.csv"), append=True),
        keras.callbacks.ModelCheckpoint(
            str(out_dir / "checkpoints" / "last.weights.h5"),
            save_weights_only=True,
        ),
        _make_tensorboard_callback(
            out_dir / "tensorboard", config.tensorboard_update_freq
        ),
    ]
    if config.progress_bar:
        # Before the epoch log, so that the bar's line ends first.
        callbacks.append(keras.callbacks.ProgbarLogger())
    callbacks += [
        keras.callbacks.LambdaCallback(on_epoch_end=_log_epoch),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.BackupAndRestore(
            str(backup_dir), double_checkpoint=True, delete_checkpoint=False
        ),
    ]
    fit_start = time.time()
    history = model.fit(
        train_ds,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=val_ds,
        shuffle=False,  # the pipeline shuffles
        callbacks=callbacks,
        verbose=1 if config.progress_bar else 2,
    )
    train_time = time.time() - fit_start

    test_logs = model.evaluate(test_ds, return_dict=True, verbose=0)
    test_accuracy = float(test_logs[accuracy_key(test_logs)])
    model.save(out_dir / "model.keras")

    last_logs = {k: float(v[-1]) for k, v in history.history.items() if len(v)}
    diagnostics = {
        k: v
        for k, v in last_logs.items()
        if k.endswith(("_cosine", "_norm_ratio", "_sg_loss", "_nonfinite"))
    }
    results = {
        "method": config.method,
        "depth": config.depth,
        "cuts": list(cuts),
        "vfbn_depth": config.vfbn_depth if config.method == "vfbn" else None,
        "alpha_gs": config.alpha_gs if config.method == "vfbn" else None,
        "seed": config.seed,
        "test_accuracy": test_accuracy,
        "test_error": 100.0 * (1.0 - test_accuracy),
        "test_loss": float(test_logs["loss"]),
        "wall_time_s": time.time() - start,
        "train_time_s": train_time,
        "epochs": config.epochs,
        "resumed_from_epoch": resumed_from,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "batch_size": config.batch_size,
        "replicas": replicas,
        "strategy": config.strategy,
        "dataset": info.source,
        "train_examples": info.train_examples,
        "validation_examples": info.validation_examples,
        "test_examples": info.test_examples,
        "parameters": int(model.count_params()),
        "final_epoch_metrics": last_logs,
        "boundary_diagnostics": diagnostics,
    }
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    logging.info("Wrote %s", path)
    if not np.isfinite(results["test_loss"]):
        logging.warning("The test loss is not finite: training diverged.")
    return results


class RelaunchError(app.UsageError):
    """A run directory holds a run started with other flags."""


def _check_relaunch(model_dir, text):
    """Refuses to resume a run directory with different flags.

    Only a run that completed an epoch (or finished) holds anything to
    resume; a launch that stopped before that, e.g. on a batch size the
    replicas cannot share, leaves its flags.cfg to be replaced.
    """
    path = pathlib.Path(model_dir) / "flags.cfg"
    progress = _backup_epoch(pathlib.Path(model_dir) / "backup") > 0 or (
        pathlib.Path(model_dir) / "results.json"
    ).exists()
    if not path.exists() or not progress:
        return

    def parse(content):
        out = {}
        for line in content.splitlines():
            if line.startswith("--"):
                key = line[2:].split("=", 1)[0]
                if key.startswith("no") and "=" not in line:
                    key = key[2:]
                out[key] = line
        return out

    old, new = parse(path.read_text()), parse(text)
    changed = sorted(
        k
        for k in set(old) | set(new)
        if old.get(k) != new.get(k) and k not in RELAUNCH_FREE_FLAGS
    )
    if changed:
        details = "; ".join(
            f"{old.get(k, '(unset)')} -> {new.get(k, '(unset)')}"
            for k in changed
        )
        raise RelaunchError(
            f"--model_dir={model_dir} holds a run with different flags "
            f"({details}). Relaunch it with --flagfile={path}, or choose a "
            "new --model_dir."
        )


def main(argv):
    """absl entry point: checks, then trains with the parsed flags."""
    check_positional_arguments(argv)
    try:
        run_from_flags(flags.FLAGS)
    except RelaunchError as e:
        # Not a mistake in how flags are written: one line, not the help.
        sys.exit(f"Error: {e}")


def run_from_flags(flag_values):
    """Runs the trainer from parsed flags, as `main` does after its checks.

    Writes the effective flags to `<model_dir>/flags.cfg`, trains, and
    prints one line with the test accuracy.

    Args:
        flag_values: parsed `FlagValues` holding `define_flags`' flags.

    Returns:
        The results dictionary of `train`.

    Raises:
        app.UsageError: for a missing --model_dir, a run directory holding
            a run with other flags, or an image folder without images.
        SystemExit: with one message, when the dataset is unavailable or an
            image does not decode.
    """
    config = config_from_flags(flag_values)
    text = flagfile_text(flag_values, model_dir=config.model_dir)
    _check_relaunch(config.model_dir, text)
    if config.dataset == "image_folder":
        _preflight_image_folder(config)

    from trainers import data

    if _is_chief():
        model_dir = pathlib.Path(config.model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "flags.cfg").write_text(text)
        logging.info(
            "Run directory %s; relaunch with --flagfile=%s",
            model_dir,
            model_dir / "flags.cfg",
        )
    try:
        results = train(config)
    except (
        data.DatasetUnavailableError,
        data.CorruptImageError,
        spec.ConfigurationError,
    ) as e:
        sys.exit(f"Error: {e}")
    print(
        f"method={results['method']} depth={results['depth']} "
        f"test_accuracy={results['test_accuracy']:.4f} "
        f"test_error={results['test_error']:.2f}% "
        f"wall_time={results['wall_time_s']:.0f}s "
        f"results={pathlib.Path(config.model_dir) / 'results.json'}",
        flush=True,
    )
    return results


def _preflight_image_folder(config):
    """Finds the image folder and its images before anything else runs."""
    from trainers import data

    try:
        root = data.prepare_image_folder(
            config.image_folder, cache_dir=config.cache_dir
        )
        _, _, classes = data.list_image_files(root / "train")
        data.list_image_files(root / "test", classes)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(f"--image_folder={config.image_folder}: {e}")


def run():
    """Defines the flags and runs `main` as an absl app."""
    define_flags()
    flags.mark_flag_as_required("model_dir")
    app.run(main)


if __name__ == "__main__":
    run()
