"""Nothing a run produced is lost: the best checkpoint across resumes, damaged checkpoints, the
config a run was trained with, metrics after a kill, Ctrl-C."""

import glob
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import flax
import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cvolution_jax.tasks.classification import Classification
from cvolution_jax.train import checkpoint, loop, workdir_lock
from cvolution_jax.train.metrics import MetricWriter, read_metrics
from tests import tiny_config as tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = np.random.default_rng(0).standard_normal(4096).astype(np.float32)  # incompressible: the largest file


def state_at(step: int) -> dict:
    """A train-state-like tree whose values tell the step: `w` = step x BASE."""
    return {"params": {"w": step * BASE, "b": np.full(3, step, np.float32)}, "step": np.int32(step)}


def data_iterator():
    return iter(grain.MapDataset.range(1000).to_iter_dataset())


def steps_in(directory: str, **kwargs) -> list[int]:
    ckpt = checkpoint.Checkpointer(directory, **kwargs)
    steps = ckpt.all_steps()
    ckpt.close()
    return steps


def restore(directory: str, target, **kwargs):
    """`Checkpointer(directory).restore(target, **kwargs)`, closing the checkpointer."""
    ckpt = checkpoint.Checkpointer(directory)
    try:
        return ckpt.restore(target, **kwargs)
    finally:
        ckpt.close()


def write_steps(directory: str, steps, metrics=None, **kwargs) -> None:
    """Checkpoints `steps` with `state_at(step)` and the data iterator at position `step`."""
    ckpt = checkpoint.Checkpointer(directory, **kwargs)
    for step in steps:
        iterator = data_iterator()
        for _ in range(step):
            next(iterator)
        ckpt.save(step, state_at(step), iterator, (metrics or {}).get(step))
    ckpt.close()


# ------------------------------------------------------------------------------ best checkpoint


@pytest.mark.parametrize("best_metric", ["top1", "AP"])  # classification, detection
def test_best_checkpoint_survives_any_number_of_resumes(tmp_path, best_metric):
    directory = str(tmp_path / "checkpoints")
    scores = {2: 0.9, 4: 0.5, 6: 0.3, 8: 0.2, 10: 0.1}  # step 2 stays the best
    write_steps(directory, [1, 2, 3], {s: {best_metric: v, "loss": 1.0} for s, v in scores.items()}, keep=2,
                best_metric=best_metric)
    for first in (4, 7, 10):  # three resumed runs, each a new Checkpointer, each saving 3 steps
        written = range(first, first + 3)
        write_steps(directory, written, {s: {best_metric: scores[s]} for s in written if s in scores}, keep=2,
                    best_metric=best_metric)
        latest = sorted(set(range(1, first + 3)))[-2:]
        assert steps_in(directory, keep=2, best_metric=best_metric) == sorted({2, *latest})


# --------------------------------------------------------------------------- damaged checkpoints


def truncate_largest_array_file(step_dir: str) -> None:
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


DAMAGE = {
    "truncated array file": (truncate_largest_array_file, r"its train state cannot be read \(ValueError: .*w"),
    "missing _METADATA": (lambda d: os.remove(os.path.join(d, "state", "_METADATA")), r"state/_METADATA is missing"),
    "garbled data-iterator JSON": (
        lambda d: open(os.path.join(d, "data", "process_0-of-1.json"), "w").write('{"next_index": 3'),
        r"its data-iterator position .*3/data/process_0-of-1\.json cannot be read \(JSONDecodeError",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, caplog, damage):
    directory = str(tmp_path / "checkpoints")
    write_steps(directory, [1, 2, 3])
    damage_fn, what = DAMAGE[damage]
    damage_fn(os.path.join(directory, "3"))
    target = state_at(0)

    # Evaluation: skips step 3 with a warning and leaves it where it is.
    iterator = data_iterator()
    with caplog.at_level(logging.WARNING, logger="cvolution_jax.train.checkpoint"):
        restored = restore(directory, target, data_iterator=iterator)
    np.testing.assert_array_equal(restored["params"]["w"], 2 * BASE)
    assert next(iterator) == 2
    # By logger: the test's own tmp_path holds "damaged", and orbax logs it when an earlier test left INFO on.
    [warning] = [r.getMessage() for r in caplog.records if r.name == "cvolution_jax.train.checkpoint"]
    assert warning.startswith(f"Checkpoint {directory}/3 is damaged: ")
    assert re.search(what, warning) and warning.endswith("Skipped it; restored step 2 instead.")
    assert os.path.isdir(os.path.join(directory, "3"))

    # Training: moves step 3 aside, so that the resumed run can write step 3 again.
    caplog.clear()
    ckpt = checkpoint.Checkpointer(directory)
    with caplog.at_level(logging.WARNING, logger="cvolution_jax.train.checkpoint"):
        restored = ckpt.restore(target, data_iterator=data_iterator(), set_aside_damaged=True)
    np.testing.assert_array_equal(restored["params"]["w"], 2 * BASE)
    assert ckpt.restored_step == 2  # what a tool reports (experiments.visualize said the latest, 3)
    assert f"Moved it to {directory}_damaged/3; restored step 2 instead." in caplog.text
    assert ckpt.all_steps() == [1, 2] and os.path.isdir(f"{directory}_damaged/3/state")
    ckpt.save(3, state_at(3), data_iterator())
    ckpt.close()
    restored = restore(directory, target)
    np.testing.assert_array_equal(restored["params"]["w"], 3 * BASE)


def test_a_damaged_chosen_checkpoint_is_refused_in_one_line_naming_its_directory(tmp_path):
    directory = str(tmp_path / "checkpoints")
    write_steps(directory, [1, 2])
    os.remove(os.path.join(directory, "2", "state", "_METADATA"))
    with pytest.raises(checkpoint.DamagedCheckpointError) as error:
        restore(directory, state_at(0), step=2)
    message = str(error.value)
    assert "\n" not in message
    assert message == (
        f"Checkpoint {directory}/2 is damaged: {directory}/2/state/_METADATA is missing. Remove that directory, or "
        f"restore another step with --config.checkpoint_step=N (steps there: [1, 2])."
    )
    assert steps_in(directory) == [1, 2]


def test_when_every_checkpoint_is_damaged_nothing_is_moved_and_the_error_lists_them(tmp_path):
    directory = str(tmp_path / "checkpoints")
    write_steps(directory, [1, 2])
    truncate_largest_array_file(os.path.join(directory, "1"))
    os.remove(os.path.join(directory, "2", "state", "_METADATA"))
    with pytest.raises(checkpoint.DamagedCheckpointError) as error:
        restore(directory, state_at(0), set_aside_damaged=True)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"No checkpoint in {directory} can be restored (step 2: {directory}/2/state/_METADATA is "
                              f"missing; step 1: its train state cannot be read (ValueError: ")
    assert message.endswith("Remove the damaged step directories to start afresh, or point --workdir at another run.")
    assert sorted(os.listdir(directory)) == ["1", "2"] and not os.path.exists(f"{directory}_damaged")


def test_a_checkpoint_of_another_model_is_not_skipped_as_damaged_and_names_the_config(tmp_path):
    directory = str(tmp_path / "checkpoints")
    write_steps(directory, [1, 2])
    (tmp_path / "config.json").write_text("{}")
    wider = {"params": {"w": BASE, "b": np.zeros(4, np.float32)}, "step": np.int32(0)}
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        restore(directory, wider)
    assert str(error.value) == (
        f"Checkpoint {directory}/2: params/b has shape (3,) in the checkpoint but (4,) in the model being restored. "
        f"Restore it with the config it was trained with ({tmp_path}/config.json), or use another workdir."
    )


# -------------------------------------------------------------------------------------- config


def test_config_json_keeps_how_the_run_was_trained(tmp_path, caplog):
    workdir = str(tmp_path)
    trained = tiny.get_config()
    assert loop.save_config(trained, workdir) == f"{workdir}/config.json"
    original = (tmp_path / "config.json").read_text()
    assert json.loads(original) == json.loads(trained.to_json())

    evaluated = tiny.get_config()
    evaluated.mode, evaluated.batch_size = "eval", 8
    assert loop.save_config(evaluated, workdir, step=12, mode="eval") == f"{workdir}/config_eval_12.json"
    assert json.load(open(f"{workdir}/config_eval_12.json"))["batch_size"] == 8

    assert loop.save_config(tiny.get_config(), workdir, step=8) is None  # resumed, same config: nothing new

    resumed = tiny.get_config()
    resumed.num_train_steps, resumed.data.image_size = 20, 24
    with caplog.at_level(logging.WARNING, logger="cvolution_jax.train.loop"):
        assert loop.save_config(resumed, workdir, step=8) == f"{workdir}/config_resume_8.json"
    assert "differs from" in caplog.text and "(data.image_size: 16 -> 24; num_train_steps: 12 -> 20)" in caplog.text
    assert json.load(open(f"{workdir}/config_resume_8.json"))["num_train_steps"] == 20
    assert (tmp_path / "config.json").read_text() == original
    assert sorted(os.listdir(workdir)) == ["config.json", "config_eval_12.json", "config_resume_8.json"]

    os.remove(f"{workdir}/config.json")  # a resumed workdir without one gets it
    assert loop.save_config(resumed, workdir, step=8) == f"{workdir}/config.json"


@pytest.mark.slow  # 40 s: two setups of the tiny run; test_train checks eval mode's config file
def test_a_failed_restore_leaves_config_json_alone(tmp_path):
    """Resuming or evaluating a workdir with a config whose model differs from the checkpoint's
    fails naming config.json, which still holds the config the run was trained with."""
    workdir = str(tmp_path)
    loop.save_config(tiny_config(), workdir)
    write_steps(f"{workdir}/checkpoints", [4])  # a model other than the tiny CedNet
    original = (tmp_path / "config.json").read_text()
    for run in (loop.train_and_evaluate, loop.evaluate):
        with pytest.raises(checkpoint.CheckpointMismatchError, match=f"trained with \\({workdir}/config.json\\)"):
            run(Classification(), tiny_config(num_train_steps=8), workdir)
        assert (tmp_path / "config.json").read_text() == original
    assert not glob.glob(f"{workdir}/config_*.json")


def tiny_config(**changes) -> ml_collections.ConfigDict:
    config = tiny.get_config()
    for key, value in changes.items():
        config[key] = value
    return config


# ------------------------------------------------------------------------------------- metrics


def test_a_resumed_run_drops_the_records_after_its_checkpoint(tmp_path):
    """A run killed after logging steps 5-6 but before checkpointing them resumes from step 4 and
    logs them again: each step must appear once. A line cut short by the kill goes too."""
    records = [{"step": 2, "split": "train", "loss": 2.0}, {"step": 4, "split": "train", "loss": 1.5},
               {"step": 4, "split": "eval", "top1": 0.25}, {"step": 6, "split": "train", "loss": 1.0},
               {"step": 6, "split": "eval", "top1": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 8, "spl')
    writer = MetricWriter(str(tmp_path), start_step=4)
    assert read_metrics(str(tmp_path)) == records[:3]
    writer.write(6, "eval", {"top1": 0.75})
    writer.close()
    assert read_metrics(str(tmp_path)) == [*records[:3], {"step": 6, "split": "eval", "top1": 0.75}]
    MetricWriter(str(tmp_path), start_step=6).close()  # nothing after step 6: the file is unchanged
    assert len(read_metrics(str(tmp_path))) == 4


# ---------------------------------------------------------------------------------- Ctrl-C


@flax.struct.dataclass
class Counter:
    step: jnp.ndarray
    w: jnp.ndarray


def fit_counter(tmp_path, interrupts_at_step: int, presses: int):
    """`loop.fit` on a state that only counts steps, pressing Ctrl-C `presses` times during step
    `interrupts_at_step` of 50. Returns the checkpointed steps and the SIGINT handler after fit."""
    config = ml_collections.ConfigDict(dict(checkpoint_every_steps=1000, log_every_steps=1000, batch_size=1))

    def step_fn(state, batch, step):
        if step == interrupts_at_step:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return state.replace(step=jnp.asarray(step)), {"loss": 1.0, "param_norm": 1.0}

    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    try:
        loop.fit(config, state=Counter(step=jnp.asarray(0), w=jnp.ones(3)), train_iter=data_iterator(), step_fn=step_fn,
                 total_steps=50, eval_every=1000, ckpt=ckpt, writer=MetricWriter(str(tmp_path)),
                 evaluate=lambda state, step: {"top1": 0.5}, learning_rate=lambda step: 0.1)
    finally:
        handler_after = signal.getsignal(signal.SIGINT)
    return steps_in(str(tmp_path / "checkpoints")), handler_after


@pytest.fixture
def outer_sigint_handler():
    """A SIGINT handler of the test's own: a Ctrl-C that fit does not catch lands here, not in pytest."""
    calls = []
    handler = lambda signum, frame: calls.append(signum)  # noqa: E731
    previous = signal.signal(signal.SIGINT, handler)
    yield handler, calls
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_saves_a_checkpoint_and_returns_like_sigterm(tmp_path, capsys, outer_sigint_handler):
    handler, calls = outer_sigint_handler
    steps, handler_after = fit_counter(tmp_path, interrupts_at_step=5, presses=1)
    assert steps == [5] and calls == [signal.SIGINT]  # the outer handler learns of it once the checkpoint is saved
    assert handler_after is handler
    assert "Received signal 2 (SIGINT): saved the checkpoint of step 5" in capsys.readouterr().out


def test_ctrl_c_twice_stops_at_once_without_saving(tmp_path, outer_sigint_handler):
    handler, calls = outer_sigint_handler
    with pytest.raises(KeyboardInterrupt):
        fit_counter(tmp_path, interrupts_at_step=5, presses=2)
    assert steps_in(str(tmp_path / "checkpoints")) == [] and calls == []
    assert signal.getsignal(signal.SIGINT) is handler


# ------------------------------------------------------------------------ strict JSON


def reject_bare_constants(name):
    raise ValueError(f"bare {name} in a metrics file: not JSON")


def test_metrics_files_are_strict_json_with_null_for_an_undefined_value(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.write(3, "eval", {"mIoU": 0.5, "IoU.train": float("nan"), "IoU.bus": float("inf"), "IoU.road": 0.75})
    writer.close()
    [record] = [json.loads(line, parse_constant=reject_bare_constants) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record == {"step": 3, "split": "eval", "mIoU": 0.5, "IoU.train": None, "IoU.bus": None, "IoU.road": 0.75}
    assert read_metrics(str(tmp_path)) == [record]


# --------------------------------------------------------------- an evaluation that fails


def test_a_failing_evaluation_saves_the_steps_before_it_first(tmp_path, capsys):
    """Bad val data found at the first evaluation (step 4, before any checkpoint): the 4 steps are saved."""
    config = ml_collections.ConfigDict(dict(checkpoint_every_steps=1000, log_every_steps=1000, batch_size=1))

    def broken_evaluation(state, step):
        raise ValueError("val image 7 is 64x64; the others are 32x32")

    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    with pytest.raises(ValueError, match="val image 7"):
        loop.fit(config, state=Counter(step=jnp.asarray(0), w=jnp.ones(3)), train_iter=data_iterator(),
                 step_fn=lambda state, batch, step: (state.replace(step=jnp.asarray(step)), {"loss": 1.0, "param_norm": 1.0}),
                 total_steps=10, eval_every=4, ckpt=ckpt, writer=MetricWriter(str(tmp_path)), evaluate=broken_evaluation,
                 learning_rate=lambda step: 0.1)
    assert steps_in(str(tmp_path / "checkpoints")) == [4]
    assert int(restore(str(tmp_path / "checkpoints"), Counter(step=jnp.asarray(0), w=jnp.ones(3))).step) == 4
    assert "The evaluation at step 4 failed; saved the checkpoint of step 4 first" in capsys.readouterr().out


def test_a_divergence_before_any_checkpoint_says_there_is_none(tmp_path):
    config = ml_collections.ConfigDict(dict(checkpoint_every_steps=1000, log_every_steps=2, batch_size=1))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    with pytest.raises(loop.DivergedError) as error:
        loop.fit(config, state=Counter(step=jnp.asarray(0), w=jnp.ones(3)), train_iter=data_iterator(),
                 step_fn=lambda state, batch, step: (state.replace(step=jnp.asarray(step)), {"loss": float("nan"), "param_norm": 1.0}),
                 total_steps=10, eval_every=1000, ckpt=ckpt, writer=MetricWriter(str(tmp_path)),
                 evaluate=lambda state, step: {}, learning_rate=lambda step: 0.1)
    message = str(error.value)
    assert "Training loss is nan" in message and "there is no checkpoint yet, so a rerun starts from the beginning" in message
    assert "None" not in message and steps_in(str(tmp_path / "checkpoints")) == []


# ------------------------------------------------------------------------ one run per workdir


def test_a_second_run_on_a_workdir_in_use_is_refused_naming_the_owner(tmp_path):
    with workdir_lock.hold(str(tmp_path)):
        record = json.loads((tmp_path / "run.lock").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["started"]
        with pytest.raises(workdir_lock.WorkdirInUse, match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
            with workdir_lock.hold(str(tmp_path)):
                pass
    assert (tmp_path / "run.lock").read_text() == ""  # ended: no owner; the file stays
    with workdir_lock.hold(str(tmp_path)):  # and the next run takes it
        pass


def test_the_entry_point_refuses_a_workdir_in_use_in_one_line_and_writes_nothing(tmp_path):
    with workdir_lock.hold(str(tmp_path)):
        result = subprocess.run(command(str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"--workdir {tmp_path} is being trained by another run (pid {os.getpid()}" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["run.lock"]  # no checkpoints, metrics or config of its own


def test_a_lock_left_by_a_killed_run_is_taken_over_and_said(tmp_path, caplog):
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    (tmp_path / "run.lock").write_text(json.dumps({"host": "node7", "pid": killed.pid, "started": "2026-12-07T10:00:00+00:00"}))
    with caplog.at_level(logging.WARNING, logger="cvolution_jax.train.workdir_lock"):
        with workdir_lock.hold(str(tmp_path)):
            assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert f"was left by a run that is no longer running (pid {killed.pid} on host node7" in caplog.text


def test_only_process_0_of_a_multi_process_run_locks(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock.jax, "process_index", lambda: 1)
    with workdir_lock.hold(str(tmp_path / "run")):
        assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ the runs end to end


@pytest.mark.slow  # 2 min on 2 loaded cores: two tiny runs and an evaluation
def test_a_run_resumed_past_a_damaged_checkpoint_logs_each_step_once(tmp_path, caplog):
    """Train 6 steps (checkpoints and evaluations at 3 and 6), damage checkpoint 6 as a kill
    mid-write could, rerun: it resumes from 3 with a warning, writes 6 again, and metrics.jsonl
    ends as the first run left it, each step once; config.json stays the first one."""
    workdir = str(tmp_path)
    config = tiny_config(num_train_steps=6, eval_every_steps=3, checkpoint_every_steps=3, log_every_steps=1)
    loop.train_and_evaluate(Classification(), config, workdir)
    first = read_metrics(workdir)
    original = (tmp_path / "config.json").read_text()
    truncate_largest_array_file(os.path.join(workdir, "checkpoints", "6"))
    with caplog.at_level(logging.WARNING, logger="cvolution_jax.train.checkpoint"):
        loop.train_and_evaluate(Classification(), config, workdir)
    assert f"Checkpoint {workdir}/checkpoints/6 is damaged: its train state cannot be read" in caplog.text
    assert os.path.isdir(f"{workdir}/checkpoints_damaged/6")
    assert steps_in(f"{workdir}/checkpoints") == [3, 6]
    again = read_metrics(workdir)
    assert [(r["step"], r["split"]) for r in again] == [(r["step"], r["split"]) for r in first]
    for a, b in zip(first, again):
        assert set(a) == set(b)
        for key in set(a) - {"step", "split", "images_per_sec"}:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-6, err_msg=f"{key} at step {a['step']}")
    loop.evaluate(Classification(), tiny_config(mode="eval"), workdir)
    assert (tmp_path / "config.json").read_text() == original
    assert sorted(os.path.basename(p) for p in glob.glob(f"{workdir}/config*.json")) == ["config.json", "config_eval_6.json"]


def command(workdir, *overrides):
    return [sys.executable, "-m", "experiments.imagenet", f"--config={ROOT}/tests/tiny_config.py", f"--workdir={workdir}",
            *overrides]


@pytest.mark.slow  # 50 s on 2 loaded cores: experiments.imagenet in a subprocess
def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path)
    process = subprocess.Popen(
        command(workdir, "--config.num_train_steps=100000", "--config.checkpoint_every_steps=1000000",
                "--config.eval_every_steps=1000000"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(workdir, "metrics.jsonl")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "Received signal 2 (SIGINT)" in output and "Traceback" not in output
    saved = steps_in(os.path.join(workdir, "checkpoints"))
    assert len(saved) == 1 and 3 <= saved[0] < 100000


@pytest.mark.slow  # 3 min on 2 loaded cores: a tiny Faster R-CNN trained, resumed and evaluated
def test_a_detection_run_resumed_past_a_damaged_checkpoint_keeps_its_record(tmp_path):
    """The detection loop's wiring of the same pieces: fallback past a damaged checkpoint, each
    step logged once, config.json kept and eval mode's config beside it."""
    from cvolution_jax.tasks.detection import Detection
    from tests.conftest import tiny_detection_config

    config = tiny_detection_config(tmp_path / "shapes")
    config.model.detector = "faster_rcnn"
    config.update(num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=1, log_every_steps=1)
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(Detection(), config, workdir)
    first = read_metrics(workdir)
    original = open(f"{workdir}/config.json").read()
    truncate_largest_array_file(f"{workdir}/checkpoints/2")
    loop.train_and_evaluate(Detection(), config, workdir)
    assert os.path.isdir(f"{workdir}/checkpoints_damaged/2") and steps_in(f"{workdir}/checkpoints") == [1, 2]
    assert [(r["step"], r["split"]) for r in read_metrics(workdir)] == [(r["step"], r["split"]) for r in first]
    config.mode = "eval"
    loop.evaluate(Detection(), config, workdir)
    assert open(f"{workdir}/config.json").read() == original
    assert sorted(os.path.basename(p) for p in glob.glob(f"{workdir}/config*.json")) == ["config.json", "config_eval_2.json"]


def _no_traceback_one_error(result: subprocess.CompletedProcess, *phrases: str) -> str:
    """The one line of stderr that says what happened (`error: ...` or `Interrupted ...`), with no traceback."""
    assert result.returncode != 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error: ", "Interrupted"))]
    assert len(lines) == 1, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_space(tmp_path):
    """A tmpfs of 700 KiB (a private mount namespace, no root needed) fills at the third checkpoint;
    orbax's background threads logged ~5 tracebacks per failed save before. With space again, the
    same command resumes from the last complete checkpoint and finishes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (a user and mount namespace) is not allowed here")
    train = f"{sys.executable} -m experiments.imagenet --config tests/tiny_config.py --workdir {disk}/run"
    script = (f"mount -t tmpfs -o size=700k tmpfs {disk} && {train}; echo rc=$? >&2; "
              f"mount -o remount,size=20m {disk} && {train}; echo rc=$? >&2; ls {disk}/run/checkpoints >&2")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    first, resumed = result.stderr.split("rc=1\n", 1) if "rc=1\n" in result.stderr else (result.stderr, "")
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    errors = [line for line in first.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "No space left on the disk of" in errors[0], first[-3000:]
    said = re.search(r"checkpoint (\d+) could not be written\. .*the latest is step (\d+); free space there and rerun "
                     r"the same command to resume from it", errors[0])
    assert said and int(said[1]) > int(said[2]), errors[0]
    assert "rc=0" in resumed and re.search(r"Resumed from .* at step \d+\.", resumed), resumed[-3000:]
    assert "12" in resumed.split("rc=0\n")[1].split(), resumed[-500:]  # `ls` of the checkpoints: the last step's is there


CTRL_C_TWICE_DURING_A_SAVE = """
import os, signal, sys
import numpy as np
from cvolution_jax.train import checkpoint, cli, loop
ckpt = checkpoint.Checkpointer(sys.argv[1])
state = {"params": {f"w{i}": np.full((1024, 1024), i, np.float32) for i in range(64)}}  # 256 MiB: a save of a while
with cli.exits_with_a_message(sys.argv[1]), loop.stop_requests():
    ckpt.save(1, state)
    ckpt.wait()
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: the loop would save and stop
    ckpt.save(2, state)
    os.kill(os.getpid(), signal.SIGINT)  # the second, while step 2 is being written
    ckpt.close()
"""


_CUDA_PLUGIN_WITHOUT_A_GPU = ("WARNING: All log messages before absl::InitializeLog() is called",
                              "I0000 ")  # "... cudart_stub.cc:31] Could not find cuda drivers on your machine"


def test_ctrl_c_twice_during_a_save_is_one_message_and_the_last_complete_checkpoint_restores(tmp_path):
    """Orbax's background threads, cut off at interpreter exit, logged their errors (with
    tracebacks before `checkpoint._AfterAFailedSave`) after the entry point's message."""
    directory = str(tmp_path / "checkpoints")
    result = subprocess.run([sys.executable, "-c", CTRL_C_TWICE_DURING_A_SAVE, directory], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1, result.stderr[-3000:]
    # With jax's CUDA plugin installed and no GPU (the compile extras), its C++ log says so at start-up; nothing else may appear.
    lines = [line for line in result.stderr.splitlines() if not line.startswith(_CUDA_PLUGIN_WITHOUT_A_GPU)]
    assert lines == [
        "Interrupted (Ctrl-C): nothing after the last complete checkpoint was saved (one being written is left incomplete "
        "and ignored at the next start); rerun the same command to resume."], result.stderr[-3000:]
    ckpt = checkpoint.Checkpointer(directory)
    try:
        assert ckpt.all_steps() == [1]
        assert float(ckpt.restore_variables()["params"]["w63"][5, 7]) == 63.0
    finally:
        ckpt.close()
    assert sorted(os.listdir(directory)) == ["1"]  # the incomplete step 2 is cleaned up by the next start
