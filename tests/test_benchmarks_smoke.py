"""Smoke tests: every benchmark still runs, on a tiny setting.

Benchmarks print figures; these tests only check that they run end to end
and write their outputs, not what the figures are.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny_image_folder(root, classes=3, train=8, test=3):
    """A CIFAR-shaped image folder of random JPEGs."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def test_step_cost_runs(tmp_path):
    from benchmarks import step_cost

    report = step_cost.run(
        depths=[8],
        methods=["bp", "vfbn_d0"],
        batch_size=4,
        rounds=2,
        warmup=1,
        torch=False,
        inference_methods=["vfbn_d0"],
        output_dir=tmp_path,
        separate_processes=False,
    )
    rows = report["depths"][0]["train"]
    assert [r["method"] for r in rows] == ["bp", "vfbn_d0"]
    assert rows[0]["ratio"] == 1.0
    assert report["inference"][0]["predict"][1]["method"] == "vfbn_d0"
    saved = json.loads((tmp_path / "step_cost.json").read_text())
    assert saved["depths"][0]["depth"] == 8
    assert "ResNet-8" in (tmp_path / "step_cost.md").read_text()


def test_gradient_quality_runs(tmp_path):
    from benchmarks import gradient_quality

    folder = _tiny_image_folder(tmp_path / "images")
    config = dict(
        steps=3,
        batch_size=4,
        depth=8,
        probe_every=2,
        learning_rate=0.1,
        lr_decay=True,
        test_examples=0,
        seed=0,
    )
    rows, records = gradient_quality.run(
        config,
        ["bp", "vfbn_d0"],
        folder,
        None,
        tmp_path / "out",
    )
    assert set(rows) == {"bp", "vfbn_d0"}
    vfbn = records["vfbn_d0"]
    assert vfbn["probe_step"] == [0, 2]
    # The probe and the library's own metric see the same step.
    np.testing.assert_allclose(
        vfbn["cosine"], vfbn["metric_cosine"], rtol=1e-4, atol=1e-6
    )
    # All methods start from the same weights on the same batch.
    assert records["bp"]["loss"][0] == records["vfbn_d0"]["loss"][0]
    for name in ("gradient_quality.json", "gradient_quality.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert (tmp_path / "out" / "gradient_quality.png").stat().st_size > 0


def test_table2_small_runs(tmp_path):
    folder = _tiny_image_folder(tmp_path / "images")
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        CIFAR_ARCHIVE=str(folder),
        RUNS=str(tmp_path / "runs"),
        OUTPUT=str(tmp_path / "report"),
        METHODS="vfbn_alpha1e-3",
        SEEDS="0",
        EPOCHS="1",
        STEPS="1",
        # The tiny folder has 24 training images.
        EXTRA_FLAGS="--validation_examples=4 --test_examples=0 --batch_size=4",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    subprocess.run(
        ["bash", str(REPO / "benchmarks" / "table2_small.sh")],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    report = (tmp_path / "report" / "report.md").read_text()
    assert "VFBN" in report
