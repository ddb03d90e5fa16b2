"""Exact gradient identities: synthetic-gradient training against backprop."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from oracles import NUM_CLASSES, OracleSynthesizer, per_example_loss

import keras_vfbn


def build_pair(kind, boundaries, oracle=True):
    """A network with boundaries and the same network without them.

    Both share their layers, hence their weights. Sections are lists of
    layers; the oracle of a boundary runs every section above it.
    """
    keras.utils.set_random_seed(1)
    if kind == "mlp":
        input_shape = (5,)
        sections = [
            [keras.layers.Dense(6, activation="tanh")],
            [keras.layers.Dense(5, activation="relu")],
            [keras.layers.Dense(NUM_CLASSES)],
        ]
    else:
        input_shape = (6, 6, 2)
        sections = [
            [keras.layers.Conv2D(4, 3, activation="tanh")],
            [keras.layers.Conv2D(3, 3, activation="relu")],
            [keras.layers.Flatten(), keras.layers.Dense(NUM_CLASSES)],
        ]
    if boundaries == 1:
        sections = [sections[0], sections[1] + sections[2]]

    def run(layers, x):
        for layer in layers:
            x = layer(x)
        return x

    inputs = keras.Input(input_shape)
    plain = run([layer for s in sections for layer in s], inputs)
    plain_model = keras.Model(inputs, plain)

    x = run(sections[0], inputs)
    for k in range(1, len(sections)):
        above = [layer for s in sections[k:] for layer in s]
        if oracle:
            synthesizer = OracleSynthesizer(
                lambda h, above=above: run(above, h)
            )
        else:
            synthesizer = keras_vfbn.LinearSynthesizer(NUM_CLASSES)
        x = keras_vfbn.SyntheticGradientBoundary(synthesizer)(x)
        x = run(sections[k], x)
    model = keras_vfbn.SyntheticGradientModel(inputs, x)
    return plain_model, model, input_shape


def one_step(model, x, y, batch_size):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    kwargs = {}
    if isinstance(model, keras_vfbn.SyntheticGradientModel):
        kwargs["synthesizer_optimizer"] = keras.optimizers.SGD(0.0)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=loss, **kwargs)
    before = [v.numpy() for v in model.trainable_variables]
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return [b - v.numpy() for b, v in zip(before, model.trainable_variables)]


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("batch_size", [1, 32])
@pytest.mark.parametrize("boundaries", [1, 2])
@pytest.mark.parametrize("strategy", ["one_device", "mirrored"])
def test_oracle_synthesizer_reproduces_backprop(
    kind, batch_size, boundaries, strategy, request
):
    if strategy == "mirrored":
        mirrored = request.getfixturevalue("mirrored_strategy")
        scope = mirrored.scope()
        global_batch = 2 * batch_size
    else:
        scope = tf.distribute.get_strategy().scope()
        global_batch = batch_size
    with scope:
        plain, model, input_shape = build_pair(kind, boundaries)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(global_batch,) + input_shape).astype("float32")
        y = rng.integers(0, NUM_CLASSES, size=global_batch)
        initial = plain.get_weights()
        expected = one_step(plain, x, y, global_batch)
        plain.set_weights(initial)  # The two models share their layers.
        actual = one_step(model, x, y, global_batch)

    assert len(actual) == len(expected) == 6
    for a, e in zip(actual, expected):
        assert np.abs(e).max() > 1e-4
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=0)


def test_linear_vfbn_matches_closed_form():
    synthesizer = keras_vfbn.VFBNSynthesizer(4, depth=0, dtype="float64")
    synthesizer.build((None, 6))
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 4))
    b = rng.normal(size=(4,))
    synthesizer.head.set_weights([w, b])
    h = rng.normal(size=(5, 6))
    y = np.eye(4)[rng.integers(0, 4, size=5)]

    got = synthesizer.synthesize(tf.constant(h), tf.constant(y)).numpy()

    logits = h @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, (p - y) @ w.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("input_shape", [(7,), (4, 4, 3)])
def test_deep_vfbn_matches_finite_differences(input_shape):
    keras.utils.set_random_seed(2)
    synthesizer = keras_vfbn.VFBNSynthesizer(
        4, depth=2, filters=5, dtype="float64"
    )
    synthesizer.build((None,) + input_shape)
    rng = np.random.default_rng(1)
    h = rng.normal(size=(3,) + input_shape)
    y = np.eye(4)[[0, 3, 1]]

    def loss(h_value):
        logits = synthesizer.virtual_forward(tf.constant(h_value))
        return float(tf.reduce_sum(per_example_loss(y, logits)))

    got = synthesizer.synthesize(tf.constant(h), tf.constant(y)).numpy()

    expected = np.zeros_like(h)
    step = 1e-6
    for index in np.ndindex(h.shape):
        plus, minus = h.copy(), h.copy()
        plus[index] += step
        minus[index] -= step
        expected[index] = (loss(plus) - loss(minus)) / (2 * step)
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)


def test_vfbn_alpha_gs_adds_virtual_task_loss():
    synthesizer = keras_vfbn.VFBNSynthesizer(3, depth=0, alpha_gs=0.5)
    synthesizer.build((None, 4))
    h = tf.constant(np.random.default_rng(0).normal(size=(6, 4)), tf.float32)
    y = tf.one_hot([0, 1, 2, 0, 1, 2], 3)
    synthetic, extra = synthesizer.synthesize(h, y)
    logits = synthesizer.virtual_forward(h)
    expected = 0.5 * np.mean(per_example_loss(y, logits).numpy())
    np.testing.assert_allclose(float(extra), expected, rtol=1e-6)
    assert synthetic.shape == h.shape


def test_weight_groups_are_separate():
    """Synthesizer weights never move with the task loss, and vice versa."""
    _, model, input_shape = build_pair("mlp", boundaries=1, oracle=False)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        synthesizer_optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    main, groups = model._variable_groups()
    synthesizer_vars = [v for g in groups.values() for v in g]
    assert len(main) == 6 and len(synthesizer_vars) == 2
    assert {id(v) for v in main}.isdisjoint(id(v) for v in synthesizer_vars)
    assert len(main) + len(synthesizer_vars) == len(model.trainable_variables)
