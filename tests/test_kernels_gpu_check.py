"""`python -m kernels.gpu_check`: the smoke run end to end on CPU, its refusals, its report when a
section fails or the run is cut short, the profile reader, and the kernels' tolerance."""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from jax.profiler import ProfileData

from kernels import bench, gpu_check, reference

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _report(out: pathlib.Path) -> dict:
    [path] = out.glob("gpu_check_*.json")
    assert path.with_suffix(".md").is_file()
    return json.loads(path.read_text())


@pytest.mark.slow  # 48 s on 2 cores; .ci/run runs it on both legs (`-m slow tests/test_kernels_gpu_check.py`)
def test_smoke_run_answers_every_section(tmp_path):
    """The command a GPU will run, with interpret mode, one tiny op and the narrow networks."""
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.gpu_check", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = _report(tmp_path)
    assert report["smoke"] and list(report["sections"]) == list(gpu_check.SECTIONS)
    assert all(s["status"] == "passed" for s in report["sections"].values()), report["sections"]
    sections = {name: s["result"] for name, s in report["sections"].items()}

    assert sections["environment"]["platform"] == "cpu" and "jax" in sections["environment"]["versions"]
    # Every output of both families in both dtypes, each within the tests' tolerance.
    rows = sections["correctness"]["rows"]
    outputs = [(r["family"], r["output"]) for r in rows if r["dtype"] == "float32"]
    assert outputs == [("unfused", o) for o in gpu_check.UNFUSED_OUTPUTS] + [("fused", o) for o in gpu_check.FUSED_OUTPUTS]
    assert len(rows) == 2 * len(outputs)
    assert all(r["ok"] and 0 <= r["max_rel_error"] <= r["tolerance"] for r in rows)
    # Pallas, XLA and the copy for both passes; a depthwise conv and the fused rows beside them.
    kernels = sections["kernels"]
    assert {(r["impl"], r["pass"]) for r in kernels["rows"]} == {(i, p) for i in bench.IMPLS for p in bench.PASSES}
    assert {r["pass"] for r in kernels["depthwise_rows"]} == set(bench.PASSES)
    assert {r["impl"] for r in kernels["fused_rows"]} == {"unfused", "fused"}
    assert all(r["time_ms"] > 0 for r in kernels["rows"] + kernels["depthwise_rows"] + kernels["fused_rows"])
    # Off GPU no kernel runs as itself, so the bytes model's measured column stays empty, and says why.
    assert len(kernels["bytes_model"]) == 2 * 7 and all(r["measured_us"] is None for r in kernels["bytes_model"])
    assert kernels["profile_errors"]
    [network] = sections["network"]["rows"]
    assert network["model"] == "resnet50" and network["impl"] == "none" and network["images_per_sec"] > 0
    assert network["speed_vs_conv"] == 1.0  # the ResNet row is its own base
    training = sections["training"]
    assert [step for step, _ in training["losses"]] == [2, 4] and all(np.isfinite(loss) for _, loss in training["losses"])
    assert training["checkpoints"] == [4] and training["eval"]["step"] == 4 and training["eval"]["images"] == 32
    assert not list(tmp_path.glob("gpu-check-training-*"))  # the run's workdir is cleaned up
    md = next(tmp_path.glob("gpu_check_*.md")).read_text()
    for heading in gpu_check.SECTIONS:
        assert f"## {heading}" in md


def test_without_a_gpu_it_says_so_and_how_to_check_the_command():
    # JAX_PLATFORMS: a CUDA plugin installed without a GPU (the compile extras) makes jax print its own traceback.
    proc = subprocess.run([sys.executable, "-m", "kernels.gpu_check", "--out", "unused"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and "no GPU" in proc.stderr and "--smoke" in proc.stderr and "Traceback" not in proc.stderr
    assert not (ROOT / "unused").exists()


@pytest.mark.parametrize("argv, message", [
    (["--sections", "environment,speed"], "choose from environment"),
    (["--budget-s", "0"], "must be positive"),
])
def test_bad_arguments_end_in_one_sentence(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--smoke", "--out", str(tmp_path), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_out_that_is_a_file_is_refused_and_left_alone(tmp_path, capsys):
    path = tmp_path / "results"
    path.write_text("keep me")
    with pytest.raises(SystemExit):
        gpu_check.main(["--smoke", "--out", str(path)])
    assert "is a file" in capsys.readouterr().err and path.read_text() == "keep me"


def test_a_failed_section_is_recorded_and_the_next_ones_run(tmp_path, monkeypatch):
    row = dict(op="stage1_c64", family="unfused", dtype="float32", output="dx", max_rel_error=3e-5, tolerance=1e-5, ok=False)

    def broken(clock, smoke):
        raise RuntimeError("bench_train fell over")

    monkeypatch.setattr(gpu_check, "correctness", lambda clock, smoke: {"rows": [row], "failures": ["unfused dx: 3e-05 > 1e-05"]})
    monkeypatch.setattr(gpu_check, "network", broken)
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--sections", "environment,correctness,network"]) == 1
    sections = _report(tmp_path)["sections"]
    assert sections["environment"]["status"] == "passed"
    assert sections["correctness"]["status"] == "failed"  # results that carry failures fail their section
    assert sections["network"]["status"] == "failed" and "bench_train fell over" in sections["network"]["error"]
    md = next(tmp_path.glob("gpu_check_*.md")).read_text()
    assert "| unfused | stage1_c64 | float32 | dx | 3.00e-05 | 1e-05 | **no** |" in md and "bench_train fell over" in md


def test_a_run_cut_short_keeps_the_sections_it_finished(tmp_path, monkeypatch):
    def killed(clock, smoke):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_check, "correctness", killed)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--smoke", "--out", str(tmp_path), "--sections", "environment,correctness"])
    report = _report(tmp_path)
    assert list(report["sections"]) == ["environment"] and report["sections"]["environment"]["status"] == "passed"
    assert not list(tmp_path.glob("*.partial"))


def test_work_beyond_a_sections_share_of_the_budget_is_skipped_and_said(tmp_path):
    """A budget too small for anything: each section records that its share ran out, and the run ends."""
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--sections", "correctness,training", "--budget-s", "1e-6"]) == 1
    sections = _report(tmp_path)["sections"]
    for name in ("correctness", "training"):
        assert sections[name]["status"] == "out of time" and "--budget-s" in sections[name]["skipped"]


def test_a_section_whose_share_runs_out_keeps_its_results_and_names_the_rest(tmp_path, monkeypatch):
    clock = gpu_check.Clock(1000.0)

    def check_op(op_name, op, dtype, family, interpret):
        clock.deadline = 0.0  # the share runs out during the first piece of work
        return [dict(op=op_name, family=family, dtype=dtype.name, output="out", max_rel_error=0.0, tolerance=1e-5, ok=True)]

    monkeypatch.setattr(gpu_check, "check_op", check_op)
    report = gpu_check.Report(out_dir=tmp_path, command="test", smoke=True, budget=1000.0, device="cpu", date="2026-12-07")
    gpu_check.run_section("correctness", lambda c: gpu_check.correctness(c, True), report, clock)
    entry = report.sections["correctness"]
    assert entry["status"] == "partial" and len(entry["result"]["rows"]) == 1
    assert "fused smoke_c32_k7_s2 float32" in entry["skipped"] and "unfused smoke_c32_k7_s2 bfloat16" in entry["skipped"]
    assert "**not run**: the section's share of --budget-s ran out before: fused smoke_c32_k7_s2 float32" in (
        next(tmp_path.glob("gpu_check_*.md")).read_text())


def test_a_piece_that_fails_is_recorded_and_the_next_pieces_run(tmp_path, monkeypatch):
    def check_op(op_name, op, dtype, family, interpret):
        if family == "fused" and dtype == jnp.float32:
            raise RuntimeError("Triton: out of shared memory")
        return [dict(op=op_name, family=family, dtype=dtype.name, output="out", max_rel_error=0.0, tolerance=1e-5, ok=True)]

    monkeypatch.setattr(gpu_check, "check_op", check_op)
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--sections", "correctness"]) == 1
    entry = _report(tmp_path)["sections"]["correctness"]
    assert entry["status"] == "failed"
    assert entry["error"] == "fused smoke_c32_k7_s2 float32: RuntimeError: Triton: out of shared memory"
    # The three other pieces' rows are kept: unfused in both dtypes, fused in bf16.
    assert {(r["family"], r["dtype"]) for r in entry["result"]["rows"]} == {
        ("unfused", "float32"), ("unfused", "bfloat16"), ("fused", "bfloat16")}


def _fake_training(monkeypatch, trained_loss, restored_loss, restored_step=4):
    """`_run` standing in for the two experiments.imagenet processes: writes what they would."""
    def run(command, clock, what, env=None):
        workdir = pathlib.Path(next(a for a in command if a.startswith("--workdir=")).split("=", 1)[1])
        assert env["JAX_COMPILATION_CACHE_DIR"]  # the two processes share one compilation cache
        if "--config.mode=eval" in command:
            (workdir / "eval_4.json").write_text(json.dumps({"step": restored_step, "loss": restored_loss}))
        else:
            (workdir / "checkpoints" / "4").mkdir(parents=True)
            (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
                {"step": 2, "split": "train", "loss": 2.3}, {"step": 4, "split": "train", "loss": 2.2},
                {"step": 4, "split": "eval", "loss": trained_loss})) + "\n")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(gpu_check, "_run", run)


@pytest.mark.parametrize("trained, restored, step, problem", [
    (2.31, 2.3101, 4, None),
    (2.31, 2.9, 4, "the restore did not give back the trained parameters"),
    (2.31, None, 4, "the restored checkpoint's evaluation is not finite"),  # strict JSON's null for a NaN
    (2.31, 2.31, 2, "the evaluation restored step 2, not the last checkpoint, 4"),
])
def test_training_holds_the_restored_evaluation_to_the_trained_one(monkeypatch, trained, restored, step, problem):
    _fake_training(monkeypatch, trained, restored, step)
    clock = gpu_check.Clock(1000.0, child_env=dict(os.environ))
    clock.enter("training")
    result = gpu_check.training(clock, True)
    assert result["losses"] == [(2, 2.3), (4, 2.2)] and result["checkpoints"] == [4]
    assert result["trained_eval"]["loss"] == trained
    if problem is None:
        assert result["failures"] == []
    else:
        assert len(result["failures"]) == 1 and problem in result["failures"][0]


def test_the_clock_shares_the_budget_among_the_chosen_sections_only():
    clock = gpu_check.Clock(100.0, chosen=("correctness", "kernels"), start=0.0)
    clock.enter("correctness")
    share = gpu_check.SHARES["correctness"] / (gpu_check.SHARES["correctness"] + gpu_check.SHARES["kernels"])
    assert clock.deadline == pytest.approx(100 * share)
    clock.enter("kernels")
    assert clock.deadline == pytest.approx(100.0)


def test_the_clock_passes_time_a_section_leaves_to_the_next():
    clock = gpu_check.Clock(100.0, start=0.0)
    clock.enter("correctness")
    first = clock.deadline
    clock.enter("kernels")
    assert first == pytest.approx(100 * (gpu_check.SHARES["environment"] + gpu_check.SHARES["correctness"]))
    assert clock.deadline == pytest.approx(first + 100 * gpu_check.SHARES["kernels"])
    clock.enter("training")
    assert clock.deadline == pytest.approx(100.0)  # the shares add up to the whole budget


XSPACE = """
planes {
  id: 1 name: "/device:GPU:0"
  lines { id: 1 name: "Stream #13(Compute)"
    events { metadata_id: 1 offset_ps: 0 duration_ps: 10000000 }
    events { metadata_id: 1 offset_ps: 20000000 duration_ps: 30000000 }
    events { metadata_id: 1 offset_ps: 60000000 duration_ps: 20000000 }
    events { metadata_id: 2 offset_ps: 90000000 duration_ps: 5000000 }
    events { metadata_id: 3 offset_ps: 99000000 duration_ps: 7000000 }
    events { metadata_id: 4 offset_ps: 110000000 duration_ps: 9000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "cvolution_forward" } }
  event_metadata { key: 2 value { id: 2 name: "input_reduce_fusion" } }
  event_metadata { key: 3 value { id: 3 name: "cvolution_dx" } }
  event_metadata { key: 4 value { id: 4 name: "cvolution_dx__1" } }
}
planes { id: 2 name: "/host:CPU"
  lines { id: 1 name: "python" events { metadata_id: 1 duration_ps: 99000000 } }
  event_metadata { key: 1 value { id: 1 name: "cvolution_forward" } }
}
"""


def test_kernel_times_are_medians_of_the_device_events_named_after_each_kernel(tmp_path):
    (tmp_path / "plugins" / "profile" / "run").mkdir(parents=True)
    (tmp_path / "plugins" / "profile" / "run" / "host.xplane.pb").write_bytes(ProfileData.text_proto_to_serialized_xspace(XSPACE))
    times = gpu_check.kernel_times(str(tmp_path), ("cvolution_forward", "cvolution_dx", "cvolution_weight_grads"))
    # 10, 30 and 20 us on the GPU (the host's event of the same name is not a kernel); dx under its own name
    # and a name XLA made unique; no weight_grads event.
    assert times == {"cvolution_forward": 20.0, "cvolution_dx": 8.0}


# --- the tolerance both the tests and the GPU check hold the kernels to ---------------------


def test_compare_float32_is_relative_per_element_plus_a_floor_at_the_largest_magnitude():
    expected = np.array([1000.0, 1.0, 0.0], np.float32)
    at_tolerance = expected + np.array([1000 * 1e-5 * 1.5, 0.0, 0.0], np.float32)  # 1e-5 of |e| + 1e-5 of the scale
    assert reference.compare(at_tolerance, expected, jnp.float32)[1]
    over = expected + np.array([0.0, 0.0, 1000 * 1e-5 * 1.01], np.float32)  # near zero only the floor counts
    relative, ok = reference.compare(over, expected, jnp.float32)
    assert not ok and relative == pytest.approx(1.01e-5, rel=1e-3)


def test_compare_bfloat16_holds_the_max_error_to_one_percent_of_the_largest_magnitude():
    expected = np.array([100.0, 0.01], np.float32)
    assert reference.compare(expected + np.array([0.0, 0.99], np.float32), expected, jnp.bfloat16) == (pytest.approx(0.0099), True)
    assert not reference.compare(expected + np.array([0.0, 1.01], np.float32), expected, jnp.bfloat16)[1]


def test_compare_edge_cases():
    assert reference.compare(np.zeros((0, 3)), np.zeros((0, 3)), jnp.float32) == (0.0, True)
    assert reference.compare(np.zeros(3), np.zeros(3), jnp.float32) == (0.0, True)  # all zero: no scale, no error
    assert not reference.compare(np.array([np.nan, 1.0]), np.array([1.0, 1.0]), jnp.float32)[1]
    assert not reference.compare(np.array([np.inf, 1.0]), np.array([1.0, 1.0]), jnp.bfloat16)[1]
    with pytest.raises(ValueError, match="shapes differ"):
        reference.compare(np.zeros(3), np.zeros(4), jnp.float32)
    with pytest.raises(ValueError, match="tolerances are for"):
        reference.compare(np.zeros(3), np.zeros(3), jnp.float16)
