"""`kernels.traffic`: the bytes model's counts against brute force and hand arithmetic."""

import itertools

import pytest

from kernels import bench, traffic


def brute_force_pairs(op, dilation=1):
    """Valid (output pixel, tap) pairs of one image, by walking every pixel and tap."""
    k, s, h = op.kernel_size, op.stride, op.size
    p = dilation * (k - 1) // 2
    count = 0
    for i, j, kh, kw in itertools.product(range(op.out_size), range(op.out_size), range(k), range(k)):
        r, q = s * i + kh * dilation - p, s * j + kw * dilation - p
        count += 0 <= r < h and 0 <= q < h
    return count


@pytest.mark.parametrize("name", ["stem_c32_k3", "stage2_c128_s2", "stage3_c256", "stage4_c512_s2", "stage4_c512"])
def test_valid_tap_pairs_match_brute_force(name):
    op = bench.REDNET50_OPS[name]
    assert traffic.valid_tap_pairs(op) == op.batch * brute_force_pairs(op)


def test_valid_tap_pairs_on_a_7x7_image_by_hand():
    # H = K = 7, pad 3: rows 0..6 see 4, 5, 6, 7, 6, 5, 4 taps inside the image: 37 per axis.
    assert traffic.valid_tap_pairs(bench.Op(1, 7, 16, 7, 1)) == 37 * 37
    # Dilation 2 (pad 6): row i sees the kh with 0 <= i + 2*kh - 6 < 7: 4, 3, 4, 3, 4, 3, 4.
    assert traffic.valid_tap_pairs(bench.Op(1, 7, 16, 7, 1), dilation=2) == 25 * 25


def test_unfused_forward_bytes_by_hand():
    op = bench.REDNET50_OPS["stage4_c512"]  # x [64, 7, 7, 512], Hd [64, 7, 7, 32, 49], S [49, 512]
    rows = {r.kernel: r for r in traffic.kernel_traffic("stage4_c512", op, 4, "float32")}
    x = 64 * 7 * 7 * 512
    hd = 64 * 7 * 7 * 32 * 49
    assert rows["forward"].one_pass == 4 * (x + hd + 49 * 512 + x)
    # Without reuse: each of the 64 * 37**2 valid taps reads a 512-channel row of x (2 KB) and one
    # 32-byte sector per group of Hd (32 groups); S and out once.
    pairs = 64 * 37 * 37
    assert rows["forward"].taps_from_hbm == pairs * 512 * 4 + pairs * 32 * 32 + 4 * (49 * 512 + x)
    assert rows["forward"].flops == 0 and rows["fused_forward"].flops > 0


def test_fused_forward_moves_less_than_unfused_in_one_pass():
    """The point of fusing: Hd (49/16 |x|) never travels; v (|x|/4) does instead."""
    for name, op in bench.REDNET50_OPS.items():
        rows = {r.kernel: r for r in traffic.kernel_traffic(name, op, 2, "bfloat16")}
        assert rows["fused_forward"].one_pass < rows["forward"].one_pass, name


def test_markdown_leaves_the_measured_column_empty(tmp_path):
    path = traffic.main(["--out", str(tmp_path / "model.md")])
    table = [line for line in path.read_text().splitlines() if line.startswith("| ") and "kernel" not in line]
    assert len(table) == 8 * 2 * 7  # ops x dtypes x kernels
    assert all(line.endswith("|  |") for line in table)


def test_table_fills_the_measured_column_where_a_time_is_given():
    rows = traffic.kernel_traffic("stage4_c512", bench.REDNET50_OPS["stage4_c512"], 2, "bfloat16")
    lines = traffic.table(rows, {("forward", "stage4_c512", "bfloat16"): 12.345, ("dx", "stage4_c512", "float32"): 9.0})
    cells = {line.split(" | ")[0][2:]: line.rsplit("|", 2)[1].strip() for line in lines[2:]}
    assert cells["forward"] == "12.3"  # its kernel, op and dtype
    assert cells["dx"] == ""  # a float32 time does not fill the bfloat16 row
    assert len(lines) == 2 + len(rows)
