"""CIFAR input pipelines: tensorflow-datasets or an image folder.

Two sources give the same arrays of uint8 images and int labels:

- `cifar10` from tensorflow-datasets, version pinned (`TFDS_VERSION`). It is
  downloaded and prepared on first use where there is a network, or read
  from a prepared copy in `data_dir`. Offline with no prepared copy, the
  load fails at once with `DatasetUnavailableError`, naming the dataset,
  version and directory.
- An image folder, `train/<class>/*` and `test/<class>/*` (JPEG, PNG, BMP
  or GIF), or a `.tar.gz` of one, which `prepare_image_folder` extracts
  once into a cache directory. Classes are the sorted folder names of
  `train/`. A file that does not decode is an error naming the file.

Images are decoded once, in parallel with `tf.data`, and kept in memory
(CIFAR-10 is 180 MB decoded). A validation split is carved from the
training set; the test set is left for the final evaluation. The training
pipeline shuffles, standardises each channel with the training split's
mean and standard deviation, pads by 4 pixels, crops 32x32 at random and
flips horizontally (He et al. 2016); evaluation pipelines standardise
only, and are cached. All pipelines prefetch.

Note: the in-memory decode suits datasets of CIFAR's size; an image folder
of millions of large images needs a streaming pipeline instead.
"""

import dataclasses
import hashlib
import os
import pathlib
import shutil
import socket
import tarfile
import tempfile

import numpy as np
import tensorflow as tf
from absl import logging

from trainers import spec
from trainers.spec import TFDS_NAME, TFDS_VERSION

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DEFAULT_CACHE_DIR = pathlib.Path.home() / ".cache" / "keras_vfbn"
_DECODE_BATCH = 1024


class DatasetUnavailableError(RuntimeError):
    """The requested dataset is neither prepared locally nor downloadable."""


class CorruptImageError(ValueError):
    """An image file could not be decoded."""


@dataclasses.dataclass
class ImageArrays:
    """A dataset held in memory.

    Attributes:
        x_train: uint8 images, shape `(n, height, width, 3)`.
        y_train: int32 labels, shape `(n,)`.
        x_test: uint8 test images.
        y_test: int32 test labels.
        class_names: one name per label.
        source: a human-readable description of where the data came from.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list
    source: str


def default_cache_dir():
    """`$KERAS_VFBN_CACHE`, or `~/.cache/keras_vfbn`."""
    return pathlib.Path(os.environ.get("KERAS_VFBN_CACHE", DEFAULT_CACHE_DIR))


def _is_archive(path):
    return path.name.endswith((".tar.gz", ".tgz", ".tar"))


def _folder_root(directory):
    """The directory under `directory` that holds `train/`, or None."""
    if (directory / "train").is_dir():
        return directory
    for candidate in sorted(directory.rglob("train")):
        if candidate.is_dir():
            return candidate.parent
    return None


def prepare_image_folder(path, cache_dir=None):
    """Returns an image-folder directory for a directory or an archive.

    Args:
        path: a directory holding `train/` (and usually `test/`) class
            folders, or a `.tar.gz`, `.tgz` or `.tar` archive of one.
        cache_dir: where archives are extracted; defaults to
            `default_cache_dir()`. An archive is extracted once: later
            calls with the same archive (same path, size and modification
            time) reuse the extracted copy.

    Returns:
        A `pathlib.Path` to the directory that holds `train/`.

    Raises:
        FileNotFoundError: if `path` does not exist, or holds no `train/`
            folder.
        ValueError: if `path` is a file but not a tar archive.
    """
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Image folder not found: {path} does not exist. Expected a "
            "directory with train/<class>/ and test/<class>/ folders, or "
            "a .tar.gz of one."
        )
    if path.is_dir():
        root = _folder_root(path)
        if root is None:
            raise FileNotFoundError(
                f"No train/ folder found in image folder {path}: expected "
                "train/<class>/*.jpg and test/<class>/*.jpg."
            )
        return root
    if not _is_archive(path):
        raise ValueError(
            f"Expected an image-folder directory or a .tar.gz/.tgz/.tar "
            f"archive of one. Received: {path}"
        )

    cache_dir = pathlib.Path(cache_dir or default_cache_dir()).expanduser()
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    stem = path.name.split(".")[0]
    target = cache_dir / f"{stem}-{digest}"
    if not (target / ".complete").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        logging.info("Extracting %s into %s", path, target)
        staging = pathlib.Path(tempfile.mkdtemp(dir=cache_dir))
        try:
            with tarfile.open(path) as archive:
                archive.extractall(staging, filter="data")
            (staging / ".complete").touch()
            try:
                staging.rename(target)
            except OSError:
                # Another process finished the same extraction first.
                if not (target / ".complete").exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    root = _folder_root(target)
    if root is None:
        raise FileNotFoundError(
            f"Archive {path} holds no train/ folder (extracted to {target})."
        )
    return root


def list_image_files(split_dir, class_names=None):
    """Lists the images of one split of an image folder.

    Args:
        split_dir: a directory with one sub-directory per class.
        class_names: the classes to read, in label order; `None` for the
            sorted sub-directory names.

    Returns:
        `(paths, labels, class_names)`: lists of file paths (str) and int
        labels, and the class names.

    Raises:
        FileNotFoundError: if the directory, a class folder, or any image
            is missing; the message says what was looked for.
    """
    split_dir = pathlib.Path(split_dir)
    wanted = "*" + "|*".join(IMAGE_EXTENSIONS)
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"Image folder split not found: {split_dir} (looked for "
            f"{split_dir}/<class>/{wanted})."
        )
    if class_names is None:
        class_names = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            raise FileNotFoundError(
                f"Class folder {class_dir} is missing (classes are taken "
                f"from train/: {class_names})."
            )
        files = sorted(
            str(p)
            for p in class_dir.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise FileNotFoundError(
            f"No images found in {split_dir}: looked for "
            f"{split_dir}/<class>/{wanted} in {len(class_names)} class "
            "folders."
        )
    return paths, labels, list(class_names)


def _decode(contents, image_size):
    image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    size = tf.shape(image)[:2]
    return tf.cond(
        tf.reduce_all(size == image_size),
        lambda: image,
        lambda: tf.cast(
            tf.clip_by_value(
                tf.round(tf.image.resize(image, image_size)), 0, 255
            ),
            tf.uint8,
        ),
    )


def _find_corrupt(paths, image_size):
    for path in paths:
        try:
            _decode(tf.io.read_file(path), image_size)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
            raise CorruptImageError(
                f"Cannot decode image file {path}: {e.message}"
            ) from None


def decode_images(paths, image_size=(32, 32)):
    """Decodes image files in parallel with `tf.data` into one array.

    Args:
        paths: image file paths.
        image_size: `(height, width)`; other sizes are resized to it.

    Returns:
        A uint8 array of shape `(len(paths), height, width, 3)`.

    Raises:
        CorruptImageError: naming the first file that does not decode.
    """
    image_size = tuple(image_size)
    dataset = (
        tf.data.Dataset.from_tensor_slices(list(paths))
        .map(
            lambda p: _decode(tf.io.read_file(p), image_size),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        .batch(_DECODE_BATCH)
        .prefetch(tf.data.AUTOTUNE)
    )
    chunks = []
    try:
        for chunk in dataset:
            chunks.append(chunk.numpy())
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        start = len(chunks) * _DECODE_BATCH
        _find_corrupt(paths[start : start + _DECODE_BATCH], image_size)
        _find_corrupt(paths, image_size)
        raise
    return np.concatenate(chunks, axis=0)


def load_image_folder(path, cache_dir=None, image_size=(32, 32)):
    """Reads an image folder (or a .tar.gz of one) into memory.

    Args:
        path: see `prepare_image_folder`.
        cache_dir: see `prepare_image_folder`.
        image_size: `(height, width)` of the arrays.

    Returns:
        An `ImageArrays`.

    Raises:
        FileNotFoundError: if the folder, `train/`, `test/` or any images
            are missing.
        CorruptImageError: naming a file that does not decode.
    """
    root = prepare_image_folder(path, cache_dir=cache_dir)
    train_paths, train_labels, class_names = list_image_files(root / "train")
    test_paths, test_labels, _ = list_image_files(root / "test", class_names)
    logging.info(
        "Decoding %d training and %d test images of %d classes from %s",
        len(train_paths),
        len(test_paths),
        len(class_names),
        root,
    )
    return ImageArrays(
        x_train=decode_images(train_paths, image_size),
        y_train=np.asarray(train_labels, np.int32),
        x_test=decode_images(test_paths, image_size),
        y_test=np.asarray(test_labels, np.int32),
        class_names=class_names,
        source=f"image folder {root}",
    )


def _can_reach(host, port=443, timeout=3.0):
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_tfds(
    name=TFDS_NAME,
    version=TFDS_VERSION,
    data_dir=None,
    download=True,
    download_host="www.cs.toronto.edu",
):
    """Reads a tensorflow-datasets image classification set into memory.

    A prepared copy in `data_dir` is read with no network access. Without
    one, the dataset is downloaded and prepared if `download` is true and
    `download_host` answers within a few seconds; otherwise this fails at
    once.

    Args:
        name: tfds dataset name.
        version: the pinned dataset version.
        data_dir: tfds data directory; `None` for tfds' default
            (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
        download: whether a missing dataset may be downloaded.
        download_host: the host the dataset is downloaded from, checked
            before a download is attempted.

    Returns:
        An `ImageArrays`.

    Raises:
        DatasetUnavailableError: if the dataset is not prepared in
            `data_dir` and cannot be downloaded.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(f"{name}:{version}", data_dir=data_dir)
    where = builder.data_dir

    def read():
        splits = builder.as_dataset(
            split=["train", "test"],
            as_supervised=True,
            shuffle_files=False,
        )
        arrays = []
        for split in splits:
            images, labels = [], []
            for x, y in split.batch(_DECODE_BATCH).prefetch(2):
                images.append(x.numpy())
                labels.append(y.numpy())
            arrays.append(np.concatenate(images).astype(np.uint8))
            arrays.append(np.concatenate(labels).astype(np.int32))
        return arrays

    try:
        arrays = read()
    except AssertionError:
        if not download:
            reason = "downloads are turned off"
        elif not _can_reach(download_host):
            reason = f"no network ({download_host} unreachable)"
        else:
            reason = None
        if reason:
            raise DatasetUnavailableError(
                f"tensorflow-datasets dataset {name} version {version} is "
                f"not prepared in {where}, and {reason}. Prepare it on a "
                "machine with a network (tfds build "
                f"{name}:{version} --data_dir=DIR) and pass that "
                "directory, or read an image folder instead."
            ) from None
        logging.info(
            "Downloading and preparing %s:%s in %s", name, version, where
        )
        builder.download_and_prepare()
        arrays = read()
    info = builder.info
    class_names = list(info.features["label"].names)
    return ImageArrays(
        *arrays,
        class_names=class_names,
        source=f"tensorflow-datasets {name}:{version} in {where}",
    )


def _subset(x, y, count, rng):
    if not count or count >= len(y):
        return x, y
    keep = np.sort(rng.permutation(len(y))[:count])
    return x[keep], y[keep]


def split_arrays(
    arrays,
    validation_examples=5000,
    train_examples=None,
    test_examples=None,
    seed=0,
):
    """Carves a validation split and optional subsets out of `arrays`.

    The validation examples are drawn at random (by `seed`) from the
    training set and removed from it; then `train_examples` and
    `test_examples`, where given, keep random subsets of what is left.

    Args:
        arrays: an `ImageArrays`.
        validation_examples: size of the validation split (0 for none).
        train_examples: training examples to keep; `None`/0 keeps all.
        test_examples: test examples to keep; `None`/0 keeps all.
        seed: seed of the random choice.

    Returns:
        `(train, validation, test)`, each an `(images, labels)` pair;
        `validation` is `None` when `validation_examples` is 0.

    Raises:
        ValueError: if the validation split would leave no training data.
    """
    rng = np.random.default_rng(seed)
    n = len(arrays.y_train)
    if validation_examples < 0 or validation_examples >= n:
        raise spec.ConfigurationError(
            f"Expected `validation_examples` in [0, {n - 1}] for a training "
            f"set of {n} images. Received: "
            f"validation_examples={validation_examples}"
        )
    order = rng.permutation(n)
    val_index = np.sort(order[:validation_examples])
    train_index = np.sort(order[validation_examples:])
    train = _subset(
        arrays.x_train[train_index],
        arrays.y_train[train_index],
        train_examples,
        rng,
    )
    validation = None
    if validation_examples:
        validation = (arrays.x_train[val_index], arrays.y_train[val_index])
    test = _subset(arrays.x_test, arrays.y_test, test_examples, rng)
    return train, validation, test


def channel_stats(images):
    """Per-channel mean and standard deviation of uint8 images in [0, 1]."""
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return pixels.mean(axis=0), pixels.std(axis=0)


def _standardise(mean, std):
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)

    def fn(image):
        return (tf.cast(image, tf.float32) / 255.0 - mean) / std

    return fn


def augment(image, padding=4):
    """Zero-pads by `padding`, crops back at random and flips at random."""
    height, width, channels = image.shape
    image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    image = tf.image.random_crop(image, (height, width, channels))
    return tf.image.random_flip_left_right(image)


def make_train_dataset(x, y, batch_size, mean, std, seed=0, augment_fn=augment):
    """An endless, shuffled, augmented and batched training pipeline.

    Args:
        x: uint8 images.
        y: int labels.
        batch_size: the global batch size; batches are full (the last
            partial batch of a pass is dropped).
        mean: per-channel mean in [0, 1] for standardisation.
        std: per-channel standard deviation in [0, 1].
        seed: shuffle seed.
        augment_fn: per-image augmentation of a standardised image, or
            `None` for none.

    Returns:
        A `tf.data.Dataset` of `(images, labels)` batches, repeating.
    """
    standardise = _standardise(mean, std)

    def prepare(image, label):
        image = standardise(image)
        if augment_fn is not None:
            image = augment_fn(image)
        return image, label

    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .cache()
        .shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def make_eval_dataset(x, y, batch_size, mean, std):
    """A standardised, batched, cached evaluation pipeline (one pass)."""
    standardise = _standardise(mean, std)
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .map(
            lambda image, label: (standardise(image), label),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .batch(batch_size)
        .cache()
        .prefetch(tf.data.AUTOTUNE)
    )


def with_label_per_output(dataset, output_names):
    """Repeats each label for every named output (multi-output models)."""
    if len(output_names) == 1:
        return dataset
    return dataset.map(
        lambda x, y: (x, {name: y for name in output_names}),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


@dataclasses.dataclass
class DataInfo:
    """What `load_datasets` read.

    Attributes:
        num_classes: number of classes.
        class_names: one name per label.
        train_examples: size of the training split.
        validation_examples: size of the validation split.
        test_examples: size of the test set.
        steps_per_epoch: full batches in one pass over the training split.
        mean: per-channel mean used for standardisation.
        std: per-channel standard deviation used for standardisation.
        image_shape: `(height, width, channels)`.
        source: where the data came from.
    """

    num_classes: int
    class_names: list
    train_examples: int
    validation_examples: int
    test_examples: int
    steps_per_epoch: int
    mean: list
    std: list
    image_shape: tuple
    source: str


def load_datasets(
    dataset="cifar10",
    image_folder=None,
    data_dir=None,
    download=True,
    cache_dir=None,
    validation_examples=5000,
    train_examples=None,
    test_examples=None,
    batch_size=128,
    seed=0,
    augment_train=True,
    return_info=False,
):
    """Loads CIFAR-style data and builds the three `tf.data` pipelines.

    Args:
        dataset: `"cifar10"` (tensorflow-datasets) or `"image_folder"`.
        image_folder: directory or archive for `dataset="image_folder"`.
        data_dir: tensorflow-datasets data directory.
        download: whether tensorflow-datasets may download.
        cache_dir: where image-folder archives are extracted.
        validation_examples: training examples held out for validation.
        train_examples: keep only this many training examples (0/None: all).
        test_examples: keep only this many test examples (0/None: all).
        batch_size: global batch size of every pipeline.
        seed: seed of the split, the subsets and the shuffle.
        augment_train: apply pad-crop-flip augmentation to training data.
        return_info: also return a `DataInfo`.

    Returns:
        `(train, validation, test)` datasets of `(images, labels)`
        batches, `validation` being `None` when `validation_examples` is 0;
        with `return_info`, `(train, validation, test, info)`. `train`
        repeats forever: pass `steps_per_epoch` to `fit`.

    Raises:
        ValueError: for an unknown `dataset`, or `image_folder` missing.
        FileNotFoundError, CorruptImageError, DatasetUnavailableError: see
            `load_image_folder` and `load_tfds`.
    """
    if dataset == "image_folder":
        if not image_folder:
            raise ValueError(
                "`image_folder` is required with dataset='image_folder'."
            )
        arrays = load_image_folder(image_folder, cache_dir=cache_dir)
    elif dataset == "cifar10":
        arrays = load_tfds(data_dir=data_dir, download=download)
    else:
        raise ValueError(
            "Expected `dataset` to be 'cifar10' or 'image_folder'. "
            f"Received: dataset={dataset!r}"
        )
    train, validation, test = split_arrays(
        arrays,
        validation_examples=validation_examples,
        train_examples=train_examples,
        test_examples=test_examples,
        seed=seed,
    )
    if len(train[1]) < batch_size:
        raise spec.ConfigurationError(
            f"The training split has {len(train[1])} examples, fewer than "
            f"one batch of {batch_size}."
        )
    mean, std = channel_stats(train[0])
    train_ds = make_train_dataset(
        *train,
        batch_size,
        mean,
        std,
        seed=seed,
        augment_fn=augment if augment_train else None,
    )
    val_ds = None
    if validation is not None:
        val_ds = make_eval_dataset(*validation, batch_size, mean, std)
    test_ds = make_eval_dataset(*test, batch_size, mean, std)
    if not return_info:
        return train_ds, val_ds, test_ds
    info = DataInfo(
        num_classes=len(arrays.class_names),
        class_names=arrays.class_names,
        train_examples=len(train[1]),
        validation_examples=0 if validation is None else len(validation[1]),
        test_examples=len(test[1]),
        steps_per_epoch=len(train[1]) // batch_size,
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        image_shape=tuple(int(d) for d in arrays.x_train.shape[1:]),
        source=arrays.source,
    )
    return train_ds, val_ds, test_ds, info
