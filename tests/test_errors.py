"""Bad input gets a clear error naming the problem and the fix."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vfbn

SPARSE_CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class NaNSynthesizer(keras_vfbn.Synthesizer):
    """Predicts NaN everywhere, through a weight whose gradient is NaN too."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones")

    def synthesize(self, h, labels, training=False):
        return tf.math.log(-tf.ones_like(h)) * self.scale


class NarrowSynthesizer(keras_vfbn.Synthesizer):
    def synthesize(self, h, labels, training=False):
        return h[:, :2]


def small_model(synthesizer, model_class=keras_vfbn.SyntheticGradientModel):
    inputs = keras.Input((5,))
    h = keras.layers.Dense(4, name="lower")(inputs)
    h = keras_vfbn.SyntheticGradientBoundary(synthesizer, name="cut")(h)
    outputs = keras.layers.Dense(3, name="upper")(h)
    return model_class(inputs, outputs)


def data(n=8):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 5)).astype("float32"), rng.integers(0, 3, n)


def test_boundary_in_plain_keras_model_refuses_to_train():
    model = small_model(keras_vfbn.LinearSynthesizer(3), keras.Model)
    model.compile("sgd", SPARSE_CE)
    with pytest.raises(RuntimeError, match="SyntheticGradientModel"):
        model.fit(*data(), verbose=0)


def test_boundary_without_synthesizer():
    with pytest.raises(TypeError, match="needs a synthesizer"):
        keras_vfbn.SyntheticGradientBoundary()
    with pytest.raises(TypeError, match="needs a synthesizer"):
        keras_vfbn.SyntheticGradientBoundary(keras.layers.Dense(3))


def test_synthesizer_output_shape_must_match_input():
    model = small_model(NarrowSynthesizer(3))
    model.compile("sgd", SPARSE_CE)
    with pytest.raises(ValueError, match=r"shape \(None, 2\).*\(None, 4\)"):
        model.fit(*data(), verbose=0)


@pytest.mark.parametrize(
    "labels",
    [
        np.zeros((8, 5), "float32"),  # one-hot of the wrong width
        np.zeros((8, 2), "int64"),  # two integer labels per example
        np.zeros((8, 3, 1), "float32"),
    ],
)
def test_labels_neither_sparse_nor_one_hot(labels):
    model = small_model(keras_vfbn.LinearSynthesizer(3))
    model.compile("sgd", "mse")
    with pytest.raises(ValueError, match="num_classes"):
        model.fit(data()[0], labels, verbose=0)


def test_one_hot_and_sparse_labels_give_the_same_step():
    x, y = data()
    results = []
    for labels, loss in [
        (y, SPARSE_CE),
        (np.eye(3, dtype="float32")[y], "categorical_crossentropy"),
    ]:
        keras.utils.set_random_seed(3)
        model = small_model(keras_vfbn.VFBNSynthesizer(3, depth=0))
        if loss != SPARSE_CE:
            loss = keras.losses.CategoricalCrossentropy(from_logits=True)
        model.compile(keras.optimizers.SGD(0.1), loss)
        history = model.fit(x, labels, batch_size=8, verbose=0)
        results.append((history.history, model.get_weights()))
    (sparse_logs, sparse_weights), (dense_logs, dense_weights) = results
    assert sparse_logs.keys() == dense_logs.keys()
    for key in sparse_logs:
        assert sparse_logs[key] == pytest.approx(dense_logs[key], abs=1e-6)
    for a, b in zip(sparse_weights, dense_weights):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "cls", [keras_vfbn.LinearSynthesizer, keras_vfbn.ResNetSynthesizer]
)
def test_alpha_gs_only_for_vfbn(cls):
    with pytest.raises(ValueError, match="only applies to VFBNSynthesizer"):
        cls(10, alpha_gs=1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(depth=-1), "depth"),
        (dict(alpha_gs=-0.1), "alpha_gs"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_vfbn_argument_checks(kwargs, match):
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        keras_vfbn.VFBNSynthesizer(**kwargs)


def test_synthesizer_rejects_unsupported_rank():
    boundary = keras_vfbn.SyntheticGradientBoundary(
        keras_vfbn.VFBNSynthesizer(10)
    )
    with pytest.raises(ValueError, match="Flatten or reshape"):
        boundary.build((None, 4, 4))


def test_same_optimizer_instance_refused():
    model = small_model(keras_vfbn.LinearSynthesizer(3))
    optimizer = keras.optimizers.SGD()
    with pytest.raises(ValueError, match="different optimizer instance"):
        model.compile(optimizer, SPARSE_CE, synthesizer_optimizer=optimizer)


def test_nan_synthetic_gradient_is_skipped_and_counted():
    model = small_model(NaNSynthesizer(3))
    model.compile(
        keras.optimizers.SGD(0.1),
        SPARSE_CE,
        synthesizer_optimizer=keras.optimizers.SGD(0.1),
    )
    lower = model.get_layer("lower").get_weights()
    upper = model.get_layer("upper").get_weights()
    history = model.fit(*data(16), batch_size=4, epochs=2, verbose=0)

    assert history.history["cut_nonfinite"] == [4.0, 4.0]
    for before, after in zip(lower, model.get_layer("lower").get_weights()):
        np.testing.assert_array_equal(before, after)
    for before, after in zip(upper, model.get_layer("upper").get_weights()):
        assert np.all(np.isfinite(after)) and np.abs(after - before).max() > 0
    assert float(model.get_layer("cut").synthesizer.scale.numpy()) == 1.0
    assert all(np.isfinite(history.history["loss"]))
    assert history.history["cut_sg_loss"] == [0.0, 0.0]
