"""Multi-process training on one machine: 2 processes x 2 CPU devices against 1 process x 4,
checkpoints across process counts, and a killed peer (jax.distributed, gloo collectives)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, TINY, final_params, leaves

STEPS = ("--config.num_train_steps=3", "--config.eval_every_steps=3", "--config.log_every_steps=1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, process_id, num_processes, port, *overrides, devices=2):
    args = [sys.executable, "-m", "experiments.imagenet", f"--config={TINY}", f"--workdir={workdir}", *overrides]
    if num_processes > 1:
        args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}", f"--process_id={process_id}", "--heartbeat_timeout_seconds=10"]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_all(processes, timeout=300):
    """Waits for every process; kills them all if any hangs. Returns their outputs."""
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-3000:]
    return outputs


def eval_records(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if '"eval"' in line]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("two_processes"))
    port = free_port()
    run_all([start(workdir, i, 2, port, *STEPS) for i in range(2)])
    return workdir


@pytest.mark.slow  # 96 s on 2 CPU cores with its two-process fixture (the default suite keeps under 15 min)
def test_two_processes_match_one_process_with_four_devices(two_process_run, tmp_path):
    single = str(tmp_path / "single")
    run_all([start(single, 0, 1, None, *STEPS, devices=4)])
    for a, b in zip(final_params(two_process_run, 3), final_params(single, 3)):
        for x, y in zip(leaves(a), leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    # The 360 eval images are counted once over both processes: the same metrics as one process.
    (two,), (one,) = eval_records(two_process_run), eval_records(single)
    assert two["top1"] == pytest.approx(one["top1"], abs=1e-6) and two["loss"] == pytest.approx(one["loss"], rel=1e-5)


@pytest.mark.slow  # 32 s after the two-process fixture; with the test above, the whole file is slow
def test_two_process_checkpoint_restores_and_resumes_in_one_process(two_process_run, tmp_path):
    (trained,) = eval_records(two_process_run)
    output = run_all([start(two_process_run, 0, 1, None, "--config.mode=eval", devices=4)])[0]
    evaluated = json.load(open(os.path.join(two_process_run, "eval_3.json")))
    assert evaluated["top1"] == pytest.approx(trained["top1"], abs=1e-6), output[-2000:]
    output = run_all([start(two_process_run, 0, 1, None, "--config.num_train_steps=5", "--config.eval_every_steps=5", devices=1)])[0]
    assert "written by a different number of processes" in output
    assert [r["step"] for r in eval_records(two_process_run)] == [3, 5]


@pytest.mark.slow  # 41 s
def test_one_process_checkpoint_resumes_in_two_processes(tmp_path):
    workdir = str(tmp_path)
    run_all([start(workdir, 0, 1, None, *STEPS, devices=4)])
    port = free_port()
    run_all([start(workdir, i, 2, port, "--config.num_train_steps=5", "--config.eval_every_steps=5") for i in range(2)])
    assert [r["step"] for r in eval_records(workdir)] == [3, 5]


@pytest.mark.slow  # 27 s: waits for the heartbeat timeout
def test_killing_one_process_makes_the_other_exit(tmp_path):
    workdir = str(tmp_path)
    port = free_port()
    long = ("--config.num_train_steps=100000", "--config.eval_every_steps=100000", "--config.checkpoint_every_steps=100000")
    processes = [start(workdir, i, 2, port, *long) for i in range(2)]
    try:
        metrics = os.path.join(workdir, "metrics.jsonl")
        deadline = time.time() + 240
        while not os.path.exists(metrics) and time.time() < deadline and all(p.poll() is None for p in processes):
            time.sleep(0.1)
        assert os.path.exists(metrics), "the two-process run did not start training"
        processes[1].send_signal(signal.SIGKILL)
        started = time.time()
        output = processes[0].communicate(timeout=120)[0]
        elapsed = time.time() - started
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert processes[0].returncode != 0
    assert elapsed < 120
    # jax's coordination service ends the survivor with a fatal error naming the cause.
    assert "another task died" in output or "detected fatal errors" in output, output[-3000:]
