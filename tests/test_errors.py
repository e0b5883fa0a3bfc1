"""User mistakes end in one `error:` line that names the field and the fix, before anything is built:
config checks (`cvolution_jax.train.config_checks` and each task's `check_<task>`), the
models' field checks, the entry points' flag parsing, `count` and the PyTorch converter."""

import os
import subprocess
import sys
import zipfile

import ml_collections
import pytest

from cvolution_jax import count, models
from cvolution_jax.convert import torch_rednet
from cvolution_jax.tasks.detection import check_detection
from cvolution_jax.tasks.classification import check_classification
from cvolution_jax.train.config_checks import ConfigError, check_workdir
from experiments.configs import coco_default, common
from tests import tiny_config
from tests.conftest import CONFIGS, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETECTION = ("coco", "faster_rcnn", "mask_rcnn", "nuclei")


def entry_point(module, config, workdir, *overrides):
    """Runs `python -m <module>` and returns its stderr's one `error:` line, checking that it failed
    without a traceback."""
    result = subprocess.run([sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}", *overrides],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


# ---------------------------------------------------------------------------------- the models


def test_widths_shorter_than_stage_sizes_is_refused_not_a_dropped_stage():
    with pytest.raises(ValueError, match=r"3 stages in stage_sizes \(1, 1, 1\) but 2 in widths \(16, 32\); give one width per stage"):
        models.create("cednet26", stage_sizes=(1, 1, 1), widths=(16, 32), stem_width=32)
    with pytest.raises(ValueError, match=r"4 stages in stage_sizes \(1, 2, 4, 1\) but 5 in widths"):
        models.create("resnet50", stage_sizes=(1, 2, 4, 1), widths=(8, 8, 8, 8, 8))


@pytest.mark.parametrize("op_model", ["rednet26", "cednet26"])
def test_op_widths_must_be_multiples_of_16(op_model):
    with pytest.raises(ValueError, match=r"widths must be multiples of 16 with op='(involution|cvolution)'.*got \(16, 24, 32, 64\)"):
        models.create(op_model, widths=(16, 24, 32, 64))
    # 32 and 48 are exact multiples, and the stem's op runs on 64 / 2 = 32 channels.
    models.create(op_model, widths=(16, 32, 48, 64), stem_width=64)


def test_stem_width_must_give_the_stem_op_a_multiple_of_16_channels():
    # 48 is a multiple of 16, but the rednet stem's op runs on 48 / 2 = 24 channels.
    with pytest.raises(ValueError, match=r"stem_width must be a multiple of 32 .*stem_width / 2 channels; got 48"):
        models.create("cednet26", stem_width=48)
    with pytest.raises(ValueError, match=r"stem_width must be a multiple of 32 .*stem='small'.*got 16"):
        models.create("rednet26", stem="small", stem_width=16)
    models.create("cednet26", stem_width=96)
    # Convolutions group nothing: any positive width builds.
    models.create("resnet50", widths=(4, 8, 8, 12), stem_width=8)


@pytest.mark.parametrize("field, value, message", [
    ("stage_sizes", (1, 0, 1, 1), r"stage_sizes must be one or more block counts >= 1"),
    ("stage_sizes", (), r"stage_sizes must be one or more block counts >= 1"),
    ("stem", "tiny", r"stem must be one of \('resnet', 'rednet', 'small'\); got 'tiny'"),
    ("op", "attention", r"op must be a cvolution_jax.layers.SpatialOp of kind \('conv', 'involution', 'cvolution'\).*got 'attention'"),
    ("widths", (64, 0, 256, 512), r"widths must be ints >= 1; got \(64, 0, 256, 512\)"),
    ("stem_width", 0, r"stem_width must be an int >= 1 .*got 0"),
])
def test_every_resnet_field_is_checked_at_construction(field, value, message):
    with pytest.raises(ValueError, match="ResNet: " + message):
        models.ResNet(**{"stage_sizes": (3, 4, 6, 3), field: value})


def test_unknown_override_lists_the_resnet_fields():
    with pytest.raises(ValueError, match=r"Unknown ResNet field\(s\) widht in the overrides of 'cednet26'; valid: stage_sizes, op, .*stem_width"):
        models.create("cednet26", widht=(16, 16, 16, 16))


# -------------------------------------------------------------------------- classification config


def tiny(**fields):
    config = tiny_config.get_config()
    config.update(fields)
    return config


@pytest.mark.parametrize("fields, message", [
    ({"num_epochs": 0.0, "num_train_steps": -1}, r"config.num_epochs is 0.0 and config.num_train_steps -1: nothing to train"),
    ({"checkpoint_every_steps": 0}, r"config.checkpoint_every_steps must be an int >= 1 .*got 0"),
    ({"log_every_steps": 0}, r"config.log_every_steps must be an int >= 1; got 0"),
    ({"keep_checkpoints": -1}, r"config.keep_checkpoints must be an int >= 0 .*got -1"),
    ({"batch_size": 0}, r"config.batch_size must be an int >= 1 .*got 0"),
])
def test_run_fields_are_checked(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        check_classification(tiny(**fields), str(tmp_path), train=True)
    assert not os.listdir(tmp_path)  # refused before anything was written


@pytest.mark.parametrize("config_file", ["default.py", "coco_default.py", "segmentation_default.py"])
def test_every_task_checks_the_dtype_before_anything_is_written(config_file, tmp_path):
    from cvolution_jax import tasks

    config = load_config(os.path.join(ROOT, "experiments", "configs", config_file))
    config.dtype = "float16"
    with pytest.raises(ConfigError, match=r"config.dtype must be one of \['bfloat16', 'float32'\]; got 'float16'"):
        tasks.get(config).check_config(config, str(tmp_path / "run"), train=True)
    assert not os.listdir(tmp_path)


def test_data_and_model_fields_are_named():
    config = tiny()
    config.data.image_size = 0
    with pytest.raises(ConfigError, match=r"config.data.image_size must be an int >= 1 .*got 0. Set --config.data.image_size=N"):
        check_classification(config, "unused", train=True)
    config = tiny()
    config.model.overrides.widths = (16,)
    with pytest.raises(ConfigError, match=r"config.model.name='cednet26' with config.model.overrides=.*2 stages in stage_sizes \(1, 1\) but 1 in widths"):
        check_classification(config, "unused", train=True)
    config = tiny()
    config.data.name = "mnist"
    with pytest.raises(ConfigError, match=r"config.data.name must be one of digits, .* for classification; got 'mnist'"):
        check_classification(config, "unused", train=True)


def test_evaluation_needs_no_training_length_and_creates_no_workdir(tmp_path):
    check_classification(tiny(num_epochs=0.0, num_train_steps=-1), str(tmp_path / "missing"), train=False)
    assert not (tmp_path / "missing").exists()  # the restore names the missing checkpoint


@pytest.mark.parametrize("path", [p for p in CONFIGS if not os.path.basename(p).startswith(("_", "common"))], ids=os.path.basename)
def test_every_shipped_config_passes(path, tmp_path):
    config = load_config(path)
    if os.path.basename(path).startswith(DETECTION):
        check_detection(config, str(tmp_path), train=True)
    elif os.path.basename(path).startswith("ablation_"):  # a study: each row's run is a classification run
        for row in config.rows:
            check_classification(common.study_run(config, row, 0), str(tmp_path), train=True)
    elif os.path.basename(path).startswith(("fpn_", "upernet_", "segmentation_")):
        from cvolution_jax.tasks.segmentation import check_segmentation

        check_segmentation(config, str(tmp_path), train=True)
    else:
        check_classification(config, str(tmp_path), train=True)


# ----------------------------------------------------------------------------------- the workdir


def test_a_workdir_that_is_a_file_or_under_one_is_refused(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=rf"--workdir {a_file} is a file, not a directory; give a directory"):
        check_workdir(str(a_file))
    with pytest.raises(ConfigError, match=r"notes.txt/run cannot be written \(Not a directory\); give a directory this user can write"):
        check_workdir(str(a_file / "run"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories; the check tries a write, so it passes there")
def test_a_read_only_workdir_is_refused(tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=r"read_only cannot be written \(Permission denied\)"):
            check_workdir(str(read_only))
        with pytest.raises(ConfigError, match=r"read_only/run cannot be written \(Permission denied\)"):
            check_workdir(str(read_only / "run"))
    finally:
        read_only.chmod(0o755)


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs")
def test_a_workdir_even_root_cannot_write_is_refused():
    # sysfs takes no new files or folders, from root either: the read-only directory that CI (as
    # root, where permission bits are ignored) has too.
    with pytest.raises(ConfigError, match=r"--workdir /sys/kernel cannot be written \(.+\); give a directory this user can write"):
        check_workdir("/sys/kernel")
    with pytest.raises(ConfigError, match=r"--workdir /sys/kernel/cvolution_run cannot be written"):
        check_workdir("/sys/kernel/cvolution_run")


def test_a_workdir_creates_its_parents_and_leaves_no_probe(tmp_path):
    check_workdir(str(tmp_path / "a" / "b"))
    assert os.listdir(tmp_path / "a" / "b") == []


# ------------------------------------------------------------------------------ detection config


def detection_config(**model):
    config = coco_default.get_config()
    config.model.update(model)
    return config


def test_detection_fields_are_checked(tmp_path):
    workdir = str(tmp_path)
    with pytest.raises(ConfigError, match=r"config.model.channels must be a multiple of 16 with neck_op='cvolution' .*got 24"):
        check_detection(detection_config(channels=24), workdir, train=True)
    with pytest.raises(ConfigError, match=r"neck_op='involution', rpn_op='cvolution'.*got 40"):
        check_detection(detection_config(channels=40, neck_op="involution", rpn_op="cvolution"), workdir, train=True)
    check_detection(detection_config(channels=24, neck_op="conv"), workdir, train=True)  # convolutions group nothing
    with pytest.raises(ConfigError, match=r"backbone_overrides gives the backbone 3 stages .*the FPN takes C2-C5, so give 4"):
        check_detection(detection_config(backbone_overrides={"stage_sizes": (1, 1, 1), "widths": (8, 8, 8), "stem_width": 8}),
                        workdir, train=True)
    with pytest.raises(ConfigError, match=r"mask_channels \(32\) must equal config.model.channels \(64\)"):
        check_detection(detection_config(mask_op="cvolution"), workdir, train=True)
    # Faster R-CNN takes no mask fields, so a mask op in its config groups no channels.
    check_detection(detection_config(detector="faster_rcnn", mask_op="cvolution", channels=24, neck_op="conv"), workdir,
                    train=True)
    small_stem = detection_config(backbone_overrides={"stage_sizes": (1, 1, 1, 1), "widths": (16, 32, 64, 128),
                                                      "stem_width": 32, "stem": "small"})
    with pytest.raises(ConfigError, match=r"strides\[:4\] = \(4, 8, 16, 32\) are not the strides of the backbone's "
                                          r"C2-C5, \(2, 4, 8, 16\) \(its stem 'small'\)"):
        check_detection(small_stem, workdir, train=True)
    with pytest.raises(ConfigError, match=r"config.model.settings has unknown fields \['anchor_scales'\]"):
        check_detection(detection_config(settings={"anchor_scales": 4.0}), workdir, train=True)
    config = detection_config()
    config.data.buckets = ((128, 0),)
    with pytest.raises(ConfigError, match=r"config.data.buckets must be one or more padded \(H, W\) shapes .*got \(\(128, 0\),\)"):
        check_detection(config, workdir, train=True)
    config = detection_config()
    config.data.scale = (1333, 0)
    with pytest.raises(ConfigError, match=r"config.data.scale must be a size in pixels >= 1 .*got \(1333, 0\)"):
        check_detection(config, workdir, train=True)
    config = detection_config()
    config.data.image_size = 0
    with pytest.raises(ConfigError, match=r"config.data.image_size must be an int >= 1"):
        check_detection(config, workdir, train=True)


# ---------------------------------------------------------------------------------- entry points


def test_unknown_config_field_is_one_line_with_a_suggestion(tmp_path):
    line = entry_point("experiments.imagenet", "tests/tiny_config.py", tmp_path, "--config.model.overrides.widht=(16, 16)")
    assert line.startswith("error: --config.model.overrides.widht: tests/tiny_config.py has no field "
                           "config.model.overrides.widht (did you mean config.model.overrides.widths?); the fields of "
                           "config.model.overrides are op_kwargs, stage_sizes, stem, stem_width, widths.")


# coco and cityscapes parse their flags with imagenet's cli.parse_flags; ablation too, with its own flags.
@pytest.mark.parametrize("module", ["experiments.imagenet", "experiments.ablation"])
def test_a_config_file_that_does_not_exist_is_one_line(module, tmp_path):
    line = entry_point(module, "experiments/configs/no_such.py", tmp_path / "run")
    assert line == ("error: --config experiments/configs/no_such.py: no such file; give a config file with get_config(), "
                    "e.g. experiments/configs/default.py.")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, problem", [
    (["prog", "--config=tests/tiny_config.py", "--workdir=w"], None),
    (["prog", "--config", "tests/tiny_config.py"], None),
    (["prog", "--config=experiments/configs/imagenet_synthetic.py:smoke"], None),  # get_config's argument
    (["prog", "--config=no/such.py:smoke"], "--config no/such.py:smoke: no such file;"),
    (["prog", "--config", "tests"], "--config tests: no such file (it is a directory);"),
    (["prog", "--config=runs/x/config.json"], "--config runs/x/config.json is a run's saved config (JSON), not a config file. To resume"),
    (["prog", "--workdir=w"], None),  # absl says that --config is required
    (["prog", "--config=no/such.py", "--config=tests/tiny_config.py"], None),  # absl takes the last one
    (["prog", "--config=tests/tiny_config.py", "--config"], "--config : no such file;"),  # the last has no value
])
def test_config_path_problems_are_found_before_absl_parses(monkeypatch, argv, problem):
    from cvolution_jax.train import cli

    monkeypatch.chdir(ROOT)
    found = cli.config_path_problem(argv)
    assert found == problem if problem is None else found.startswith(problem), found


def test_eval_without_a_checkpoint_is_one_line_with_no_traceback_at_exit(tmp_path):
    """Newer orbax left a cleanup thread to fail at interpreter exit after this error (Checkpointer.close)."""
    line = entry_point("experiments.imagenet", "tests/tiny_config.py", tmp_path / "run", "--config.mode=eval")
    assert line.startswith(f"error: No checkpoint in {tmp_path / 'run' / 'checkpoints'} (steps there: none).")
    assert not (tmp_path / "run").exists()  # nothing made where nothing was


def test_evaluating_an_empty_workdir_writes_no_dataset_first(tmp_path):
    line = entry_point("experiments.cityscapes", "experiments/configs/segmentation_default.py", tmp_path / "run",
                       "--config.mode=eval")
    assert line.startswith(f"error: No checkpoint in {tmp_path / 'run' / 'checkpoints'} (steps there: none).")
    assert not (tmp_path / "run").exists()  # the shapes dataset (1200 images, 20 s) was written before


def test_imagenet_with_nothing_to_train_fails_before_building_anything(tmp_path):
    workdir = tmp_path / "run"
    line = entry_point("experiments.imagenet", "tests/tiny_config.py", workdir, "--config.num_epochs=0", "--config.num_train_steps=-1")
    assert line.startswith("error: config.num_epochs is 0.0 and config.num_train_steps -1: nothing to train.")
    assert not workdir.exists()


def test_imagenet_workdir_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("")
    line = entry_point("experiments.imagenet", "tests/tiny_config.py", tmp_path / "run")
    assert line == f"error: --workdir {tmp_path / 'run'} is a file, not a directory; give a directory (it is created if missing)."


def test_coco_unknown_config_field(tmp_path):
    line = entry_point("experiments.coco", "experiments/configs/coco_default.py", tmp_path, "--config.model.overrides.widths=(16,)")
    assert line.startswith("error: --config.model.overrides.widths: experiments/configs/coco_default.py has no field "
                           "config.model.overrides (did you mean config.model.backbone_overrides?)")


def test_coco_refuses_a_zero_checkpoint_interval_before_writing_its_data(tmp_path):
    line = entry_point("experiments.coco", "experiments/configs/coco_default.py", tmp_path / "run", "--config.checkpoint_every_steps=0")
    assert line.startswith("error: config.checkpoint_every_steps must be an int >= 1")
    assert not (tmp_path / "run").exists()  # neither the shapes data set nor the workdir was written


# ------------------------------------------------------------------------------------ count, convert


@pytest.mark.parametrize("flag", ["--image-size", "--num-classes"])
def test_count_refuses_a_zero_size(capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        count.main(["resnet50", flag, "0"])
    assert exit_info.value.code == 2
    assert f"error: {flag} must be >= 1" in capsys.readouterr().err


@pytest.fixture
def no_torch(monkeypatch):
    """`import torch` fails, as where the optional extra is not installed."""
    monkeypatch.setitem(sys.modules, "torch", None)


def convert(tmp_path, source, *flags):
    with pytest.raises(SystemExit) as exit_info:
        torch_rednet.main([str(source), str(tmp_path / "out"), "--model", "rednet26", *flags])
    assert not (tmp_path / "out").exists()
    return exit_info.value.code


def test_converter_names_an_empty_file_without_torch(tmp_path, no_torch):
    empty = tmp_path / "rednet.pth"
    empty.write_bytes(b"")
    assert convert(tmp_path, empty) == f"error: {empty} is empty (0 bytes), e.g. an interrupted download or copy; fetch the checkpoint again."


def test_converter_names_a_file_that_is_not_a_checkpoint_without_torch(tmp_path, no_torch):
    page = tmp_path / "rednet.pth"
    page.write_text("<html>404 Not Found</html>")
    message = convert(tmp_path, page)
    assert message.startswith(f"error: {page} is not a PyTorch checkpoint: torch.save writes a zip archive")
    assert "starts with b'<htm'" in message


def test_converter_names_a_truncated_zip_without_torch(tmp_path, no_torch):
    whole = tmp_path / "whole.pth"
    with zipfile.ZipFile(whole, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00." * 100)
    cut = tmp_path / "rednet.pth"
    cut.write_bytes(whole.read_bytes()[:200])  # the start of a download: no central directory
    assert convert(tmp_path, cut).startswith(f"error: {cut} is a damaged or truncated zip archive (200 bytes)")


def test_converter_refuses_fewer_than_one_class(tmp_path, capsys, no_torch):
    source = tmp_path / "rednet.pth"
    source.write_bytes(b"")
    assert convert(tmp_path, source, "--num-classes", "0") == 2
    assert "error: --num-classes must be >= 1 (the rows of head.fc.weight); got 0." in capsys.readouterr().err


def test_num_epochs_that_rounds_to_no_steps_is_an_error(tmp_path):
    # 0.01 of the digits' 44 steps per epoch (1437 images at batch 32) is 0 steps: known only once
    # the data is loaded, so the runner's schedule_length checks it as the task builds (every task).
    line = entry_point("experiments.imagenet", "tests/tiny_config.py", tmp_path / "run", "--config.num_epochs=0.01",
                       "--config.num_train_steps=-1")
    assert line.startswith("error: The run has 0 training steps: config.num_epochs=0.01 of this dataset's 44 steps "
                           "per epoch rounds down to 0.")


@pytest.mark.parametrize("examples, batch_size, num_epochs, num_train_steps, expected", [
    (1437, 32, 15.0, -1, (44, 660)),  # the digits default: 44 whole batches per epoch
    (64, 32, 1.5, -1, (2, 3)),  # an exact multiple
    (64, 32, 0.5, 7, (2, 7)),  # num_train_steps wins
    (31, 32, 1.0, -1, "config.batch_size=32 exceeds the 31 training examples"),
    (64, 32, 0.4, -1, "The run has 0 training steps"),
])
def test_every_task_counts_its_schedule_one_way(examples, batch_size, num_epochs, num_train_steps, expected):
    from cvolution_jax.train.loop import schedule_length

    config = ml_collections.ConfigDict({"batch_size": batch_size, "num_epochs": num_epochs,
                                        "num_train_steps": num_train_steps})
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            schedule_length(config, examples)
    else:
        assert schedule_length(config, examples) == expected


def test_mask_rcnn_without_mask_crops_is_refused_before_the_workdir(tmp_path):
    config = detection_config()
    config.data.mask_size = 0
    with pytest.raises(ConfigError, match=r"config.data.mask_size must be an int >= 1 \(Mask R-CNN trains on each"):
        check_detection(config, str(tmp_path / "run"), train=True)
    assert not (tmp_path / "run").exists()


def test_a_config_of_another_task_names_the_entry_point_that_trains_it(tmp_path):
    line = entry_point("experiments.coco", "tests/tiny_config.py", tmp_path / "run")
    assert line == ("error: --config is a classification config (config.task='classification'), and this entry point "
                    "trains detection: run it with python -m experiments.imagenet.")
    assert not (tmp_path / "run").exists()


def test_an_unknown_detector_is_refused_before_any_data_is_written(tmp_path):
    config = detection_config()
    config.model.detector = "retinanet"
    with pytest.raises(ConfigError, match=r"config.model.detector must be one of faster_rcnn, mask_rcnn; got 'retinanet'"):
        check_detection(config, str(tmp_path / "run"), train=True)
    assert not os.listdir(tmp_path)
