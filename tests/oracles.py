"""Test synthesizers shared by the test modules."""

import keras
import tensorflow as tf

import keras_vfbn

NUM_CLASSES = 3


def per_example_loss(labels, logits):
    return keras.losses.categorical_crossentropy(
        labels, logits, from_logits=True
    )


class OracleSynthesizer(keras_vfbn.Synthesizer):
    """Returns the true per-example gradient through the real upper layers.

    `upper` is a plain callable, so the upper layers' weights are not
    tracked as synthesizer weights. The shapes of what it is asked to
    synthesize from, and of the targets it is fitted to, are recorded.
    """

    def __init__(self, upper, **kwargs):
        super().__init__(NUM_CLASSES, **kwargs)
        self.upper = upper
        self.input_shapes = []
        self.target_shapes = []

    def synthesize(self, h, labels, training=False):
        self.input_shapes.append(tuple(h.shape))
        with tf.GradientTape() as tape:
            tape.watch(h)
            total = tf.reduce_sum(per_example_loss(labels, self.upper(h)))
        return tape.gradient(total, h)

    def regression_loss(self, synthetic, target):
        self.target_shapes.append(tuple(target.shape))
        return super().regression_loss(synthetic, target)
