"""Compiles every Pallas kernel for a GPU this machine does not have, and reads its registers.

    pip install -e ".[compile-cuda13]" # jax's CUDA plugin at jax's version + ptxas (~1.2 GB, no GPU needed)
    python -m kernels.compile          # every kernel at every kernels.bench shape, fp32 and bf16
    python -m kernels.compile --ci     # three shapes, every kernel and dtype; exit 1 on a compile error or a spill

XLA compiles the whole jitted forward + backward program, Triton kernels included, for a
compile-only CUDA device described by a `GpuTargetConfigProto` (`kernels/specs/h100_sxm.txtpb`,
copied from openxla/xla; `--target-config` takes any other). With `xla_dump_to` XLA leaves a
thunk sequence (grid, threads, shared memory per launch; read in jax 0.10's and 0.12.1's
formats), and ptxas, which XLA runs on each
kernel's PTX, keeps a copy of that PTX (`ptxas_spy`); `ptxas -v` on it prints registers, spill
stores/loads and stack per kernel. From these and the target's limits the theoretical occupancy
follows (the CUDA occupancy calculator's rules). The default run writes
`benchmarks/compile_sm<cc>.md`.

A kernel that spills keeps part of its accumulator in local memory (L1, then L2/HBM): every
tap's `acc +=` becomes a load and a store, and the kernel runs many times slower than the
bytes it must move. The check fails on any spill byte or stack frame, and on more than
`REGISTER_BUDGET` registers in an unfused kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import math
import os
import pathlib
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

# The CUDA plugin checks the driver's CUDA version when it registers; with no driver it fails
# (`cuInit(0) failed: ... 303`) unless told to skip. Must be set before jax loads its plugins.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels import bench, common, fused, pallas, reference  # noqa: E402

SPECS = pathlib.Path(__file__).resolve().parent / "specs"
DEFAULT_TARGET = SPECS / "h100_sxm.txtpb"
INSTALL_HINT = (
    'pip install -e ".[compile-cuda13]" (jax\'s CUDA 13 plugin at jax\'s version and ptxas; no GPU needed; '
    '".[compile-cuda12]" for CUDA 12 on jax <= 0.12.0.1)'
)
PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")  # either compiles for CUDA
# Where the CUDA wheels put ptxas, under the `nvidia` namespace package: nvidia-cuda-nvcc-cu12
# in `cuda_nvcc/bin`, CUDA 13's nvidia-cuda-nvcc in `cu13/bin`.
PTXAS_IN_WHEELS = ("cu13/bin/ptxas", "cuda_nvcc/bin/ptxas")
# Per thread, unfused kernels: at 128 an SM keeps 16 of its 64 warps resident (25% occupancy)
# on sm_80 to sm_100, enough to keep loads in flight; above it 12 or fewer.
REGISTER_BUDGET = 128
# Kernels each program launches; a missing one means the program compiled something else.
FAMILIES = {
    "unfused": ("cvolution_forward", "cvolution_dx", "cvolution_weight_grads"),
    "fused": ("cvolution_fused_forward", "cvolution_fused_dx", "cvolution_fused_dv", "cvolution_fused_weight_grads"),
}
# Shapes for CI, every kernel, variant and dtype at each: where the full table (2026-12-01)
# had the most registers (unfused dx and fused dW2 at stride 2, C=128 and C=256) and the widest
# contraction (C=512, R=128: the 8-warp dv and dW2 tiles). About a minute on 2 cores.
CI_OPS = ("stage2_c128_s2", "stage3_c256_s2", "stage4_c512")
VARIANTS = ("cvolution", "involution")


class MissingTools(RuntimeError):
    """The CUDA plugin or ptxas is not installed."""


# --- what ptxas and XLA's dumps say ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PtxasInfo:
    """Per-thread resources ptxas reports for one kernel."""

    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of stack frame


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch of XLA's thunk sequence."""

    grid: tuple[int, int, int]
    threads: int  # per block
    shared_memory: int  # bytes per block


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
# jax 0.10 to 0.12.0.1: `kCustomKernel [..] NAME grid: [X, Y, Z] threads: [X, Y, Z]  shared_memory: N bytes`.
_THUNK = re.compile(
    r"kCustomKernel\b.*?\]\s+(\S+)\s+grid: \[(\d+), (\d+), (\d+)\]\s+threads: \[(\d+), (\d+), (\d+)\]\s+shared_memory: (\d+) bytes"
)
# jax 0.12.1: `kernel=NAME, ..., launch dimensions=blocks: {X, Y, Z}, threads/block: {X, Y, Z}, ..., shmem_bytes=N`.
_THUNK_0121 = re.compile(
    r"\bkernel=([^,\s]+),.*?launch dimensions=blocks: \{(\d+), (\d+), (\d+)\}, threads/block: \{(\d+), (\d+), (\d+)\}.*?shmem_bytes=(\d+)"
)


def parse_ptxas(text: str) -> dict[str, PtxasInfo]:
    """`ptxas -v` output -> {kernel name: its registers and spills}.

    ptxas prints, per entry function, a "Compiling entry function" line, then the stack/spill
    line, then "Used N registers" (stack and spills omitted or zero when there are none).
    """
    infos, name, frame = {}, None, (0, 0, 0)
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            name, frame = m.group(1), (0, 0, 0)
        elif name and (m := _FRAME.search(line)):
            frame = tuple(int(g) for g in m.groups())
        elif name and (m := _REGS.search(line)):
            infos[name] = PtxasInfo(int(m.group(1)), frame[1], frame[2], frame[0])
            name = None
    return infos


def parse_thunks(text: str) -> dict[str, Launch]:
    """XLA's `*thunk_sequence.txt` -> {kernel name: its launch}, in either format (see `_THUNK`)."""
    launches = {}
    for m in (*_THUNK.finditer(text), *_THUNK_0121.finditer(text)):
        name, *dims = m.groups()
        grid, threads = tuple(int(d) for d in dims[:3]), math.prod(int(d) for d in dims[3:6])
        launches[name] = Launch(grid, threads, int(dims[6]))
    return launches


# --- the target GPU ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """The limits of one GPU that bound occupancy, read from its `GpuTargetConfigProto` text."""

    name: str
    major: int
    minor: int
    cores: int  # SMs
    registers_per_sm: int
    registers_per_block: int
    threads_per_sm: int
    shared_memory_per_sm: int  # bytes
    shared_memory_per_block: int  # bytes, opt-in maximum

    # Not in the proto; the same on sm_80 to sm_100 (CUDA occupancy calculator).
    blocks_per_sm = 32
    register_unit = 256  # registers are allocated per warp in units of 256
    sub_partitions = 4  # each holds a quarter of the register file; a warp lives in one
    shared_memory_unit = 128
    shared_memory_reserved = 1024  # per block, taken by the system on sm_80+

    @classmethod
    def from_text(cls, text: str) -> Target:
        def field(key: str, default=None):
            m = re.search(rf"^\s*{key}:\s*(\S+)", text, flags=re.M)
            if m is None:
                if default is None:
                    raise ValueError(f"target config has no `{key}` field; expected an XLA GpuTargetConfigProto in text form")
                return default
            return m.group(1).strip('"')

        name = re.search(r'^\s*name:\s*"([^"]*)"', text, flags=re.M)
        capability = re.search(r"cuda_compute_capability\s*\{([^}]*)\}", text)
        if capability is None:
            raise ValueError("target config has no `cuda_compute_capability`; expected an XLA GpuTargetConfigProto for a CUDA GPU")
        major, minor = (re.search(rf"{key}:\s*(\d+)", capability.group(1)) for key in ("major", "minor"))
        return cls(
            name=name.group(1) if name else "unnamed GPU",
            major=int(major.group(1)) if major else 0,
            minor=int(minor.group(1)) if minor else 0,
            cores=int(field("core_count")),
            registers_per_sm=int(field("registers_per_core_limit")),
            registers_per_block=int(field("registers_per_block_limit")),
            threads_per_sm=int(field("threads_per_core_limit")),
            shared_memory_per_sm=int(field("shared_memory_per_core")),
            shared_memory_per_block=int(field("shared_memory_per_block_optin")),
        )

    @property
    def sm(self) -> str:
        return f"{self.major}{self.minor}"

    def blocks_per_sm_for(self, registers: int, threads: int, shared_memory: int) -> tuple[int, str]:
        """Resident blocks per SM for a kernel, and which limit binds (`cudaOccupancyMaxActiveBlocksPerMultiprocessor`)."""
        warps = -(-threads // 32)
        per_warp = -(-registers * 32 // self.register_unit) * self.register_unit
        if per_warp * warps > self.registers_per_block:
            by_registers = 0
        else:
            warps_per_partition = self.registers_per_sm // self.sub_partitions // per_warp
            by_registers = warps_per_partition * self.sub_partitions // warps
        smem = -(-shared_memory // self.shared_memory_unit) * self.shared_memory_unit + self.shared_memory_reserved
        limits = {
            "blocks": self.blocks_per_sm,
            "warps": self.threads_per_sm // 32 // warps,
            "registers": by_registers,
            "shared memory": self.shared_memory_per_sm // smem if shared_memory <= self.shared_memory_per_block else 0,
        }
        binding = min(limits, key=lambda k: limits[k])
        return limits[binding], binding

    def occupancy(self, registers: int, threads: int, shared_memory: int) -> float:
        """Resident warps over the SM's maximum warps."""
        blocks, _ = self.blocks_per_sm_for(registers, threads, shared_memory)
        return blocks * -(-threads // 32) / (self.threads_per_sm // 32)


# --- the tools --------------------------------------------------------------------------------


def nvidia_roots() -> list[str]:
    """The folders of the `nvidia` namespace package the CUDA wheels install into (none without them)."""
    spec = importlib.util.find_spec("nvidia")
    return list(spec.submodule_search_locations or []) if spec else []


def find_ptxas() -> str | None:
    """ptxas from the CUDA 13 or CUDA 12 nvcc wheel (the `compile-cuda*` extras), else from PATH."""
    for root in nvidia_roots():
        for relative in PTXAS_IN_WHEELS:
            candidate = pathlib.Path(root) / relative
            if candidate.is_file():
                return str(candidate)
    return shutil.which("ptxas")


def missing_tools() -> str | None:
    """What is missing to compile for CUDA here, with the command that installs it; None if nothing."""
    missing = []
    if not any(importlib.util.find_spec(m) for m in PLUGINS):
        missing.append("jax's CUDA plugin (jax-cuda13-plugin or jax-cuda12-plugin)")
    if find_ptxas() is None:
        missing.append("ptxas (nvidia-cuda-nvcc or nvidia-cuda-nvcc-cu12)")
    if not missing:
        return None
    return f"{' and '.join(missing)} not installed; install with: {INSTALL_HINT}"


def compile_device(target_text: str):
    """A compile-only CUDA device for the GPU `target_text` describes."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=target_text)
    except Exception as e:  # noqa: BLE001 -- jax raises several types here; all mean the same to the user
        reason = missing_tools()
        if reason:
            raise MissingTools(reason) from e
        raise MissingTools(
            f"jax could not make a CUDA device to compile for ({str(e).splitlines()[0]}). If jax was imported "
            f"before kernels.compile, set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 first; if the target config does not "
            f"parse, drop the fields this jaxlib ({jax.__version__}) does not know."
        ) from e
    return topology.devices[0]


def ptxas_spy(ptxas: str, root: pathlib.Path) -> pathlib.Path:
    """A CUDA directory for XLA's `xla_gpu_cuda_data_dir` whose `bin/ptxas` copies each PTX it is given.

    The copies land in `root/ptx/`. jax 0.10 also leaves the PTX in its `xla_dump_to` dump, but
    jax 0.12's deviceless compile dumps none; every version runs the ptxas binary on it, so this
    reads the PTX the same way on both. Everything but `bin/` (libdevice under `nvvm/`) links to
    the real CUDA directory `ptxas` lives in.
    """
    real_ptxas = pathlib.Path(ptxas).resolve()
    cuda, spy, captured = real_ptxas.parent.parent, root / "cuda", root / "ptx"
    (spy / "bin").mkdir(parents=True)
    captured.mkdir()
    for entry in cuda.iterdir():
        if entry.name != "bin":
            (spy / entry.name).symlink_to(entry)
    # Any file argument that holds an entry function is PTX (the -o output does not exist yet).
    script = f"""#!/bin/sh
for arg in "$@"; do
  case "$arg" in -*) ;; *) if [ -f "$arg" ] && grep -q '\\.entry' "$arg"; then cp "$arg" {shlex.quote(str(captured))}/$$.ptx; fi ;; esac
done
exec {shlex.quote(str(real_ptxas))} "$@"
"""
    (spy / "bin" / "ptxas").write_text(script)
    (spy / "bin" / "ptxas").chmod(0o755)
    return spy


def run_ptxas(ptxas: str, ptx_files: list[pathlib.Path]) -> dict[str, PtxasInfo]:
    """Registers and spills of every entry function in `ptx_files`, for the target each file names."""
    infos = {}
    for path in ptx_files:
        text = path.read_text()
        target = re.search(r"^\s*\.target\s+(sm_\w+)", text, flags=re.M)
        if ".entry" not in text or target is None:
            continue  # XLA also dumps empty modules
        proc = subprocess.run(
            [ptxas, "-v", "--gpu-name", target.group(1), str(path), "-o", os.devnull],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode:
            raise RuntimeError(f"ptxas failed on {path.name}: {proc.stderr.strip()[:500]}")
        infos.update(parse_ptxas(proc.stdout + proc.stderr))
    return infos


# --- the programs -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelReport:
    """One kernel of one program: what XLA launches and what ptxas allotted."""

    kernel: str
    op: str
    family: str
    variant: str  # "cvolution" (static kernel) or "involution"
    dtype: str
    launch: Launch
    ptxas: PtxasInfo
    blocks_per_sm: int
    limiter: str
    occupancy: float

    @property
    def warps(self) -> int:
        return -(-self.launch.threads // 32)

    @property
    def spills(self) -> int:
        return self.ptxas.spill_stores + self.ptxas.spill_loads


def _program(family: str, variant: str, op: bench.Op, dtype, device):
    """(forward + backward function, its abstract arguments) of one op.

    `variant`: "cvolution" passes a static kernel `S`, "involution" none (kernels without its loads).
    """
    b, h, c, k, s = op.batch, op.size, op.channels, op.kernel_size, op.stride
    ho, groups = op.out_size, c // reference.GROUP_CHANNELS
    sharding = jax.sharding.make_single_device_sharding(device)

    def arg(*shape):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    config = dict(kernel_size=k, stride=s, dilation=1)
    static = (arg(k * k, c),) if variant == "cvolution" else ()
    if family == "unfused":
        layer = lambda x, hd, *st: pallas.aggregate(x, hd, *st or [None], **config)
        inputs = (arg(b, h, h, c), arg(b, ho, ho, groups, k * k), *static)
    else:
        reduced = c // 4
        layer = lambda x, v, w2, bias, *st: fused.fused_aggregate(x, v, w2, bias, *st or [None], **config)
        inputs = (arg(b, h, h, c), arg(b, ho, ho, reduced), arg(reduced, groups * k * k), arg(groups * k * k), *static)

    def forward_backward(*args):
        *inputs, dout = args
        out, vjp = jax.vjp(layer, *inputs)
        return out, vjp(dout)

    return forward_backward, (*inputs, arg(b, ho, ho, c))


def compile_kernels(family: str, variant: str, op_name: str, op: bench.Op, dtype, device, target: Target, ptxas: str) -> list[KernelReport]:
    """Compiles the forward + backward program of one op and reports each of its Pallas kernels.

    Raises:
      RuntimeError: when XLA (or ptxas inside it) fails, or a kernel is missing from the program.
    """
    fn, args = _program(family, variant, op, dtype, device)
    what = f"{family} {variant} {op_name} {jnp.dtype(dtype).name}"
    with tempfile.TemporaryDirectory(prefix="kernels-compile-") as work:
        dump_dir, spy_root = pathlib.Path(work) / "dump", pathlib.Path(work) / "spy"
        options = {"xla_dump_to": str(dump_dir), "xla_gpu_cuda_data_dir": str(ptxas_spy(ptxas, spy_root))}
        try:
            # The compile-only device as the default too: newer Pallas (jax 0.12) asks the
            # default device which GPU it lowers for, and would otherwise find the CPU.
            with jax.default_device(device):
                jax.jit(fn).lower(*args).compile(compiler_options=options)
        except Exception as e:  # noqa: BLE001 -- XLA's errors come as several types; report and go on
            raise RuntimeError(f"{what}: compile failed: {str(e).splitlines()[0][:500]}") from e
        launches = {}
        for path in dump_dir.glob("*thunk_sequence.txt"):
            launches.update(parse_thunks(path.read_text()))
        # The dump's PTX where ptxas was not run as a program (an XLA built with libnvptxcompiler).
        ptx = sorted((spy_root / "ptx").glob("*.ptx")) or sorted(dump_dir.glob("*.ptx"))
        infos = run_ptxas(ptxas, ptx)
    if not infos:
        raise RuntimeError(
            f"{what}: compiled, but XLA (jax {jax.__version__}) neither ran {ptxas} nor dumped PTX, so there are no "
            f"registers to read; kernels.compile reads them with jax 0.10.2, 0.12.0.1 and 0.12.1"
        )
    reports = []
    for kernel in FAMILIES[family]:
        if kernel not in launches or kernel not in infos:
            raise RuntimeError(
                f"{what}: kernel {kernel} not found in the compiled program "
                f"(launched: {sorted(launches)}; in the PTX: {sorted(infos)})"
            )
        launch, info = launches[kernel], infos[kernel]
        blocks, limiter = target.blocks_per_sm_for(info.registers, launch.threads, launch.shared_memory)
        reports.append(KernelReport(
            kernel, op_name, family, variant, jnp.dtype(dtype).name, launch, info, blocks, limiter,
            target.occupancy(info.registers, launch.threads, launch.shared_memory),
        ))
    return reports


# --- the report -------------------------------------------------------------------------------


def _versions() -> str:
    names = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "nvidia-cuda-nvcc", "jax-cuda12-plugin", "jax-cuda12-pjrt",
             "nvidia-cuda-nvcc-cu12")
    found = []
    for dist in names:
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def _ptxas_version(ptxas: str) -> str:
    proc = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    return lines[-2] if len(lines) >= 2 else "unknown"


def markdown(reports: list[KernelReport], failures: list[str], target: Target, sources: dict, seconds: float) -> str:
    """The table of `benchmarks/compile_sm<cc>.md`; `sources`: command, target file, ptxas path."""
    lines = [
        f"# Pallas kernels compiled for sm_{target.sm} ({target.name}), compile only",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- versions: Python {platform.python_version()}, {_versions()}; ptxas: {_ptxas_version(sources['ptxas'])}",
        f"- command: `{sources['command']}` ({seconds / 60:.1f} min)",
        f"- machine: {os.cpu_count()}-core CPU ({platform.machine()}), no GPU: XLA compiled each program for a "
        f"compile-only CUDA device described by `{sources['target']}`; registers and spills from `ptxas -v` on the "
        "PTX XLA dumped, grid, threads and shared memory from its thunk sequence",
        "- programs: the forward + backward pass (`jax.vjp`) of each `kernels.bench` RedNet-50 op at batch 64, "
        "unfused (`kernels.pallas`) and fused (`kernels.fused`), C-volution (static kernel `S`) and involution (none)",
        f"- occupancy: resident warps / {target.threads_per_sm // 32} per SM, from registers, threads and shared "
        f"memory by the CUDA occupancy calculator's rules ({target.registers_per_sm} registers in "
        f"{Target.sub_partitions} partitions, {Target.register_unit}-register units, {Target.blocks_per_sm} blocks, "
        f"{target.shared_memory_per_sm // 1024} KiB shared memory per SM, {Target.shared_memory_reserved} B reserved per block)",
        f"- budget: no spills anywhere; at most {REGISTER_BUDGET} registers per thread in the unfused kernels",
        "",
    ]
    if failures:
        lines += ["## Failures", ""] + [f"- {f}" for f in failures] + [""]
    lines += [
        "## Per kernel, over every op, variant and dtype",
        "",
        "| kernel | programs | registers | spill bytes (max) | occupancy |",
        "|---|---|---|---|---|",
    ]
    for kernel in dict.fromkeys(r.kernel for r in reports):
        mine = [r for r in reports if r.kernel == kernel]
        regs = [r.ptxas.registers for r in mine]
        occupancy = [100 * r.occupancy for r in mine]
        lines.append(
            f"| {kernel} | {len(mine)} | {min(regs)}-{max(regs)} | {max(r.spills for r in mine)} "
            f"| {min(occupancy):.0f}-{max(occupancy):.0f}% |"
        )
    lines += ["", "## Every kernel", "", 
        "| kernel | op | variant | dtype | warps | grid | registers | spill stores (B) | spill loads (B) | stack (B) | shared memory (B) | blocks/SM | occupancy | bound by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        grid = "x".join(str(g) for g in r.launch.grid)
        lines.append(
            f"| {r.kernel} | {r.op} | {r.variant} | {r.dtype} | {r.warps} | {grid} | {r.ptxas.registers} | {r.ptxas.spill_stores} "
            f"| {r.ptxas.spill_loads} | {r.ptxas.stack} | {r.launch.shared_memory} | {r.blocks_per_sm} "
            f"| {100 * r.occupancy:.0f}% | {r.limiter} |"
        )
    return "\n".join(lines) + "\n"


def problems(reports: list[KernelReport]) -> list[str]:
    """Kernels outside the budget: any spill; more than `REGISTER_BUDGET` registers unfused."""
    found = []
    for r in reports:
        where = f"{r.kernel} at {r.op} {r.variant} {r.dtype}"
        if r.spills or r.ptxas.stack:
            found.append(f"{where}: {r.ptxas.spill_stores} B spill stores, {r.ptxas.spill_loads} B spill loads, {r.ptxas.stack} B stack")
        if r.family == "unfused" and r.ptxas.registers > REGISTER_BUDGET:
            found.append(f"{where}: {r.ptxas.registers} registers > {REGISTER_BUDGET}")
    return found


def main(argv: list[str] | None = None) -> int:
    """Compiles, prints one line per kernel, writes the table; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m kernels.compile", description=__doc__.split("\n")[0])
    parser.add_argument("--ci", action="store_true", help=f"only {', '.join(CI_OPS)}; no table unless --out")
    parser.add_argument("--ops", default=None, help="comma-separated kernels.bench op names (default: all)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--families", default="unfused,fused", help="comma-separated: unfused, fused")
    parser.add_argument("--variants", default="cvolution,involution", help="comma-separated: cvolution (static kernel), involution")
    parser.add_argument("--target-config", default=None, help=f"an XLA GpuTargetConfigProto in text form (default: kernels/specs/{DEFAULT_TARGET.name})")
    parser.add_argument("--out", default=None, help="markdown table (default benchmarks/compile_sm<cc>.md; none with --ci)")
    args = parser.parse_args(argv)
    # A program found in a persistent compilation cache (JAX_COMPILATION_CACHE_DIR, as the test
    # suite sets) is not compiled again: no ptxas run and no dump, so nothing to report.
    jax.config.update("jax_enable_compilation_cache", False)

    ops = {name: bench.REDNET50_OPS[name] for name in (CI_OPS if args.ci else bench.REDNET50_OPS)}
    if args.ops:
        unknown = set(args.ops.split(",")) - set(bench.REDNET50_OPS)
        if unknown:
            parser.error(f"unknown ops {sorted(unknown)}; choose from {sorted(bench.REDNET50_OPS)}")
        ops = {name: bench.REDNET50_OPS[name] for name in args.ops.split(",")}
    families = args.families.split(",")
    if set(families) - set(FAMILIES):
        parser.error(f"unknown families {sorted(set(families) - set(FAMILIES))}; choose from {sorted(FAMILIES)}")
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(set(variants) - set(VARIANTS))}; choose from {list(VARIANTS)}")
    target_path = pathlib.Path(args.target_config) if args.target_config else DEFAULT_TARGET
    target_label = args.target_config or f"kernels/specs/{DEFAULT_TARGET.name}"
    if not target_path.is_file():
        parser.error(f"--target-config {target_path} does not exist; give an XLA GpuTargetConfigProto text file")
    dtypes = args.dtypes.split(",")
    if set(dtypes) - {"float32", "bfloat16"}:
        parser.error(f"unknown dtypes {sorted(set(dtypes) - {'float32', 'bfloat16'})}; the kernels take float32 and bfloat16")
    target_text = target_path.read_text()
    try:
        target = Target.from_text(target_text)
    except ValueError as e:
        parser.error(f"--target-config {target_path}: {e}")
    problem = args.out and common.output_problem(args.out, folder=False)
    if problem:
        parser.error(f"--out {args.out}: {problem}; checked before anything is compiled.")

    reason = missing_tools()
    if reason:
        print(f"kernels.compile: {reason}", file=sys.stderr)
        return 2
    try:
        device = compile_device(target_text)
    except MissingTools as e:
        print(f"kernels.compile: {e}", file=sys.stderr)
        return 2
    ptxas = find_ptxas()

    start = time.perf_counter()
    reports, failures = [], []
    programs = [(f, v, o, d) for f in families for o in ops for v in variants for d in dtypes]
    for family, variant, op_name, dtype_name in programs:
        tic = time.perf_counter()
        try:
            found = compile_kernels(family, variant, op_name, ops[op_name], jnp.dtype(dtype_name), device, target, ptxas)
        except RuntimeError as e:
            failures.append(str(e))
            print(f"FAILED {e}", flush=True)
            continue
        reports.extend(found)
        for r in found:
            print(
                f"{r.kernel:30s} {op_name:15s} {variant:10s} {dtype_name:9s} warps {r.warps} regs {r.ptxas.registers:3d} "
                f"spill {r.ptxas.spill_stores}/{r.ptxas.spill_loads} B smem {r.launch.shared_memory:6d} "
                f"occupancy {100 * r.occupancy:3.0f}% ({time.perf_counter() - tic:.0f} s program)",
                flush=True,
            )
    seconds = time.perf_counter() - start
    over = problems(reports)
    command = " ".join(["python -m kernels.compile", *argv]).strip()
    out = args.out or (None if args.ci else f"benchmarks/compile_sm{target.sm}.md")
    if out:
        path = pathlib.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        sources = dict(command=command, target=target_label, ptxas=ptxas)
        path.write_text(markdown(reports, failures, target, sources, seconds))
        print(f"wrote {path}")
    for line in failures + over:
        print(f"kernels.compile: {line}", file=sys.stderr)
    if failures or over:
        print(f"kernels.compile: {len(failures)} programs failed, {len(over)} findings over budget (no spills, "
              f"<= {REGISTER_BUDGET} registers unfused; the tiles in kernels/pallas.py and kernels/fused.py set them)", file=sys.stderr)
        return 1
    print(f"kernels.compile: {len(reports)} kernels compiled for sm_{target.sm}, no spills ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
