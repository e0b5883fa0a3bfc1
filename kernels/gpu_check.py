"""The first command to run on a GPU: every question about the kernels and the training on it, in one go.

    python -m kernels.gpu_check --out benchmarks                # one NVIDIA GPU: at most 8 minutes on an H100
    python -m kernels.gpu_check --smoke --out /tmp/gpu_check    # anywhere: CPU, interpret mode, tiny shapes

GPU time is scarce, so one prepared command answers everything the first minutes on a GPU must
answer, and writes `DIR/gpu_check_<device>_<date>_<time>.md` and `.json` again after every piece
of work: a run cut short keeps what it finished. A piece that fails (a compile error, an out of
memory, a command that exits non-zero) is recorded with its error, and the next one runs. Sections:

1. environment: the device, its memory, the driver, CUDA, and the versions of jax, jaxlib, the
   CUDA plugin and Triton;
2. correctness: every Pallas kernel against the XLA path on the same device, at the
   `kernels.bench` RedNet-50 shapes (strides 1 and 2; the most telling first, `OP_ORDER`), float32
   and bfloat16: the forward, dx, dHd
   and dS of the unfused kernels (`kernels.pallas`), and the forward, dx, dv, dW2, db and dS of the
   fused ones (`kernels.fused`). The XLA path runs in float32 (HIGHEST matmul precision) on the
   same input values; each result's max error relative to its largest magnitude is held to the
   tests' tolerance (`reference.TOLERANCE`);
3. kernels: the forward and forward + backward times of the Pallas and XLA paths, a copy moving
   the same bytes (the bandwidth reference, measured in the same run: `kernels.bench`), a
   depthwise convolution of the same shape, and the fused kernels against the unfused ones; then
   each kernel's own time from a profile of the Pallas programs, beside the bytes model
   (`kernels.traffic`) whose "measured" column it fills;
4. network: `experiments.bench_train` for ResNet-50, RedNet-50 and CedNet-50 at 224x224, batch
   64, bfloat16, with the Pallas and the XLA aggregation: images/s and peak device memory;
5. training: 50 steps of `experiments.imagenet` on the ImageNet-shaped random data of
   `experiments/configs/imagenet_synthetic.py`, sharded over every local device; the loss must
   stay finite, and the checkpoint it saves is restored and evaluated by a second process, whose
   eval loss must equal the training process's own at that step.

Sections 4 and 5 run the entry points as commands, in processes of their own (each peak memory is
its own, and `kernels/` imports nothing of `cvolution_jax` or `experiments`). This process
allocates device memory as it goes (`XLA_PYTHON_CLIENT_PREALLOCATE=false`), so those commands,
run with the user's settings, find the card free.

The run keeps to `--budget-s` (default 420 s, counted from before jax loads): each section has a
share of it, and time a section leaves unused passes to the next. A piece that would start with
less time left than half the last one took is recorded as skipped (the section is "partial", or
"out of time" if it could start nothing), so the command ends within 8 minutes on a slower GPU too. Exit status: 0 when every section passed or ran partly, 1 when one failed, ran
out of time, or held a result out of tolerance, 2 on bad arguments (no GPU without `--smoke`).
`--smoke` runs the same code on the CPU (kernels in Pallas's interpreter, one tiny op, the narrow
test ResNet) in under a minute (51 s on 2 idle cores, 2026-12-07): its numbers check the command,
not the hardware.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before jax loads: the budget counts the start-up too

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import glob  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels import bench, common, fused, pallas, reference, traffic  # noqa: E402

SECTIONS = ("environment", "correctness", "kernels", "network", "training")
# Each section's share of the budget. A section may run until the sum of the shares up to it has
# passed, so time an earlier section leaves unused goes to the later ones.
SHARES = {"environment": 0.02, "correctness": 0.20, "kernels": 0.25, "network": 0.25, "training": 0.28}
DEFAULT_BUDGET_S = 420  # the whole run, start-up included, within 8 minutes, with room for the last piece
# The order the pieces run in, the most telling first, so a short budget still checks the stride-2
# gather `dx` (stage2_c128_s2), two channel tiles (stage4_c512), K=3 and wide rows (the stem) and the
# largest op (stage1_c64).
OP_ORDER = ("stage2_c128_s2", "stage4_c512", "stem_c32_k3", "stage1_c64", "stage3_c256_s2", "stage4_c512_s2",
            "stage2_c128", "stage3_c256")
CHILD_MIN_S = {"network": 20.0, "training": 45.0, "evaluation": 15.0}  # a command started with less left would be killed
UNFUSED_OUTPUTS = ("out", "dx", "dHd", "dS")
FUSED_OUTPUTS = ("out", "dx", "dv", "dW2", "db", "dS")
# (bench_train variant, aggregation) per network row, the most wanted first.
NETWORK_ROWS = (("resnet50", "none"), ("cednet50", "pallas"), ("rednet50", "pallas"), ("cednet50", "xla"), ("rednet50", "xla"))
TRAINING_CONFIG = "configs/imagenet_synthetic.py"  # inside the `experiments` package


class OutOfTime(Exception):
    """A section's share of the budget ran out before a piece of its work could finish."""


@dataclasses.dataclass
class Clock:
    """The run's budget and the current section's progress.

    A section may run until the shares of it and of the chosen sections before it have passed
    (shares normalised over the chosen sections). It does its work in pieces (`piece`): a piece
    that would start too late is skipped and named, one that fails is recorded with its error and
    the next runs, and `save` writes what the section has so far.
    """

    budget: float
    chosen: tuple = SECTIONS
    start: float = dataclasses.field(default_factory=time.monotonic)
    child_env: dict | None = None  # the environment of the commands a section starts (the user's)
    deadline: float = 0.0
    skipped: list = dataclasses.field(default_factory=list)
    errors: list = dataclasses.field(default_factory=list)
    done: int = 0  # pieces of the current section that finished
    last_piece: float = 0.0  # seconds the section's last piece took: the next likely takes as long
    save: object = lambda result: None  # `save(result)` writes the section's result so far (run_section sets it)

    def enter(self, section: str, save=None) -> None:
        chosen = [s for s in SECTIONS if s in self.chosen]
        total = sum(SHARES[s] for s in chosen)
        spent = sum(SHARES[s] for s in chosen[: chosen.index(section) + 1])
        self.deadline = self.start + spent / total * self.budget
        self.skipped, self.errors, self.done, self.last_piece = [], [], 0, 0.0
        self.save = save or (lambda result: None)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, what: str, need: float = 0.0) -> bool:
        """Whether `what` may start: more time left than `need` s and than half the last piece took.
        If not, it is recorded as skipped."""
        if self.left() > max(need, 0.5 * self.last_piece, 0.0):
            return True
        self.skipped.append(what)
        return False

    @contextlib.contextmanager
    def piece(self, what: str):
        """`with clock.piece(what):` times the block; an error in it is recorded, not raised."""
        tic = time.monotonic()
        try:
            yield
            self.done += 1
        except OutOfTime as e:
            self.skipped.append(str(e))
        except Exception as e:  # noqa: BLE001 -- recorded with the piece's name; the next piece runs
            self.errors.append(f"{what}: {type(e).__name__}: {str(e).strip()[:1500]}")
            print(f"  FAILED {what}: {type(e).__name__}: {str(e).strip()[:300]}", flush=True)
        finally:
            self.last_piece = time.monotonic() - tic


@dataclasses.dataclass
class Report:
    """The results so far, written as markdown and JSON after every section."""

    out_dir: pathlib.Path
    command: str
    smoke: bool
    budget: float
    device: str = ""
    date: str = ""
    sections: dict = dataclasses.field(default_factory=dict)

    @property
    def stem(self) -> str:
        """`gpu_check_<device>_<date>_<time>[_smoke]`: a later run, or a rerun of one section, adds files."""
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.device).strip("-").lower() or "unknown-device"
        stamp = datetime.datetime.fromisoformat(self.date).strftime("%Y-%m-%d_%H%M%S")
        return f"gpu_check_{slug}_{stamp}{'_smoke' if self.smoke else ''}"

    def write(self) -> list[pathlib.Path]:
        """Both files, each replaced in one step (a kill never leaves half a file)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        paths = [self.out_dir / f"{self.stem}.json", self.out_dir / f"{self.stem}.md"]
        contents = [json.dumps(dataclasses.asdict(self) | {"out_dir": str(self.out_dir)}, indent=1) + "\n", markdown(self)]
        for path, text in zip(paths, contents):
            partial = path.with_name(path.name + ".partial")
            partial.write_text(text)
            os.replace(partial, path)
        return paths


# --- 1. environment ---------------------------------------------------------------------------


def _nvidia_smi() -> dict:
    """Driver version, the driver's CUDA version and the GPU's name and memory from `nvidia-smi`."""
    if shutil.which("nvidia-smi") is None:
        return {"nvidia_smi": "not found"}
    found = {}
    try:
        query = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        if query.returncode == 0 and query.stdout.strip():
            name, driver, memory, capability = (f.strip() for f in query.stdout.splitlines()[0].split(",")[:4])
            found.update(gpu=name, driver=driver, gpu_memory=memory, compute_capability=capability)
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30, check=False).stdout
    except subprocess.TimeoutExpired:
        return {**found, "nvidia_smi": "did not answer within 30 s"}
    if m := re.search(r"CUDA Version:\s*([\d.]+)", header):
        found["driver_cuda"] = m.group(1)
    return found


def _cuda_runtime() -> dict:
    """The CUDA runtime and cuDNN versions the jax CUDA plugin loaded, where it says."""
    for plugin in ("jax_cuda13_plugin", "jax_cuda12_plugin"):
        try:
            versions = importlib.import_module(f"{plugin}._versions")
        except ImportError:
            continue
        found = {}
        for key, fn in (("cuda_runtime", "cuda_runtime_get_version"), ("cudnn", "cudnn_get_version")):
            try:
                found[key] = str(getattr(versions, fn)())
            except Exception as e:  # noqa: BLE001 -- a missing library is reported, not fatal
                found[key] = f"unknown ({type(e).__name__})"
        return {"cuda_plugin": plugin, **found}
    return {"cuda_plugin": "none"}


def environment(clock: Clock, smoke: bool) -> dict:
    del clock, smoke
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {
        "device": device.device_kind,
        "platform": device.platform,
        "local_devices": jax.local_device_count(),
        "devices": jax.device_count(),
        "allocator_limit_bytes": stats.get("bytes_limit"),  # what jax's allocator may take, not the card's size
        "allocator": "this process: XLA_PYTHON_CLIENT_PREALLOCATE=false (grows as needed); the commands it starts: "
                     "the user's setting",
        "host": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "versions": bench.versions(),
        **_cuda_runtime(),
        **_nvidia_smi(),
    }


# --- 2. correctness ---------------------------------------------------------------------------


def _inputs(op: bench.Op, dtype, family: str, seed: int = 0) -> tuple[tuple, jax.Array]:
    """(arguments, output cotangent) of one op: unfused `(x, Hd, S)`, fused `(x, v, W2, b, S)`.

    Hd ~ N(0, 1), and W2 scaled so the fused path's Hd is too.
    """
    b, h, c, k, ho = op.batch, op.size, op.channels, op.kernel_size, op.out_size
    groups, reduced = c // reference.GROUP_CHANNELS, c // 4
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (b, h, h, c), dtype)
    static = jax.random.normal(keys[1], (k * k, c), dtype)
    cotangent = jax.random.normal(keys[2], (b, ho, ho, c), dtype)
    if family == "unfused":
        return (x, jax.random.normal(keys[3], (b, ho, ho, groups, k * k), dtype), static), cotangent
    v = jax.random.normal(keys[3], (b, ho, ho, reduced), dtype)
    w2 = (jax.random.normal(keys[4], (reduced, groups * k * k)) / math.sqrt(reduced)).astype(dtype)
    bias = jax.random.normal(keys[5], (groups * k * k,), dtype)
    return (x, v, w2, bias, static), cotangent


@functools.cache
def forward_backward(impl: str, family: str, op: bench.Op, interpret: bool):
    """The jitted `(args, cotangent) -> (out, grads)` of one path; one per key, so the kernels
    section times the very programs the correctness section compiled."""
    config = dict(kernel_size=op.kernel_size, stride=op.stride, dilation=1)
    if family == "unfused":
        layer = (functools.partial(pallas.aggregate, interpret=interpret) if impl == "pallas" else reference.aggregate)
    else:
        layer = (functools.partial(fused.fused_aggregate, interpret=interpret) if impl == "pallas" else reference.fused_aggregate)

    def run(args, cotangent):
        out, vjp = jax.vjp(lambda *a: layer(*a, **config), *args)
        return out, vjp(cotangent)

    return jax.jit(run)


def check_op(op_name: str, op: bench.Op, dtype, family: str, interpret: bool) -> list[dict]:
    """One row per output of the Pallas kernels against the XLA path in float32 on the same values."""
    args, cotangent = _inputs(op, dtype, family)
    out, grads = forward_backward("pallas", family, op, interpret)(args, cotangent)
    up = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)
    with jax.default_matmul_precision("highest"):  # the fused reference's v @ W2 in true float32
        expected_out, expected_grads = forward_backward("xla", family, op, False)(up(args), up(cotangent))
    names = UNFUSED_OUTPUTS if family == "unfused" else FUSED_OUTPUTS
    rows = []
    for name, got, expected in zip(names, (out, *grads), (expected_out, *expected_grads), strict=True):
        relative, ok = reference.compare(got, expected, dtype)
        rows.append(dict(op=op_name, family=family, dtype=jnp.dtype(dtype).name, output=name,
                         max_rel_error=relative if math.isfinite(relative) else None,  # NaN: strict JSON has none
                         tolerance=reference.TOLERANCE[jnp.dtype(dtype).name], ok=ok))
    return rows


def correctness(clock: Clock, smoke: bool) -> dict:
    result, interpret = {"rows": [], "failures": []}, not on_gpu()
    for op_name, op in ops(smoke).items():
        for dtype in ("float32", "bfloat16"):
            for family in ("unfused", "fused"):
                what = f"{family} {op_name} {dtype}"
                if not clock.allows(what):
                    continue
                with clock.piece(what):
                    found = check_op(op_name, op, jnp.dtype(dtype), family, interpret)
                    result["rows"].extend(found)
                    result["failures"].extend(
                        f"{r['family']} {r['op']} {r['dtype']} {r['output']}: {bench.fmt(r['max_rel_error'], '.3g')} > {r['tolerance']}"
                        for r in found if not r["ok"])
                    for r in found:
                        print(f"  {r['family']:8s} {r['op']:16s} {r['dtype']:9s} {r['output']:4s} max rel error "
                              f"{bench.fmt(r['max_rel_error'], '.2e')} {'ok' if r['ok'] else 'OUT OF TOLERANCE'}", flush=True)
                clock.save(result)
    return result


# --- 3. kernel speed --------------------------------------------------------------------------


def kernel_times(trace_dir: str, kernels: tuple[str, ...]) -> dict[str, float]:
    """Median device microseconds of each kernel in `kernels`, from a jax profiler trace.

    Reads the `.xplane.pb` the trace left: events on the device planes (`/device:GPU:N`) named
    after the launched kernel, or after it with a numeric suffix where XLA made a name unique
    (`cvolution_dx__1`). A kernel with no event is left out.
    """
    from jax.profiler import ProfileData

    durations: dict[str, list[float]] = {}
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:"):
                continue
            for line in plane.lines:
                for event in line.events:
                    name = re.sub(r"(?:__|[._])\d+$", "", event.name)
                    if name in kernels:
                        durations.setdefault(name, []).append(event.duration_ns / 1e3)
    return {name: statistics.median(times) for name, times in durations.items()}


def _profile_kernels(op: bench.Op, dtype, interpret: bool, calls: int) -> dict[str, float]:
    """Each Pallas kernel's median time (us) over `calls` calls of the fused and unfused programs."""
    programs = [(forward_backward("pallas", family, op, interpret), *_inputs(op, dtype, family)) for family in ("unfused", "fused")]
    for program, args, cotangent in programs:
        jax.block_until_ready(program(args, cotangent))  # compiled outside the trace
    names = tuple(f"cvolution_{k}" for family in traffic.FAMILIES.values() for k in family)
    with tempfile.TemporaryDirectory(prefix="gpu-check-trace-") as trace_dir:
        with jax.profiler.trace(trace_dir):
            for program, args, cotangent in programs:
                for _ in range(calls):
                    jax.block_until_ready(program(args, cotangent))
        return kernel_times(trace_dir, names)


def _depthwise_rows(op_name: str, op: bench.Op, dtype, pallas_ms: dict, **timing) -> list[dict]:
    """Forward and forward + backward (input and kernel) of a depthwise KxK convolution of the op's shape."""
    keys = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(keys[0], (op.batch, op.size, op.size, op.channels), dtype)
    w = jax.random.normal(keys[1], (op.kernel_size, op.kernel_size, 1, op.channels), dtype)
    g = jax.random.normal(keys[2], (op.batch, op.out_size, op.out_size, op.channels), dtype)
    rows = []
    for pass_ in bench.PASSES:
        seconds = bench.time_calls(bench.jitted_pass(bench.depthwise_conv(op), pass_), (x, w, g), **timing)
        rows.append(dict(op=op_name, dtype=jnp.dtype(dtype).name, **{"pass": pass_}, impl="depthwise_conv",
                         time_ms=seconds * 1e3, pallas_vs_depthwise=pallas_ms[pass_] / (seconds * 1e3)))
    return rows


def kernel_speed(clock: Clock, smoke: bool) -> dict:
    interpret = not on_gpu()
    timing = dict(iters=1, warmup=1, repeats=1) if smoke else dict(iters=10, warmup=2, repeats=3)
    result = {"rows": [], "depthwise_rows": [], "fused_rows": [], "bytes_model": [], "profile_errors": [], "timing": timing}
    measured = {}
    for op_name, op in ops(smoke).items():
        for dtype_name in ("float32",) if smoke else ("bfloat16", "float32"):  # bf16 first: what training runs
            dtype, what = jnp.dtype(dtype_name), f"{op_name} {dtype_name}"
            if not clock.allows(what):
                continue
            with clock.piece(what):
                op_rows = bench.run_op(op_name, op, dtype, with_static=True, interpret=interpret, **timing)
                result["rows"].extend(op_rows)
                pallas_ms = {r["pass"]: r["time_ms"] for r in op_rows if r["impl"] == "pallas"}
                result["depthwise_rows"].extend(_depthwise_rows(op_name, op, dtype, pallas_ms, **timing))
                result["fused_rows"].extend(bench.run_fused(op_name, op, dtype, with_static=True, interpret=interpret, **timing))
                for r in op_rows:
                    print(f"  {op_name:16s} {dtype_name:9s} {r['pass']:17s} {r['impl']:7s} {r['time_ms']:9.3f} ms "
                          f"{r['pct_of_copy']:5.0f}% of copy", flush=True)
                try:
                    for kernel, us in _profile_kernels(op, dtype, interpret, calls=1 if smoke else 5).items():
                        measured[kernel.removeprefix("cvolution_"), op_name, dtype_name] = us
                except Exception as e:  # noqa: BLE001 -- a profiler without CUPTI costs the per-kernel column only
                    result["profile_errors"].append(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            result["bytes_model"] = [
                dataclasses.asdict(row) | {"measured_us": measured.get((row.kernel, row.op, row.dtype))}
                for name, op_ in ops(smoke).items() for dt, size in (("float32", 4), ("bfloat16", 2))
                for row in traffic.kernel_traffic(name, op_, size, dt)
            ]
            clock.save(result)
    if result["rows"] and not measured and not result["profile_errors"]:
        result["profile_errors"].append("the profile held no device events named after the kernels (off GPU the kernels run "
                                        "interpreted, as loops of XLA ops)")
    return result


# --- 4 and 5: the entry points, as commands -------------------------------------------------


def _run(command: list[str], clock: Clock, what: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs an entry point until the section's share runs out; raises with its last words on failure."""
    print(f"  $ {' '.join(command)}", flush=True)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=max(clock.left(), 1.0), check=False,
                              env=env or clock.child_env)
    except subprocess.TimeoutExpired as e:
        raise OutOfTime(f"{what} (stopped after {e.timeout:.0f} s)") from None
    if proc.returncode:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def network(clock: Clock, smoke: bool) -> dict:
    """One `bench_train --only` process per row, so each peak memory is its own."""
    if smoke:
        # ResNet compiles in half the time of RedNet or CedNet on a CPU: the smoke run checks the command.
        flags, rows_wanted = ["--smoke", "--steps=1", "--warmup=1"], (("resnet50", "none"),)
    else:
        flags, rows_wanted = ["--batch=64", "--dtype=bfloat16", "--steps=10", "--warmup=2"], NETWORK_ROWS
    result = {"rows": [], "command": " ".join(["python -m experiments.bench_train", *flags, "--only=MODEL --impls=IMPL"]),
              "image_size": 32 if smoke else 224}
    for model, impl in rows_wanted:
        what = f"{model} ({impl})"
        if not clock.allows(what, need=0.0 if smoke else CHILD_MIN_S["network"]):
            continue
        with clock.piece(what):
            command = [sys.executable, "-m", "experiments.bench_train", *flags, f"--only={model}",
                       f"--impls={'auto' if impl == 'none' else impl}"]
            row = json.loads(_run(command, clock, what).stdout.strip().splitlines()[-1])
            result["rows"].append(row)
            peak = "n/a" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**30:.2f} GiB"
            print(f"  {row['model']:10s} {row['impl']:6s} {row['images_per_sec']:8.0f} img/s peak {peak}", flush=True)
        base = next((r for r in result["rows"] if r["model"].startswith("resnet")), None)
        for row in result["rows"]:
            row["speed_vs_conv"] = None if base is None else row["images_per_sec"] / base["images_per_sec"]
        clock.save(result)
    return result


def _number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def training(clock: Clock, smoke: bool) -> dict:
    """Trains in one process, then restores and evaluates the checkpoint in another; records what
    the training left even when the evaluation fails."""
    spec = importlib.util.find_spec("experiments")
    config = pathlib.Path(spec.submodule_search_locations[0]) / TRAINING_CONFIG
    suffix = ":smoke" if smoke else ""
    result = {"command": f"python -m experiments.imagenet --config=experiments/{TRAINING_CONFIG}{suffix} --workdir=WORKDIR",
              "local_devices": jax.local_device_count(), "losses": [], "images_per_sec": [], "checkpoints": [],
              "trained_eval": None, "eval": None, "failures": []}
    if not clock.allows("training", need=0.0 if smoke else CHILD_MIN_S["training"]):
        raise OutOfTime("training")
    # Both processes share one compilation cache (the evaluation reuses the eval step the training
    # compiled), unless the user keeps one. The workdir is a temporary one, outside --out.
    with tempfile.TemporaryDirectory(prefix="gpu-check-training-") as workdir:
        env = {"JAX_COMPILATION_CACHE_DIR": os.path.join(workdir, "xla_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               **(clock.child_env or os.environ)}
        base = [sys.executable, "-m", "experiments.imagenet", f"--config={config}{suffix}", f"--workdir={os.path.join(workdir, 'run')}"]
        run = pathlib.Path(workdir, "run")
        with clock.piece("training"):
            _run(base, clock, "training", env)
        if (run / "metrics.jsonl").exists():
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            result["losses"] = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
            result["images_per_sec"] = [(r["step"], r.get("images_per_sec")) for r in records if r["split"] == "train"]
            result["trained_eval"] = next((r for r in reversed(records) if r["split"] == "eval"), None)
        if (run / "checkpoints").is_dir():
            result["checkpoints"] = sorted(int(name) for name in os.listdir(run / "checkpoints") if name.isdigit())
        clock.save(result)
        if result["checkpoints"] and clock.allows("restoring and evaluating the checkpoint", need=0.0 if smoke else CHILD_MIN_S["evaluation"]):
            with clock.piece("restoring and evaluating the checkpoint"):
                _run([*base, "--config.mode=eval"], clock, "restoring and evaluating the checkpoint", env)
                evaluated = sorted(run.glob("eval_*.json"))
                result["eval"] = json.loads(evaluated[-1].read_text()) if evaluated else None
    problems = result["failures"]
    if not result["losses"] or not all(_number(loss) for _, loss in result["losses"]):
        problems.append(f"train losses missing or not all finite: {result['losses']}")
    if not result["checkpoints"]:
        problems.append("no checkpoint saved")
    restored, trained = result["eval"], result["trained_eval"]
    if restored is not None:
        if not _number(restored.get("loss")):
            problems.append(f"the restored checkpoint's evaluation is not finite: {restored}")
        elif restored.get("step") != result["checkpoints"][-1]:
            problems.append(f"the evaluation restored step {restored.get('step')}, not the last checkpoint, {result['checkpoints'][-1]}")
        elif trained is not None and _number(trained.get("loss")) and not math.isclose(restored["loss"], trained["loss"], rel_tol=1e-3):
            problems.append(f"the restored checkpoint evaluates to loss {restored['loss']}, the trained state to {trained['loss']} "
                            "at the same step: the restore did not give back the trained parameters")
    print(f"  losses {[(s, round(v, 3)) for s, v in result['losses'] if _number(v)]}; checkpoints {result['checkpoints']}; "
          f"eval {restored}", flush=True)
    return result


# --- the run ----------------------------------------------------------------------------------


def on_gpu() -> bool:
    """Whether jax runs on a GPU; elsewhere (a smoke run) the kernels run in Pallas's interpreter."""
    return jax.default_backend() == "gpu"


def ops(smoke: bool) -> dict[str, bench.Op]:
    """The ops the kernel sections check, the most telling first (`OP_ORDER`)."""
    return bench.SMOKE_OPS if smoke else {name: bench.REDNET50_OPS[name] for name in OP_ORDER}


def run_section(name: str, fn, report: Report, clock: Clock) -> None:
    """Runs one section, records its result, errors and skipped work, and writes the report after
    each of its pieces and at its end."""
    entry: dict = {"status": "running"}
    report.sections[name] = entry

    def save(result) -> None:
        entry["result"] = result
        report.write()

    clock.enter(name, save)
    print(f"[{name}] ({clock.left():.0f} s of budget)", flush=True)
    tic = time.monotonic()
    try:
        entry["result"] = fn(clock)
    except OutOfTime as e:
        clock.skipped.append(str(e))
    except Exception as e:  # noqa: BLE001 -- recorded; the later sections still run
        clock.errors.append(f"{type(e).__name__}: {e}")
        entry["traceback"] = traceback.format_exc()[-4000:]
    failures = (entry.get("result") or {}).get("failures") or []
    if clock.errors or failures:
        entry["status"] = "failed"
    elif clock.skipped:
        entry["status"] = "partial" if clock.done else "out of time"
    else:
        entry["status"] = "passed"
    if clock.errors:
        entry["error"] = "; ".join(clock.errors)
    if clock.skipped:
        entry["skipped"] = f"the section's share of --budget-s ran out before: {', '.join(clock.skipped)}"
    entry["seconds"] = round(time.monotonic() - tic, 1)
    paths = report.write()
    said = entry.get("error") or entry.get("skipped") or ""
    print(f"[{name}] {entry['status']} in {entry['seconds']} s{': ' + said.splitlines()[0][:300] if said else ''}; wrote {paths[1]}",
          flush=True)


def main(argv: list[str] | None = None, start: float | None = None) -> int:
    """The command; `start`: when the budget began (the command passes the time before jax loaded)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m kernels.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check_<device>_<date>_<time>.md and .json (made if missing)")
    parser.add_argument("--smoke", action="store_true", help="CPU is fine: interpret mode, tiny shapes, narrow networks (< 60 s)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run (default %(default)s)")
    args = parser.parse_args(argv)
    chosen = args.sections.split(",")
    if set(chosen) - set(SECTIONS):
        parser.error(f"--sections {args.sections!r}: choose from {', '.join(SECTIONS)}, comma-separated.")
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive; got {args.budget_s}.")
    out = pathlib.Path(args.out)
    # This process allocates as it goes: jax's default takes 75% of the card at its first use, and
    # would leave the bench_train and imagenet commands it starts too little. They get the user's setting.
    child_env = dict(os.environ)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if not on_gpu() and not args.smoke:
        parser.error(
            f"no GPU: jax's backend is {jax.default_backend()!r} (devices: {jax.devices()}). Run it on a machine with an NVIDIA "
            'GPU and jax\'s CUDA plugin (pip install -e ".[cuda13]"), or add --smoke to check the command on this CPU.'
        )
    problem = common.output_problem(out, folder=True)
    if problem:
        parser.error(f"--out {out}: {problem}.")

    device = jax.devices()[0]
    report = Report(
        out_dir=out, command=" ".join(["python -m kernels.gpu_check", *argv]), smoke=args.smoke, budget=args.budget_s,
        device=device.device_kind, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    clock = Clock(args.budget_s, chosen=tuple(chosen), child_env=child_env, start=time.monotonic() if start is None else start)
    runs = {
        "environment": lambda c: environment(c, args.smoke),
        "correctness": lambda c: correctness(c, args.smoke),
        "kernels": lambda c: kernel_speed(c, args.smoke),
        "network": lambda c: network(c, args.smoke),
        "training": lambda c: training(c, args.smoke),
    }
    for name in SECTIONS:
        if name in chosen:
            run_section(name, runs[name], report, clock)
    statuses = [s["status"] for s in report.sections.values()]
    passed = all(s in ("passed", "partial") for s in statuses)
    summary = "every section passed" if set(statuses) == {"passed"} else ", ".join(f"{n} {s['status']}" for n, s in report.sections.items())
    print(f"kernels.gpu_check: {summary}; {time.monotonic() - clock.start:.0f} s since start; results in {out / report.stem}.md")
    return 0 if passed else 1


# --- the markdown -----------------------------------------------------------------------------


def markdown(report: Report) -> str:
    lines = [
        f"# GPU check{' (smoke run: CPU, interpret mode; the numbers check the command, not the hardware)' if report.smoke else ''}",
        "",
        f"- device: {report.device}",
        f"- date: {report.date}",
        f"- command: `{report.command}` (budget {report.budget:.0f} s)",
        "",
        "| section | status | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {s['status']} | {s.get('seconds', '')} |" for name, s in report.sections.items()]
    for name, section in report.sections.items():
        lines += ["", f"## {name}", ""]
        if "error" in section:
            lines += [f"**errors**: {section['error']}", ""]
        if "skipped" in section:
            lines += [f"**not run**: {section['skipped']}", ""]
        result = section.get("result")
        if not result:
            continue
        try:
            lines += _SECTION_MARKDOWN[name](result)
        except (KeyError, TypeError, ValueError) as e:  # the JSON holds the result whatever its shape
            lines += [f"(not rendered: {type(e).__name__}: {e}; the JSON file has the result)"]
        if result.get("failures"):
            lines += ["", "Failures:", ""] + [f"- {f}" for f in result["failures"]]
    return "\n".join(lines) + "\n"


def _environment_md(result: dict) -> list[str]:
    lines = [f"- {key}: {value}" for key, value in result.items() if key != "versions"]
    return lines + ["- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items())]


def _correctness_md(result: dict) -> list[str]:
    lines = [
        "Pallas kernels against the XLA path in float32 (HIGHEST matmul precision) on the same input values, "
        "same device; error = max |pallas - xla| / max |xla|.",
        "",
        "| family | op | dtype | output | max rel error | tolerance | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['family']} | {r['op']} | {r['dtype']} | {r['output']} | {bench.fmt(r['max_rel_error'], '.2e')} | {r['tolerance']} "
                     f"| {'yes' if r['ok'] else '**no**'} |")
    return lines


def _kernels_md(result: dict) -> list[str]:
    t = result["timing"]
    lines = [
        f"Median of {t['repeats']} timings of {t['iters']} calls after {t['warmup']} warm-up. `% of copy`: the copy's time over "
        "the impl's for the same bytes (the traffic model of `kernels.bench`). `xla` is the jnp reference path, whose "
        "backward is written for CPUs; in float32 the fused kernels' dots are exact (HIGHEST) while the unfused span conv "
        "runs at XLA's default precision; the `weight_grads` bytes include reading back the partial sums, which a "
        "separate XLA reduction does (not in the kernel's measured time).",
        "",
        "| op | dtype | pass | impl | time (ms) | GB/s | % of copy | speedup vs xla |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {r['dtype']} | {r['pass']} | {r['impl']} | {r['time_ms']:.3f} | {r['gb_per_s']:.0f} "
                     f"| {r['pct_of_copy']:.0f} | {bench.fmt(r['speedup_vs_xla'], '.2f')} |")
    lines += ["", "Depthwise KxK convolution of the same shape (`lax.conv`, input and kernel gradients):", "",
              "| op | dtype | pass | time (ms) | pallas time / depthwise time |", "|---|---|---|---|---|"]
    for r in result["depthwise_rows"]:
        lines.append(f"| {r['op']} | {r['dtype']} | {r['pass']} | {r['time_ms']:.3f} | {r['pallas_vs_depthwise']:.2f} |")
    lines += ["", "Fused span conv + aggregation (`kernels.fused`) against unfused (Hd written, then `kernels.pallas`):", "",
              "| op | dtype | pass | impl | time (ms) | temp memory (MiB) | speedup vs unfused |", "|---|---|---|---|---|---|---|"]
    for r in result["fused_rows"]:
        temp = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['op']} | {r['dtype']} | {r['pass']} | {r['impl']} | {r['time_ms']:.3f} | {temp} | {r['speedup_vs_unfused']:.2f} |")
    lines += ["", "Each kernel's time (its median device time in a profile of the Pallas programs) in the bytes model's "
              "\"measured\" column (`kernels.traffic`):", ""]
    model = [traffic.Traffic(**{k: v for k, v in r.items() if k != "measured_us"}) for r in result["bytes_model"]]
    lines += traffic.table(model, {(r["kernel"], r["op"], r["dtype"]): r["measured_us"] for r in result["bytes_model"] if r["measured_us"]})
    if result["profile_errors"]:
        lines += ["", "Per-kernel times not measured:", ""] + [f"- {e}" for e in result["profile_errors"]]
    return lines


def _network_md(result: dict) -> list[str]:
    lines = [f"`{result['command']}`, one process per row; {result['image_size']}x{result['image_size']} synthetic images.", "",
             "| model | aggregation | params | step (ms) | images/s | x resnet50 | peak memory (GiB) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
        lines.append(f"| {r['model']} | {r['impl']} | {r['params']:,} | {r['step_ms']:.1f} | {r['images_per_sec']:.0f} "
                     f"| {bench.fmt(r['speed_vs_conv'], '.2f')} | {peak} |")
    return lines


def _training_md(result: dict) -> list[str]:
    return [
        f"- command: `{result['command']}` over {result['local_devices']} local device(s), then the same with "
        "`--config.mode=eval` in a new process",
        "- train loss by step: " + ", ".join(f"{s}: {bench.fmt(loss, '.4f')}" for s, loss in result["losses"]),
        "- images/s by step: " + ", ".join(f"{s}: {bench.fmt(v, '.0f')}" for s, v in result["images_per_sec"]),
        f"- checkpoints saved: {result['checkpoints']}",
        f"- the training process's own evaluation at its last step: {result['trained_eval']}",
        f"- evaluation of the restored checkpoint in a new process (must match it): {result['eval']}",
    ]


_SECTION_MARKDOWN = {"environment": _environment_md, "correctness": _correctness_md, "kernels": _kernels_md,
                     "network": _network_md, "training": _training_md}


if __name__ == "__main__":
    sys.exit(main(start=STARTED))
