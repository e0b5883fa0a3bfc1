"""Training throughput and peak device memory of ResNet-50, RedNet-50 and CedNet-50 on one GPU.

CedNet-50 runs twice: as built by default and with `fuse_generator=True`, the generator's span
conv fused into the aggregation (`ops.fused_aggregate`, which `impl="auto"` runs on the fused
Pallas kernels, `kernels.fused`, on a GPU). The smoke run leaves the fused variant out.

    python -m experiments.bench_train                  # on a GPU: batch 128, bfloat16, 224x224
    python -m experiments.bench_train --smoke --out-dir /tmp   # anywhere: narrow nets, 32x32, batch 8

Each model runs in its own process (so each peak memory is its own) on synthetic images, the
same jitted `train_step` as `experiments.imagenet` (SGD Nesterov, label smoothing), `--warmup`
untimed steps then `--steps` timed ones. Writes `train_<date>_<device>.json` and `.md` to
`--out-dir` (default `benchmarks/`) with the device, date, versions, command and the ratios to
ResNet-50. Off GPU only `--smoke` runs, and its numbers say nothing about performance.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax

from cvolution_jax import models
from cvolution_jax.tasks import classification
from cvolution_jax.train import steps
from kernels.bench import versions

MODELS = ("resnet50", "rednet50", "cednet50")
# name -> (registry model, model overrides); the fused CedNet is timed on GPU runs only.
VARIANTS = {name: (name, {}) for name in MODELS}
VARIANTS["cednet50_fused"] = ("cednet50", {"op_kwargs": (("fuse_generator", True),)})
SMOKE_OVERRIDES = {"widths": (16, 16, 16, 16), "stem_width": 32, "stage_sizes": (1, 1, 1, 1), "kernel_size": 3}


def measure(name: str, *, batch: int, image_size: int, dtype: str, warmup: int, timed: int, smoke: bool) -> dict:
    """Images/s and peak bytes of variant `name`'s train step (one process, one model)."""
    model_name, overrides = VARIANTS[name]
    model = models.create(model_name, dtype=jnp.dtype(dtype), **overrides, **(SMOKE_OVERRIDES if smoke else {}))
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
    state = jax.jit(functools.partial(steps.create_train_state, model, tx, (image_size, image_size, 3)))(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 2)
    data = {
        "image": jax.random.normal(keys[0], (batch, image_size, image_size, 3)),
        "label": jax.random.randint(keys[1], (batch,), 0, 1000),
        "mask": jnp.ones((batch,)),
    }
    train_step = jax.jit(functools.partial(classification.train_step, label_smoothing=0.1), donate_argnums=0)
    for _ in range(warmup):
        state, metrics = train_step(state, data)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(timed):
        state, metrics = train_step(state, data)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / timed
    stats = jax.devices()[0].memory_stats() or {}
    return {"model": name, "step_ms": seconds * 1e3, "images_per_sec": batch / seconds, "peak_bytes": stats.get("peak_bytes_in_use")}


def _markdown(result: dict) -> str:
    lines = [
        f"# Training benchmark{' (smoke run: times mean nothing)' if result['smoke'] else ''}",
        "",
        f"- device: {result['device']}",
        f"- date: {result['date']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        f"- command: `{result['command']}`",
        f"- batch {result['batch']}, {result['dtype']}, {result['image_size']}x{result['image_size']} synthetic images, "
        f"{result['warmup']} warm-up + {result['steps']} timed steps",
        "",
        "| model | step (ms) | images/s | x ResNet-50 | peak memory (GiB) | x ResNet-50 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
        memory_ratio = "n/a" if r["memory_vs_resnet50"] is None else f"{r['memory_vs_resnet50']:.2f}"
        lines.append(f"| {r['model']} | {r['step_ms']:.1f} | {r['images_per_sec']:.0f} | {r['speed_vs_resnet50']:.2f} | {peak} | {memory_ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[pathlib.Path]:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_train", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="narrow nets, 32x32 images, batch 8, 2 steps: checks the benchmark runs")
    parser.add_argument("--out-dir", default="benchmarks")
    parser.add_argument("--batch", type=int, default=None, help="default 128 (smoke 8)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; smoke 1)")
    parser.add_argument("--only", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # one model, JSON on stdout (a child run)
    args = parser.parse_args(argv)
    batch = args.batch or (8 if args.smoke else 128)
    image_size = 32 if args.smoke else 224
    timed, warmup = args.steps or (2 if args.smoke else 20), args.warmup or (1 if args.smoke else 5)
    if args.only:
        print(json.dumps(measure(args.only, batch=batch, image_size=image_size, dtype=args.dtype, warmup=warmup, timed=timed, smoke=args.smoke)))
        return []
    if jax.default_backend() != "gpu" and not args.smoke:
        parser.error(f"no GPU (backend {jax.default_backend()!r}): run on a GPU machine, or pass --smoke to check the benchmark end to end.")

    rows = []
    child = [sys.executable, "-m", "experiments.bench_train", f"--batch={batch}", f"--dtype={args.dtype}", f"--steps={timed}", f"--warmup={warmup}"]
    for name in MODELS + (() if args.smoke else ("cednet50_fused",)):
        output = subprocess.run([*child, *(["--smoke"] if args.smoke else []), f"--only={name}"], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    base = rows[0]
    for row in rows:
        row["speed_vs_resnet50"] = row["images_per_sec"] / base["images_per_sec"]
        row["memory_vs_resnet50"] = None if row["peak_bytes"] is None else row["peak_bytes"] / base["peak_bytes"]
    device = jax.devices()[0]
    date = datetime.date.today().isoformat()
    result = dict(
        device=device.device_kind, date=date, versions=versions(), smoke=args.smoke, batch=batch, dtype=args.dtype,
        image_size=image_size, steps=timed, warmup=warmup,
        command="python -m experiments.bench_train " + " ".join(sys.argv[1:] if argv is None else argv), rows=rows,
    )
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"train_{date}_{device.device_kind.replace(' ', '_').lower()}{'_smoke' if args.smoke else ''}"
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(_markdown(result))
    print(_markdown(result))
    return paths


if __name__ == "__main__":
    main()
