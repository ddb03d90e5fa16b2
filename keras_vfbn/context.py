"""What a training step shares with the boundaries it runs through.

Labels are not a model input: a functional model keeps the inputs its user
gave it, and `predict` needs no labels. During a training step the model
opens a `StepContext` holding the batch's labels; every boundary reached by
the forward pass reads them from it and leaves a `BoundaryRecord` behind for
the step to train the synthesizers with.

The current context is thread-local, because `tf.distribute` runs each
replica's step function in a thread of its own.
"""

import contextlib
import dataclasses
import threading
from typing import Any

import tensorflow as tf

_state = threading.local()


@dataclasses.dataclass
class BoundaryRecord:
    """What one boundary produced during the forward pass of a step.

    Attributes:
        boundary: The `SyntheticGradientBoundary` layer.
        inputs: `stop_gradient` of the boundary's input `h`.
        labels: The one-hot labels given to the synthesizer.
        outputs: The boundary's output; the gradient of the task loss with
            respect to it is the synthesizer's regression target.
        synthetic: The synthesizer's per-example gradient `delta_hat`.
        extra_loss: A scalar added to the synthesizer's objective (the VFBN
            alpha_gs term), or None.
        finite: Scalar bool, whether every entry of `synthetic` is finite.
    """

    boundary: Any
    inputs: tf.Tensor
    labels: tf.Tensor
    outputs: tf.Tensor
    synthetic: tf.Tensor
    extra_loss: Any
    finite: tf.Tensor


class StepContext:
    """The labels of one training step and the records of its boundaries.

    Args:
        labels: The batch's labels, sparse class indices or one-hot.
        use_synthetic: Scalar bool tensor. When False the boundaries pass the
            true gradient downwards (synthesizer warm-up) while still
            synthesizing a gradient to train on.
        tape: The gradient tape of the task loss, or None. Each boundary
            output is watched on it so that its gradient (the target) exists
            even where nothing trainable lies below the boundary.
    """

    def __init__(self, labels, use_synthetic=True, tape=None):
        self.labels = labels
        self.use_synthetic = tf.convert_to_tensor(use_synthetic, tf.bool)
        self.tape = tape
        self.records = []


def current():
    """Returns the innermost open `StepContext` of this thread, or None."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def step_context(labels, use_synthetic=True, tape=None):
    """Opens a `StepContext` for the forward pass of one training step.

    `SyntheticGradientModel.train_step` opens it for you. Use it directly only
    in a custom training loop:

        with tf.GradientTape() as tape:
            with keras_vfbn.step_context(y, tape=tape) as ctx:
                logits = model(x, training=True)
            loss = loss_fn(y, logits)
        # ctx.records holds one BoundaryRecord per boundary reached.

    Yields:
        The new `StepContext`.
    """
    ctx = StepContext(labels, use_synthetic=use_synthetic, tape=tape)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(ctx)
    try:
        yield ctx
    finally:
        stack.pop()
