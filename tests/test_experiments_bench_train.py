"""`python -m experiments.bench_train`: the smoke run end to end, and `--config` timing a config's network per op."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # 55 s on 2 CPU cores; the benchmark is for GPUs
def test_smoke_run_writes_results_with_ratios(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.bench_train", "--smoke", f"--out-dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].endswith("_smoke.json") and files[1].endswith("_smoke.md")
    data = json.load(open(tmp_path / files[0]))
    assert data["smoke"] and data["batch"] == 8 and "jax" in data["versions"] and data["date"]
    assert [row["model"] for row in data["rows"]] == ["resnet50", "rednet50", "cednet50"]
    base = data["rows"][0]["images_per_sec"]
    for row in data["rows"]:
        assert row["images_per_sec"] > 0
        assert row["speed_vs_conv"] == pytest.approx(row["images_per_sec"] / base)
    assert "| cednet50 |" in open(tmp_path / files[1]).read()


def test_refuses_to_measure_without_a_gpu():
    result = subprocess.run([sys.executable, "-m", "experiments.bench_train"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "no GPU" in result.stderr and "--smoke" in result.stderr and "--config" in result.stderr


TINY_CONFIG = """
from experiments.configs import default


def get_config():
    config = default.get_config()
    config.model.overrides = {"stem": "small", "stem_width": 32, "widths": (16, 16, 16), "stage_sizes": (1, 1, 1)}
    config.data.image_size = 16
    config.batch_size = 4
    return config
"""


def test_config_mode_times_the_configs_network_with_each_op(tmp_path):
    from experiments import bench_train

    path = tmp_path / "tiny.py"
    path.write_text(TINY_CONFIG)
    for name, conv2 in (("resnet", {"kernel": (3, 3, 16, 16)}), ("rednet", "generator"), ("cednet", "static_kernel")):
        model = bench_train.models.create(bench_train.CONFIG_VARIANTS[name], **bench_train.load_config(str(path)).model.overrides)
        params = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))["params"]
        if name == "resnet":  # one timed train step (compiling the other two costs most of a minute on 2 cores)
            row = bench_train.measure(name, batch=4, image_size=16, dtype="float32", warmup=1, timed=1, smoke=False, config_path=str(path))
            assert row["model"] == name and row["step_ms"] > 0
            assert row["params"] == sum(x.size for x in jax.tree_util.tree_leaves(params))
        # The config's three single-block stages, whatever depth the family's registry name has ...
        assert sorted(k for k in params if k.startswith("layer")) == ["layer1_0", "layer2_0", "layer3_0"]
        # ... with the family's op: a 3x3 conv, involution's generator, C-volution's static kernel.
        block = jax.tree_util.tree_map(lambda x: x.shape, params["layer1_0"]["conv2"])
        assert block == conv2 if isinstance(conv2, dict) else conv2 in block
        assert name != "rednet" or "static_kernel" not in block


@pytest.mark.parametrize("argv, message", [
    (["--config=no/such/config.py"], "is not a config file"),
    (["--config=experiments/configs/default.py", "--smoke"], "exclude each other"),
    (["--smoke", "--impls=pallas,cuda"], "choose from auto, pallas, xla"),
    (["--smoke", "--models=resnet50,vgg16"], "choose from resnet50"),
    (["--config=experiments/configs/default.py", "--models=resnet50"], "not with --config"),
    (["--smoke", "--steps=-1"], "--steps must be >= 1"),
    (["--smoke", "--warmup=-2"], "--warmup must be >= 0; got -2"),
    (["--smoke", "--only=vgg16"], "one variant, from resnet50"),
    (["--config=experiments/configs/coco_default.py"], "is a detection config: bench_train times"),
    (["--config=experiments/configs/segmentation_default.py"], "is a segmentation config: bench_train times"),
    (["--config=experiments/configs/ablation_fashion_mnist.py"], "is a study config: bench_train times"),
    (["--smoke", "--out-dir=pyproject.toml"], "pyproject.toml is a file; give a folder (it is made if missing); checked before anything is measured"),
    (["--smoke", "--batch=0"], "--batch must be >= 1; got 0"),
    (["--smoke", "--out-dir=pyproject.toml/results"], "pyproject.toml is a file, so"),
    (["--smoke", "--only=rednet50", "--impls=pallas,xla"], "and one implementation"),
])
def test_bad_arguments_end_in_one_sentence(argv, message, capsys, monkeypatch):
    from experiments import bench_train

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        bench_train.main(argv)
    said = capsys.readouterr().err + (exit_.value.code if isinstance(exit_.value.code, str) else "")
    assert exit_.value.code != 0 and message in said, said


class _Built(Exception):
    pass


@pytest.mark.parametrize("name, impl, expected", [
    ("cednet50", "xla", ("impl", "xla")),
    ("rednet50", "pallas", ("impl", "pallas")),
    ("rednet50", "auto", None),  # the layers' own default
    ("resnet50", "xla", None),  # no aggregation to choose for
])
def test_impl_reaches_the_networks_aggregations(monkeypatch, name, impl, expected):
    from experiments import bench_train

    built = {}

    def create(model_name, **kwargs):
        built.update(kwargs, model=model_name)
        raise _Built

    monkeypatch.setattr(bench_train.models, "create", create)
    with pytest.raises(_Built):
        bench_train.measure(name, batch=2, image_size=16, dtype="float32", warmup=0, timed=1, smoke=True, impl=impl)
    impls = [kv for kv in built.get("op_kwargs", ()) if kv[0] == "impl"]
    assert built["model"] == name and impls == ([expected] if expected else [])
