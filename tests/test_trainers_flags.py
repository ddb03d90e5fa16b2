"""trainers: flagfiles, flag validation, import hygiene and model builders."""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import app, flags

from trainers import cifar, resnet

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "trainers" / "configs"
ROW_CONFIGS = sorted(p for p in CONFIGS.glob("*.cfg") if p.name != "quick.cfg")


def new_flags():
    fv = flags.FlagValues()
    cifar.define_flags(fv)
    return fv


def parse(*args):
    """Parses trainer arguments into fresh FlagValues; returns (fv, rest)."""
    fv = new_flags()
    rest = fv(["trainer", *args])
    return fv, rest


def test_flagfiles_cover_the_seed_table():
    names = {p.stem for p in ROW_CONFIGS}
    assert names == {
        "bp",
        "half",
        "local",
        "dni_linear",
        "dni_resnet",
        "vfbn_alpha0",
        "vfbn_alpha1e-3",
    }


@pytest.mark.parametrize(
    "path", ROW_CONFIGS + [CONFIGS / "quick.cfg"], ids=lambda p: p.stem
)
def test_every_flagfile_parses_and_builds_its_model(path):
    fv, rest = parse(f"--flagfile={path}")
    assert rest == ["trainer"]
    config = cifar.config_from_flags(fv)
    if path.stem != "quick.cfg" and path.name != "quick.cfg":
        assert config.depth == 110
        assert config.batch_size == 128
        assert config.learning_rate == 0.1
        assert config.weight_decay == 1e-4
    model = resnet.build_model(
        config.depth,
        method=config.method,
        cuts=config.cuts or None,
        vfbn_depth=config.vfbn_depth,
        alpha_gs=config.alpha_gs,
        weight_decay=config.weight_decay,
    )
    assert model.outputs[0].shape == (None, 10)
    if config.method in resnet.SYNTHETIC_GRADIENT_METHODS:
        import keras_vfbn

        assert isinstance(model, keras_vfbn.SyntheticGradientModel)
        assert len(model.boundaries) == 1


def test_vfbn_rows_set_alpha_gs():
    fv, _ = parse(f"--flagfile={CONFIGS / 'vfbn_alpha1e-3.cfg'}")
    assert fv.method == "vfbn" and fv.alpha_gs == 1e-3 and fv.vfbn_depth == 2
    fv, _ = parse(f"--flagfile={CONFIGS / 'vfbn_alpha0.cfg'}")
    assert fv.method == "vfbn" and fv.alpha_gs == 0.0


def test_quick_config_method_is_overridable():
    for method in resnet.METHODS:
        fv, _ = parse(
            f"--flagfile={CONFIGS / 'quick.cfg'}", f"--method={method}"
        )
        config = cifar.config_from_flags(fv)
        assert config.method == method
        assert method in config.model_dir


def test_resnet110_parameter_count_matches_published():
    model = resnet.build_model(110)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    # He et al. (2016), Table 6: 1.7M.
    assert 1.70e6 <= trainable <= 1.75e6
    model = resnet.build_model(20)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert 0.26e6 <= trainable <= 0.28e6  # 0.27M


def test_default_cut_is_the_middle_and_more_cuts_make_more_sections():
    assert resnet.default_cuts(110) == (27,)
    assert resnet.default_cuts(20) == (4,)
    model = resnet.build_model(20, method="dni_linear", cuts=[3, 6])
    assert [b.name for b in model.boundaries] == ["boundary1", "boundary2"]
    model = resnet.build_model(20, method="local", cuts=[3, 6])
    assert resnet.output_names(model) == ["logits", "aux1", "aux2"]


def test_half_is_the_bottom_alone_with_a_head():
    full = resnet.build_model(20)
    half = resnet.build_model(20, method="half")
    names = {layer.name for layer in half.layers}
    assert "stage2_block1_add" in names and "stage3_block1_add" not in names
    assert half.count_params() < full.count_params()


def test_local_passes_no_gradient_across_the_cut():
    model = resnet.build_model(8, method="local")
    x = tf.random.normal((4, 32, 32, 3))
    stem = model.get_layer("stem_conv").kernel
    top = model.get_layer("logits").kernel
    with tf.GradientTape(persistent=True) as tape:
        logits, aux = model(x, training=True)
        top_loss = tf.reduce_sum(logits)
        aux_loss = tf.reduce_sum(aux)
    assert tape.gradient(top_loss, stem) is None
    assert tape.gradient(top_loss, top) is not None
    assert tape.gradient(aux_loss, stem) is not None


def test_shortcut_layer_round_trips():
    model = resnet.build_model(8)
    clone = keras.Model.from_config(model.get_config())
    x = np.random.rand(2, 32, 32, 3).astype("float32")
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(model(x), clone(x), atol=1e-6)


def test_learning_rate_schedule_warms_up_then_steps_down():
    schedule = cifar.make_learning_rate_schedule(
        0.1, 1000, decay_at=(0.5, 0.75), warmup_steps=100
    )
    rates = [float(schedule(s)) for s in (0, 99, 101, 499, 501, 751, 999)]
    np.testing.assert_allclose(
        rates, [0.01, 0.01, 0.1, 0.1, 0.01, 0.001, 0.001], rtol=1e-6
    )
    assert cifar.make_learning_rate_schedule(0.05, 10, decay_at=()) == 0.05


# C14: flag syntax.


def test_noflag_and_values_in_a_flagfile(tmp_path):
    path = tmp_path / "f.cfg"
    path.write_text("# a comment line\n--noaugment\n--batch_size=32\n")
    fv, rest = parse(f"--flagfile={path}")
    assert rest == ["trainer"]
    assert fv.augment is False and fv.batch_size == 32


def test_trailing_comment_in_a_flagfile_is_rejected(tmp_path):
    path = tmp_path / "f.cfg"
    path.write_text("--batch_size=32  # the global batch\n")
    with pytest.raises(flags.IllegalFlagValueError, match="batch_size"):
        parse(f"--flagfile={path}")


def test_bool_flag_followed_by_a_word_is_a_usage_error():
    fv, rest = parse("--augment", "False", "--model_dir=/tmp/x")
    assert fv.augment is True  # what absl does; the trainer must refuse:
    with pytest.raises(app.UsageError, match="False"):
        cifar.check_positional_arguments(rest)


# Item 7: every bad input fails before anything runs, naming the flag.


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--method=sgd"], r"--method.*bp.*half.*local.*vfbn"),
        (["--depth=21"], r"--depth.*6n\+2"),
        (["--depth=20", "--cuts=9"], r"--cuts.*between 1 and 8"),
        (["--depth=20", "--cuts=0"], r"--cuts.*between 1 and 8"),
        (["--cuts=a,b"], r"--cuts.*block indices"),
        (["--learning_rate=0"], r"--learning_rate.*positive"),
        (["--learning_rate=-0.1"], r"--learning_rate.*positive"),
        (["--batch_size=0"], r"--batch_size.*positive"),
        (["--method=bp", "--alpha_gs=0.001"], r"--alpha_gs.*--method=vfbn"),
        (["--method=dni_linear", "--alpha_gs=1"], r"--alpha_gs.*vfbn"),
        (["--data_dir=/nonexistent/tfds"], r"--data_dir=/nonexistent/tfds"),
        (["--dataset=image_folder"], r"--image_folder"),
        (
            ["--dataset=image_folder", "--image_folder=/nonexistent/imgs"],
            r"--image_folder=/nonexistent/imgs.*train/<class>",
        ),
        (["--image_folder=/tmp"], r"--dataset=image_folder"),
        (["--strategy=tpu"], r"--strategy.*default.*mirrored.*multi_worker"),
        (["--lr_decay_at=0.8,0.5"], r"--lr_decay_at"),
    ],
)
def test_bad_flags_are_usage_errors(args, pattern):
    with pytest.raises(flags.Error, match=pattern):
        parse("--model_dir=/tmp/unused", *args)


def test_image_folder_without_images_names_what_was_looked_for(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    fv, _ = parse(
        "--dataset=image_folder",
        f"--image_folder={tmp_path}",
        f"--model_dir={tmp_path / 'run'}",
    )
    with pytest.raises(app.UsageError, match=r"No images found.*\*\.jpg"):
        cifar.run_from_flags(fv)
    assert not (tmp_path / "run").exists()


def test_relaunch_with_other_flags_is_refused(tmp_path):
    fv, _ = parse(f"--model_dir={tmp_path}", "--method=bp")
    (tmp_path / "flags.cfg").write_text(cifar.flagfile_text(fv))
    # What BackupAndRestore leaves after the first completed epoch.
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "training_metadata.json").write_text(
        '{"epoch": 1}'
    )
    fv, _ = parse(f"--model_dir={tmp_path}", "--method=vfbn")
    with pytest.raises(app.UsageError, match="--method=bp -> --method=vfbn"):
        cifar.run_from_flags(fv)


def test_a_launch_that_failed_before_an_epoch_does_not_lock_its_dir(
    tmp_path, monkeypatch
):
    fv, _ = parse(f"--model_dir={tmp_path}", "--batch_size=127")
    (tmp_path / "flags.cfg").write_text(cifar.flagfile_text(fv))
    started = []
    monkeypatch.setattr(cifar, "train", lambda config: started.append(config))
    fv, _ = parse(f"--model_dir={tmp_path}", "--batch_size=128")
    with pytest.raises(TypeError):  # the stub returns no results
        cifar.run_from_flags(fv)
    assert [c.batch_size for c in started] == [128]
    assert "--batch_size=128" in (tmp_path / "flags.cfg").read_text()


def test_a_setting_that_does_not_fit_is_one_error_line(tmp_path, monkeypatch):
    def train(config):
        raise cifar.spec.ConfigurationError(
            "--batch_size=127 must be a multiple of the 2 replicas"
        )

    monkeypatch.setattr(cifar, "train", train)
    fv, _ = parse(f"--model_dir={tmp_path}", "--batch_size=127")
    with pytest.raises(SystemExit, match="^Error: --batch_size=127 must"):
        cifar.run_from_flags(fv)


def test_a_trailing_comment_on_a_text_flag_is_refused(tmp_path):
    flagfile = tmp_path / "run.cfg"
    flagfile.write_text(f"--model_dir={tmp_path / 'run'}  # scratch run\n")
    fv, _ = parse(f"--flagfile={flagfile}")
    with pytest.raises(app.UsageError, match="trailing comment.*own"):
        cifar.config_from_flags(fv)
    assert not (tmp_path / "run").exists()


def test_model_dir_placeholders():
    fv, _ = parse("--model_dir=runs/{method}-d{depth}-s{seed}", "--seed=3")
    assert cifar.config_from_flags(fv).model_dir == "runs/bp-d110-s3"
    fv, _ = parse("--model_dir=runs/{nope}")
    with pytest.raises(app.UsageError, match="placeholders"):
        cifar.config_from_flags(fv)


# C15 and the command line itself, in fresh processes.


def _run(args, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def test_importing_parses_no_flags():
    code = (
        "import sys; sys.argv = ['x', '--method=nope', 'stray'];"
        "import trainers, trainers.cifar, trainers.report, trainers.data,"
        " trainers.resnet;"
        "from absl import flags;"
        "assert not flags.FLAGS.is_parsed();"
        "assert 'method' not in flags.FLAGS;"
        "assert 'output_dir' not in flags.FLAGS;"
        "print('clean')"
    )
    result = _run(["-c", code])
    assert result.returncode == 0, result.stderr
    assert "clean" in result.stdout


def test_command_line_rejects_bad_method_and_positional_arguments():
    result = _run(
        [
            "-m",
            "trainers.cifar",
            f"--flagfile={CONFIGS / 'quick.cfg'}",
            "--method=sgd",
        ]
    )
    assert result.returncode != 0
    assert "--method" in result.stderr and "vfbn" in result.stderr
    result = _run(
        [
            "-m",
            "trainers.cifar",
            f"--flagfile={CONFIGS / 'quick.cfg'}",
            "--augment",
            "False",
        ]
    )
    assert result.returncode != 0
    assert "Unexpected positional arguments: False" in result.stderr
