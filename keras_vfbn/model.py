"""A Keras model whose training step decouples the sections of a network."""

import warnings

import keras
import tensorflow as tf

from keras_vfbn import context
from keras_vfbn.boundary import SyntheticGradientBoundary, num_replicas

_PACKAGE = "keras_vfbn"
_EPSILON = 1e-12


def _flat(x):
    return tf.reshape(x, [tf.shape(x)[0], -1])


def _gradient_agreement(synthetic, target):
    """Per-example cosine (batch mean) and the ratio of batch norms."""
    synthetic, target = _flat(synthetic), _flat(target)
    dot = tf.reduce_sum(synthetic * target, axis=1)
    norms = tf.norm(synthetic, axis=1) * tf.norm(target, axis=1)
    cosine = tf.reduce_mean(dot / tf.maximum(norms, _EPSILON))
    ratio = tf.norm(synthetic) / tf.maximum(tf.norm(target), _EPSILON)
    return cosine, ratio


def _zero_unless_finite(grads):
    """The gradients of one synthesizer, or zeros if any entry is not finite."""
    present = [g for g in grads if g is not None]
    if not present:
        return grads, tf.constant(True)
    finite = tf.reduce_all(
        [tf.reduce_all(tf.math.is_finite(g)) for g in present]
    )
    return [
        None if g is None else tf.where(finite, g, tf.zeros_like(g))
        for g in grads
    ], finite


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SyntheticGradientModel(keras.Model):
    """A functional model trained with synthetic gradients at its boundaries.

    Build it like `keras.Model(inputs, outputs)` from a graph that contains
    `SyntheticGradientBoundary` layers. Its training step keeps three groups
    of weights apart:

    - below a boundary: updated with the boundary's synthetic gradient only;
    - above the last boundary: updated with the true gradient of the loss;
    - synthesizers: updated with their own optimizer, from their regression
      loss onto the gradient that arrives from above (plus the VFBN alpha_gs
      term), never from the task loss.

    With several boundaries the target at a boundary is what the section
    above it backpropagates from its own synthetic gradient (bootstrapping).
    `predict` and `evaluate` run the plain network: boundaries are exact
    identities outside training.

    Per boundary `b`, training logs `b_sg_loss` (synthesizer objective),
    `b_cosine` (cosine similarity between synthetic and target gradient, per
    example, averaged), `b_norm_ratio` (`|delta_hat| / |delta|` over the
    batch) and `b_nonfinite` (steps whose synthetic gradient held NaN or Inf
    and was not applied). They appear in the progress bar, `History` and
    `keras.callbacks.TensorBoard`, as epoch means.

    Example:

    ```python
    inputs = keras.Input((32, 32, 3))
    h = lower_layers(inputs)
    h = keras_vfbn.SyntheticGradientBoundary(
        keras_vfbn.VFBNSynthesizer(num_classes=10, depth=2, alpha_gs=1e-3))(h)
    outputs = upper_layers(h)
    model = keras_vfbn.SyntheticGradientModel(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        synthesizer_optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(train_dataset, epochs=10)
    ```

    Note:
        When a synthetic gradient holds NaN or Inf, the section below gets no
        gradient from the loss for that step, but weight decay written as a
        regularization loss, and a stateful optimizer's momentum, still move
        it.
    """

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        *,
        synthesizer_optimizer="adam",
        synthesizer_loss_weight=1.0,
        synthesizer_warmup_steps=0,
        **kwargs,
    ):
        """Configures the model for training.

        Args:
            optimizer: The optimizer of the network's own weights.
            loss: The task loss, as for `keras.Model.compile`.
            synthesizer_optimizer: The optimizer of all synthesizers' weights
                (a name, config or instance; not the same instance as
                `optimizer`).
            synthesizer_loss_weight: Factor on the synthesizers' objective.
            synthesizer_warmup_steps: For this many first steps (counted by
                `optimizer.iterations`), synthesizers train while the true
                gradient still flows to the sections below.
            **kwargs: Any other `keras.Model.compile` argument.
        """
        super().compile(optimizer=optimizer, loss=loss, **kwargs)
        synthesizer_optimizer = keras.optimizers.get(synthesizer_optimizer)
        if synthesizer_optimizer is self.optimizer:
            raise ValueError(
                "`synthesizer_optimizer` must be a different optimizer "
                "instance from `optimizer`: the two keep separate state for "
                "separate weights. Pass a new instance, e.g. "
                "keras.optimizers.Adam(1e-3)."
            )
        if synthesizer_loss_weight < 0:
            raise ValueError(
                "`synthesizer_loss_weight` must be >= 0. Received: "
                f"synthesizer_loss_weight={synthesizer_loss_weight}"
            )
        if int(synthesizer_warmup_steps) < 0:
            raise ValueError(
                "`synthesizer_warmup_steps` must be >= 0. Received: "
                f"synthesizer_warmup_steps={synthesizer_warmup_steps}"
            )
        self.synthesizer_optimizer = synthesizer_optimizer
        self.synthesizer_loss_weight = float(synthesizer_loss_weight)
        self.synthesizer_warmup_steps = int(synthesizer_warmup_steps)
        if not self.boundaries:
            warnings.warn(
                "This SyntheticGradientModel has no SyntheticGradientBoundary"
                " layer, so it trains with plain backpropagation.",
                stacklevel=2,
            )

        # Both optimizers are built here, under the caller's strategy scope:
        # an optimizer first built inside a replica step fails under
        # tf.distribute.MirroredStrategy.
        main_variables, synthesizer_groups = self._variable_groups()
        if not self.optimizer.built:
            self.optimizer.build(main_variables)
        if not self.synthesizer_optimizer.built:
            self.synthesizer_optimizer.build(
                [v for group in synthesizer_groups.values() for v in group]
            )

    def get_compile_config(self):
        config = super().get_compile_config()
        if self.compiled:
            config.update(
                synthesizer_optimizer=keras.saving.serialize_keras_object(
                    self.synthesizer_optimizer
                ),
                synthesizer_loss_weight=self.synthesizer_loss_weight,
                synthesizer_warmup_steps=self.synthesizer_warmup_steps,
            )
        return config

    def compile_from_config(self, config):
        self.compile(**keras.saving.deserialize_keras_object(config))

    @property
    def boundaries(self):
        """The `SyntheticGradientBoundary` layers of this model."""
        return [
            layer
            for layer in self._flatten_layers(include_self=False)
            if isinstance(layer, SyntheticGradientBoundary)
        ]

    def _variable_groups(self):
        """Main trainable variables and, per boundary, its synthesizer's."""
        synthesizer_groups = {
            boundary.name: list(boundary.synthesizer.trainable_variables)
            for boundary in self.boundaries
        }
        taken = {id(v) for group in synthesizer_groups.values() for v in group}
        main = [v for v in self.trainable_variables if id(v) not in taken]
        return main, synthesizer_groups

    def _boundary_metric_names(self):
        return {m.name for b in self.boundaries for m in b.metrics}

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        main_variables, synthesizer_groups = self._variable_groups()
        synthesizer_variables = [
            v for group in synthesizer_groups.values() for v in group
        ]
        use_synthetic = tf.greater_equal(
            self.optimizer.iterations, self.synthesizer_warmup_steps
        )
        local_batch = tf.shape(tf.nest.flatten(x)[0])[0]
        replicas = num_replicas()
        global_batch = tf.cast(local_batch * replicas, tf.float32)
        loss_scale = self.optimizer.loss_scale_factor or 1.0

        # Forward pass: each boundary synthesizes its gradient on the way up.
        with tf.GradientTape(watch_accessed_variables=False) as outer_tape:
            outer_tape.watch([v.value for v in synthesizer_variables])
            with tf.GradientTape() as tape:
                with context.step_context(y, use_synthetic, tape) as step:
                    y_pred = self(x, training=True)
                loss = self._compute_loss(
                    x=x,
                    y=y,
                    y_pred=y_pred,
                    sample_weight=sample_weight,
                    training=True,
                )
                self._loss_tracker.update_state(
                    loss * tf.cast(replicas, loss.dtype),
                    sample_weight=local_batch,
                )
                loss = self.optimizer.scale_loss(loss)

            # One gradient call: main weights (true above the boundaries,
            # synthetic below) and the targets at every boundary output.
            records = step.records
            grads = tape.gradient(
                loss, main_variables + [r.outputs for r in records]
            )
            main_grads = grads[: len(main_variables)]
            targets = grads[len(main_variables) :]

            # Synthesizer objectives, differentiated below w.r.t. their
            # weights only (second order for VFBN).
            objectives = []
            for record, target in zip(records, targets):
                if target is None:
                    raise ValueError(
                        f"The output of boundary '{record.boundary.name}' "
                        "does not reach the loss, so its synthesizer has "
                        "nothing to learn from. Remove the boundary or "
                        "connect its output to the model's outputs."
                    )
                target = tf.stop_gradient(target) * tf.cast(
                    global_batch / loss_scale, target.dtype
                )
                synthesizer = record.boundary.synthesizer
                objective = synthesizer.regression_loss(
                    record.synthetic, target
                )
                if record.extra_loss is not None:
                    objective += record.extra_loss
                objectives.append(objective)
                self._update_boundary_metrics(
                    record, target, objective, local_batch, replicas
                )
            total = tf.add_n(objectives) if objectives else tf.constant(0.0)
            total *= self.synthesizer_loss_weight / replicas

        synthesizer_grads = []
        if synthesizer_variables:
            raw = outer_tape.gradient(total, synthesizer_variables)
            start = 0
            for group in synthesizer_groups.values():
                group_grads = raw[start : start + len(group)]
                synthesizer_grads += _zero_unless_finite(group_grads)[0]
                start += len(group)

        # Apply both optimizers.
        self.optimizer.apply_gradients(zip(main_grads, main_variables))
        if synthesizer_variables:
            self.synthesizer_optimizer.apply_gradients(
                [
                    (g, v)
                    for g, v in zip(synthesizer_grads, synthesizer_variables)
                    if g is not None
                ]
            )

        # Metrics.
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _update_boundary_metrics(
        self, record, target, objective, local_batch, replicas
    ):
        boundary = record.boundary
        weight = tf.cast(local_batch, tf.float32) * tf.cast(
            record.finite, tf.float32
        )
        cosine, ratio = _gradient_agreement(record.synthetic, target)
        for tracker, value in (
            (boundary.loss_tracker, objective),
            (boundary.cosine_tracker, cosine),
            (boundary.norm_ratio_tracker, ratio),
        ):
            value = tf.where(record.finite, tf.cast(value, tf.float32), 0.0)
            tracker.update_state(value, sample_weight=weight)
        boundary.nonfinite_tracker.update_state(
            tf.cast(tf.logical_not(record.finite), tf.float32) / replicas
        )

    def test_step(self, data):
        logs = super().test_step(data)
        hidden = self._boundary_metric_names()
        return {k: v for k, v in logs.items() if k not in hidden}
