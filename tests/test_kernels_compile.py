"""`kernels.compile`: its readers of ptxas and XLA output, the occupancy rules, and one real compile.

The parsers and the occupancy arithmetic run everywhere, against text captured from ptxas 12.9
and XLA (jax 0.10.2 and 0.12.1) and against occupancies worked out by hand from the CUDA occupancy
calculator's rules. The compile itself needs `pip install -e ".[compile-cuda13]"` (or `compile-cuda12`) and skips without it.
"""

import dataclasses
import pathlib
import subprocess
import sys

import pytest

from kernels import bench, common, fused, pallas
from kernels import compile as kcompile

ROOT = pathlib.Path(__file__).resolve().parents[1]

# `ptxas -v --gpu-name sm_90a` on two kernels: one clean, one with a stack frame and spills.
PTXAS_OUTPUT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'cvolution_forward' for 'sm_90a'
ptxas info    : Function properties for cvolution_forward
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 88 registers, used 1 barriers
ptxas info    : Compile time = 146.316 ms
ptxas info    : Compiling entry function 'cvolution_weight_grads' for 'sm_90a'
ptxas info    : Function properties for cvolution_weight_grads
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 48 registers, used 1 barriers, 8 bytes cumulative stack size
ptxas info    : Compile time = 76.859 ms
"""

# XLA's thunk sequence of a fused forward + backward program: Pallas kernels and XLA's own.
THUNK_SEQUENCE = """\
001: kCustomKernel [source       | sink        ] cvolution_fused_dv grid: [3584, 2, 1] threads: [128, 1, 1]  shared_memory: 12288 bytes
002: kCustomKernel [source       | next=003 (1)] cvolution_fused_weight_grads grid: [256, 2, 1] threads: [128, 1, 1]  shared_memory: 10240 bytes
003: kCustomKernel [prev=002 (1) | next=007 (4)] input_reduce_fusion_2 grid: [49, 1, 1] threads: [1024, 1, 1]  shared_memory: 0 bytes
006: kCustomKernel [source | sink] cvolution_forward grid: [28, 1, 1] threads: [64, 1, 1]  shared_memory: 256 bytes
"""


def test_parse_ptxas_reads_registers_spills_and_stack_per_kernel():
    infos = kcompile.parse_ptxas(PTXAS_OUTPUT)
    assert infos == {
        "cvolution_forward": kcompile.PtxasInfo(registers=88, spill_stores=0, spill_loads=0, stack=0),
        "cvolution_weight_grads": kcompile.PtxasInfo(registers=48, spill_stores=4, spill_loads=12, stack=8),
    }


def test_parse_ptxas_without_a_properties_line_means_no_spills():
    text = "ptxas info    : Compiling entry function 'k' for 'sm_90a'\nptxas info    : Used 30 registers\n"
    assert kcompile.parse_ptxas(text) == {"k": kcompile.PtxasInfo(30, 0, 0, 0)}
    assert kcompile.parse_ptxas("ptxas info    : 0 bytes gmem\n") == {}


def test_parse_thunks_reads_every_launch():
    launches = kcompile.parse_thunks(THUNK_SEQUENCE)
    assert launches["cvolution_fused_dv"] == kcompile.Launch((3584, 2, 1), 128, 12288)
    assert launches["cvolution_fused_weight_grads"] == kcompile.Launch((256, 2, 1), 128, 10240)
    assert launches["input_reduce_fusion_2"] == kcompile.Launch((49, 1, 1), 1024, 0)
    assert launches["cvolution_forward"] == kcompile.Launch((28, 1, 1), 64, 256)
    assert len(launches) == 4


# The same dump from jax 0.12.1 (stage4_c512, bf16, unfused): one `key=value` line per launch.
THUNK_SEQUENCE_0121 = """\
001: kCustomKernel [source       | next=002 (1)] kernel=cvolution_weight_grads, profile_annotation=pallas_call.7, launch dimensions=blocks: {64, 1, 8}, threads/block: {64, 1, 1}, cluster_dim=nullopt, shmem_bytes=256, use_pdl=true
002: kCustomKernel [prev=001 (1) | sink        ] kernel=input_reduce_fusion, profile_annotation=input_reduce_fusion, launch dimensions=blocks: {392, 1, 1}, threads/block: {1024, 1, 1}, cluster_dim=nullopt, shmem_bytes=0, use_pdl=true
003: kCustomKernel [source       | sink        ] kernel=cvolution_forward, profile_annotation=pallas_call.5, launch dimensions=blocks: {448, 1, 2}, threads/block: {128, 1, 1}, cluster_dim=nullopt, shmem_bytes=512, use_pdl=true
004: kCustomKernel [source       | sink        ] kernel=cvolution_dx, profile_annotation=pallas_call.6, launch dimensions=blocks: {448, 1, 4}, threads/block: {256, 1, 1}, cluster_dim=nullopt, shmem_bytes=0, use_pdl=true
"""


def test_parse_thunks_reads_jax_0121s_launch_format():
    launches = kcompile.parse_thunks(THUNK_SEQUENCE_0121)
    assert launches == {
        "cvolution_weight_grads": kcompile.Launch((64, 1, 8), 64, 256),
        "input_reduce_fusion": kcompile.Launch((392, 1, 1), 1024, 0),
        "cvolution_forward": kcompile.Launch((448, 1, 2), 128, 512),
        "cvolution_dx": kcompile.Launch((448, 1, 4), 256, 0),
    }
    # Both formats in one file (a dump from several programs) are read alike.
    assert kcompile.parse_thunks(THUNK_SEQUENCE + THUNK_SEQUENCE_0121).keys() == launches.keys() | kcompile.parse_thunks(THUNK_SEQUENCE).keys()


def test_target_reads_the_shipped_h100_spec():
    """Compute capability 9.0, not the cuDNN version's `minor: 9` further down the file."""
    target = kcompile.Target.from_text(kcompile.DEFAULT_TARGET.read_text())
    assert (target.major, target.minor, target.sm) == (9, 0, "90")
    assert (target.cores, target.registers_per_sm, target.threads_per_sm) == (132, 65536, 2048)
    assert (target.shared_memory_per_sm, target.shared_memory_per_block) == (233472, 232448)
    assert target.name == "NVIDIA H100 80GB HBM3"


def test_target_without_compute_capability_says_what_it_needs():
    with pytest.raises(ValueError, match="cuda_compute_capability"):
        kcompile.Target.from_text("gpu_device_info { core_count: 1 }")


H100 = kcompile.Target.from_text(kcompile.DEFAULT_TARGET.read_text())


@pytest.mark.parametrize(
    "registers,threads,smem,blocks,limiter",
    [
        # 88 regs: 2816 per warp (11 units), 5 warps per 16384-register partition, 20 per SM,
        # 10 blocks of 2 warps; shared memory alone would allow 233472 // 1280 = 182.
        (88, 64, 256, 10, "registers"),
        # 128 regs at 4 warps: 4096 per warp, 4 per partition, 16 per SM: 4 blocks (25%).
        (128, 128, 0, 4, "registers"),
        # 255 regs: 8192 per warp (rounded up), 2 per partition: one 8-warp block (12.5%).
        (255, 256, 0, 1, "registers"),
        # 32 regs at 2 warps: registers allow 64 warps, warps 32 blocks, the block limit 32.
        (32, 64, 0, 32, "blocks"),
        # 100 KB of shared memory: (102400 + 1024 reserved) twice in 228 KB.
        (32, 128, 102400, 2, "shared memory"),
        # 255 regs at 1024 threads: 262144 registers, over the 65536 a block may have.
        (255, 1024, 0, 0, "registers"),
    ],
)
def test_occupancy_follows_the_calculators_rules(registers, threads, smem, blocks, limiter):
    assert H100.blocks_per_sm_for(registers, threads, smem) == (blocks, limiter)
    assert H100.occupancy(registers, threads, smem) == pytest.approx(blocks * threads / 32 / 64)


def _report(kernel, family, registers, stores=0, loads=0, stack=0):
    return kcompile.KernelReport(
        kernel, "stage4_c512", family, "cvolution", "float32", kcompile.Launch((1, 1, 1), 128, 0),
        kcompile.PtxasInfo(registers, stores, loads, stack), 4, "registers", 0.25,
    )


def test_problems_are_spills_anywhere_and_registers_over_budget_unfused():
    reports = [
        _report("cvolution_forward", "unfused", 128),  # at the budget: fine
        _report("cvolution_dx", "unfused", 129),
        _report("cvolution_fused_forward", "fused", 200),  # fused kernels: only spills count
        _report("cvolution_fused_dx", "fused", 32, stores=24256, loads=33432, stack=9960),
    ]
    found = kcompile.problems(reports)
    assert len(found) == 2
    assert "cvolution_dx" in found[0] and "129 registers > 128" in found[0]
    assert "cvolution_fused_dx" in found[1] and "24256 B spill stores" in found[1]


def test_without_the_plugin_the_command_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(kcompile, "PLUGINS", ("no_such_cuda_plugin",))
    monkeypatch.setattr(kcompile, "find_ptxas", lambda: None)
    reason = kcompile.missing_tools()
    assert "jax-cuda13-plugin" in reason and "ptxas" in reason and 'pip install -e ".[compile-cuda13]"' in reason
    assert kcompile.main(["--ci"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[compile-cuda13]"' in err


@pytest.mark.parametrize("relative", ["cu13/bin/ptxas", "cuda_nvcc/bin/ptxas"], ids=["cuda13-wheel", "cuda12-wheel"])
def test_find_ptxas_in_either_cuda_wheel(tmp_path, monkeypatch, relative):
    """nvidia-cuda-nvcc (CUDA 13) installs nvidia/cu13/bin/ptxas; nvidia-cuda-nvcc-cu12 nvidia/cuda_nvcc/bin/ptxas."""
    ptxas = tmp_path / "nvidia" / relative
    ptxas.parent.mkdir(parents=True)
    ptxas.write_text("#!/bin/sh\n")
    (tmp_path / "nvidia" / "cublas" / "bin").mkdir(parents=True)  # another wheel's folder, no ptxas
    monkeypatch.setattr(kcompile, "nvidia_roots", lambda: [str(tmp_path / "nvidia")])
    assert kcompile.find_ptxas() == str(ptxas)


def test_find_ptxas_falls_back_to_path(tmp_path, monkeypatch):
    (tmp_path / "ptxas").write_text("#!/bin/sh\n")
    (tmp_path / "ptxas").chmod(0o755)
    monkeypatch.setattr(kcompile, "nvidia_roots", lambda: [])
    monkeypatch.setenv("PATH", str(tmp_path))
    assert kcompile.find_ptxas() == str(tmp_path / "ptxas")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert kcompile.find_ptxas() is None


def test_ptxas_spy_copies_the_ptx_it_is_given_and_runs_the_real_ptxas(tmp_path):
    """XLA runs `<xla_gpu_cuda_data_dir>/bin/ptxas IN.ptx -o OUT -arch=sm_90a ...`; the spy keeps IN."""
    cuda = tmp_path / "cuda_nvcc"
    (cuda / "bin").mkdir(parents=True)
    (cuda / "nvvm" / "libdevice").mkdir(parents=True)
    real = cuda / "bin" / "ptxas"
    # Stands in for ptxas: records its arguments, writes the output file, exits 3.
    real.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ntouch "$3"\nexit 3\n')
    real.chmod(0o755)
    ptx = tmp_path / "in.ptx"
    ptx.write_text(".version 8.4\n.target sm_90a\n.visible .entry cvolution_dx(\n)\n{\n\tret;\n}\n")
    options = tmp_path / "options.txt"  # a file argument that is not PTX
    options.write_text("-O3\n")

    spy = kcompile.ptxas_spy(str(real), tmp_path / "spy")
    assert (spy / "nvvm").resolve() == (cuda / "nvvm").resolve()  # libdevice still found
    out = tmp_path / "out.cubin"
    proc = subprocess.run([str(spy / "bin" / "ptxas"), str(ptx), "-o", str(out), "-arch=sm_90a", str(options)], check=False)

    assert proc.returncode == 3 and out.exists()
    assert (tmp_path / "args").read_text().split() == [str(ptx), "-o", str(out), "-arch=sm_90a", str(options)]
    copies = list((tmp_path / "spy" / "ptx").iterdir())
    assert [c.read_text() for c in copies] == [ptx.read_text()]
    assert copies[0].suffix == ".ptx"


def test_spec_ships_with_the_package():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'kernels = ["specs/*.txtpb"]' in pyproject
    assert kcompile.DEFAULT_TARGET.is_file()


@pytest.mark.skipif(kcompile.missing_tools() is not None, reason=str(kcompile.missing_tools()))
def test_compiles_one_op_for_h100_with_no_spills(tmp_path):
    """The real thing, in a fresh process (the CUDA plugin must register before jax starts)."""
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.compile", "--ops", "stage3_c256", "--families", "unfused", "--variants", "cvolution",
         "--dtypes", "bfloat16", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| cvolution_")]
    rows = [row for row in rows if len(row) == 14]  # "Every kernel", not the per-kernel summary
    assert sorted(row[0][2:] for row in rows) == ["cvolution_dx", "cvolution_forward", "cvolution_weight_grads"]
    for row in rows:
        assert row[1:4] == ["stage3_c256", "cvolution", "bfloat16"]
        registers, stores, loads = int(row[6]), int(row[7]), int(row[8])
        assert 0 < registers <= kcompile.REGISTER_BUDGET and stores == loads == 0


def _tiles_now(kernel, op, variant):
    """(warps, grid) the kernels' own default tiles give `kernel` at `op`: what a fresh compile reports."""
    b, h, c, k, ho = op.batch, op.size, op.channels, op.kernel_size, op.out_size
    rows = op.batch * op.out_size
    cdiv = lambda a, d: -(-a // d)
    geo = common.Geometry(b, h, h, c, k, op.stride, 1, False)
    unfused = pallas.default_tiles(geo, with_static=variant == "cvolution")
    fused_tiles = fused.default_tiles(fused.FusedGeometry(*dataclasses.astuple(geo), reduced=c // 4))
    grids = {
        "cvolution_forward": (unfused.forward, (rows, ho, c)),
        "cvolution_dx": (unfused.dx, (b * h, h, c)),
        "cvolution_weight_grads": (unfused.weight_grads, (rows, ho, c)),
        "cvolution_fused_forward": (fused_tiles.forward, (rows, ho, c)),
        "cvolution_fused_dx": (fused_tiles.dx, (b * h, h, c)),
        "cvolution_fused_dv": (fused_tiles.dv, (rows, ho, None)),  # all channels per program
        "cvolution_fused_weight_grads": (fused_tiles.weight_grads, (rows, ho, c)),
    }
    t, (n, width, channels) = grids[kernel]
    row_blocks = cdiv(n, t.rows) if kernel.endswith("weight_grads") else n
    return t.num_warps, (row_blocks, cdiv(width, t.width), 1 if channels is None else cdiv(channels, t.channels))


def test_checked_in_table_matches_the_current_tiles():
    """benchmarks/compile_sm90.md was regenerated after the last tile change: its warps and grids
    are what the heuristics give now, for every kernel, op, variant and dtype."""
    table = ROOT / "benchmarks" / "compile_sm90.md"
    rows = [line.split(" | ") for line in table.read_text().splitlines() if line.startswith("| cvolution_")]
    rows = [row for row in rows if len(row) == 14]  # "Every kernel", not the per-kernel summary
    assert len(rows) == 8 * 2 * 2 * 7, len(rows)  # ops x variants x dtypes x kernels
    stale = []
    for row in rows:
        kernel, op_name, variant, warps, grid = row[0][2:], row[1], row[2], int(row[4]), tuple(int(g) for g in row[5].split("x"))
        expected = _tiles_now(kernel, bench.REDNET50_OPS[op_name], variant)
        if (warps, grid) != expected:
            stale.append(f"{kernel} {op_name} {variant}: table {warps} warps, grid {grid}; tiles now {expected}")
        assert int(row[7]) == int(row[8]) == 0, f"{kernel} {op_name} {variant} spills in the checked-in table"
    assert not stale, "benchmarks/compile_sm90.md is stale; rerun python -m kernels.compile:\n" + "\n".join(stale)
