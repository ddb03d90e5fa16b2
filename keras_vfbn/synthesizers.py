"""Gradient synthesizers: models that predict the gradient at a boundary.

Every synthesizer predicts the *per-example* gradient `d l_i / d h_i` of the
task loss with respect to the boundary's input `h`, free of the batch size;
the boundary divides by the global batch size before handing it downwards.
The sign is that of a gradient of the loss: descent goes along `-delta_hat`.
"""

import keras
import tensorflow as tf

_PACKAGE = "keras_vfbn"


def _is_feature_map(shape):
    return len(shape) == 4


def _broadcast_labels(h, labels):
    """Concatenates one-hot labels to `h`, as extra channels for maps."""
    labels = tf.cast(labels, h.dtype)
    if _is_feature_map(h.shape):
        spatial = tf.shape(h)[1:3]
        tiled = tf.tile(
            labels[:, None, None, :], [1, spatial[0], spatial[1], 1]
        )
        return tf.concat([h, tiled], axis=-1)
    return tf.concat([h, labels], axis=-1)


def _check_input_shape(layer, input_shape):
    if len(input_shape) not in (2, 4):
        raise ValueError(
            f"{type(layer).__name__} takes dense vectors of shape "
            "(batch, features) or feature maps of shape (batch, height, "
            f"width, channels). Received input shape {tuple(input_shape)}. "
            "Flatten or reshape the boundary's input to one of these."
        )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Synthesizer(keras.layers.Layer):
    """Base class of gradient synthesizers.

    A subclass implements `build(input_shape)` (creating every weight, since
    the boundary builds its synthesizer before training starts) and
    `synthesize(h, labels, training)`. It may override `regression_loss` to
    change how the prediction is fitted to the gradient that arrives from
    above.

    Args:
        num_classes: Number of classes; labels reach `synthesize` one-hot with
            this width.
        **kwargs: Standard `keras.layers.Layer` arguments.

    Call arguments (of `synthesize`):
        h: The boundary's input, with gradients stopped.
        labels: One-hot labels of shape `(batch, num_classes)`.
        training: Python bool, whether sublayers run in training mode.

    Returns (of `synthesize`):
        The per-example gradient `delta_hat`, shaped like `h`, or a tuple
        `(delta_hat, extra_loss)` where `extra_loss` is a scalar added to this
        synthesizer's training objective.
    """

    def __init__(self, num_classes, **kwargs):
        if "alpha_gs" in kwargs:
            raise ValueError(
                "`alpha_gs` weights the virtual network's own task loss and "
                f"only applies to VFBNSynthesizer; {type(self).__name__} has "
                f"no virtual network. Received: alpha_gs={kwargs['alpha_gs']}."
                " Use keras_vfbn.VFBNSynthesizer(..., alpha_gs=...) or drop "
                "the argument."
            )
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                "`num_classes` must be a positive integer. Received: "
                f"num_classes={num_classes!r}"
            )
        self.num_classes = num_classes

    def synthesize(self, h, labels, training=False):
        raise NotImplementedError(
            f"{type(self).__name__} must implement "
            "`synthesize(h, labels, training)`."
        )

    def regression_loss(self, synthetic, target):
        """The batch mean of `|| target_i - synthetic_i ||^2`.

        Args:
            synthetic: The predicted per-example gradient.
            target: The per-example gradient that arrived from above (true,
                or bootstrapped from the boundary above), gradients stopped.

        Returns:
            A scalar.
        """
        squared = tf.square(target - synthetic)
        axes = list(range(1, len(synthetic.shape)))
        return tf.reduce_mean(tf.reduce_sum(squared, axis=axes))

    def call(self, h, labels, training=False):
        return self.synthesize(h, labels, training=training)

    def compute_output_shape(self, input_shape, labels_shape=None):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["num_classes"] = self.num_classes
        return config


class _ResidualBlock(keras.layers.Layer):
    """A post-activation basic block (He et al. 2016), width-preserving.

    Two 3x3 convolutions (with batch normalization if asked) on feature maps,
    or two dense layers on vectors, added to the input before a ReLU.
    """

    def __init__(self, width, maps, batch_norm, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.maps = maps
        self.batch_norm = batch_norm

    def build(self, input_shape):
        if self.maps:
            self.layer1 = keras.layers.Conv2D(
                self.width,
                3,
                padding="same",
                use_bias=not self.batch_norm,
                dtype=self.dtype_policy,
            )
            self.layer2 = keras.layers.Conv2D(
                self.width,
                3,
                padding="same",
                use_bias=not self.batch_norm,
                dtype=self.dtype_policy,
            )
        else:
            self.layer1 = keras.layers.Dense(
                self.width, dtype=self.dtype_policy
            )
            self.layer2 = keras.layers.Dense(
                self.width, dtype=self.dtype_policy
            )
        self.norm1 = self.norm2 = None
        if self.maps and self.batch_norm:
            self.norm1 = keras.layers.BatchNormalization(
                dtype=self.dtype_policy
            )
            self.norm2 = keras.layers.BatchNormalization(
                dtype=self.dtype_policy
            )
        for layer in (self.layer1, self.norm1, self.layer2, self.norm2):
            if layer is not None:
                layer.build(input_shape)

    def call(self, x, training=False):
        y = self.layer1(x)
        if self.norm1 is not None:
            y = self.norm1(y, training=training)
        y = self.layer2(tf.nn.relu(y))
        if self.norm2 is not None:
            y = self.norm2(y, training=training)
        return tf.nn.relu(x + y)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package=_PACKAGE)
class VFBNSynthesizer(Synthesizer):
    """Virtual forward-backward network (Miyato et al. 2017).

    A small *virtual forward network* `v(h)` maps the boundary's input to
    class logits, standing in for the part of the real network above the
    boundary. The synthetic gradient is the gradient of the task loss through
    it, `delta_hat = d l(y, v(h)) / d h`; fitting it to the true gradient
    differentiates through that gradient (second order).

    For `depth=0` on a vector, `v(h) = W h + b` and
    `delta_hat = W^T (softmax(W h + b) - y)`.

    Args:
        num_classes: Number of classes.
        depth: Number of residual blocks before the head. 0 is global average
            pooling (for feature maps) and a dense softmax layer; `d >= 1`
            puts `d` residual blocks first. The paper's VFBN for ResNet-110 is
            `depth=2`.
        alpha_gs: Weight of the virtual network's own task loss in the
            synthesizer objective: `e + alpha_gs * mean_i l(y_i, v(h_i))`.
            0 is pure gradient matching; large values make the VFBN a local
            classifier. The paper's best is 1e-3.
        filters: Width of the residual blocks (channels for feature maps,
            units for vectors). Defaults to the width of the input; another
            width adds a linear projection first.
        batch_norm: Whether residual blocks on feature maps use batch
            normalization, as the CIFAR ResNets do.
        **kwargs: Standard `keras.layers.Layer` arguments.

    Input shape:
        `(batch, features)` or `(batch, height, width, channels)`.

    Output shape:
        The same as the input.

    Note:
        With `batch_norm=True` and `training=True`, batch statistics couple
        the examples of a batch, so `delta_hat_i` is the gradient of the
        virtual network's summed batch loss with respect to `h_i`, not of
        `l_i` alone.

    Reference:
        - [Miyato et al. 2017, Synthetic Gradient Methods with Virtual
          Forward-Backward Networks](https://openreview.net/forum?id=Bkh5h6mXg)
    """

    def __init__(
        self,
        num_classes,
        depth=2,
        alpha_gs=0.0,
        filters=None,
        batch_norm=True,
        **kwargs,
    ):
        super().__init__(num_classes, **kwargs)
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(
                "`depth` must be a non-negative integer (0 is a linear "
                f"softmax head). Received: depth={depth!r}"
            )
        if alpha_gs < 0:
            raise ValueError(
                f"`alpha_gs` must be >= 0. Received: alpha_gs={alpha_gs}"
            )
        self.depth = depth
        self.alpha_gs = float(alpha_gs)
        self.filters = filters
        self.batch_norm = batch_norm

    def build(self, input_shape):
        _check_input_shape(self, input_shape)
        maps = _is_feature_map(input_shape)
        width = self.filters or input_shape[-1]
        shape = tuple(input_shape)
        self.projection = None
        if self.depth and width != input_shape[-1]:
            if maps:
                self.projection = keras.layers.Conv2D(
                    width, 1, use_bias=False, dtype=self.dtype_policy
                )
            else:
                self.projection = keras.layers.Dense(
                    width, dtype=self.dtype_policy
                )
            self.projection.build(shape)
            shape = shape[:-1] + (width,)
        self.blocks = []
        for _ in range(self.depth):
            block = _ResidualBlock(
                width, maps, self.batch_norm, dtype=self.dtype_policy
            )
            block.build(shape)
            self.blocks.append(block)
        self.pool = (
            keras.layers.GlobalAveragePooling2D(dtype=self.dtype_policy)
            if maps
            else None
        )
        self.head = keras.layers.Dense(
            self.num_classes, dtype=self.dtype_policy
        )
        self.head.build((shape[0], shape[-1]))

    def virtual_forward(self, h, training=False):
        """The virtual network's logits `v(h)`."""
        x = h
        if self.projection is not None:
            x = self.projection(x)
        for block in self.blocks:
            x = block(x, training=training)
        if self.pool is not None:
            x = self.pool(x)
        return self.head(x)

    def synthesize(self, h, labels, training=False):
        with tf.GradientTape() as tape:
            tape.watch(h)
            logits = self.virtual_forward(h, training=training)
            losses = keras.losses.categorical_crossentropy(
                labels, logits, from_logits=True
            )
            total = tf.reduce_sum(losses)
        synthetic = tape.gradient(total, h)
        if self.alpha_gs:
            return synthetic, self.alpha_gs * tf.reduce_mean(losses)
        return synthetic

    def get_config(self):
        config = super().get_config()
        config.update(
            depth=self.depth,
            alpha_gs=self.alpha_gs,
            filters=self.filters,
            batch_norm=self.batch_norm,
        )
        return config


def _zero_output_layer(units, maps, kernel_size, dtype):
    zeros = dict(
        kernel_initializer="zeros", bias_initializer="zeros", dtype=dtype
    )
    if maps:
        return keras.layers.Conv2D(units, kernel_size, padding="same", **zeros)
    return keras.layers.Dense(units, **zeros)


class _LabelConditioned(Synthesizer):
    """Shared arguments of Jaderberg's label-conditioned synthesizers."""

    def __init__(self, num_classes, output_scale=1e-3, kernel_size=3, **kw):
        super().__init__(num_classes, **kw)
        if output_scale <= 0:
            raise ValueError(
                "`output_scale` must be > 0. Received: "
                f"output_scale={output_scale}"
            )
        self.output_scale = float(output_scale)
        self.kernel_size = kernel_size

    def get_config(self):
        config = super().get_config()
        config.update(
            output_scale=self.output_scale, kernel_size=self.kernel_size
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LinearSynthesizer(_LabelConditioned):
    """Jaderberg et al.'s linear, label-conditioned synthesizer (cDNI).

    `delta_hat = output_scale * g([h, y])` where `g` is one linear map on
    vectors, or one convolution with no non-linearity on feature maps (the
    one-hot label broadcast as extra channels). `g` starts at zero, so
    training starts from a zero synthetic gradient.

    Args:
        num_classes: Number of classes.
        output_scale: Fixed factor on `g`'s output. True per-example
            gradients are small (about 1e-3 per element at the middle of a
            CIFAR ResNet); without this factor a zero-initialised regressor
            trained with Adam(1e-3) overshoots and diverges within a few dozen
            steps.
        kernel_size: Kernel size of the convolution on feature maps.
        normalize_inputs: Whether `h` is standardised per channel with batch
            statistics (synchronised across replicas) before the linear map.
            Without it the prediction grows with `h`, and on a real CIFAR
            network the lower section and the synthesizer fed each other
            until the weights overflowed (NaN within ~60 steps).
        **kwargs: Standard `keras.layers.Layer` arguments.

    Input shape:
        `(batch, features)` or `(batch, height, width, channels)`.

    Output shape:
        The same as the input.

    Reference:
        - [Jaderberg et al. 2016, Decoupled Neural Interfaces using Synthetic
          Gradients](https://arxiv.org/abs/1608.05343)
    """

    def __init__(self, num_classes, normalize_inputs=True, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.normalize_inputs = normalize_inputs

    def build(self, input_shape):
        _check_input_shape(self, input_shape)
        maps = _is_feature_map(input_shape)
        self.input_norm = None
        if self.normalize_inputs:
            self.input_norm = keras.layers.BatchNormalization(
                center=False,
                scale=False,
                synchronized=True,
                dtype=self.dtype_policy,
            )
            self.input_norm.build(input_shape)
        self.output_layer = _zero_output_layer(
            input_shape[-1], maps, self.kernel_size, self.dtype_policy
        )
        conditioned = tuple(input_shape[:-1]) + (
            input_shape[-1] + self.num_classes,
        )
        self.output_layer.build(conditioned)

    def synthesize(self, h, labels, training=False):
        if self.input_norm is not None:
            h = self.input_norm(h, training=training)
        return self.output_scale * self.output_layer(
            _broadcast_labels(h, labels)
        )

    def get_config(self):
        config = super().get_config()
        config["normalize_inputs"] = self.normalize_inputs
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ResNetSynthesizer(_LabelConditioned):
    """Jaderberg et al.'s small residual, label-conditioned synthesizer.

    A stem (3x3 convolution, batch normalization and ReLU on feature maps; a
    dense layer and ReLU on vectors) on `[h, y]`, `depth` residual blocks,
    then a zero-initialised output layer scaled by `output_scale`.

    Args:
        num_classes: Number of classes.
        depth: Number of residual blocks.
        filters: Width of the hidden layers; defaults to the input's width.
        output_scale: Fixed factor on the output layer (see
            `LinearSynthesizer`).
        kernel_size: Kernel size of the output convolution on feature maps.
        **kwargs: Standard `keras.layers.Layer` arguments.

    Input shape:
        `(batch, features)` or `(batch, height, width, channels)`.

    Output shape:
        The same as the input.

    Reference:
        - [Jaderberg et al. 2016, Decoupled Neural Interfaces using Synthetic
          Gradients](https://arxiv.org/abs/1608.05343)
    """

    def __init__(self, num_classes, depth=2, filters=None, **kwargs):
        super().__init__(num_classes, **kwargs)
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(
                "`depth` must be a non-negative integer. Received: "
                f"depth={depth!r}"
            )
        self.depth = depth
        self.filters = filters

    def build(self, input_shape):
        _check_input_shape(self, input_shape)
        maps = _is_feature_map(input_shape)
        width = self.filters or input_shape[-1]
        conditioned = tuple(input_shape[:-1]) + (
            input_shape[-1] + self.num_classes,
        )
        hidden = tuple(input_shape[:-1]) + (width,)
        if maps:
            self.stem = keras.layers.Conv2D(
                width,
                3,
                padding="same",
                use_bias=False,
                dtype=self.dtype_policy,
            )
            self.stem_norm = keras.layers.BatchNormalization(
                dtype=self.dtype_policy
            )
            self.stem_norm.build(hidden)
        else:
            self.stem = keras.layers.Dense(width, dtype=self.dtype_policy)
            self.stem_norm = None
        self.stem.build(conditioned)
        self.blocks = []
        for _ in range(self.depth):
            block = _ResidualBlock(
                width, maps, batch_norm=True, dtype=self.dtype_policy
            )
            block.build(hidden)
            self.blocks.append(block)
        self.output_layer = _zero_output_layer(
            input_shape[-1], maps, self.kernel_size, self.dtype_policy
        )
        self.output_layer.build(hidden)

    def synthesize(self, h, labels, training=False):
        x = self.stem(_broadcast_labels(h, labels))
        if self.stem_norm is not None:
            x = self.stem_norm(x, training=training)
        x = tf.nn.relu(x)
        for block in self.blocks:
            x = block(x, training=training)
        return self.output_scale * self.output_layer(x)

    def get_config(self):
        config = super().get_config()
        config.update(depth=self.depth, filters=self.filters)
        return config
