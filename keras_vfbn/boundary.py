"""The boundary layer that cuts a network into separately updated sections."""

import keras
import tensorflow as tf

from keras_vfbn import context
from keras_vfbn.synthesizers import Synthesizer

_PACKAGE = "keras_vfbn"


def num_replicas():
    """The number of replicas that share a global batch in this context."""
    replica = tf.distribute.get_replica_context()
    if replica is not None:
        return replica.num_replicas_in_sync
    return tf.distribute.get_strategy().num_replicas_in_sync


def substitute_gradient(
    h, synthetic, global_batch, use_synthetic, finite, scale=1.0
):
    """Identity on `h` whose gradient is replaced by `synthetic / batch`.

    Args:
        h: The boundary's input.
        synthetic: The per-example synthetic gradient, shaped like `h`.
        global_batch: The global batch size `B`, as a float scalar.
        use_synthetic: Scalar bool. When False the gradient from above passes
            unchanged (synthesizer warm-up).
        finite: Scalar bool, whether `synthetic` is entirely finite. When
            False the section below receives a zero gradient for this step.
        scale: Factor on the synthetic gradient handed downwards.

    Returns:
        A tensor equal to `h`.
    """

    @tf.custom_gradient
    def identity(x):
        def grad(upstream):
            scaled = tf.where(
                finite,
                synthetic * (scale / global_batch),
                tf.zeros_like(synthetic),
            )
            return tf.where(use_synthetic, scaled, upstream)

        return tf.identity(x), grad

    return identity(h)


def labels_to_one_hot(labels, num_classes, layer_name):
    """Converts sparse or one-hot labels to one-hot, or says what is wrong."""
    labels = tf.convert_to_tensor(labels)
    shape = labels.shape
    sparse = shape.rank == 1 or (shape.rank == 2 and shape[-1] == 1)
    if num_classes > 1 and sparse:
        indices = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        return tf.one_hot(indices, num_classes)
    if (
        shape.rank == 2
        and shape[-1] == num_classes
        and labels.dtype.is_floating
    ):
        return labels
    raise ValueError(
        f"Boundary '{layer_name}' cannot use labels of shape {shape} and "
        f"dtype {labels.dtype.name} as its synthesizer's context: expected "
        "sparse class indices of shape (batch,) or (batch, 1), or float "
        f"one-hot labels of shape (batch, {num_classes}). Check that the "
        "dataset yields (inputs, labels) with one label per example and that "
        f"the synthesizer's num_classes ({num_classes}) matches the task."
    )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SyntheticGradientBoundary(keras.layers.Layer):
    """Cuts a network: the section below learns from a synthesized gradient.

    The forward pass is the identity. In a training step of
    `SyntheticGradientModel`, the synthesizer predicts the per-example
    gradient `delta_hat` of the task loss with respect to this layer's input
    from the input (gradients stopped) and the batch's labels; the section
    below then receives `delta_hat / B`, with `B` the global batch size, in
    place of the true gradient, which is kept as the synthesizer's
    regression target. Outside training the layer is an exact identity: it
    needs no labels and runs no synthesizer.

    Args:
        synthesizer: A `keras_vfbn.Synthesizer`, e.g. `VFBNSynthesizer`.
        gradient_scale: Factor on the synthetic gradient handed to the
            section below; the synthesizer still regresses onto the true
            gradient unscaled, and the diagnostics compare the unscaled
            prediction. A synthesizer fitted by least squares predicts a
            shrunken gradient: where it explains a fraction `c^2` of the
            target, its norm is about `c` times the target's and its step
            along the true gradient about `c^2` of backprop's, so the
            section below trains as if at a learning rate `c^2` times the
            one set. A factor above 1 restores part of that step (and
            scales the prediction's error alike); the logged
            `b_norm_ratio` is a guide to its size. 1 hands the prediction
            down as it is.
        **kwargs: Standard `keras.layers.Layer` arguments.

    Call arguments:
        inputs: The activations at the cut.
        training: Python bool. Only in training mode, inside
            `SyntheticGradientModel.train_step` (or `keras_vfbn.step_context`),
            is the gradient replaced.

    Input shape:
        `(batch, features)` or `(batch, height, width, channels)`.

    Output shape:
        The same as the input.

    Reference:
        - [Jaderberg et al. 2016, Decoupled Neural Interfaces using Synthetic
          Gradients](https://arxiv.org/abs/1608.05343)
        - [Miyato et al. 2017, Synthetic Gradient Methods with Virtual
          Forward-Backward Networks](https://openreview.net/forum?id=Bkh5h6mXg)
    """

    def __init__(self, synthesizer=None, gradient_scale=1.0, **kwargs):
        super().__init__(**kwargs)
        if not gradient_scale > 0:
            raise ValueError(
                "`gradient_scale` must be > 0. Received: "
                f"gradient_scale={gradient_scale!r}"
            )
        self.gradient_scale = float(gradient_scale)
        if isinstance(synthesizer, dict):
            synthesizer = keras.saving.deserialize_keras_object(synthesizer)
        if not isinstance(synthesizer, Synthesizer):
            raise TypeError(
                "SyntheticGradientBoundary needs a synthesizer to predict "
                "the gradient of the section below. Received: "
                f"synthesizer={synthesizer!r}. Pass one, e.g. "
                "SyntheticGradientBoundary(keras_vfbn.VFBNSynthesizer("
                "num_classes=10, depth=2))."
            )
        self.synthesizer = synthesizer
        self.supports_masking = True
        # Diagnostics, updated by SyntheticGradientModel.train_step.
        self.loss_tracker = keras.metrics.Mean(name=f"{self.name}_sg_loss")
        self.cosine_tracker = keras.metrics.Mean(name=f"{self.name}_cosine")
        self.norm_ratio_tracker = keras.metrics.Mean(
            name=f"{self.name}_norm_ratio"
        )
        self.nonfinite_tracker = keras.metrics.Sum(
            name=f"{self.name}_nonfinite"
        )

    def build(self, input_shape):
        # A synthesizer restored by `load_model` arrives already built from
        # its own build config; building it again would add its sublayers
        # twice.
        if not self.synthesizer.built:
            self.synthesizer.build(input_shape)
            self.synthesizer.built = True

    def call(self, inputs, training=False):
        if not training:
            return inputs
        step = context.current()
        if step is None:
            raise RuntimeError(
                f"SyntheticGradientBoundary '{self.name}' was called in "
                "training mode outside a synthetic-gradient training step, "
                "so nothing would train its synthesizer and training would "
                "silently be plain backpropagation. Build the model with "
                "keras_vfbn.SyntheticGradientModel(inputs, outputs) instead "
                "of keras.Model, or open keras_vfbn.step_context(labels) "
                "around the forward pass of a custom training loop."
            )
        h = tf.stop_gradient(inputs)
        labels = labels_to_one_hot(
            step.labels, self.synthesizer.num_classes, self.name
        )
        result = self.synthesizer.synthesize(h, labels, training=True)
        synthetic, extra_loss = (
            result if isinstance(result, tuple) else (result, None)
        )
        if synthetic.shape[1:] != h.shape[1:]:
            raise ValueError(
                f"The synthesizer of boundary '{self.name}' returned a "
                f"gradient of shape {synthetic.shape}, but the boundary's "
                f"input has shape {h.shape}. A synthesizer must predict the "
                "gradient with respect to its input, so its output must have "
                "the input's shape; fix its output layer's width."
            )
        synthetic = tf.cast(synthetic, inputs.dtype)
        finite = tf.reduce_all(tf.math.is_finite(synthetic))
        global_batch = tf.cast(
            tf.shape(inputs)[0] * num_replicas(), inputs.dtype
        )
        outputs = substitute_gradient(
            inputs,
            synthetic,
            global_batch,
            step.use_synthetic,
            finite,
            scale=self.gradient_scale,
        )
        if step.tape is not None:
            step.tape.watch(outputs)
        step.records.append(
            context.BoundaryRecord(
                boundary=self,
                inputs=h,
                labels=labels,
                outputs=outputs,
                synthetic=synthetic,
                extra_loss=extra_loss,
                finite=finite,
            )
        )
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["synthesizer"] = keras.saving.serialize_keras_object(
            self.synthesizer
        )
        config["gradient_scale"] = self.gradient_scale
        return config
