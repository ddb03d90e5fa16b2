"""CIFAR ResNet-(6n+2) builders for every training method of the seed's table.

The network follows He et al. (2016), section 4.2: a 3x3 convolution with 16
filters, then three stages of `n` basic blocks at 16, 32 and 64 filters (the
first block of stages 2 and 3 halves the resolution), global average
pooling and a dense classifier. Shortcuts are parameter-free (option A:
subsample and zero-pad the channels), which gives the published parameter
counts (0.27 M for ResNet-20, 1.7 M for ResNet-110).

The network is cut between residual blocks. Blocks are numbered
1 ... 3n from the input; a cut `k` places a boundary after block `k`, so
valid cuts are 1 ... 3n - 1. The default is one cut in the middle,
`(3n // 2,)`: the seed's two sections.

Methods (`METHODS`):

- `bp`: the whole network trained by backpropagation.
- `half`: only the layers below the first cut, with their own classifier
  head (global pooling + dense), trained by backpropagation.
- `local`: subnetwork-wise supervised loss. Each section below a cut feeds
  an auxiliary classifier head (global pooling + dense) trained on the
  labels; the section above receives the section's output through a
  stop-gradient, so no gradient crosses a cut. The model has one output
  per head, `logits` first; only `logits` is the reported prediction.
- `dni_linear`, `dni_resnet`: Jaderberg et al. (2016) synthesizers at each
  cut (`keras_vfbn.LinearSynthesizer`, `keras_vfbn.ResNetSynthesizer`).
- `vfbn`: Miyato et al. (2017) virtual forward-backward networks at each
  cut (`keras_vfbn.VFBNSynthesizer`).

Models with boundaries are `keras_vfbn.SyntheticGradientModel`s; the others
are plain `keras.Model`s. All outputs are logits.
"""

import keras
import tensorflow as tf

from trainers.spec import (
    METHODS,
    SYNTHETIC_GRADIENT_METHODS,
    blocks_per_stage,
    default_cuts,
    validate_cuts,
)

__all__ = [
    "METHODS",
    "SYNTHETIC_GRADIENT_METHODS",
    "ShortcutPad",
    "StopGradient",
    "blocks_per_stage",
    "build_model",
    "default_cuts",
    "make_synthesizer",
    "output_names",
    "validate_cuts",
]

STAGE_FILTERS = (16, 32, 64)


@keras.saving.register_keras_serializable(package="trainers")
class ShortcutPad(keras.layers.Layer):
    """Parameter-free ResNet shortcut (He et al. 2016, option A).

    Subsamples the input spatially by `strides` and zero-pads the channel
    axis up to `filters`.

    Args:
        filters: number of output channels, at least the input's.
        strides: spatial subsampling factor.
        **kwargs: base layer keyword arguments, such as `name`.

    Input shape:
        `(batch, height, width, channels)`.

    Output shape:
        `(batch, ceil(height / strides), ceil(width / strides), filters)`.
    """

    def __init__(self, filters, strides=2, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.strides = strides

    def call(self, inputs):
        x = inputs[:, :: self.strides, :: self.strides, :]
        extra = self.filters - x.shape[-1]
        return tf.pad(
            x,
            [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]],
        )

    def compute_output_shape(self, input_shape):
        def sub(size):
            return None if size is None else -(-size // self.strides)

        return (
            input_shape[0],
            sub(input_shape[1]),
            sub(input_shape[2]),
            self.filters,
        )

    def get_config(self):
        config = super().get_config()
        config.update({"filters": self.filters, "strides": self.strides})
        return config


@keras.saving.register_keras_serializable(package="trainers")
class StopGradient(keras.layers.Layer):
    """Identity in the forward pass; passes no gradient backwards."""

    def call(self, inputs):
        return tf.stop_gradient(inputs)


def _regularizer(weight_decay):
    # He et al. add `weight_decay * w` to each kernel's gradient; an L2
    # penalty `c * sum(w ** 2)` adds `2 c w`.
    if not weight_decay:
        return None
    return keras.regularizers.L2(weight_decay / 2.0)


def _conv_bn(x, filters, strides, weight_decay, name, relu=True):
    x = keras.layers.Conv2D(
        filters,
        3,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=_regularizer(weight_decay),
        name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(
        momentum=0.9, epsilon=1e-5, name=f"{name}_bn"
    )(x)
    if relu:
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def _basic_block(x, filters, strides, weight_decay, name):
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = ShortcutPad(filters, strides, name=f"{name}_shortcut")(x)
    y = _conv_bn(x, filters, strides, weight_decay, f"{name}_1")
    y = _conv_bn(y, filters, 1, weight_decay, f"{name}_2", relu=False)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _classifier_head(x, num_classes, weight_decay, name):
    x = keras.layers.GlobalAveragePooling2D(name=f"{name}_pool")(x)
    return keras.layers.Dense(
        num_classes,
        kernel_initializer="he_normal",
        kernel_regularizer=_regularizer(weight_decay),
        name=name,
    )(x)


def make_synthesizer(
    method,
    num_classes,
    vfbn_depth=2,
    alpha_gs=0.0,
    dni_depth=2,
    dni_output_scale=1e-3,
):
    """Builds the gradient synthesizer of one boundary for `method`.

    Args:
        method: one of `SYNTHETIC_GRADIENT_METHODS`.
        num_classes: number of classes (the synthesizer's label context).
        vfbn_depth: residual blocks in a VFBN before its pooling and dense
            head (0: pooling and dense only).
        alpha_gs: weight of the VFBN's own task loss in its training loss.
        dni_depth: convolutional blocks of the Jaderberg small-ResNet.
        dni_output_scale: fixed output scale of Jaderberg synthesizers.

    Returns:
        A `keras_vfbn` synthesizer layer.
    """
    import keras_vfbn

    if method == "vfbn":
        return keras_vfbn.VFBNSynthesizer(
            num_classes, depth=vfbn_depth, alpha_gs=alpha_gs
        )
    if method == "dni_linear":
        return keras_vfbn.LinearSynthesizer(
            num_classes, output_scale=dni_output_scale
        )
    if method == "dni_resnet":
        return keras_vfbn.ResNetSynthesizer(
            num_classes, depth=dni_depth, output_scale=dni_output_scale
        )
    raise ValueError(
        f"Expected `method` to be one of {SYNTHETIC_GRADIENT_METHODS}. "
        f"Received: method={method!r}"
    )


def build_model(
    depth,
    num_classes=10,
    method="bp",
    cuts=None,
    vfbn_depth=2,
    alpha_gs=0.0,
    weight_decay=1e-4,
    input_shape=(32, 32, 3),
    dni_depth=2,
    dni_output_scale=1e-3,
    gradient_scale=1.0,
    name=None,
):
    """Builds a CIFAR ResNet-(6n+2) set up for one training method.

    Creates variables in the current distribution strategy scope, if any;
    opens none of its own.

    Args:
        depth: `6n + 2` (20, 32, 44, 56, 110, ...).
        num_classes: number of output logits.
        method: one of `METHODS` (see the module docstring).
        cuts: residual-block indices after which the network is cut; `None`
            for one cut in the middle.
        vfbn_depth: residual blocks in each VFBN (`method="vfbn"` only).
        alpha_gs: weight of each VFBN's own task loss (`method="vfbn"`
            only).
        weight_decay: L2 weight decay on convolution and dense kernels,
            as a gradient coefficient: each kernel's gradient gains
            `weight_decay * w`.
        input_shape: image shape, channels last.
        dni_depth: blocks of the Jaderberg small-ResNet synthesizer.
        dni_output_scale: output scale of Jaderberg synthesizers.
        gradient_scale: factor on the synthetic gradient each boundary
            hands down (see `keras_vfbn.SyntheticGradientBoundary`).
        name: model name; defaults to e.g. `resnet20_vfbn`.

    Returns:
        A `keras.Model` (bp, half, local) or a
        `keras_vfbn.SyntheticGradientModel` (dni_linear, dni_resnet, vfbn)
        whose first output is the class logits.

    Raises:
        ValueError: for an unknown method, a depth that is not 6n+2, a cut
            outside the network, or alpha_gs set for a method without VFBN.
    """
    if method not in METHODS:
        raise ValueError(
            f"Expected `method` to be one of {METHODS}. "
            f"Received: method={method!r}"
        )
    n = blocks_per_stage(depth)
    cuts = validate_cuts(depth, cuts)
    if alpha_gs and method != "vfbn":
        raise ValueError(
            "`alpha_gs` only applies to method='vfbn'. Received: "
            f"alpha_gs={alpha_gs!r} with method={method!r}"
        )
    name = name or f"resnet{depth}_{method}"

    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn(inputs, STAGE_FILTERS[0], 1, weight_decay, "stem")
    aux_outputs = []
    block = 0
    for stage, filters in enumerate(STAGE_FILTERS, start=1):
        for index in range(1, n + 1):
            block += 1
            strides = 2 if stage > 1 and index == 1 else 1
            x = _basic_block(
                x,
                filters,
                strides,
                weight_decay,
                f"stage{stage}_block{index}",
            )
            if block not in cuts:
                continue
            cut_number = cuts.index(block) + 1
            if method == "half":
                logits = _classifier_head(
                    x, num_classes, weight_decay, "logits"
                )
                return keras.Model(inputs, logits, name=name)
            if method == "local":
                aux_outputs.append(
                    _classifier_head(
                        x, num_classes, weight_decay, f"aux{cut_number}"
                    )
                )
                x = StopGradient(name=f"stop_gradient{cut_number}")(x)
            elif method in SYNTHETIC_GRADIENT_METHODS:
                import keras_vfbn

                synthesizer = make_synthesizer(
                    method,
                    num_classes,
                    vfbn_depth=vfbn_depth,
                    alpha_gs=alpha_gs,
                    dni_depth=dni_depth,
                    dni_output_scale=dni_output_scale,
                )
                x = keras_vfbn.SyntheticGradientBoundary(
                    synthesizer,
                    gradient_scale=gradient_scale,
                    name=f"boundary{cut_number}",
                )(x)
    logits = _classifier_head(x, num_classes, weight_decay, "logits")

    if method == "local":
        return keras.Model(inputs, [logits] + aux_outputs, name=name)
    if method in SYNTHETIC_GRADIENT_METHODS:
        import keras_vfbn

        return keras_vfbn.SyntheticGradientModel(inputs, logits, name=name)
    return keras.Model(inputs, logits, name=name)


def output_names(model):
    """Names of the model's output layers, reported prediction first."""
    return [t._keras_history.operation.name for t in model.outputs]
