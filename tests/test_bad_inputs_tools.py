"""Bad input to the tools, by class of case (docs/training.md, "Reliability"): a config file that is not one,
a metrics file that was edited, an output path that cannot be written, counts below one, a run
started over an earlier run's records. Each ends in one sentence before anything is measured or
trained, or is skipped and counted; nothing is lost."""

import json
import logging
import os

import ml_collections
import pytest

from cvolution_jax.tasks.classification import check_classification
from cvolution_jax.train import loop
from cvolution_jax.train.config_checks import ConfigError
from cvolution_jax.train.metrics import MetricWriter, read_metrics
from kernels import common
from tests import tiny_config
from tests.test_errors import entry_point

CONFIG_ADVICE = "A config file is Python defining get_config() that returns an ml_collections.ConfigDict"


# ------------------------------------------------------------------------- a config file that is not one


@pytest.mark.parametrize("name, text, said", [
    ("bad.yaml", "model: x\n", "could not be loaded (NameError: name 'x' is not defined). " + CONFIG_ADVICE),
    ("noget.py", "X = 1\n", "could not be loaded (AttributeError: module 'config_config' has no attribute 'get_config'). "
     + CONFIG_ADVICE),
    ("dict.py", "def get_config():\n    return {'mode': 'train'}\n",
     ": get_config() returned a dict; it must return an ml_collections.ConfigDict"),
])
def test_a_config_file_that_is_not_one_is_one_line(tmp_path, name, text, said):
    (tmp_path / name).write_text(text)
    line = entry_point("experiments.imagenet", str(tmp_path / name), tmp_path / "run", "--config.num_train_steps=3")
    assert line.startswith(f"error: --config {tmp_path / name}") and said in line, line
    assert not (tmp_path / "run").exists()


def test_a_get_config_argument_it_refuses_is_its_own_message(tmp_path):
    line = entry_point("experiments.imagenet", "experiments/configs/ablation_fashion_mnist.py:nosuchrow", tmp_path / "run")
    assert line.startswith("error: --config experiments/configs/ablation_fashion_mnist.py:nosuchrow could not be loaded "
                           "(ValueError: Unknown ablation row 'nosuchrow'; the rows are cednet, ")


# ---------------------------------------------------------------------------- fields below their range


@pytest.mark.parametrize("field, value, message", [
    ("num_train_steps", 0, r"config.num_train_steps must be -1 \(unset: config.num_epochs says how long\) or an int >= 1; got 0"),
    ("num_train_steps", -5, r"config.num_train_steps must be -1 .* got -5"),
    ("eval_every_steps", 0, r"config.eval_every_steps must be -1 \(once per epoch\) or an int >= 1; got 0"),
    ("checkpoint_step", -7, r"config.checkpoint_step must be -1 \(the latest checkpoint\) or an int >= 1; got -7"),
    ("base_lr", -1.0, r"config.base_lr must be > 0; got -1.0"),
    ("data.validation_size", -3, r"config.data.validation_size must be an int >= 0 .*got -3"),
])
def test_a_value_that_would_be_silently_taken_as_unset_is_refused(tmp_path, field, value, message):
    config = tiny_config.get_config()
    node, _, name = field.rpartition(".")
    (config[node] if node else config)[name] = value
    with pytest.raises(ConfigError, match=message):
        check_classification(config, str(tmp_path / "run"), train=True)


# --------------------------------------------------------------------------- an edited metrics file


def test_lines_of_metrics_jsonl_that_are_not_records_are_dropped_and_counted(tmp_path, caplog):
    good = [{"step": 3, "split": "train", "loss": 1.5}, {"step": 6, "split": "eval", "top1": 0.5},
            {"step": 9, "split": "train", "loss": 1.0}]
    garbage = ["[1, 2]", '{"step": "abc", "split": "train"}', '{"step": null}', "{not json", '"text"']
    lines = [json.dumps(good[0]), garbage[0], json.dumps(good[1]), *garbage[1:], json.dumps(good[2])]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert read_metrics(str(tmp_path)) == good  # read: the records, in order

    with caplog.at_level(logging.INFO, logger="cvolution_jax.train.metrics"):
        MetricWriter(str(tmp_path), start_step=6).close()  # a run resumed from step 6
    assert read_metrics(str(tmp_path)) == good[:2]
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in good[:2])
    assert "dropped 5 line(s) that are not metrics records" in caplog.text
    assert "dropped 1 record(s) after step 6" in caplog.text


# ------------------------------------------------------------------ a run started over an earlier one


def test_a_run_started_from_scratch_over_an_earlier_runs_records_moves_them_aside(tmp_path):
    """Its checkpoints were deleted (as the damaged-checkpoint message suggests), or it stopped
    before the first: training from step 0 replaced its config.json and dropped its metrics."""
    (tmp_path / "config.json").write_text('{"base_lr": 0.5}')
    (tmp_path / "metrics.jsonl").write_text('{"step": 3, "split": "train", "loss": 2.0}\n')
    (tmp_path / "eval_3.json").write_text('{"step": 3}')
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "shapes").mkdir()  # a dataset the run wrote: it stays
    moved = loop.set_aside_previous_run(str(tmp_path))
    assert os.path.dirname(moved) == str(tmp_path) and os.path.basename(moved).startswith("previous_")
    assert sorted(os.listdir(moved)) == ["config.json", "eval_3.json", "metrics.jsonl", "tensorboard"]
    assert json.loads((tmp_path / moved / "config.json").read_text()) == {"base_lr": 0.5}
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(moved), "shapes"])
    assert loop.set_aside_previous_run(str(tmp_path)) is None  # nothing more to move


# ------------------------------------------------------------------ output paths and counts of the tools


@pytest.mark.parametrize("make, folder, said", [
    (lambda tmp: tmp / "new" / "deeper", True, None),  # made
    (lambda tmp: tmp / "file.txt", True, "is a file; give a folder (it is made if missing)"),
    (lambda tmp: tmp / "file.txt" / "out", True, "file.txt is a file, so"),
    (lambda tmp: tmp, False, "is a folder; give the path of the file to write in it"),
    (lambda tmp: tmp / "file.txt" / "t.md", False, "file.txt is a file, so"),
    (lambda tmp: tmp / "sub" / "t.md", False, None),
])
def test_an_output_path_is_judged_before_anything_is_measured(tmp_path, make, folder, said):
    (tmp_path / "file.txt").write_text("x")
    problem = common.output_problem(make(tmp_path), folder=folder)
    assert problem is None if said is None else said in problem, problem
    assert not [name for name in os.listdir(tmp_path) if name.startswith("tmp")]  # the probe leaves nothing


@pytest.mark.parametrize("module, argv, said", [
    ("kernels.bench", ["--smoke", "--repeats=-1"], "--repeats must be >= 1; got -1"),
    ("kernels.bench", ["--smoke", "--iters=0"], "--iters must be >= 1; got 0"),
    ("kernels.bench", ["--smoke", "--dtypes=float16"], "--dtypes float16: the kernels take float32 and bfloat16; got float16"),
    ("kernels.bench", ["--smoke", "--out-dir=pyproject.toml"], "pyproject.toml is a file; give a folder"),
    ("kernels.bench", ["--xla-backward", "--involution-code=no/such/involution_naive.py"], "no such file; give the path"),
    ("kernels.compile", ["--ci", "--ops=stem_c99"], "unknown ops ['stem_c99']; choose from"),
    ("kernels.compile", ["--ci", "--dtypes=float16"], "unknown dtypes ['float16']; the kernels take float32 and bfloat16"),
    ("kernels.compile", ["--ci", "--target-config=no/such.txtpb"], "--target-config no/such.txtpb does not exist"),
    ("kernels.compile", ["--ci", "--out=pyproject.toml/c.md"], "pyproject.toml is a file, so"),
    ("kernels.traffic", ["--out=kernels"], "is a folder; give the path of the file to write in it"),
    ("kernels.traffic", ["--out=pyproject.toml/t.md"], "pyproject.toml is a file, so"),
    ("kernels.gpu_check", ["--smoke", "--out=pyproject.toml/g"], "pyproject.toml is a file, so"),
])
def test_kernel_tools_refuse_bad_arguments_in_one_sentence(module, argv, said, capsys, monkeypatch):
    import importlib

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(argv)
    assert exit_.value.code == 2 and said in capsys.readouterr().err


def test_visualize_never_writes_over_a_file_that_is_not_its_png(tmp_path):
    from experiments import visualize

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"the picture is a PNG; give a path ending in .png"):
        visualize.visualize(str(tmp_path), "unused.png", out=str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match=r"notes.txt is a file, so"):
        visualize.visualize(str(tmp_path), "unused.png", out=str(tmp_path / "notes.txt" / "k.png"))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_count_loads_a_config_file_as_the_entry_points_do(tmp_path, capsys):
    from cvolution_jax import count

    (tmp_path / "noget.py").write_text("X = 1\n")
    count.load_config("experiments/configs/default.py")  # its get_config must not be taken for noget.py's
    with pytest.raises(SystemExit):
        count.main(["--config", str(tmp_path / "noget.py")])
    assert (f"error: --config {tmp_path / 'noget.py'} could not be loaded (AttributeError: module 'config_config' has no "
            f"attribute 'get_config'). " + CONFIG_ADVICE) in capsys.readouterr().err
    # `file.py:argument` passes the argument to get_config, as --config does for training.
    count.main(["--config", "experiments/configs/ablation_fashion_mnist.py:resnet", "--json"])
    [row] = json.loads(capsys.readouterr().out)
    assert row["classes"] == 1000 and row["params"] > 0


def test_a_missing_coco_folder_says_what_it_must_hold(tmp_path):
    from cvolution_jax.data import coco

    with pytest.raises(FileNotFoundError, match=r"instances_val2017.json: no such file. COCO is read from "
                                                r"config.data.data_dir, which must hold annotations/"):
        coco.load_coco(tmp_path / "annotations" / "instances_val2017.json", tmp_path / "val2017")


def test_a_negative_vis_is_refused_by_the_flag(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "experiments.cityscapes", "--config",
                             "experiments/configs/segmentation_default.py", "--workdir", str(tmp_path / "run"), "--vis=-3"],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True,
                            timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "flag --vis=-3: -3 is not a non-negative integer" in result.stderr, result.stderr[-1000:]
    assert not (tmp_path / "run").exists()


def test_a_pretrained_path_without_checkpoints_is_refused_before_any_data_and_makes_no_folder(tmp_path):
    from cvolution_jax.tasks.backbone import check_pretrained

    check_pretrained("")  # none: the backbone trains from scratch
    with pytest.raises(FileNotFoundError, match=r"config.model.pretrained='.*nope': no checkpoint in .*nope/checkpoints. "
                                                r"Give the --workdir of a finished experiments.imagenet run"):
        check_pretrained(str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()


def test_a_run_saved_before_configs_named_their_task_resumes_without_a_false_difference(tmp_path):
    config = tiny_config.get_config()
    saved = json.loads(config.to_json_best_effort())
    del saved["task"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert loop.save_config(config, str(tmp_path), step=4) is None  # nothing new to record
    config.base_lr = 0.2
    assert os.path.basename(loop.save_config(config, str(tmp_path), step=4)) == "config_resume_4.json"
