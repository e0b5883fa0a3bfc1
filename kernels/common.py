"""What the Pallas kernels (`kernels.pallas`, `kernels.fused`) share: geometry, tiles, masked memory.

Every kernel reads and writes flat refs through integer offset tensors (Triton pointer
arithmetic) with masks at ragged borders; offsets are int32, so every array must hold fewer
than 2**31 elements. Every tensor inside a kernel has power-of-two dimensions (Triton requires
it). Programs of the elementwise kernels own a `[TW, TC]` tile of one row: grid axis 1 walks the
columns, axis 2 the channels.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import reference

# jax 0.11 deprecated the Pallas Triton backend these kernels lower through (docs/kernels.md,
# "Pallas on Triton"). It warns at every kernel's lowering, dozens of times for one network, and Python's
# default filters hide it, as it comes from jax's own module. Shown once per process instead:
# this message only, so every other deprecation is shown as before.
TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"
warnings.filterwarnings("once", message=TRITON_DEPRECATION, category=DeprecationWarning)

GROUP_CHANNELS = reference.GROUP_CHANNELS
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
MAX_ELEMENTS = 2**31 - 1  # offsets are int32
# Programs the weight-gradient kernels aim for: about 4 resident per SM on an H100 (132 SMs) or
# an A100 (108). More programs means more partial sums to write and reduce.
WEIGHT_GRAD_PROGRAMS = 512


def output_problem(path: str | os.PathLike, *, folder: bool) -> str | None:
    """Why a tool's output cannot go to `path` (a `folder` of results, made if missing, or a file),
    in one sentence; None if it can. Every tool asks before it measures anything, so a bad path
    never throws away minutes of results. The folder is made and probed (`write_error`)."""
    path = os.path.abspath(path)
    if folder and os.path.exists(path) and not os.path.isdir(path):
        return f"{path} is a file; give a folder (it is made if missing)"
    if not folder and os.path.isdir(path):
        return f"{path} is a folder; give the path of the file to write in it"
    directory = path if folder else os.path.dirname(path)
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, so {path} cannot be made under it"
    error = write_error(directory)
    if error:
        return f"{directory} cannot be written ({error.strerror or error}); give a folder this user can write"
    return None


def write_error(directory: str | os.PathLike) -> OSError | None:
    """Makes `directory` (and its parents) and writes a probe file there, removed at once; the
    OSError if either fails. Trying is the only reliable test: permission bits say nothing to root,
    and a read-only mount or a full disk shows on writing alone."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        return error
    return None


class Tiles(NamedTuple):
    """Work of one Triton program: a `[width, channels]` tile of `rows` consecutive rows."""

    width: int  # TW, power of two
    channels: int  # TC, power of two and a multiple of 16
    rows: int  # loop trip count, any integer >= 1
    num_warps: int  # power of two
    num_stages: int
    contraction: int = 0  # kernels.fused: rows of v and W2 per dot (a power of two >= 16); 0: all of R


def warps(elements: int, per_thread: int = 16) -> int:
    """Warps for a tile of `elements` live values: about `per_thread` per thread, 2 to 8.

    16 (512 per warp) keeps the fp32 accumulator, the loaded tiles and their offsets in
    registers; at least 2 warps so tiny tiles still hide some latency.
    """
    return min(8, max(2, elements // (32 * per_thread)))


def _power_of_two(n) -> bool:
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


def check_tiles(fn: str, kernel: str, tiles, *, min_size: int = 1) -> None:
    """Raises a one-line ValueError when hand-picked `tiles` cannot run `kernel`.

    Args:
      fn: the entry point, for the message.
      kernel: which field of the tile set (`forward`, `dx`, ...).
      tiles: a `Tiles`.
      min_size: the least TW and TC (16 where the kernel runs `tl.dot`).
    """
    if not isinstance(tiles, Tiles):
        raise ValueError(f"{fn}: tiles.{kernel} is a {type(tiles).__name__}; expected kernels.common.Tiles or None (the heuristic).")
    wrong = []
    if not _power_of_two(tiles.width) or tiles.width < min_size:
        wrong.append(f"width={tiles.width} (a power of two >= {min_size})")
    if not _power_of_two(tiles.channels) or tiles.channels < max(min_size, GROUP_CHANNELS):
        wrong.append(f"channels={tiles.channels} (a power of two >= {max(min_size, GROUP_CHANNELS)}: whole groups of {GROUP_CHANNELS})")
    if not isinstance(tiles.rows, int) or tiles.rows < 1:
        wrong.append(f"rows={tiles.rows} (>= 1)")
    if not _power_of_two(tiles.num_warps) or tiles.num_warps > 32:
        wrong.append(f"num_warps={tiles.num_warps} (1, 2, 4, ..., 32)")
    if not isinstance(tiles.num_stages, int) or tiles.num_stages < 1:
        wrong.append(f"num_stages={tiles.num_stages} (>= 1)")
    if wrong:
        raise ValueError(f"{fn}: tiles.{kernel} = {tiles} cannot run: {'; '.join(wrong)}. Fix them or pass None for the heuristic.")


def unsupported_reason(kernels: str, **arrays) -> str | None:
    """Why these (already shape-checked) arrays cannot run on `kernels`, or None if they can."""
    for name, a in arrays.items():
        if a is None:
            continue
        if jnp.dtype(a.dtype) not in SUPPORTED_DTYPES:
            return f"{name} has dtype {jnp.dtype(a.dtype)}; {kernels} take float32 or bfloat16"
        if np.prod(a.shape) > MAX_ELEMENTS:
            return f"{name} has {np.prod(a.shape)} elements; {kernels} index with int32 (< 2**31)"
    return None


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static sizes of one aggregation; hashable so it can be a `custom_vjp` static argument."""

    batch: int
    height: int
    width: int
    channels: int
    kernel_size: int
    stride: int
    dilation: int
    interpret: bool

    @property
    def out_height(self) -> int:
        return reference.output_size(self.height, self.stride)

    @property
    def out_width(self) -> int:
        return reference.output_size(self.width, self.stride)

    @property
    def groups(self) -> int:
        return self.channels // GROUP_CHANNELS

    @property
    def taps(self) -> int:
        return self.kernel_size**2

    @property
    def pad(self) -> int:
        return self.dilation * (self.kernel_size - 1) // 2

    @property
    def window(self) -> tuple[int, int, int, int]:
        """`(K, s, d, p)`."""
        return self.kernel_size, self.stride, self.dilation, self.pad

    @property
    def sizes(self) -> tuple[int, int, int, int, int]:
        """`(H, W, C, Ho, Wo)`."""
        return self.height, self.width, self.channels, self.out_height, self.out_width

    def call(self, kernel, tiles: Tiles, grid, out_shape, name: str, *arrays):
        """`pl.pallas_call` of `kernel` over `grid` on the flattened `arrays` (None skipped)."""
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid=grid,
            compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
            interpret=self.interpret, name=name,
        )(*(a.reshape(-1) for a in arrays if a is not None))


def split_refs(refs, inputs: int, with_static: bool):
    """`(*input refs, static ref or None, *output refs)`: the static kernel follows the inputs."""
    refs = list(refs)
    static = refs.pop(inputs) if with_static else None
    return (*refs[:inputs], static, *refs[inputs:])


def program_row(rows_per_image: int):
    """`(n, b, i)`: the flattened row `n = b * rows_per_image + i` this program owns (grid axis 0)."""
    n = pl.program_id(0)
    return n, *row_of(n, rows_per_image)


def row_of(n, rows_per_image: int):
    """`(b, i)` of the flattened row `n = b * rows_per_image + i`."""
    return lax.div(n, rows_per_image), lax.rem(n, rows_per_image)


def tile_ids(tiles: Tiles, width: int, channels: int):
    """Columns `[TW, 1]` and channels `[1, TC]` of this program's tile (grid axes 1 and 2), and
    which of them exist (`[TW, TC]`)."""
    cols = pl.program_id(1) * tiles.width + jnp.arange(tiles.width)[:, None]
    chans = pl.program_id(2) * tiles.channels + jnp.arange(tiles.channels)[None, :]
    return cols, chans, (cols < width) & (chans < channels)


def tap_position(geo: Geometry, i, j, kh, kw):
    """Input row `r` and column `q` that output `(i, j)` reads through tap `(kh, kw)`, and
    whether they lie inside the image (outside, `x_pad` is zero and nothing is read)."""
    _, s, d, p = geo.window
    r, q = s * i + kh * d - p, s * j + kw * d - p
    return r, q, (r >= 0) & (r < geo.height) & (q >= 0) & (q < geo.width)


def tap_products(x_ref, dout_ref, geo: Geometry, n, j, ch, kh, kw, ok):
    """`dout * x_tap` (`[TW, TC]`, float32) of output row `n = b*Ho + i` through tap `(kh, kw)`:
    what both families' weight-gradient kernels sum. Zero where not `ok` or outside the image."""
    h, w, c, ho, wo = geo.sizes
    b, i = row_of(n, ho)
    r, q, inside = tap_position(geo, i, j, kh, kw)
    ok = ok & inside
    return load(dout_ref, (n * wo + j) * c + ch, ok) * load(x_ref, ((b * h + r) * w + q) * c + ch, ok)


def load(ref, offsets, mask):
    """Masked load of `ref` at `offsets` (zero where masked off), in float32."""
    return plgpu.load(ref.at[offsets], mask=mask, other=0).astype(jnp.float32)


def store(ref, offsets, value, mask, interpret: bool):
    """Masked store of `value`, cast to `ref`'s dtype."""
    if interpret:
        # The interpreter writes masked-off lanes back with their old value, in one scatter with
        # the real writes: a masked lane aliasing a written address (a ragged channel tile's
        # lanes are the next pixel's channels) would race it. Pointing them one past the end
        # makes the scatter drop them. Not on GPU: Triton never touches masked lanes, and the
        # select would hide the offsets' contiguity from its vectoriser.
        offsets = jnp.where(mask, offsets, ref.shape[0])
    plgpu.store(ref.at[offsets], value.astype(ref.dtype), mask=mask)


def source_index(pos, tap_offset: int, stride: int, size: int):
    """Output index `o` with `stride*o + tap_offset = pos` and whether it exists in `[0, size)`.

    The gather form of a backward pass: the output row (column) that reads input row `pos`
    through a tap `tap_offset` away.
    """
    num = pos - tap_offset
    if stride == 1:
        return num, (num >= 0) & (num < size)
    # lax.div/rem truncate towards zero: shift by a multiple of the stride larger than
    # |tap_offset| (num >= -tap_offset since pos >= 0) to divide a positive number, then shift back.
    shift = stride * (abs(tap_offset) + 1)
    shifted = num + shift
    out = lax.div(shifted, stride) - shift // stride
    return out, (num >= 0) & (lax.rem(shifted, stride) == 0) & (out < size)
