"""`python -m experiments.imagenet` as a user runs it: killed and resumed, stopped by SIGTERM,
on 1 and on 4 devices, and every shipped config."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cvolution_jax import models
from tests.conftest import CONFIGS, ROOT, TINY, final_params, leaves, load_config

def command(workdir, *overrides):
    return [sys.executable, "-m", "experiments.imagenet", f"--config={TINY}", f"--workdir={workdir}", *overrides]


def run(workdir, *overrides, env=None, timeout=300):
    result = subprocess.run(command(workdir, *overrides), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def finished_steps(workdir):
    return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*")) if os.path.basename(p).isdigit())


def test_killed_run_resumes_to_bitwise_equal_parameters(tmp_path):
    steps = ("--config.num_train_steps=40", "--config.checkpoint_every_steps=5", "--config.eval_every_steps=20")
    uninterrupted = str(tmp_path / "uninterrupted")
    run(uninterrupted, *steps)

    killed = str(tmp_path / "killed")
    process = subprocess.Popen(command(killed, *steps), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not finished_steps(killed) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = finished_steps(killed)
    assert interrupted_at and interrupted_at[-1] < 40, f"the run was not killed mid-way: {interrupted_at}"
    resumed = run(killed, *steps)
    assert "Resumed" in resumed.stderr or "Resumed" in resumed.stdout

    for a, b in zip(final_params(uninterrupted, 40), final_params(killed, 40)):
        for x, y in zip(leaves(a), leaves(b)):
            np.testing.assert_array_equal(x, y)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path)
    process = subprocess.Popen(
        command(workdir, "--config.num_train_steps=100000", "--config.checkpoint_every_steps=1000000", "--config.eval_every_steps=1000000"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 240
    metrics = os.path.join(workdir, "metrics.jsonl")
    while not os.path.exists(metrics) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "Received signal 15" in output
    saved = finished_steps(workdir)
    assert len(saved) == 1 and 3 <= saved[0] < 100000


def test_four_devices_match_one_device(tmp_path):
    """The same global batch of 32 on 1 CPU device and on 4 (8 per device), for 3 steps."""
    overrides = ("--config.num_train_steps=3", "--config.eval_every_steps=3")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    run(str(tmp_path / "one"), *overrides, env=env)
    run(str(tmp_path / "four"), *overrides, env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    losses = []
    for name in ("one", "four"):
        records = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        losses.append([r["loss"] for r in records])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    for a, b in zip(final_params(str(tmp_path / "one"), 3), final_params(str(tmp_path / "four"), 3)):
        for x, y in zip(leaves(a), leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_bad_mode_is_reported(tmp_path):
    result = subprocess.run(command(str(tmp_path), "--config.mode=predict"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--config.mode must be 'train' or 'eval'; got 'predict'" in result.stderr


# The classification configs: those whose model is a registry name. Detection configs
# (experiments.coco) are checked in test_experiments_coco.py, segmentation ones (experiments.cityscapes)
# in test_experiments_cityscapes.py, studies (experiments.ablation, a config per row) in test_errors.py
# and test_experiments_ablation.py.
CLASSIFICATION_CONFIGS = [p for p in CONFIGS if "def get_config" in open(p).read() and "name" in load_config(p).get("model", {})]


def test_the_classification_configs_are_found():
    names = {os.path.basename(p) for p in CLASSIFICATION_CONFIGS}
    assert {"default.py", "fashion_mnist.py", "cednet50.py", "resnet50.py"} <= names
    assert not any(name.startswith(("coco", "faster_rcnn", "mask_rcnn", "fpn_", "upernet_", "segmentation")) for name in names)


@pytest.mark.parametrize("path", CLASSIFICATION_CONFIGS, ids=os.path.basename)
def test_every_config_loads_and_names_a_registered_model(path):
    config = load_config(path)
    assert config.model.name in models.names()
    assert "python -m experiments.imagenet --config experiments/configs/" + os.path.basename(path) in open(path).read()
    if config.data.name == "imagenet":
        assert (config.batch_size, config.base_lr, config.num_epochs, config.warmup_epochs) == (2048, 0.1, 130.0, 5.0)
        assert (config.momentum, config.nesterov, config.weight_decay, config.label_smoothing) == (0.9, True, 1e-4, 0.1)
        assert config.data.image_size == 224


def test_the_synthetic_config_is_imagenet_shaped_and_its_smoke_size_is_tiny():
    """`kernels.gpu_check` trains `imagenet_synthetic.py` on a GPU and its `:smoke` size on CPU."""
    from experiments.configs import imagenet_synthetic

    full, smoke = imagenet_synthetic.get_config(), imagenet_synthetic.get_config("smoke")
    assert (full.data.name, full.data.image_size, full.data.num_classes, full.num_train_steps) == ("synthetic", 224, 1000, 50)
    assert full.checkpoint_every_steps == full.num_train_steps == full.eval_every_steps
    assert (smoke.data.image_size, smoke.data.num_classes, smoke.num_train_steps) == (16, 10, 4)
    assert (full.model.name, smoke.model.name) == ("cednet26", "resnet50")  # the GPU trains C-volution
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        imagenet_synthetic.get_config("huge")
