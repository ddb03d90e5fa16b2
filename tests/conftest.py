"""Shared pytest setup.

The CPU is split into two logical devices before TensorFlow initialises,
so that tests can exercise `tf.distribute.MirroredStrategy` on a machine
without GPUs. Single-device tests run on the first of them, as usual.
"""

import os
import pathlib
import shutil

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


@pytest.fixture(scope="session")
def cifar_subset(cifar_dir, tmp_path_factory):
    """Makes image folders of the first real CIFAR-10 JPEGs of each class.

    Returns a function `(train, test) -> directory` holding `train` and
    `test` images per class in `train/<class>/` and `test/<class>/`; each
    size is made once per test session.
    """
    made = {}

    def make(train, test):
        if (train, test) not in made:
            root = tmp_path_factory.mktemp(f"cifar_{train}_{test}")
            for split, count in (("train", train), ("test", test)):
                for class_dir in sorted((cifar_dir / split).iterdir()):
                    target = root / split / class_dir.name
                    target.mkdir(parents=True)
                    for path in sorted(class_dir.iterdir())[:count]:
                        shutil.copy(path, target / path.name)
            made[train, test] = root
        return made[train, test]

    return make


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
