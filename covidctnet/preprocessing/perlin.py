"""Seeded, vectorised 2-D Perlin noise with the semantics of ``noise.pnoise2``, and the MONAI transforms that add it.

CovidCTNet trains its BCDU-Net denoiser on control slices with Perlin noise added (official notebook
``Training-CovidCTNet.ipynb``, ``add_noise``)::

    world[i][j] = noise.pnoise2(i / scale, j / scale, octaves=10, persistence=0.01 * randint(-50, 50),
                                lacunarity=2.0, repeatx=140, repeaty=140, base=randint(0, 1000))
    noisy = cv2.addWeighted(slice, 1, world, 1, 0)   # slice + world, no clipping

with ``scale = randint(10, 30)``; the first half of the slices is noised, the second half stays clean.
That loop calls ``pnoise2`` once per pixel (its cost: ``docs/benchmarks.md``). :func:`perlin_noise_2d` computes the
same values (to float32 rounding, about 1e-6) without a per-pixel loop:

* The lattice cell, fractional part and fade of every row and every column are computed once per octave
  (``pnoise2``'s ``fmodf``/``floorf``/fade work is separable).
* Per octave the noise is a bilinear form: with ``Lx`` (H x Kr, two non-zeros per row: the two lattice rows a
  pixel row interpolates between, weighted by fade and offset), ``Gx`` (Kr x Kc, x components of the gradients of
  the lattice points actually visited) and ``Rx`` (W x Kc, likewise for columns),
  ``noise_k = Lx @ Gx @ Rx.T + Ly @ Gy @ Ry.T``. Instead of gathering four gradients per pixel and octave we
  gather the small lattice blocks ``G`` once (from a 512-entry table per base), multiply them by the sparse ``R``,
  and sum all octaves with one sparse product ``[L_0 | L_1 | ...] @ [M_0; M_1; ...]``. ``L`` and ``R`` depend only
  on the image shape and ``scale``, so they are cached; persistence and base only change ``G`` and its weight.

``base`` and the permutation table: ``noise`` 1.2.2 adds ``base`` to indices of its 512-entry table
(Perlin's 256-entry reference permutation, stored twice). Indices stay inside the table for ``base`` 0 and 1 only;
for ``base >= 2`` (the official code draws 0..999) it reads the bytes that follow the table in the compiled
library, so its output there depends on the build and is not reproducible. Here ``base`` 0 and 1 match ``noise``
exactly, and ``base >= 2`` selects the reference permutation shuffled by ``numpy.random.RandomState(base)``
(a stream NumPy keeps stable across versions), used with offset 0. The result is ordinary Perlin noise: its mean,
std and power spectrum match ``noise.pnoise2``'s for base 2..255 (tested). They do not match ``noise`` 1.2.2 for
base >= 512, where its index lands in a float table of the library (bytes 0x00, 0x3f, 0x80, 0xbf only) and its noise
degenerates (std about 2/3 of Perlin noise's, high-frequency power about 3x lower); base 256..511 is in between.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Hashable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms.transform import MapTransform, RandomizableTransform
from monai.utils import TransformBackends
from monai.utils.type_conversion import convert_data_type, convert_to_dst_type, convert_to_tensor

__all__ = [
    "OFFICIAL_PERLIN_PARAMS",
    "perlin_permutation",
    "perlin_noise_2d",
    "perlin_noise_2d_batch",
    "RandPerlinNoise",
    "RandPerlinNoised",
    "RandPerlinNoiseBatch",
]

#: Ken Perlin's reference permutation (the one in ``noise``'s ``_noise.h`` and in "Improving Noise", 2002).
_REFERENCE_PERMUTATION = np.array(
    [151, 160, 137, 91, 90, 15, 131, 13, 201, 95, 96, 53, 194, 233, 7, 225, 140, 36, 103, 30, 69, 142, 8, 99, 37,
     240, 21, 10, 23, 190, 6, 148, 247, 120, 234, 75, 0, 26, 197, 62, 94, 252, 219, 203, 117, 35, 11, 32, 57, 177,
     33, 88, 237, 149, 56, 87, 174, 20, 125, 136, 171, 168, 68, 175, 74, 165, 71, 134, 139, 48, 27, 166, 77, 146,
     158, 231, 83, 111, 229, 122, 60, 211, 133, 230, 220, 105, 92, 41, 55, 46, 245, 40, 244, 102, 143, 54, 65, 25,
     63, 161, 1, 216, 80, 73, 209, 76, 132, 187, 208, 89, 18, 169, 200, 196, 135, 130, 116, 188, 159, 86, 164, 100,
     109, 198, 173, 186, 3, 64, 52, 217, 226, 250, 124, 123, 5, 202, 38, 147, 118, 126, 255, 82, 85, 212, 207, 206,
     59, 227, 47, 16, 58, 17, 182, 189, 28, 42, 223, 183, 170, 213, 119, 248, 152, 2, 44, 154, 163, 70, 221, 153,
     101, 155, 167, 43, 172, 9, 129, 22, 39, 253, 19, 98, 108, 110, 79, 113, 224, 232, 178, 185, 112, 104, 218, 246,
     97, 228, 251, 34, 242, 193, 238, 210, 144, 12, 191, 179, 162, 241, 81, 51, 145, 235, 249, 14, 239, 107, 49, 192,
     214, 31, 181, 199, 106, 157, 184, 84, 204, 176, 115, 121, 50, 45, 127, 4, 150, 254, 138, 236, 205, 93, 222, 114,
     67, 29, 24, 72, 243, 141, 128, 195, 78, 66, 215, 61, 156, 180],  # fmt: skip
    dtype=np.int64,
)
_REFERENCE_PERMUTATION.setflags(write=False)

#: x (row 0) and y (row 1) components of ``noise``'s ``GRAD3`` table, indexed by ``hash & 15`` (2-D uses x, y only).
_GRAD = np.array(
    [[1, -1, 1, -1, 1, -1, 1, -1, 0, 0, 0, 0, 1, -1, 0, 0], [1, 1, -1, -1, 0, 0, 0, 0, 1, -1, 1, -1, 0, 0, -1, 1]],
    dtype=np.float32,
)

#: The official CovidCTNet training draw: ``scale = randint(10, 30)``, ``persistence = 0.01 * randint(-50, 50)``,
#: ``base = randint(0, 1000)`` (upper bounds exclusive), with octaves 10, lacunarity 2, repeat 140, amplitude 1.
OFFICIAL_PERLIN_PARAMS: Mapping[str, Any] = MappingProxyType(
    {
        "scale_range": (10, 30),
        "persistence_range": (-0.5, 0.5),
        "persistence_step": 0.01,
        "base_range": (0, 1000),
        "octaves": 10,
        "lacunarity": 2.0,
        "repeat": 140.0,
        "amplitude": 1.0,
    }
)

# An octave whose weight (amplitude / total amplitude) is below this is skipped: |pnoise2 of one octave| <= 1, so
# skipping it changes the output by less than this, far below float32 resolution of the result.
_NEGLIGIBLE_WEIGHT = 1e-9
# pnoise2 converts lattice coordinates to C int; beyond 2**31 its result is undefined.
_MAX_COORD = 2.0**31


# ----------------------------------------------------------------------------------------------------------------------
# argument checks ("`x` must be ..., not ...", as in TorchIO)
# ----------------------------------------------------------------------------------------------------------------------
def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    if len(dims) != 2 or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ValueError(f"`shape` must be two positive integers (H, W), not {shape!r}")
    return int(dims[0]), int(dims[1])


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, not {value!r}")
    return float(value)


def _check_finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, not {value!r}")
    return float(value)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, not {value!r}")
    return int(value)


def _check_range(name: str, value: Any, integer: bool) -> tuple[float, float]:
    kind = numbers.Integral if integer else numbers.Real
    ok = (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        and value[0] < value[1]
    )
    if not ok:
        what = "integers" if integer else "numbers"
        raise ValueError(f"`{name}` must be two {what} (low, high) with low < high, not {value!r}")
    return value[0], value[1]


# ----------------------------------------------------------------------------------------------------------------------
# lattice tables
# ----------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1024)
def perlin_permutation(base: int = 0) -> np.ndarray:
    """The 256-entry permutation used for ``base``.

    Args:
        base: 0 or 1: Perlin's reference permutation (``noise`` offsets its index by ``base``, which
            :func:`perlin_noise_2d` reproduces). ``base >= 2``: the reference permutation shuffled by
            ``numpy.random.RandomState(base)``.

    Returns:
        (256,) int64, read-only: a permutation of 0..255.

    Raises:
        ValueError: ``base`` is not an integer >= 0.
    """
    base = _check_int("base", base, 0)
    if base < 2:
        return _REFERENCE_PERMUTATION
    # A local legacy RandomState: its stream is frozen by NumPy (NEP 19), so base -> table never changes.
    perm = np.random.RandomState(base).permutation(_REFERENCE_PERMUTATION)
    perm.setflags(write=False)
    return perm


@functools.lru_cache(maxsize=1024)
def _gradient_lookup(base: int) -> tuple[np.ndarray, np.ndarray]:
    """Gradient of lattice point (p, q) as ``grad[:, rows[p] + q]``, p, q in 0..255.

    ``noise2`` hashes lattice point (p, q) as ``PERM[PERM[PERM[p + base] + q + base]] & 15`` with the 512-entry
    table ``PERM`` (the permutation twice). With ``rows[p] = PERM[p + base] + base`` (at most 256 for base <= 1,
    so ``rows[p] + q <= 511``) this is ``PERM[PERM[rows[p] + q]] & 15``: a 512-entry gradient table per base
    replaces a 256 x 256 one.
    For ``base >= 2`` the permutation is the seeded shuffle and the offset 0.

    Returns:
        ``rows`` (256,) intp and ``grad`` (2, 512) float32 (x, y components), read-only; 6 KB per base.
    """
    offset = base if base < 2 else 0
    perm512 = np.concatenate([perlin_permutation(base)] * 2).astype(np.intp)
    rows = perm512[np.arange(256) + offset] + offset
    grad = np.ascontiguousarray(_GRAD[:, perm512[perm512] & 15])
    rows.setflags(write=False)
    grad.setflags(write=False)
    return rows, grad


# ----------------------------------------------------------------------------------------------------------------------
# per-axis work (rows or columns), replicating noise2's float32 arithmetic
# ----------------------------------------------------------------------------------------------------------------------
def _octave_frequencies(octaves: int, lacunarity: float) -> list[np.float32]:
    """``freq`` of each octave, multiplied up in float32 as ``pnoise2`` does."""
    freqs, freq, lac = [], np.float32(1.0), np.float32(lacunarity)
    for _ in range(octaves):
        freqs.append(freq)
        freq = np.float32(freq * lac)
    return freqs


def _octave_weights(octaves: int, persistence: float) -> np.ndarray:
    """``amp_k / sum(amp)`` for each octave (float64), with ``amp`` and the sum accumulated in float32 as in C.

    Raises:
        ValueError: the total amplitude is 0 (persistence -1 with an even number of octaves); ``noise.pnoise2``
            divides by it and returns inf there.
    """
    amps, amp, total, p32 = [], np.float32(1.0), np.float32(0.0), np.float32(persistence)
    for _ in range(octaves):
        amps.append(amp)
        total = np.float32(total + amp)
        amp = np.float32(amp * p32)
    if total == 0:
        raise ValueError(
            f"`persistence` must not make the total amplitude 0 (sum of persistence**k over {octaves} octaves), "
            f"not {persistence!r}; noise.pnoise2 returns inf there"
        )
    return np.array(amps, dtype=np.float64) / float(total)


def _axis_lattice(
    coords: np.ndarray, freq: np.float32, repeat: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lattice cells and interpolation terms along one axis, as ``noise2`` computes them (float32).

    Args:
        coords: (N,) float32 coordinates (``i / scale``) before the octave's frequency.
        freq: the octave's frequency.
        repeat: ``repeatx`` (or ``repeaty``) of the first octave, in lattice cells.

    Returns:
        ``i0, i1`` (N,) int64 lattice cells in 0..255 (``i & 255`` and ``((i + 1) mod repeat) & 255``),
        ``frac`` (N,) float32 position inside the cell, ``fade`` (N,) float32 ``6t^5 - 15t^4 + 10t^3``.
    """
    x = coords * freq
    period = np.float32(np.float32(repeat) * freq)
    cell = np.floor(np.fmod(x, period))
    nxt = np.trunc(np.fmod(cell + np.float32(1.0), period))  # C: (int)fmodf(i + 1, repeatx)
    i0 = cell.astype(np.int64) & 255
    i1 = nxt.astype(np.int64) & 255
    t = x - np.floor(x)
    fade = t * t * t * (t * (t * np.float32(6.0) - np.float32(15.0)) + np.float32(10.0))
    return i0, i1, t, fade


class _Plan:
    """Everything about a noise image that depends on shape, scale, octaves, lacunarity and repeat, but not on
    persistence or base. Cached by :func:`_plan`.

    Per octave ``k`` the noise is ``Lx_k @ Gx_k @ Rx_k.T + Ly_k @ Gy_k @ Ry_k.T`` (see the module docstring), with
    ``G*_k`` the gradient components of the visited lattice points (Kr rows x Kc columns). Attributes:

    * ``left``: sparse CSR (H, inner) holding every ``[Lx_k | Ly_k]`` side by side (4 non-zeros per row and octave).
    * ``right``: per octave, two sparse CSR (W, Kc): ``Rx_k`` and ``Ry_k`` (2 non-zeros per row).
    * ``octaves``: per octave ``(ridx, kidx, offset)``: the visited lattice rows (Kr,) and columns (Kc, 1), and
      the first row of the octave's block in the inner dimension (x part at ``offset``, y part at ``offset + Kr``).
    """
    def __init__(self, shape: tuple[int, int], scale: float, octaves: int, lacunarity: float, repeat: float):
        h, w = shape
        # pnoise2 receives i / scale computed in double and rounds it to float ("f" argument format).
        rows = (np.arange(h, dtype=np.float64) / scale).astype(np.float32)
        cols = (np.arange(w, dtype=np.float64) / scale).astype(np.float32)
        one = np.float32(1.0)
        self.shape = shape
        self.octaves: list[tuple[np.ndarray, np.ndarray, int]] = []
        self.right: list[tuple[Any, Any]] = []
        left_rows, left_cols, left_vals = [], [], []
        inner = 0
        r, c = np.arange(h), np.arange(w)
        for k, freq in enumerate(_octave_frequencies(octaves, lacunarity)):
            coord = max(float(rows[-1]), float(cols[-1])) * float(freq)
            if coord >= _MAX_COORD:
                raise ValueError(
                    f"`scale` must keep lattice coordinates below 2**31 (noise.pnoise2 is undefined beyond), not "
                    f"{scale!r}: coordinate {coord:.3g} at octave {k} (shape {shape}, lacunarity {lacunarity!r})"
                )
            i0, i1, fx, wx = _axis_lattice(rows, freq, repeat)
            j0, j1, fy, wy = _axis_lattice(cols, freq, repeat)
            ridx, rinv = np.unique(np.concatenate([i0, i1]), return_inverse=True)
            kidx, kinv = np.unique(np.concatenate([j0, j1]), return_inverse=True)
            kr, kc = len(ridx), len(kidx)
            # noise2 = lerp(fy, lerp(fx, g00.(x, y), g10.(x-1, y)), lerp(fx, g01.(x, y-1), g11.(x-1, y-1))):
            # corner (a, b) has weight wa(x) * wb(y) and dot product gx * (x - a) + gy * (y - b). The x part takes
            # wa(x) * (x - a) on the left and wb(y) on the right; the y part wa(x) on the left, wb(y) * (y - b) on
            # the right. Duplicate (row, col) entries (when both corners wrap onto one lattice line) are summed.
            left_rows += [r, r, r, r]
            left_cols += [inner + rinv[:h], inner + rinv[h:], inner + kr + rinv[:h], inner + kr + rinv[h:]]
            left_vals += [(one - wx) * fx, wx * (fx - one), one - wx, wx]
            rx = sp.csr_matrix(
                (np.concatenate([one - wy, wy]), (np.concatenate([c, c]), kinv)), shape=(w, kc), dtype=np.float32
            )
            ry = sp.csr_matrix(
                (np.concatenate([(one - wy) * fy, wy * (fy - one)]), (np.concatenate([c, c]), kinv)),
                shape=(w, kc),
                dtype=np.float32,
            )
            self.right.append((rx, ry))
            self.octaves.append((ridx, kidx[:, None], inner))
            inner += 2 * kr
        self.inner = inner
        self.left = sp.csr_matrix(
            (np.concatenate(left_vals), (np.concatenate(left_rows), np.concatenate(left_cols))),
            shape=(h, inner),
            dtype=np.float32,
        )


@functools.lru_cache(maxsize=128)
def _plan(shape: tuple[int, int], scale: float, octaves: int, lacunarity: float, repeat: float) -> _Plan:
    # Building a plan costs a few noise images; a 240x240, 10-octave plan holds about 0.2 MB of sparse factors.
    return _Plan(shape, scale, octaves, lacunarity, repeat)


def _noise_from_plan(plan: _Plan, weights: np.ndarray, base: int, out: np.ndarray | None = None) -> np.ndarray:
    """Noise (H, W) float32 for one image: gather the visited gradients, two small sparse products per octave, one
    sparse product for the sum over octaves. Everything runs in single-threaded NumPy/SciPy loops: no BLAS thread
    pool to oversubscribe in DataLoader workers, and the same summation order (hence result) on every machine."""
    rows, grad = _gradient_lookup(base)
    # Octaves with a negligible weight are skipped: their rows of `middle` stay 0.
    active = [k for k, w in enumerate(weights) if abs(w) >= _NEGLIGIBLE_WEIGHT]
    sizes = [plan.octaves[k][0].size * plan.octaves[k][1].size for k in active]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    index = np.empty(starts[-1], dtype=np.intp)
    for k, start, stop in zip(active, starts[:-1], starts[1:]):
        ridx, kidx, _ = plan.octaves[k]
        np.add(kidx, rows[ridx], out=index[start:stop].reshape(kidx.size, ridx.size))  # (Kc, Kr) = G_k.T
    grads = np.take(grad, index, axis=1)  # (2, n): x, y; np.take is several times faster than grad[:, index] here
    middle = np.zeros((plan.inner, plan.shape[1]), dtype=np.float32)
    for k, start, stop in zip(active, starts[:-1], starts[1:]):
        (ridx, kidx, offset), (rx, ry) = plan.octaves[k], plan.right[k]
        kr = ridx.size
        g = grads[:, start:stop].reshape(2, kidx.size, kr)
        g *= np.float32(weights[k])  # scale the small (Kc, Kr) blocks rather than (Kr, W)
        middle[offset : offset + kr] = (rx @ g[0]).T  # (W, Kc) @ (Kc, Kr) = (Gx_k @ Rx_k.T).T
        middle[offset + kr : offset + 2 * kr] = (ry @ g[1]).T
    result = plan.left @ middle  # (H, inner) sparse @ (inner, W)
    if out is None:
        return np.ascontiguousarray(result, dtype=np.float32)
    out[...] = result
    return out


def _check_common(octaves: Any, lacunarity: Any, repeat: Any) -> tuple[int, float, float]:
    return (
        _check_int("octaves", octaves, 1),
        _check_positive("lacunarity", lacunarity),
        _check_positive("repeat", repeat),
    )


# ----------------------------------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------------------------------
def perlin_noise_2d(
    shape: Sequence[int],
    scale: float,
    octaves: int = 10,
    persistence: float = 0.5,
    lacunarity: float = 2.0,
    repeat: float = 140.0,
    base: int = 0,
) -> np.ndarray:
    """Fractal 2-D Perlin noise over a pixel grid, equal to the official per-pixel ``noise.pnoise2`` loop.

    ``out[i, j] == noise.pnoise2(i / scale, j / scale, octaves, persistence, lacunarity, repeatx=repeat,
    repeaty=repeat, base=base)`` to about 1e-6 (float32 rounding) for ``base`` 0 and 1: the row index is
    ``pnoise2``'s x, the column index its y, as in the official ``world[i][j]``. Like ``pnoise2``, the octaves
    are summed with amplitudes ``persistence**k`` and divided by the total amplitude ``sum(persistence**k)``
    (so persistence 0 gives the first octave alone, and negative persistence alternates signs); octave ``k``
    has frequency ``lacunarity**k`` and period ``repeat * lacunarity**k`` lattice cells.

    Args:
        shape: (H, W) in pixels.
        scale: pixels per lattice cell of the first octave (official: 10..29).
        octaves: number of octaves, >= 1 (official: 10).
        persistence: amplitude ratio between successive octaves; any finite value whose total amplitude is not 0
            (official: -0.50..0.49).
        lacunarity: frequency ratio between successive octaves, > 0 (official: 2).
        repeat: period of the first octave in lattice cells, > 0 (official: 140, i.e. ``140 * scale`` pixels).
        base: 0 or 1: ``noise``'s table offset, same values as ``noise``. ``>= 2``: a seeded shuffle of the
            permutation table (see the module docstring); ``noise`` 1.2.2 reads past its table there.

    Returns:
        (H, W) float32 noise, typically within +-0.7 (std about 0.2-0.25 for the official parameters).

    Raises:
        ValueError: an argument is out of range, or the total amplitude is 0 (``pnoise2`` returns inf then).
    """
    shape = _check_shape(shape)
    scale = _check_positive("scale", scale)
    persistence = _check_finite("persistence", persistence)
    base = _check_int("base", base, 0)
    octaves, lacunarity, repeat = _check_common(octaves, lacunarity, repeat)
    weights = _octave_weights(octaves, persistence)
    return _noise_from_plan(_plan(shape, scale, octaves, lacunarity, repeat), weights, base)


def perlin_noise_2d_batch(
    shape: Sequence[int],
    scale: Sequence[float],
    persistence: Sequence[float],
    base: Sequence[int],
    octaves: int = 10,
    lacunarity: float = 2.0,
    repeat: float = 140.0,
) -> np.ndarray:
    """A batch of :func:`perlin_noise_2d` images with per-image ``scale``, ``persistence`` and ``base``.

    ``out[b] == perlin_noise_2d(shape, scale[b], octaves, persistence[b], lacunarity, repeat, base[b])`` exactly.
    Row/column factors are cached per (shape, scale), so a batch drawing from the official 20 scales reuses them.

    Args:
        shape: (H, W) in pixels.
        scale: (B,) pixels per lattice cell of the first octave.
        persistence: (B,) amplitude ratio between octaves.
        base: (B,) permutation selector (see :func:`perlin_noise_2d`).
        octaves: shared by the batch, >= 1.
        lacunarity: shared by the batch, > 0.
        repeat: shared by the batch, in lattice cells of the first octave, > 0.

    Returns:
        (B, H, W) float32.

    Raises:
        ValueError: an argument is out of range, or the three sequences differ in length.
    """
    h, w = _check_shape(shape)
    octaves, lacunarity, repeat = _check_common(octaves, lacunarity, repeat)
    scales, persistences, bases = list(scale), list(persistence), list(base)
    if not len(scales) == len(persistences) == len(bases):
        raise ValueError(
            f"`scale`, `persistence` and `base` must have the same length, not {len(scales)}, {len(persistences)} "
            f"and {len(bases)}"
        )
    scales = [_check_positive("scale", s) for s in scales]
    persistences = [_check_finite("persistence", p) for p in persistences]
    bases = [_check_int("base", b, 0) for b in bases]
    out = np.empty((len(scales), h, w), dtype=np.float32)
    for b, (s, p, base_b) in enumerate(zip(scales, persistences, bases)):
        plan = _plan((h, w), s, octaves, lacunarity, repeat)
        _noise_from_plan(plan, _octave_weights(octaves, p), base_b, out=out[b])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# MONAI transforms
# ----------------------------------------------------------------------------------------------------------------------
class _PerlinSampler:
    """Draws (scale, persistence, base) as the official code does, from a given RandomState, in its order."""

    def __init__(
        self,
        scale_range: Sequence[int],
        persistence_range: Sequence[float],
        persistence_step: float,
        base_range: Sequence[int],
        octaves: int,
        lacunarity: float,
        repeat: float,
        amplitude: float,
    ) -> None:
        self.scale_range = _check_range("scale_range", scale_range, integer=True)
        if self.scale_range[0] <= 0:
            raise ValueError(f"`scale_range` must be positive integers (low, high), not {scale_range!r}")
        self.persistence_range = _check_range("persistence_range", persistence_range, integer=False)
        self.persistence_step = _check_positive("persistence_step", persistence_step)
        # persistence = step * randint(lo / step, hi / step): the official 0.01 * randint(-50, 50) for the defaults.
        self._p_lo = round(self.persistence_range[0] / self.persistence_step)
        self._p_hi = round(self.persistence_range[1] / self.persistence_step)
        if self._p_lo >= self._p_hi:
            raise ValueError(
                f"`persistence_range` must span at least one `persistence_step`, not {persistence_range!r} with "
                f"step {persistence_step!r}"
            )
        self.base_range = _check_range("base_range", base_range, integer=True)
        if self.base_range[0] < 0:
            raise ValueError(f"`base_range` must be integers >= 0 (low, high), not {base_range!r}")
        self.octaves, self.lacunarity, self.repeat = _check_common(octaves, lacunarity, repeat)
        self.amplitude = _check_finite("amplitude", amplitude)
        # Fail now, not at some later draw, if a drawable persistence has total amplitude 0. sum(p**k) over n octaves
        # is 0 only for p = -1 and even n, so checking the grid points next to -1 is enough.
        k_minus_one = round(-1.0 / self.persistence_step)
        for k in range(max(self._p_lo, k_minus_one - 1), min(self._p_hi, k_minus_one + 2)):
            _octave_weights(self.octaves, self.persistence_step * k)

    def draw(self, rng: np.random.RandomState) -> dict[str, Any]:
        scale = int(rng.randint(self.scale_range[0], self.scale_range[1]))
        persistence = self.persistence_step * int(rng.randint(self._p_lo, self._p_hi))
        base = int(rng.randint(self.base_range[0], self.base_range[1]))
        return {"scale": scale, "persistence": persistence, "base": base}

    def noise(self, shape: tuple[int, int], params: Sequence[Mapping[str, Any]]) -> np.ndarray:
        out = perlin_noise_2d_batch(
            shape,
            [p["scale"] for p in params],
            [p["persistence"] for p in params],
            [p["base"] for p in params],
            octaves=self.octaves,
            lacunarity=self.lacunarity,
            repeat=self.repeat,
        )
        if self.amplitude != 1.0:
            out *= np.float32(self.amplitude)
        return out


def _spatial_shape(img: NdarrayOrTensor, batch: bool = False) -> tuple[int, int]:
    rank = 4 if batch else 3
    if img.ndim != rank:
        layout = "(B, C, H, W)" if batch else "channel-first (C, H, W)"
        raise ValueError(f"`img` must be a {layout} array, not shape {tuple(img.shape)}")
    return int(img.shape[-2]), int(img.shape[-1])


class RandPerlinNoise(RandomizableTransform):
    """Add Perlin noise to a 2-D channel-first image, as the official CovidCTNet training does.

    Per call, draws ``scale`` from ``randint(*scale_range)``, ``persistence = persistence_step *
    randint(lo / step, hi / step)`` and ``base`` from ``randint(*base_range)`` (in that order, from ``self.R``
    only), and adds ``amplitude * perlin_noise_2d(...)`` to every channel, without clipping. The defaults are the
    official ones (:data:`OFFICIAL_PERLIN_PARAMS`). The official code trained at 128x128; ``scale`` is in pixels,
    so keep the same noise relative to the anatomy at 240x240 by multiplying ``scale_range`` by 240 / 128.

    Args:
        prob: probability of adding noise.
        scale_range: (low, high) integer scale in pixels per lattice cell, high exclusive.
        persistence_range: (low, high) persistence, high exclusive, drawn on a grid of ``persistence_step``.
        persistence_step: grid step of the persistence draw.
        base_range: (low, high) integer base, high exclusive (see :func:`perlin_noise_2d` for base >= 2).
        octaves: octaves, >= 1.
        lacunarity: frequency ratio between octaves, > 0.
        repeat: period of the first octave, lattice cells.
        amplitude: factor on the noise before adding it (official: 1, ``cv2.addWeighted(img, 1, noise, 1, 0)``).
        dtype: output dtype; None keeps the input's.

    Example:
        >>> t = RandPerlinNoise(prob=1.0).set_random_state(seed=0)
        >>> noisy = t(torch.zeros(1, 240, 240))   # (1, 240, 240) float32, std about 0.2
    """
    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        prob: float = 1.0,
        scale_range: Sequence[int] = OFFICIAL_PERLIN_PARAMS["scale_range"],
        persistence_range: Sequence[float] = OFFICIAL_PERLIN_PARAMS["persistence_range"],
        persistence_step: float = OFFICIAL_PERLIN_PARAMS["persistence_step"],
        base_range: Sequence[int] = OFFICIAL_PERLIN_PARAMS["base_range"],
        octaves: int = OFFICIAL_PERLIN_PARAMS["octaves"],
        lacunarity: float = OFFICIAL_PERLIN_PARAMS["lacunarity"],
        repeat: float = OFFICIAL_PERLIN_PARAMS["repeat"],
        amplitude: float = OFFICIAL_PERLIN_PARAMS["amplitude"],
        dtype: Any = np.float32,
    ) -> None:
        if isinstance(prob, bool) or not isinstance(prob, numbers.Real) or not 0.0 <= prob <= 1.0:
            raise ValueError(f"`prob` must be a number in [0, 1], not {prob!r}")
        RandomizableTransform.__init__(self, prob)
        self.sampler = _PerlinSampler(
            scale_range, persistence_range, persistence_step, base_range, octaves, lacunarity, repeat, amplitude
        )
        self.dtype = dtype
        self.params: dict[str, Any] | None = None  # the last draw, for logging
        self.noise: np.ndarray | None = None

    def randomize(self, img: NdarrayOrTensor) -> None:
        """Draw the parameters from ``self.R`` and compute the (H, W) noise for ``img`` (C, H, W)."""
        super().randomize(None)
        if not self._do_transform:
            return
        shape = _spatial_shape(img)
        self.params = self.sampler.draw(self.R)
        self.noise = self.sampler.noise(shape, [self.params])[0]

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """Args: img: (C, H, W). Returns: (C, H, W), ``img + noise`` (same noise in every channel) or ``img``."""
        img = convert_to_tensor(img, track_meta=get_track_meta())
        if randomize:
            self.randomize(img)
        if not self._do_transform:
            return img
        if self.noise is None:
            raise RuntimeError("call randomize() before __call__(randomize=False)")
        if tuple(img.shape[-2:]) != self.noise.shape:
            raise ValueError(f"`img` must have spatial shape {self.noise.shape} (the drawn noise), not {img.shape}")
        if self.dtype is not None:
            img, *_ = convert_data_type(img, dtype=self.dtype)
        noise, *_ = convert_to_dst_type(self.noise, img)
        return img + noise


class RandPerlinNoised(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandPerlinNoise`: the same noise is added to every key in ``keys``.

    Use ``keys="image"`` on a sample ``{"image": x, "target": x}`` to get a noisy input and a clean target.

    Args:
        keys: keys to noise; other keys (e.g. "target") are left untouched.
        prob: probability of noising the sample (all keys together).
        allow_missing_keys: don't raise if a key is missing.
        kwargs: the other arguments of :class:`RandPerlinNoise`.
    """
    backend = RandPerlinNoise.backend

    def __init__(
        self, keys: KeysCollection, prob: float = 1.0, allow_missing_keys: bool = False, **kwargs: Any
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if isinstance(prob, bool) or not isinstance(prob, numbers.Real) or not 0.0 <= prob <= 1.0:
            raise ValueError(f"`prob` must be a number in [0, 1], not {prob!r}")
        RandomizableTransform.__init__(self, prob)
        self.rand_perlin_noise = RandPerlinNoise(prob=1.0, **kwargs)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandPerlinNoised:
        super().set_random_state(seed, state)
        self.rand_perlin_noise.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        self.randomize(None)
        first_key: Hashable = self.first_key(d)
        if not self._do_transform or first_key == ():
            for key in self.key_iterator(d):
                d[key] = convert_to_tensor(d[key], track_meta=get_track_meta())
            return d
        # all keys share one draw
        self.rand_perlin_noise.randomize(d[first_key])
        for key in self.key_iterator(d):
            d[key] = self.rand_perlin_noise(d[key], randomize=False)
        return d


class RandPerlinNoiseBatch(RandomizableTransform):
    """Noise the first part of a batch and leave the rest clean, as the official training set is built.

    The official notebook noises every slice and then restores the clean slice in the second half
    (``noisy[int(N / 2):] = clean[int(N / 2):]``). Applied to each batch, this transform adds Perlin noise to
    images ``0 .. int(B * fraction) - 1`` (one draw each, in order, from ``self.R``) and returns the others
    unchanged. Seed it once (``set_random_state(seed)``); for an exact resume, save ``self.R.get_state()`` with the
    checkpoint and restore it with ``self.R.set_state(...)``. In DDP, seed each rank differently (e.g. seed + rank).

    Args:
        fraction: share of each batch to noise; ``int(B * fraction)`` images (official 0.5: 2 of a batch of 5).
        kwargs: the noise arguments of :class:`RandPerlinNoise` (ranges, octaves, amplitude, ...).

    Example:
        >>> noiser = RandPerlinNoiseBatch(fraction=0.5).set_random_state(seed=0)
        >>> inputs = noiser(clean)           # clean: (B, 1, H, W) tensor; inputs[int(B / 2):] is clean[int(B / 2):]
        >>> loss = bce(model(inputs), clean)
    """
    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, fraction: float = 0.5, **kwargs: Any) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"`fraction` must be a number in [0, 1], not {fraction!r}")
        RandomizableTransform.__init__(self, prob=1.0)
        self.fraction = float(fraction)
        kwargs = {**OFFICIAL_PERLIN_PARAMS, **kwargs}
        self.sampler = _PerlinSampler(**kwargs)
        self.params: list[dict[str, Any]] = []  # the last batch's draws, one per noised image

    def randomize(self, data: int) -> None:
        """Draw (scale, persistence, base) for ``data`` images from ``self.R`` into ``self.params``."""
        self.params = [self.sampler.draw(self.R) for _ in range(data)]

    def n_noisy(self, batch_size: int) -> int:
        """How many leading images of a batch of ``batch_size`` get noise: ``int(batch_size * fraction)``."""
        return int(batch_size * self.fraction)

    def __call__(self, batch: NdarrayOrTensor) -> torch.Tensor:
        """Args: batch: (B, C, H, W). Returns: a new (B, C, H, W) float tensor; the input is not modified."""
        shape = _spatial_shape(batch, batch=True)
        batch = convert_to_tensor(batch, track_meta=False)
        if not torch.is_floating_point(batch):
            batch = batch.float()
        n_noisy = self.n_noisy(batch.shape[0])
        self.randomize(n_noisy)
        out = batch.clone()
        if n_noisy:
            noise = torch.from_numpy(self.sampler.noise(shape, self.params)).to(device=out.device, dtype=out.dtype)
            out[:n_noisy] += noise[:, None]
        return out
