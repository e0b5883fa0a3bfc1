"""Training throughput and peak device memory of ResNet-50, RedNet-50 and CedNet-50 on one GPU,
or of a config's network on any device.

CedNet-50 runs twice: as built by default and with `fuse_generator=True`, the generator's span
conv fused into the aggregation (`ops.fused_aggregate`, which `impl="auto"` runs on the fused
Pallas kernels, `kernels.fused`, on a GPU). The smoke run leaves the fused variant out.

    python -m experiments.bench_train                  # on a GPU: batch 128, bfloat16, 224x224
    python -m experiments.bench_train --smoke --out-dir /tmp   # anywhere: narrow nets, 32x32, batch 8
    python -m experiments.bench_train --config experiments/configs/default.py   # CPU: the default's net
    python -m experiments.bench_train --batch 64 --impls pallas,xla --models resnet50,rednet50,cednet50

`--only NAME` times one variant in this process and prints its row as one JSON line.
`--impls` times RedNet and CedNet once per aggregation implementation (`ops.aggregate`'s `impl`:
"auto", "pallas", "xla"); ResNet, which has none, runs once. `--models` picks the variants.

With `--config`, the config's network (its `model.overrides`: stem, widths, stage sizes) is timed
three times, with a 3x3 convolution (`resnet`), involution (`rednet`) and C-volution (`cednet`)
as its spatial op, at the config's batch size, image size and dtype, on whatever device jax has:
the CPU cost of one `experiments.imagenet` step of that network, per op.

Each model runs in its own process (so each peak memory is its own) on synthetic images, the
same jitted `train_step` as `experiments.imagenet` (SGD Nesterov, label smoothing), `--warmup`
untimed steps then `--steps` timed ones. Writes `train_<date>_<time>_<device>.json` and `.md` to
`--out-dir` (default `benchmarks/`; the file names hold the time, so nothing is overwritten) with
the device, date, versions, command and the ratios to ResNet-50 (with `--config`, to its `resnet`
row; without a ResNet row, to the first). Off GPU only `--smoke` and `--config` run; the
smoke run's numbers say nothing about performance.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax

from cvolution_jax import models, tasks
from cvolution_jax.tasks import classification
from cvolution_jax.train import steps
from kernels import common
from kernels.bench import versions

MODELS = ("resnet50", "rednet50", "cednet50")
# name -> (registry model, model overrides); the fused CedNet is timed on GPU runs only.
VARIANTS = {name: (name, {}) for name in MODELS}
VARIANTS["cednet50_fused"] = ("cednet50", {"op_kwargs": (("fuse_generator", True),)})
SMOKE_OVERRIDES = {"widths": (16, 16, 16, 16), "stem_width": 32, "stage_sizes": (1, 1, 1, 1)}
SMOKE_OP = (("kernel_size", 3),)  # added to a variant's op_kwargs
# --config: the config's network with each family's op (and K); the "50" only names the family,
# the config's stage_sizes override its depth.
CONFIG_VARIANTS = {"resnet": "resnet50", "rednet": "rednet50", "cednet": "cednet50"}


def load_config(path: str):
    """`get_config()` of the config file at `path`."""
    spec = importlib.util.spec_from_file_location("bench_config", path)
    if spec is None or not pathlib.Path(path).is_file():
        raise SystemExit(f"error: --config {path!r} is not a config file; pass e.g. experiments/configs/default.py.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


IMPLS = ("auto", "pallas", "xla")


def measure(name: str, *, batch: int, image_size: int, dtype: str, warmup: int, timed: int, smoke: bool,
            config_path: str | None = None, impl: str = "auto") -> dict:
    """Images/s and peak bytes of variant `name`'s train step (one process, one model), its
    aggregations run by `impl` (ignored by ResNet, which has none)."""
    if config_path:
        model_name, overrides = CONFIG_VARIANTS[name], dict(load_config(config_path).model.overrides)
    else:
        model_name, overrides = VARIANTS[name]
        if smoke:
            overrides = {**overrides, **SMOKE_OVERRIDES, "op_kwargs": (*overrides.get("op_kwargs", ()), *SMOKE_OP)}
    if impl != "auto" and not model_name.startswith("resnet"):
        overrides = {**overrides, "op_kwargs": (*overrides.get("op_kwargs", ()), ("impl", impl))}
    model = models.create(model_name, dtype=jnp.dtype(dtype), **overrides)
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
    state = jax.jit(functools.partial(steps.create_train_state, model, tx, (image_size, image_size, 3)))(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 2)
    data = {
        "image": jax.random.normal(keys[0], (batch, image_size, image_size, 3)),
        "label": jax.random.randint(keys[1], (batch,), 0, 1000),
        "valid": jnp.ones((batch,)),
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
    params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    return {"model": name, "impl": "none" if model_name.startswith("resnet") else impl, "step_ms": seconds * 1e3, "images_per_sec": batch / seconds, "peak_bytes": stats.get("peak_bytes_in_use"),
            "params": int(params)}


def _markdown(result: dict) -> str:
    base = result["base"]
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
        f"| model | aggregation | params | step (ms) | images/s | x {base} | peak memory (GiB) | x {base} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
        memory_ratio = "n/a" if r["memory_vs_conv"] is None else f"{r['memory_vs_conv']:.2f}"
        lines.append(f"| {r['model']} | {r.get('impl', 'auto')} | {r['params']:,} | {r['step_ms']:.1f} | {r['images_per_sec']:.0f} | {r['speed_vs_conv']:.2f} | {peak} | {memory_ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[pathlib.Path]:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_train", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="narrow nets, 32x32 images, batch 8, 2 steps: checks the benchmark runs")
    parser.add_argument("--config", default=None, help="a config file: time its network with each op, at its batch, image size and dtype")
    parser.add_argument("--out-dir", default="benchmarks")
    parser.add_argument("--batch", type=int, default=None, help="default 128 (smoke 8; --config: the config's)")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"), help="default bfloat16 (--config: the config's)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; smoke 1)")
    parser.add_argument("--models", default=None, help=f"comma-separated, from {', '.join(VARIANTS)} (default: all; smoke "
                        "and --config: their own)")
    parser.add_argument("--impls", default="auto", help=f"comma-separated aggregation implementations, from {', '.join(IMPLS)}")
    parser.add_argument("--only", default=None, help="one variant, timed in this process; prints its row as one JSON line and "
                        "writes no file (what the full run starts once per row; --impls then names one)")
    args = parser.parse_args(argv)
    impls = args.impls.split(",")
    if set(impls) - set(IMPLS) or not impls:
        parser.error(f"--impls {args.impls!r}: choose from {', '.join(IMPLS)}, comma-separated.")
    for flag, value, minimum in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--batch", args.batch, 1)):
        if value is not None and value < minimum:
            parser.error(f"{flag} must be >= {minimum}; got {value}.")
    if args.only and (args.only not in (CONFIG_VARIANTS if args.config else VARIANTS) or len(impls) > 1):
        parser.error(f"--only {args.only!r} with --impls {args.impls!r}: one variant, from "
                     f"{', '.join(CONFIG_VARIANTS if args.config else VARIANTS)}, and one implementation.")
    if args.models and (args.config or set(args.models.split(",")) - set(VARIANTS)):
        parser.error(f"--models {args.models!r}: choose from {', '.join(VARIANTS)}, comma-separated (not with --config, "
                     f"which times its own network with each op).")
    if args.config and args.smoke:
        parser.error("--config and --smoke exclude each other: --config times a config's network, --smoke the narrow test nets.")
    config = load_config(args.config) if args.config else None
    kind = None
    if config is not None:
        try:
            kind = tasks.name_of(config)
        except ValueError:  # a study config names no task and has no model
            kind = "study"
    if kind not in (None, "classification"):
        parser.error(f"--config {args.config} is a {kind} config: bench_train times the train step of a classification "
                     f"network (the op's cost, without a task's heads and data). Pass an experiments.imagenet config, "
                     f"e.g. experiments/configs/default.py, or --models to time the ImageNet networks; the log of a "
                     f"{kind} run shows its images/s.")
    out_dir = pathlib.Path(args.out_dir)
    problem = None if args.only else common.output_problem(out_dir, folder=True)
    if problem:
        parser.error(f"--out-dir {out_dir}: {problem}; checked before anything is measured.")
    batch = args.batch or (config.batch_size if config else 8 if args.smoke else 128)
    image_size = config.data.image_size if config else 32 if args.smoke else 224
    dtype = args.dtype or (config.dtype if config else "bfloat16")
    timed = args.steps or (2 if args.smoke else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    if args.only:
        print(json.dumps(measure(args.only, batch=batch, image_size=image_size, dtype=dtype, warmup=warmup, timed=timed, smoke=args.smoke,
                                 config_path=args.config, impl=impls[0])))
        return []
    if jax.default_backend() != "gpu" and not (args.smoke or config):
        parser.error(f"no GPU (backend {jax.default_backend()!r}): run on a GPU machine, pass --config to time a config's "
                     f"network here, or --smoke to check the benchmark end to end.")

    rows = []
    child = [sys.executable, "-m", "experiments.bench_train", f"--batch={batch}", f"--dtype={dtype}", f"--steps={timed}", f"--warmup={warmup}"]
    if config:
        names, child = tuple(CONFIG_VARIANTS), [*child, f"--config={args.config}"]
    else:
        names, child = MODELS + (() if args.smoke else ("cednet50_fused",)), [*child, *(["--smoke"] if args.smoke else [])]
    if args.models:
        names = tuple(args.models.split(","))
    runs = [(name, impl) for name in names for impl in (impls[:1] if name.startswith("resnet") else impls)]
    for name, impl in runs:  # each in its own process, so each peak memory is its own
        proc = subprocess.run([*child, f"--only={name}", f"--impls={impl}"], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"error: timing {name} (aggregation {impl}) failed in its own process, which said:\n{proc.stderr.strip()[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = next((row for row in rows if row["model"].startswith("resnet")), rows[0])  # the convolution, where timed
    for row in rows:
        row["speed_vs_conv"] = row["images_per_sec"] / base["images_per_sec"]
        row["memory_vs_conv"] = None if row["peak_bytes"] is None else row["peak_bytes"] / base["peak_bytes"]
    device = jax.devices()[0]
    now = datetime.datetime.now(datetime.timezone.utc)
    result = dict(
        device=device.device_kind, date=now.isoformat(timespec="seconds"), base=base["model"], versions=versions(), smoke=args.smoke, config=args.config, batch=batch, dtype=dtype, impls=impls,
        image_size=image_size, steps=timed, warmup=warmup,
        command="python -m experiments.bench_train " + " ".join(sys.argv[1:] if argv is None else argv), rows=rows,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_{pathlib.Path(args.config).stem}" if config else "_smoke" if args.smoke else ""
    # The time of day too: a second run on the same day adds its files beside the first's.
    stem = f"train_{now:%Y-%m-%d_%H%M%S}_{device.device_kind.replace(' ', '_').lower()}{suffix}"
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(_markdown(result))
    print(_markdown(result))
    return paths


if __name__ == "__main__":
    main()
