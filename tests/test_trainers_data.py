"""trainers.data: image folders, archives, tensorflow-datasets, pipelines."""

import tarfile
import time

import numpy as np
import pytest
import tensorflow as tf

from trainers import data


def write_image_folder(root, per_class=3, classes=("cat", "dog"), size=32):
    """A tiny image folder of random JPEGs."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 2)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), np.uint8)
                jpeg = tf.io.encode_jpeg(pixels).numpy()
                (folder / f"{i:04d}.jpg").write_bytes(jpeg)
    return root


def test_directory_is_used_in_place(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    assert data.prepare_image_folder(root) == root
    arrays = data.load_image_folder(root)
    assert arrays.x_train.shape == (6, 32, 32, 3)
    assert arrays.x_train.dtype == np.uint8
    assert arrays.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    assert arrays.x_test.shape == (4, 32, 32, 3)
    assert arrays.class_names == ["cat", "dog"]


def test_archive_is_extracted_once_into_the_cache(tmp_path):
    root = write_image_folder(tmp_path / "src" / "cifar")
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar")
    cache = tmp_path / "cache"
    first = data.prepare_image_folder(archive, cache_dir=cache)
    assert (first / "train" / "cat").is_dir()
    assert cache in first.parents
    stamp = (first / "train" / "cat" / "0000.jpg").stat().st_mtime_ns
    second = data.prepare_image_folder(archive, cache_dir=cache)
    assert second == first
    assert (first / "train" / "cat" / "0000.jpg").stat().st_mtime_ns == stamp
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1


def test_cifar_fixture_goes_through_prepare_image_folder(cifar_dir):
    assert data.prepare_image_folder(cifar_dir) == cifar_dir
    paths, labels, classes = data.list_image_files(cifar_dir / "test")
    assert len(paths) == 10000 and len(classes) == 10
    assert np.bincount(labels).tolist() == [1000] * 10


def test_non_archive_file_is_refused(tmp_path):
    path = tmp_path / "images.zip"
    path.write_bytes(b"PK")
    with pytest.raises(ValueError, match="tar.gz"):
        data.prepare_image_folder(path)


def test_missing_folder_says_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train/<class>/"):
        data.prepare_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No train/ folder"):
        data.prepare_image_folder(tmp_path / "empty")


def test_folder_without_images_says_what_was_looked_for(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as info:
        data.list_image_files(tmp_path / "train")
    message = str(info.value)
    assert "No images found" in message
    assert "*.jpg" in message and "*.png" in message
    assert str(tmp_path / "train") in message


def test_corrupt_image_is_an_error_naming_the_file(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=40)
    bad = root / "train" / "dog" / "0031.jpg"
    bad.write_bytes(bad.read_bytes()[:50])  # truncated
    with pytest.raises(data.CorruptImageError, match=str(bad)):
        data.load_image_folder(root)
    bad.write_bytes(b"this is not an image")
    with pytest.raises(data.CorruptImageError, match="0031.jpg"):
        data.load_image_folder(root)


def test_other_image_sizes_are_resized(tmp_path):
    root = write_image_folder(tmp_path / "imgs", size=40)
    arrays = data.load_image_folder(root)
    assert arrays.x_train.shape == (6, 32, 32, 3)


def _fake_arrays(n_train=300, n_test=50):
    rng = np.random.default_rng(1)
    return data.ImageArrays(
        x_train=rng.integers(0, 256, (n_train, 32, 32, 3), np.uint8),
        y_train=rng.integers(0, 10, n_train).astype(np.int32),
        x_test=rng.integers(0, 256, (n_test, 32, 32, 3), np.uint8),
        y_test=rng.integers(0, 10, n_test).astype(np.int32),
        class_names=[str(i) for i in range(10)],
        source="fake",
    )


def test_validation_is_carved_from_training_and_test_is_untouched():
    arrays = _fake_arrays()
    train, val, test = data.split_arrays(arrays, validation_examples=60)
    assert len(train[1]) == 240 and len(val[1]) == 60
    both = np.concatenate([train[0], val[0]]).reshape(300, -1)
    assert len({row.tobytes() for row in both}) == 300
    np.testing.assert_array_equal(test[0], arrays.x_test)
    train, _, test = data.split_arrays(
        arrays, validation_examples=60, train_examples=100, test_examples=20
    )
    assert len(train[1]) == 100 and len(test[1]) == 20
    with pytest.raises(ValueError, match="validation_examples"):
        data.split_arrays(arrays, validation_examples=300)


def test_pipelines_standardise_augment_and_batch():
    arrays = _fake_arrays()
    mean, std = data.channel_stats(arrays.x_train)
    train = data.make_train_dataset(
        arrays.x_train, arrays.y_train, 100, mean, std, seed=0
    )
    images, labels = next(iter(train))
    assert images.shape == (100, 32, 32, 3) and labels.shape == (100,)
    # Zero padding after standardisation pads with the mean.
    assert abs(float(tf.reduce_mean(images))) < 0.1
    # Endless: more batches than one pass holds.
    assert len(list(train.take(7))) == 7
    test = data.make_eval_dataset(arrays.x_test, arrays.y_test, 32, mean, std)
    assert [int(x.shape[0]) for x, _ in test] == [32, 18]


# tensorflow-datasets, through its own mocking.


def test_tfds_cifar10_through_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=40):
        train, val, test, info = data.load_datasets(
            "cifar10",
            data_dir=str(tmp_path),
            validation_examples=8,
            batch_size=16,
            return_info=True,
        )
    assert info.num_classes == 10
    assert "cifar10" in info.class_names[0] or len(info.class_names) == 10
    assert info.train_examples == 32 and info.validation_examples == 8
    assert "cifar10:3.0.2" in info.source
    x, y = next(iter(train))
    assert x.shape == (16, 32, 32, 3) and x.dtype == tf.float32
    assert sum(int(b[1].shape[0]) for b in val) == 8
    assert sum(int(b[1].shape[0]) for b in test) == 40


@pytest.mark.parametrize("download", [False, True])
def test_tfds_offline_without_a_copy_fails_fast(
    tmp_path, download, monkeypatch
):
    # With downloads on, a host that cannot be reached stands for no
    # network (on a machine with one, the download would start).
    monkeypatch.setattr(data, "_can_reach", lambda *a, **k: False)
    start = time.monotonic()
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_tfds(data_dir=str(tmp_path), download=download)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "cifar10" in message and "3.0.2" in message
    assert str(tmp_path) in message


def test_unreachable_host_is_detected_quickly():
    start = time.monotonic()
    assert not data._can_reach("host.invalid", timeout=2)
    assert time.monotonic() - start < 10
