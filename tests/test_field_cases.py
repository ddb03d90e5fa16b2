"""Field cases C1 to C10 of FIELD-CASES.md, each with its exact right value.

Most tests train one step of SGD with learning rate 1 and no momentum, so
that a weight's change is exactly minus its gradient, and compare against
plain backpropagation from identical initial weights or against a closed
form.
"""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from oracles import NUM_CLASSES, OracleSynthesizer

import keras_vfbn

BATCH = 8


def sgd():
    return keras.optimizers.SGD(learning_rate=1.0)


def task_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def batch(features=5, num_classes=NUM_CLASSES, size=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, features)).astype("float32")
    y = (np.arange(size) % num_classes).astype("int32")
    return x, y


def values(variables):
    return [np.array(v.numpy()) for v in variables]


def as_json(config):
    return json.loads(json.dumps(config))


def fit_one_step(model, x, y):
    return model.fit(
        x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0
    )


class ConstantSynthesizer(keras_vfbn.Synthesizer):
    """Predicts the same value for every entry; has no weights."""

    def __init__(self, value, **kwargs):
        super().__init__(NUM_CLASSES, **kwargs)
        self.value = value

    def synthesize(self, h, labels, training=False):
        return tf.ones_like(h) * self.value


class CountingResNetSynthesizer(keras_vfbn.ResNetSynthesizer):
    """A `ResNetSynthesizer` that counts the traces/calls of `synthesize`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def synthesize(self, h, labels, training=False):
        self.calls += 1
        return super().synthesize(h, labels, training=training)


class ReadOutSynthesizer(keras_vfbn.Synthesizer):
    """Objective = batch mean of the input's first feature; zero gradient."""

    def __init__(self, **kwargs):
        super().__init__(NUM_CLASSES, **kwargs)

    def synthesize(self, h, labels, training=False):
        return tf.zeros_like(h), tf.reduce_mean(h[:, 0])

    def regression_loss(self, synthetic, target):
        return tf.constant(0.0)


def mlp(synthesizer, hidden=4, name="cut"):
    """Dense(hidden) -> boundary -> Dense(3), and its three parts."""
    inputs = keras.Input((5,))
    lower = keras.layers.Dense(hidden)
    boundary = keras_vfbn.SyntheticGradientBoundary(synthesizer, name=name)
    upper = keras.layers.Dense(NUM_CLASSES)
    model = keras_vfbn.SyntheticGradientModel(
        inputs, upper(boundary(lower(inputs)))
    )
    return model, lower, boundary, upper


def plain_copy(lower, upper, relu=False):
    """A plain keras.Model with fresh layers holding the same weights."""
    inputs = keras.Input((5,))
    plain_lower = keras.layers.Dense(lower.units)
    plain_upper = keras.layers.Dense(upper.units)
    h = plain_lower(inputs)
    if relu:
        h = keras.layers.ReLU()(h)
    model = keras.Model(inputs, plain_upper(h))
    plain_lower.set_weights(lower.get_weights())
    plain_upper.set_weights(upper.get_weights())
    return model, plain_lower, plain_upper


# Synthetic-gradient semantics.


def test_c1_warmup_trains_synthesizer_without_leaking_below():
    x, y = batch()
    keras.utils.set_random_seed(1)
    model, lower, boundary, upper = mlp(
        keras_vfbn.VFBNSynthesizer(NUM_CLASSES, depth=0)
    )
    plain, plain_lower, plain_upper = plain_copy(lower, upper)
    synth_vars = boundary.synthesizer.trainable_variables
    synth_before = values(synth_vars)
    assert np.all(boundary.synthesizer.head.kernel.numpy() != 0)

    model.compile(
        optimizer=sgd(),
        loss=task_loss(),
        synthesizer_optimizer=sgd(),
        synthesizer_warmup_steps=1,
    )
    plain.compile(optimizer=sgd(), loss=task_loss())
    fit_one_step(model, x, y)
    fit_one_step(plain, x, y)

    # Warm-up: the lower section gets exactly backprop's gradient.
    np.testing.assert_array_equal(lower.kernel.numpy(), plain_lower.kernel)
    np.testing.assert_array_equal(lower.bias.numpy(), plain_lower.bias)
    np.testing.assert_array_equal(upper.kernel.numpy(), plain_upper.kernel)
    # ...while the synthesizer is trained.
    for before, after in zip(synth_before, values(synth_vars)):
        assert np.max(np.abs(after - before)) > 1e-4


def test_c2_synthesizer_loss_weight_touches_only_synthesizers():
    x, y = batch()
    keras.utils.set_random_seed(2)
    runs = []
    initial = None
    for weight in (1.0, 1000.0):
        model, lower, boundary, upper = mlp(
            keras_vfbn.VFBNSynthesizer(NUM_CLASSES, depth=0)
        )
        if initial is None:
            initial = model.get_weights()
        model.set_weights(initial)
        synth_vars = boundary.synthesizer.trainable_variables
        synth_ids = {id(v) for v in synth_vars}
        main_vars = [v for v in model.variables if id(v) not in synth_ids]
        synth_before = values(synth_vars)
        model.compile(
            optimizer=sgd(),
            loss=task_loss(),
            synthesizer_optimizer=sgd(),
            synthesizer_loss_weight=weight,
        )
        fit_one_step(model, x, y)
        runs.append(
            (
                values(main_vars),
                [a - b for a, b in zip(values(synth_vars), synth_before)],
            )
        )

    (main_1, step_1), (main_1000, step_1000) = runs
    for a, b in zip(main_1, main_1000):
        np.testing.assert_array_equal(a, b)
    # The lower section did move (synthetic gradient applied).
    assert np.max(np.abs(main_1[0] - initial[0])) > 1e-4
    for a, b in zip(step_1, step_1000):
        assert np.max(np.abs(a)) > 1e-6
        np.testing.assert_allclose(b, 1000.0 * a, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("placement", ["before_relu", "after_relu"])
def test_c3_oracle_at_either_side_of_relu_matches_backprop(placement):
    x, y = batch()
    keras.utils.set_random_seed(3)
    lower = keras.layers.Dense(4)
    relu = keras.layers.ReLU()
    upper = keras.layers.Dense(NUM_CLASSES)
    if placement == "before_relu":
        synthesizer = OracleSynthesizer(lambda h: upper(relu(h)))
    else:
        synthesizer = OracleSynthesizer(lambda h: upper(h))
    boundary = keras_vfbn.SyntheticGradientBoundary(synthesizer, name="cut")

    inputs = keras.Input((5,))
    h = lower(inputs)
    if placement == "before_relu":
        outputs = upper(relu(boundary(h)))
    else:
        outputs = upper(boundary(relu(h)))
    model = keras_vfbn.SyntheticGradientModel(inputs, outputs)
    plain, plain_lower, plain_upper = plain_copy(lower, upper, relu=True)

    model.compile(
        optimizer=sgd(),
        loss=task_loss(),
        synthesizer_optimizer=sgd(),
        run_eagerly=True,
    )
    plain.compile(optimizer=sgd(), loss=task_loss())
    history = fit_one_step(model, x, y)
    fit_one_step(plain, x, y)

    for ours, theirs in (
        (lower.kernel, plain_lower.kernel),
        (lower.bias, plain_lower.bias),
        (upper.kernel, plain_upper.kernel),
        (upper.bias, plain_upper.bias),
    ):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-6)
    # The target is taken where the prediction is made and applied.
    assert synthesizer.input_shapes == [(BATCH, 4)]
    assert synthesizer.target_shapes == [(BATCH, 4)]
    assert history.history["cut_sg_loss"][0] < 1e-10


def test_c4_zero_synthesizer_first_step_modes_and_predict():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(BATCH, 32, 32, 3)).astype("float32")
    y = (np.arange(BATCH) % 10).astype("int32")
    keras.utils.set_random_seed(4)
    synthesizer = CountingResNetSynthesizer(10, depth=1, filters=4)
    conv = keras.layers.Conv2D(4, 3, padding="same")
    boundary = keras_vfbn.SyntheticGradientBoundary(synthesizer)
    pool = keras.layers.GlobalAveragePooling2D()
    dense = keras.layers.Dense(10)
    inputs = keras.Input((32, 32, 3))
    model = keras_vfbn.SyntheticGradientModel(
        inputs, dense(pool(boundary(conv(inputs))))
    )
    plain = keras.Model(inputs, dense(pool(conv(inputs))))
    model.compile(
        optimizer=sgd(),
        loss=task_loss(),
        synthesizer_optimizer=keras.optimizers.SGD(0.1),
    )
    statistics = synthesizer.non_trainable_variables
    assert len(statistics) == 6  # moving mean and variance of 3 BN layers
    lower_before = values(conv.trainable_variables)
    upper_before = values(dense.trainable_variables)
    stats_initial = values(statistics)

    # First step: exactly zero below the boundary, non-zero above.
    fit_one_step(model, x, y)
    for before, after in zip(lower_before, values(conv.trainable_variables)):
        np.testing.assert_array_equal(after, before)
    for before, after in zip(upper_before, values(dense.trainable_variables)):
        assert np.all(after != before)
    stats_fit1 = values(statistics)
    for before, after in zip(stats_initial, stats_fit1):
        assert np.max(np.abs(after - before)) > 1e-6

    # evaluate neither runs the synthesizers nor moves their statistics...
    calls = synthesizer.calls
    model.evaluate(x, y, batch_size=BATCH, verbose=0)
    assert synthesizer.calls == calls
    for before, after in zip(stats_fit1, values(statistics)):
        np.testing.assert_array_equal(after, before)

    # ...and a second fit trains them again.
    fit_one_step(model, x, y)
    for before, after in zip(stats_fit1, values(statistics)):
        assert np.max(np.abs(after - before)) > 1e-6

    # predict is the plain network and runs no synthesizer.
    stats_fit2 = values(statistics)
    x4 = rng.normal(size=(4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        model.predict(x4, verbose=0), plain.predict(x4, verbose=0), atol=1e-6
    )
    assert synthesizer.calls == calls
    for before, after in zip(stats_fit2, values(statistics)):
        np.testing.assert_array_equal(after, before)


C5_MODES = ["eager", "tf_function", "tf_function_jit", "fit", "fit_jit"]


@pytest.mark.parametrize("keyword", [False, True], ids=["positional", "kw"])
@pytest.mark.parametrize("mode", C5_MODES)
def test_c5_constant_synthetic_gradient_scale(mode, keyword):
    x = np.ones((2, 5), "float32")
    y = np.array([0, 2], "int32")
    keras.utils.set_random_seed(5)
    dense = keras.layers.Dense(4, use_bias=False)
    boundary = keras_vfbn.SyntheticGradientBoundary(ConstantSynthesizer(7.0))
    upper = keras.layers.Dense(NUM_CLASSES)

    def cut(h, training):
        if keyword:
            return boundary(inputs=h, training=training)
        return boundary(h, training=training)

    if mode.startswith("fit"):
        inputs = keras.Input((5,))
        model = keras_vfbn.SyntheticGradientModel(
            inputs, upper(cut(dense(inputs), training=None))
        )
        model.compile(
            optimizer=sgd(),
            loss=task_loss(),
            synthesizer_optimizer=sgd(),
            jit_compile=mode == "fit_jit",
        )
        before = dense.kernel.numpy()
        fit_one_step(model, x, y)
        gradient = before - dense.kernel.numpy()
    else:
        dense.build((None, 5))
        boundary.build((None, 4))
        upper.build((None, 4))
        loss_fn = task_loss()

        def step(x, y):
            with tf.GradientTape() as tape:
                with keras_vfbn.step_context(y, tape=tape):
                    logits = upper(cut(dense(x), training=True))
                loss = loss_fn(y, logits)
            return tape.gradient(loss, dense.kernel)

        if mode != "eager":
            step = tf.function(step, jit_compile=mode == "tf_function_jit")
        gradient = step(tf.constant(x), tf.constant(y)).numpy()

    # Per-example gradient 7 at the output, scaled by 1/B, summed over B
    # examples of ones: 7 in every entry, with nothing of the true gradient.
    np.testing.assert_allclose(gradient, np.full((5, 4), 7.0), rtol=1e-6)


def test_c5_gradient_scale_multiplies_only_the_gradient_handed_down():
    x = np.ones((2, 5), "float32")
    y = np.array([0, 2], "int32")
    keras.utils.set_random_seed(5)
    inputs = keras.Input((5,))
    dense = keras.layers.Dense(4, use_bias=False)
    boundary = keras_vfbn.SyntheticGradientBoundary(
        ConstantSynthesizer(7.0), gradient_scale=0.5, name="cut"
    )
    model = keras_vfbn.SyntheticGradientModel(
        inputs, keras.layers.Dense(NUM_CLASSES)(boundary(dense(inputs)))
    )
    model.compile(
        optimizer=sgd(), loss=task_loss(), synthesizer_optimizer=sgd()
    )
    before = dense.kernel.numpy()
    fit_one_step(model, x, y)
    # Half the constant 7, with nothing of the true gradient.
    np.testing.assert_allclose(
        before - dense.kernel.numpy(), np.full((5, 4), 3.5), rtol=1e-6
    )
    assert boundary.get_config()["gradient_scale"] == 0.5
    with pytest.raises(ValueError, match="gradient_scale"):
        keras_vfbn.SyntheticGradientBoundary(
            ConstantSynthesizer(7.0), gradient_scale=0.0
        )


# Keras integration.


def test_c6_functional_conv_boundary_shape_and_summary():
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(8, 3)(inputs)
    boundary = keras_vfbn.SyntheticGradientBoundary(
        keras_vfbn.VFBNSynthesizer(10, depth=1), name="cut"
    )
    cut = boundary(h)
    outputs = keras.layers.Dense(10)(keras.layers.Flatten()(cut))
    model = keras_vfbn.SyntheticGradientModel(inputs, outputs)

    assert tuple(cut.shape) == (None, 30, 30, 8)
    assert tuple(boundary.output.shape) == (None, 30, 30, 8)
    assert boundary.count_params() == boundary.synthesizer.count_params() > 0
    lines = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    rows = [
        row
        for row in "\n".join(lines).splitlines()
        if "cut (SyntheticGradientBoundary)" in row
    ]
    assert len(rows) == 1
    assert "(None, 30, 30, 8)" in rows[0]
    assert model.predict(np.zeros((2, 32, 32, 3)), verbose=0).shape == (2, 10)


def test_c7_save_load_keeps_config_predictions_and_synthetic_step(tmp_path):
    x, y = batch()
    keras.utils.set_random_seed(7)
    model, _, _, _ = mlp(keras_vfbn.VFBNSynthesizer(NUM_CLASSES, depth=0))
    # One warm-up step before saving: the step after loading must be
    # synthetic, so the step counter has to survive the round trip.
    model.compile(
        optimizer=sgd(),
        loss=task_loss(),
        synthesizer_optimizer=keras.optimizers.SGD(0.5),
        synthesizer_loss_weight=2.0,
        synthesizer_warmup_steps=1,
    )
    fit_one_step(model, x, y)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)

    assert isinstance(loaded, keras_vfbn.SyntheticGradientModel)
    # Equal as saved (JSON turns the tuples of build configs into lists).
    assert as_json(loaded.get_config()) == as_json(model.get_config())
    assert as_json(loaded.get_compile_config()) == as_json(
        model.get_compile_config()
    )
    assert loaded.synthesizer_loss_weight == 2.0
    assert loaded.synthesizer_warmup_steps == 1
    assert int(loaded.optimizer.iterations) == 1
    assert int(loaded.synthesizer_optimizer.iterations) == 1
    assert loaded.synthesizer_optimizer.learning_rate.numpy() == 0.5
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)

    # The next step moves the lower Dense by the synthesizer's output / B.
    lower = loaded.layers[1]
    boundary = loaded.layers[2]
    assert isinstance(boundary, keras_vfbn.SyntheticGradientBoundary)
    h = lower(x)
    labels = tf.one_hot(y, NUM_CLASSES)
    delta_hat = boundary.synthesizer.synthesize(h, labels, training=True)
    expected = x.T @ delta_hat.numpy() / BATCH
    with tf.GradientTape() as tape:
        loss = task_loss()(y, loaded(x))
    true = tape.gradient(loss, lower.kernel).numpy()
    assert np.max(np.abs(true - expected)) > 1e-3

    before = lower.kernel.numpy()
    fit_one_step(loaded, x, y)
    np.testing.assert_allclose(
        before - lower.kernel.numpy(), expected, atol=1e-6
    )


@pytest.fixture
def strategies(mirrored_strategy):
    """One device, and the shared two-replica strategy of conftest.py."""
    return {1: tf.distribute.OneDeviceStrategy("/cpu:0"), 2: mirrored_strategy}


@pytest.mark.parametrize("replicas", [1, 2])
def test_c8_reported_losses_do_not_depend_on_replicas(replicas, strategies):
    x, y = batch(num_classes=10)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    with strategies[replicas].scope():
        inputs = keras.Input((5,))
        logits = keras.layers.Dense(10, kernel_initializer="zeros")(inputs)
        boundary = keras_vfbn.SyntheticGradientBoundary(
            keras_vfbn.LinearSynthesizer(10), name="cut"
        )
        model = keras_vfbn.SyntheticGradientModel(inputs, boundary(logits))
        model.compile(
            optimizer=sgd(), loss=task_loss(), synthesizer_optimizer=sgd()
        )
    history = model.fit(dataset, epochs=1, verbose=0).history

    # Zero logits: every example's loss is ln 10, and its gradient at the
    # logits is softmax(0) - onehot(y), whose squared norm is 9 * 0.1^2 +
    # 0.9^2 = 0.9; the zero-initialised synthesizer misses all of it.
    np.testing.assert_allclose(history["loss"][0], math.log(10), rtol=1e-6)
    np.testing.assert_allclose(history["cut_sg_loss"][0], 0.9, rtol=1e-6)


def test_c9_one_step_equal_on_one_device_and_two_replicas(strategies):
    x, y = batch()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    # Non-zero weights (fixed, the same in both runs): from all-zero weights
    # the synthesizer's target and output are zero, and the comparison
    # would hold whatever the aggregation.
    rng = np.random.default_rng(9)
    initial = None
    results = []
    for replicas in (1, 2):
        with strategies[replicas].scope():
            model, _, boundary, _ = mlp(
                keras_vfbn.LinearSynthesizer(NUM_CLASSES, output_scale=1.0)
            )
            model.compile(
                optimizer=sgd(), loss=task_loss(), synthesizer_optimizer=sgd()
            )
        if initial is None:
            initial = [
                rng.normal(size=w.shape).astype("float32")
                for w in model.get_weights()
            ]
        model.set_weights(initial)
        synth_vars = boundary.synthesizer.trainable_variables
        synth_ids = {id(v) for v in synth_vars}
        main_vars = [
            v for v in model.trainable_variables if id(v) not in synth_ids
        ]
        tracked = main_vars + synth_vars
        assert len(main_vars) == 4 and len(synth_vars) == 2
        before = values(tracked)
        model.fit(dataset, epochs=1, verbose=0)
        results.append((before, values(tracked)))

    (before_1, after_1), (before_2, after_2) = results
    for a, b in zip(before_1, before_2):
        np.testing.assert_array_equal(a, b)
    for start, a, b in zip(before_1, after_1, after_2):
        assert np.max(np.abs(a - start)) > 1e-3
        np.testing.assert_allclose(b, a, atol=1e-6)


def test_c10_epoch_metrics_are_epoch_means():
    # Batches of 2 whose first feature is the synthesizer's objective.
    objectives = [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]
    x = np.repeat(np.array(objectives, "float32"), 2)[:, None]
    x = np.concatenate([x, np.zeros_like(x)], axis=1)
    y = np.zeros((12,), "int32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)

    inputs = keras.Input((2,))
    boundary = keras_vfbn.SyntheticGradientBoundary(
        ReadOutSynthesizer(), name="cut"
    )
    model = keras_vfbn.SyntheticGradientModel(
        inputs, keras.layers.Dense(NUM_CLASSES)(boundary(inputs))
    )
    model.compile(
        optimizer=sgd(), loss=task_loss(), synthesizer_optimizer=sgd()
    )
    history = model.fit(dataset, epochs=2, steps_per_epoch=3, verbose=0)
    assert history.history["cut_sg_loss"] == pytest.approx([2.0, 4.0])
