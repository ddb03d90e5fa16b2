"""A batch-norm layer that runs TensorFlow's fused kernel (a proposal).

Keras 3's `keras.layers.BatchNormalization` on the TensorFlow backend is
built from generic ops: `tf.nn.moments` (a mean, a squared difference and
a second mean over the whole activation) followed by
`tf.nn.batch_normalization` (an rsqrt and two element-wise passes), and
its gradient is the gradient of each of those ops. TensorFlow 1 and
`tf.keras` 2 used the single `FusedBatchNormV3` kernel instead, which
makes one pass for the statistics and one for the output, and has a fused
gradient kernel. `FusedBatchNormalization` is the Keras 3 layer with that
kernel substituted in training and inference; weights, configuration,
moving-statistics update and numerics are those of the Keras layer.
"""

import keras
import tensorflow as tf


def _reduced_count(x, axis):
    """Elements per channel: a Python float when the shape is static."""
    dims = [d for i, d in enumerate(x.shape) if i != axis % 4]
    if all(d is not None for d in dims):
        count = 1
        for d in dims:
            count *= d
        return float(count)
    shape = tf.shape(x)
    return tf.cast(tf.reduce_prod(shape) // shape[axis], tf.float32)


@keras.saving.register_keras_serializable(package="keras_vfbn_bench")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` on TensorFlow's fused kernel.

    Takes the same arguments as `keras.layers.BatchNormalization` and has
    the same weights and configuration, so a model can swap one for the
    other and load the other's weights. The fused kernel is used for
    rank-4 inputs normalised over the channel axis (last, or 1 for
    channels-first) without a mask, renorm or synchronized statistics;
    anything else falls back to the Keras layer's own computation.

    The moving variance is updated with the biased batch variance, as the
    Keras layer does (the fused kernel reports the unbiased one, which is
    corrected here). The epsilon is passed to the kernel as given:
    `tf.nn.fused_batch_norm` would silently raise it to 1.001e-5.

    Note: Only the TensorFlow backend is supported.

    Call arguments:
        inputs: a tensor of rank 4 for the fused path, any rank otherwise.
        training: whether to normalise with the batch statistics and
            update the moving statistics.
        mask: as for `keras.layers.BatchNormalization`; disables fusion.

    Input shape:
        Arbitrary.

    Output shape:
        Same shape as input.

    Reference:
        Ioffe and Szegedy, "Batch Normalization: Accelerating Deep Network
        Training by Reducing Internal Covariate Shift", ICML 2015.
    """

    def _data_format(self, inputs):
        if (
            len(inputs.shape) != 4
            or self.renorm
            or self.synchronized
            or keras.backend.backend() != "tensorflow"
        ):
            return None
        axis = self.axis % 4
        if axis == 3:
            return "NHWC"
        if axis == 1:
            return "NCHW"
        return None

    def call(self, inputs, training=None, mask=None):
        data_format = self._data_format(inputs)
        if data_format is None or mask is not None:
            return super().call(inputs, training=training, mask=mask)

        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = tf.cast(inputs, compute_dtype)
        channels = x.shape[self.axis]
        gamma = (
            tf.cast(self.gamma, tf.float32)
            if self.scale
            else tf.ones([channels], tf.float32)
        )
        beta = (
            tf.cast(self.beta, tf.float32)
            if self.center
            else tf.zeros([channels], tf.float32)
        )

        if training and self.trainable:
            empty = tf.constant([], tf.float32)
            outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x,
                scale=gamma,
                offset=beta,
                mean=empty,
                variance=empty,
                epsilon=self.epsilon,
                data_format=data_format,
                is_training=True,
            )
            # The kernel returns the unbiased batch variance; Keras keeps
            # the biased one in its moving average.
            count = _reduced_count(x, self.axis)
            variance = variance * ((count - 1.0) / count)
            momentum = self.momentum
            self.moving_mean.assign(
                tf.cast(self.moving_mean, tf.float32) * momentum
                + mean * (1.0 - momentum)
            )
            self.moving_variance.assign(
                tf.cast(self.moving_variance, tf.float32) * momentum
                + variance * (1.0 - momentum)
            )
        else:
            outputs, _, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x,
                scale=gamma,
                offset=beta,
                mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32),
                epsilon=self.epsilon,
                data_format=data_format,
                is_training=False,
            )
        return tf.cast(outputs, self.compute_dtype)


def with_fused_batch_norm(model):
    """A copy of a functional model with every batch norm fused.

    Each `keras.layers.BatchNormalization` becomes a
    `FusedBatchNormalization` of the same configuration and weights; the
    other layers are copied as they are.

    Args:
        model: a functional `keras.Model`.

    Returns:
        The new model.
    """

    def clone(layer):
        config = layer.get_config()
        if type(layer) is keras.layers.BatchNormalization:
            new = FusedBatchNormalization.from_config(config)
        else:
            new = layer.__class__.from_config(config)
        return new

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy
