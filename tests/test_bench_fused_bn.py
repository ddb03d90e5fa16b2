"""The fused batch-norm proposal matches keras.layers.BatchNormalization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from benchmarks.fused_bn import FusedBatchNormalization

SETTINGS = [
    dict(),
    dict(momentum=0.9, epsilon=1e-5),
    dict(center=False),
    dict(scale=False),
    dict(axis=1),
]


def _pair(shape, **kwargs):
    """A Keras and a fused layer, built alike, with the same weights."""
    reference = keras.layers.BatchNormalization(**kwargs)
    fused = FusedBatchNormalization(**kwargs)
    reference.build(shape)
    fused.build(shape)
    rng = np.random.default_rng(1)
    weights = [
        rng.uniform(0.5, 1.5, w.shape).astype("float32")
        for w in reference.get_weights()
    ]
    reference.set_weights(weights)
    fused.set_weights(weights)
    return reference, fused


def _batch(shape, seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant(3.0 + 2.0 * rng.standard_normal(shape), tf.float32)


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_training_output_and_moving_statistics_match(kwargs):
    shape = (8, 5, 6, 4)
    reference, fused = _pair(shape, **kwargs)
    for step in range(3):
        x = _batch(shape, seed=step)
        np.testing.assert_allclose(
            fused(x, training=True),
            reference(x, training=True),
            rtol=1e-5,
            atol=1e-5,
        )
    for mine, theirs in zip(fused.weights, reference.weights):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_inference_output_matches(kwargs):
    shape = (8, 5, 6, 4)
    reference, fused = _pair(shape, **kwargs)
    x = _batch(shape)
    np.testing.assert_allclose(
        fused(x, training=False),
        reference(x, training=False),
        rtol=1e-5,
        atol=1e-5,
    )


def test_gradients_match():
    shape = (8, 5, 6, 4)
    reference, fused = _pair(shape, momentum=0.9, epsilon=1e-5)
    x = _batch(shape)
    upstream = tf.random.stateless_normal(shape, seed=(7, 0))
    grads = []
    for layer in (reference, fused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(layer(x, training=True) * upstream)
        grads.append(tape.gradient(y, [x] + layer.trainable_weights))
    # The scale and offset gradients are sums over 240 elements that
    # largely cancel; summation order alone moves them by ~1e-5 of the
    # terms' magnitude.
    for mine, theirs in zip(grads[1], grads[0]):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=5e-4)


def test_falls_back_to_keras_for_other_ranks():
    shape = (16, 4)
    reference, fused = _pair(shape)
    x = _batch(shape)
    np.testing.assert_allclose(
        fused(x, training=True), reference(x, training=True), rtol=1e-5
    )


def test_uses_the_fused_kernel_inside_a_function():
    layer = FusedBatchNormalization()
    layer.build((2, 4, 4, 3))
    function = tf.function(lambda x: layer(x, training=True))
    graph = function.get_concrete_function(
        tf.TensorSpec((2, 4, 4, 3), tf.float32)
    ).graph
    types = {op.type for op in graph.get_operations()}
    assert "FusedBatchNormV3" in types
    assert "SquaredDifference" not in types


def test_trains_in_a_compiled_model_like_keras():
    def model(norm):
        keras.utils.set_random_seed(3)
        inputs = keras.Input((6, 6, 2))
        x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
        x = norm(momentum=0.9)(x)
        outputs = keras.layers.Dense(1)(keras.layers.Flatten()(x))
        built = keras.Model(inputs, outputs)
        built.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        return built

    x = _batch((16, 6, 6, 2)).numpy()
    y = np.linspace(-1.0, 1.0, 16).astype("float32")[:, None]
    reference = model(keras.layers.BatchNormalization)
    fused = model(FusedBatchNormalization)
    fused.set_weights(reference.get_weights())
    reference.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    fused.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for mine, theirs in zip(fused.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)


def test_config_and_saved_model_round_trip(tmp_path):
    inputs = keras.Input((4, 4, 3))
    outputs = FusedBatchNormalization(momentum=0.8, epsilon=1e-4)(inputs)
    model = keras.Model(inputs, outputs)
    x = _batch((2, 4, 4, 3))
    model(x, training=True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.layers[-1]
    assert isinstance(layer, FusedBatchNormalization)
    assert layer.get_config() == model.layers[-1].get_config()
    np.testing.assert_allclose(
        loaded(x, training=False), model(x, training=False), rtol=1e-6
    )
