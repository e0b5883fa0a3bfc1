"""experiments.ablation: the grid runs as ordinary runs, its table matches their own eval files, and
a half-finished grid resumes by training only the missing runs."""

import dataclasses
import json
import logging
import math
import os
import shutil
import signal

import numpy as np
import pytest
from scipy import stats

from cvolution_jax import count
from cvolution_jax.tasks import classification
from cvolution_jax.train import checkpoint, loop
from experiments import ablation
from experiments.configs import ablation_fashion_mnist, common


def tiny_study(rows=("resnet", "resnet_matched"), seeds=(0, 1)):
    """The Fashion-MNIST study shrunk to seconds: digits at 16x16, one-block stages of width 16, K=3, 3 steps.
    The grid's rows are convolutions, which compile in seconds; the driver treats every row alike."""
    study = ablation_fashion_mnist.study_config()
    study.recipe.data.name = "digits"
    study.recipe.data.image_size = 16
    study.recipe.batch_size = 32
    study.recipe.num_train_steps = 3
    study.recipe.log_every_steps = 1
    study.recipe.checkpoint_every_steps = 3
    for row in study.models:
        overrides = study.models[row].overrides
        overrides.widths = (16, 12) if row == "resnet_matched" else (16, 16)
        overrides.stage_sizes = (1, 1)
        overrides.op_kwargs = (*overrides.op_kwargs, ("kernel_size", 3))
    study.rows = rows
    study.seeds = seeds
    return study


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A half-finished grid (seed 0 only) completed by a second call; counts the runs trained."""
    workdir = str(tmp_path_factory.mktemp("ablation"))
    trained = []
    real = loop.train_and_evaluate

    def spy(task, config, run_workdir):
        trained.append(os.path.relpath(run_workdir, workdir))
        return real(task, config, run_workdir)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "train_and_evaluate", spy)
        first = ablation.run_study(tiny_study(seeds=(0,)), workdir)
        trained_first = list(trained)
        trained.clear()
        os.remove(os.path.join(workdir, "resnet", "seed_0", "eval_3.json"))  # killed during its evaluation
        summary = ablation.run_study(tiny_study(), workdir)
    return workdir, first, trained_first, list(trained), summary


def test_resume_trains_only_the_missing_runs(grid):
    workdir, first, trained_first, trained_second, summary = grid
    assert sorted(trained_first) == ["resnet/seed_0", "resnet_matched/seed_0"]
    assert sorted(trained_second) == ["resnet/seed_1", "resnet_matched/seed_1"]  # seed 0's missing eval: evaluated, not retrained
    assert [r["row"] for r in first["rows"]] == ["resnet", "resnet_matched"] and first["seeds"] == [0]
    assert os.path.exists(os.path.join(workdir, "resnet", "seed_0", "eval_3.json"))


def test_table_matches_the_runs_own_eval_files(grid):
    workdir, _, _, _, summary = grid
    saved = json.load(open(os.path.join(workdir, "results.json")))
    assert saved["seeds"] == [0, 1] and [r["row"] for r in saved["rows"]] == ["resnet", "resnet_matched"]
    for row in saved["rows"]:
        top1 = []
        for seed in (0, 1):
            run = os.path.join(workdir, row["row"], f"seed_{seed}")
            evaluation = json.load(open(os.path.join(run, "eval_3.json")))
            assert evaluation["step"] == 3 and evaluation["images"] == 360
            top1.append(100 * evaluation["top1"])
            assert row["top1"][seed] == pytest.approx(top1[-1])
            assert json.load(open(os.path.join(run, "config.json")))["seed"] == seed
            assert json.load(open(os.path.join(run, ablation.TIMING_FILE)))["invocations"] == 1
        assert row["mean"] == pytest.approx(np.mean(top1))
        assert row["std"] == pytest.approx(math.sqrt((top1[0] - top1[1]) ** 2 / 2))  # sample std of two values
        config = common.study_run(tiny_study(), row["row"], 0)
        counted = count.count(classification.create_model(config, 10), 16, lambda image: image[..., :1])  # grey digits
        assert (row["params"], row["macs"]) == (counted["params"], counted["macs"])
        assert row["images_per_sec"] > 0 and len(row["minutes"]) == 2 and min(row["minutes"]) > 0
    assert [[r[k] for k in ("op", "context", "channel_branch")] for r in saved["rows"]] == [["conv3x3", "-", False]] * 2
    (pair,) = saved["comparisons"]
    assert pair["difference"] == pytest.approx(saved["rows"][0]["mean"] - saved["rows"][1]["mean"])
    markdown = open(os.path.join(workdir, "results.md")).read()
    assert f"{saved['rows'][1]['mean']:.2f} ± {saved['rows'][1]['std']:.2f}" in markdown
    assert os.path.getsize(os.path.join(workdir, "results.png")) > 0


def test_sigterm_during_a_run_saves_it_and_stops_the_grid(tmp_path, monkeypatch):
    real_build = classification.Classification.build

    def build(self, *args, **kwargs):  # the last training step sends this process SIGTERM
        run = real_build(self, *args, **kwargs)

        def step_fn(state, batch, step):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return run.step_fn(state, batch, step)

        return dataclasses.replace(run, step_fn=step_fn) if run.step_fn else run

    monkeypatch.setattr(classification.Classification, "build", build)
    assert ablation.run_study(tiny_study(), str(tmp_path)) is None
    # The training loop took the signal, finished the run and passed the signal on: the grid went no further.
    assert os.listdir(tmp_path) == ["resnet"] and os.listdir(tmp_path / "resnet") == ["seed_0"]
    assert checkpoint.Checkpointer(str(tmp_path / "resnet" / "seed_0" / "checkpoints")).latest_step() == 3
    assert (tmp_path / "resnet" / "seed_0" / "eval_3.json").exists() and not (tmp_path / "results.json").exists()


def test_a_workdir_of_another_recipe_is_refused(tmp_path):
    ablation.run_study(tiny_study(rows=("resnet",), seeds=(0,)), str(tmp_path))
    study = tiny_study(rows=("resnet",), seeds=(0,))
    study.recipe.base_lr = 0.8
    with pytest.raises(ValueError, match=r"ablation run resnet/seed_0: .* holds a run of another recipe \(base_lr: 0.4 -> 0.8\)"):
        ablation.run_study(study, str(tmp_path))
    # A run trained before a config field existed trained at its default: still the same recipe.
    saved_path = tmp_path / "resnet" / "seed_0" / "config.json"
    saved = json.loads(saved_path.read_text())
    del saved["static_kernel_lr_mult"]
    saved_path.write_text(json.dumps(saved))
    ablation.run_study(tiny_study(rows=("resnet",), seeds=(0,)), str(tmp_path))
    saved["static_kernel_lr_mult"] = 0.5
    saved_path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"another recipe \(static_kernel_lr_mult: 0.5 -> 1.0\)"):
        ablation.run_study(tiny_study(rows=("resnet",), seeds=(0,)), str(tmp_path))


def test_a_run_whose_checkpoints_were_deleted_is_read_from_its_eval_file_not_retrained(grid, monkeypatch, caplog):
    """The last test of the grid: it deletes a run's checkpoints, as a user saving space would."""
    workdir, _, _, _, summary = grid
    run = os.path.join(workdir, "resnet", "seed_1")
    shutil.rmtree(os.path.join(run, "checkpoints"))
    monkeypatch.setattr(loop, "train_and_evaluate", lambda *args: pytest.fail("retrained a run whose result is on disk"))
    with caplog.at_level(logging.INFO):
        again = ablation.run_study(tiny_study(), workdir)
    assert f"Ablation run {run} has no checkpoints left; its result is read from {os.path.join(run, 'eval_3.json')}" in caplog.text
    assert json.dumps(again["rows"]) == json.dumps(summary["rows"])  # the same top-1 and minutes (one training each)


def test_a_damaged_final_checkpoint_is_retrained_from_the_newest_good_one(tmp_path, monkeypatch, caplog):
    study = tiny_study(rows=("resnet",), seeds=(0,))
    study.recipe.checkpoint_every_steps = 1
    ablation.run_study(study, str(tmp_path))
    run = tmp_path / "resnet" / "seed_0"
    os.remove(run / "eval_3.json")  # killed during its evaluation, and its final checkpoint unreadable
    os.remove(run / "checkpoints" / "3" / "state" / "_METADATA")
    trained = []
    real = loop.train_and_evaluate
    monkeypatch.setattr(loop, "train_and_evaluate", lambda *args: trained.append(args) or real(*args))
    with caplog.at_level(logging.INFO):
        summary = ablation.run_study(study, str(tmp_path))
    assert len(trained) == 1
    assert f"Resumed from {run / 'checkpoints'} at step 2." in caplog.text  # not from scratch
    assert (run / "checkpoints_damaged" / "3").is_dir()
    assert checkpoint.Checkpointer(str(run / "checkpoints")).latest_step() == 3
    assert summary["rows"][0]["top1"][0] == pytest.approx(100 * json.loads((run / "eval_3.json").read_text())["top1"])


def test_holm_adjustment():
    # Holm by hand: sorted 0.01, 0.02, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.02), max(0.04, 1 * 0.04).
    assert ablation.holm([0.04, 0.01, float("nan"), 0.02]) == pytest.approx([0.04, 0.03, float("nan"), 0.04], nan_ok=True)


def test_compare_is_welchs_t_test():
    rows = [{"row": "a", "top1": [91.0, 91.4, 91.2], "mean": 91.2},
            {"row": "b", "top1": [90.1, 90.3, 90.2], "mean": 90.2},
            {"row": "c", "top1": [91.1, 91.5, 90.9], "mean": 91.1666}]
    pairs = {(p["a"], p["b"]): p for p in ablation.compare(rows)}
    # Welch by hand: t = d / sqrt(s1^2/n1 + s2^2/n2), Welch-Satterthwaite degrees of freedom.
    s1, s2 = np.var([91.0, 91.4, 91.2], ddof=1) / 3, np.var([90.1, 90.3, 90.2], ddof=1) / 3
    t = 1.0 / math.sqrt(s1 + s2)
    df = (s1 + s2) ** 2 / (s1 ** 2 / 2 + s2 ** 2 / 2)
    assert pairs["a", "b"]["p"] == pytest.approx(2 * stats.t.sf(t, df))
    assert pairs["a", "b"]["p_holm"] == pytest.approx(ablation.holm([p["p"] for p in pairs.values()])[0])
    assert pairs["a", "b"]["difference"] == pytest.approx(1.0) and pairs["a", "b"]["exceeds_spread"]
    assert not pairs["a", "c"]["exceeds_spread"]


def test_compare_rows_without_spread_and_with_one_seed():
    # Ties: rows whose seeds all agree have no spread, so Welch's t is undefined (scipy gives NaN);
    # equal means then differ by nothing and unequal ones always. One seed: no spread at all.
    same = {"row": "a", "top1": [90.0, 90.0], "mean": 90.0}
    equal, higher = dict(same, row="b"), {"row": "c", "top1": [91.0, 91.0], "mean": 91.0}
    pairs = {(p["a"], p["b"]): p for p in ablation.compare([same, equal, higher])}
    assert (pairs["a", "b"]["p"], pairs["a", "b"]["exceeds_spread"]) == (1.0, False)
    assert (pairs["a", "c"]["p"], pairs["a", "c"]["exceeds_spread"]) == (0.0, True)
    (single,) = ablation.compare([{"row": "a", "top1": [90.0], "mean": 90.0}, {"row": "b", "top1": [91.0], "mean": 91.0}])
    assert math.isnan(single["p"]) and math.isnan(single["p_holm"]) and not single["exceeds_spread"]


def test_study_config_rows_and_one_run_alone():
    study = ablation_fashion_mnist.get_config()
    assert set(study.rows) >= {"resnet", "rednet", "cednet", "cednet_context", "cednet_channel", "resnet_matched"}
    run = ablation_fashion_mnist.get_config("cednet_context")
    assert run.model.name == "cednet50" and dict(run.model.overrides.op_kwargs) == {"channel_branch": False}
    assert run.seed == 0 and run.to_dict() == common.study_run(study, "cednet_context", 0).to_dict()
    with pytest.raises(ValueError, match="Unknown ablation row 'cedent'; the rows are"):
        ablation_fashion_mnist.get_config("cedent")
    params = {}
    for row in study.models:
        config = common.study_run(study, row, 0)
        assert {k: v for k, v in config.model.overrides.items() if k not in ("widths", "op_kwargs")} == \
            {k: v for k, v in ablation_fashion_mnist.BACKBONE.items() if k != "widths"}
        params[row] = count.count(classification.create_model(config, 10), 28, lambda image: image[..., :1])["params"]
    assert abs(params["resnet_matched"] / params["cednet"] - 1) < 0.10  # size alone cannot explain a gain
    switches = {row: [ablation.describe(study.models[row])[k] for k in ("op", "context", "channel_branch")]
                for row in study.models}
    assert switches == {"resnet": ["conv3x3", "-", False], "resnet_matched": ["conv3x3", "-", False],
                        "rednet": ["involution", "-", False], "cednet": ["cvolution", "dilated3x3", True],
                        "cednet_context": ["cvolution", "dilated3x3", False], "cednet_channel": ["cvolution", "none", True]}
    # Both switches off is involution: the same parameters as RedNet.
    assert params["cednet_context"] + params["cednet_channel"] - params["cednet"] == params["rednet"]


@pytest.mark.parametrize("field, value, message", [
    ("rows", ("resnet", "cedent"), "must be a non-empty subset of the rows"),
    ("rows", (), "must be a non-empty subset of the rows"),
    ("seeds", (0, 0), "distinct non-negative ints"),
    ("seeds", (-1,), "distinct non-negative ints"),
])
def test_bad_rows_and_seeds_say_what_to_do(tmp_path, field, value, message):
    study = tiny_study()
    study[field] = value
    with pytest.raises(ValueError, match=message):
        ablation.run_study(study, str(tmp_path))


def test_a_table_of_other_rows_is_kept_not_replaced(tmp_path, caplog):
    whole = {"rows": [{"row": "resnet"}, {"row": "cednet"}], "seeds": [0, 1]}
    (tmp_path / "results.json").write_text(json.dumps(whole))
    (tmp_path / "results.md").write_text("the whole grid")
    assert ablation.keep_other_results(str(tmp_path), whole) is None  # the same table: rewritten in place
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]

    part = {"rows": [{"row": "cednet"}], "seeds": [0]}
    stem = ablation.keep_other_results(str(tmp_path), part)
    assert os.path.basename(stem).startswith("results_previous_")
    assert json.loads(open(stem + ".json").read()) == whole and open(stem + ".md").read() == "the whole grid"
    assert not (tmp_path / "results.json").exists() and "held the results of another table" in caplog.text


def test_a_timing_file_that_is_not_one_makes_the_minutes_unknown_with_a_warning(tmp_path, caplog):
    assert ablation.read_timing(str(tmp_path)) is None  # no file: a run read from its eval file
    (tmp_path / ablation.TIMING_FILE).write_text('{"train_seconds": 90.0, "invocations": 2}')
    assert ablation.read_timing(str(tmp_path)) == {"train_seconds": 90.0, "invocations": 2}
    for garbage in ("{not json", "[1, 2]", '{"train_seconds": "long"}'):
        (tmp_path / ablation.TIMING_FILE).write_text(garbage)
        caplog.clear()
        assert ablation.read_timing(str(tmp_path)) == {"train_seconds": None, "invocations": 0}
        assert "is not a timing record" in caplog.text
