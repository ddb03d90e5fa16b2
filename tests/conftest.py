"""Shared pytest setup.

The CPU is split into two logical devices before TensorFlow initialises,
so that tests can exercise `tf.distribute.MirroredStrategy` on a machine
without GPUs. Single-device tests run on the first of them, as usual.
"""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0],
    [tf.config.LogicalDeviceConfiguration()] * 2,
)

SHARED_CIFAR = (
    pathlib.Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "cifar10-jpeg.tar.gz"
)
CIFAR_ARCHIVE = pathlib.Path(
    os.environ.get("KERAS_VFBN_CIFAR_ARCHIVE", SHARED_CIFAR)
)


@pytest.fixture(autouse=True)
def _reset_keras_state():
    import keras

    keras.backend.clear_session()
    yield


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """The real CIFAR-10 JPEG copy, extracted once per test session.

    Returns the directory holding `train/<class>/` and `test/<class>/`.
    """
    if not CIFAR_ARCHIVE.exists():
        pytest.skip(
            f"real CIFAR-10 copy not found at {CIFAR_ARCHIVE}; put the "
            "shared data beside the checkout or set "
            "KERAS_VFBN_CIFAR_ARCHIVE"
        )
    from trainers.data import prepare_image_folder

    cache = os.environ.get("KERAS_VFBN_CACHE")
    return prepare_image_folder(CIFAR_ARCHIVE, cache_dir=cache)


@pytest.fixture
def mirrored_strategy():
    """The trainer's MirroredStrategy over the two logical CPUs.

    `make_strategy` keeps one instance per process: strategies created one
    after another over the same devices reuse collective keys and abort
    each other's all-reduces with a shape mismatch.
    """
    from trainers.cifar import make_strategy

    strategy = make_strategy("mirrored", num_cpu_devices=2)
    assert strategy.num_replicas_in_sync == 2
    return strategy
