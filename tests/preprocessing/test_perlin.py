"""Tests for covidctnet.preprocessing.perlin: parity with ``noise.pnoise2``, statistics for base >= 2, transforms,
validation."""

from __future__ import annotations

import math

import noise
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from covidctnet.preprocessing.perlin import (
    OFFICIAL_PERLIN_PARAMS,
    RandPerlinNoise,
    RandPerlinNoiseBatch,
    RandPerlinNoised,
    perlin_noise_2d,
    perlin_noise_2d_batch,
    perlin_permutation,
)

OFFICIAL = {"octaves": 10, "lacunarity": 2.0, "repeat": 140}


def pnoise2_loop(shape, scale, octaves=10, persistence=0.5, lacunarity=2.0, repeat=140, base=0) -> np.ndarray:
    """The official per-pixel loop (Training-CovidCTNet.ipynb, ``add_noise``): row index -> x, column index -> y."""
    h, w = shape
    return np.array(
        [
            [
                noise.pnoise2(
                    i / scale,
                    j / scale,
                    octaves=octaves,
                    persistence=persistence,
                    lacunarity=lacunarity,
                    repeatx=repeat,
                    repeaty=repeat,
                    base=base,
                )
                for j in range(w)
            ]
            for i in range(h)
        ],
        dtype=np.float64,
    )


# ----------------------------------------------------------------------------------------------------------------------
# parity with noise.pnoise2
# ----------------------------------------------------------------------------------------------------------------------
# (shape, kwargs): official settings (scale = randint(10, 30), persistence = 0.01 * randint(-50, 50)) with base 0/1,
# then edge cases of the pnoise2 semantics.
PARITY_CASES = [
    ((48, 40), {"scale": 10, "persistence": -0.50, "base": 0, **OFFICIAL}),
    ((48, 40), {"scale": 29, "persistence": 0.49, "base": 1, **OFFICIAL}),
    ((48, 40), {"scale": 17, "persistence": 0.25, "base": 0, **OFFICIAL}),
    ((48, 40), {"scale": 23, "persistence": -0.31, "base": 1, **OFFICIAL}),
    ((48, 40), {"scale": 14, "persistence": 0.41, "base": 0, **OFFICIAL}),
    ((48, 40), {"scale": 26, "persistence": -0.07, "base": 1, **OFFICIAL}),
    ((48, 40), {"scale": 12, "persistence": 0.0, "base": 0, **OFFICIAL}),  # persistence 0: first octave only
    ((48, 40), {"scale": 19, "persistence": 0.0, "base": 1, **OFFICIAL}),
    ((48, 40), {"scale": 11, "persistence": -0.9, "base": 0, **OFFICIAL}),  # total amplitude ~0.05: errors x20
    ((48, 40), {"scale": 13, "persistence": -1.0, "base": 1, "octaves": 9}),  # odd octaves: total amplitude 1
    ((48, 40), {"scale": 11, "persistence": 2.5, "octaves": 5}),
    ((48, 40), {"scale": 13, "octaves": 1}),
    ((48, 40), {"scale": 9.5, "persistence": 0.9, "lacunarity": 1.7, "repeat": 3.5, "octaves": 4}),
    ((30, 17), {"scale": 7, "repeat": 1}),  # both corners wrap onto one lattice line
    ((30, 17), {"scale": 0.7, "octaves": 3}),  # several lattice cells per pixel
    ((1, 5), {"scale": 5, "base": 1}),
    ((240, 240), {"scale": 21, "persistence": 0.33, "base": 0, **OFFICIAL}),
]


def _case_id(shape, kwargs) -> str:
    extra = ",".join(f"{k}={v}" for k, v in kwargs.items() if OFFICIAL.get(k) != v)
    return f"{shape[0]}x{shape[1]}-{extra}"


@pytest.mark.parametrize("shape, kwargs", PARITY_CASES, ids=[_case_id(s, k) for s, k in PARITY_CASES])
def test_perlin_noise_2d_equals_pnoise2(shape, kwargs):
    expected = pnoise2_loop(shape, **kwargs)
    result = perlin_noise_2d(shape, **kwargs)
    assert result.shape == shape and result.dtype == np.float32
    # 1e-5 absolute; relative to the magnitude where the total amplitude is small and values grow beyond 1.
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


def test_batch_equals_pnoise2_and_single_images():
    shape, scales, persistences, bases = (48, 40), [10, 29, 18, 22], [-0.5, 0.49, 0.0, -0.13], [0, 1, 1, 0]
    batch = perlin_noise_2d_batch(shape, scales, persistences, bases, **OFFICIAL)
    assert batch.shape == (4, *shape) and batch.dtype == np.float32
    for b, (s, p, base) in enumerate(zip(scales, persistences, bases)):
        np.testing.assert_array_equal(batch[b], perlin_noise_2d(shape, s, persistence=p, base=base, **OFFICIAL))
        np.testing.assert_allclose(batch[b], pnoise2_loop(shape, s, persistence=p, base=base), atol=1e-5)
    # bases >= 2 go through the same code
    big = perlin_noise_2d_batch(shape, [15, 15], [0.2, 0.2], [7, 999])
    np.testing.assert_array_equal(big[1], perlin_noise_2d(shape, 15, persistence=0.2, base=999))


def test_zero_total_amplitude_raises_where_pnoise2_returns_inf():
    # persistence -1 over an even number of octaves: amplitudes 1 - 1 + 1 ... sum to 0 and pnoise2 divides by it
    assert math.isinf(noise.pnoise2(0.3, 0.7, octaves=10, persistence=-1.0))
    with pytest.raises(ValueError, match="total amplitude 0"):
        perlin_noise_2d((8, 8), 10, octaves=10, persistence=-1.0)


# ----------------------------------------------------------------------------------------------------------------------
# base >= 2: a seeded permutation, same statistics as pnoise2
# ----------------------------------------------------------------------------------------------------------------------
def test_permutation_tables():
    reference = perlin_permutation(0)
    assert reference[:4].tolist() == [151, 160, 137, 91]
    assert perlin_permutation(1) is reference  # base 1 is noise's offset into the same table
    for base in (2, 3, 500, 999):
        perm = perlin_permutation(base)
        assert sorted(perm.tolist()) == list(range(256))
        assert not np.array_equal(perm, reference)
    assert not np.array_equal(perlin_permutation(2), perlin_permutation(3))
    # pinned: the definition (RandomState(base).permutation of the reference table) must never change
    assert perlin_permutation(2)[:8].tolist() == [149, 179, 75, 96, 178, 6, 119, 3]
    assert perlin_permutation(999)[:8].tolist() == [29, 146, 127, 69, 106, 13, 102, 21]
    np.testing.assert_allclose(
        perlin_noise_2d((3, 3), 10.0, base=2)[1], [-0.0572544, 0.1086260, 0.2258707], rtol=0, atol=1e-6
    )


def test_large_bases_deterministic_and_distinct():
    a = perlin_noise_2d((32, 32), 12, persistence=0.3, base=123)
    np.testing.assert_array_equal(a, perlin_noise_2d((32, 32), 12, persistence=0.3, base=123))
    assert np.abs(a - perlin_noise_2d((32, 32), 12, persistence=0.3, base=124)).max() > 0.05


def _radial_log_spectrum(img: np.ndarray, n_bins: int = 8) -> np.ndarray:
    h, w = img.shape
    power = (np.abs(np.fft.fft2(img - img.mean())) ** 2).ravel()
    radius = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]).ravel()
    bins = np.digitize(radius, np.linspace(0, 0.5, n_bins + 1))
    return np.log10([power[bins == i].mean() for i in range(1, n_bins + 1)])


def test_large_base_statistics_match_pnoise2():
    """Mean, std and radially averaged power spectrum of our base >= 2 noise against noise.pnoise2's.

    Paired draws: each of 80 (scale, persistence) pairs from the official ranges gives one 64x64 image from
    pnoise2 with a base in 2..255 and one of ours with a base in 2..999. Tolerances are about 4 standard errors of
    these estimates (measured over 6 independent repeats of this experiment with 100 pairs: mean difference within
    0.013, std ratio within 0.97..1.04, log10 spectrum within 0.035 decade). pnoise2 is compared for base < 256
    only: above, noise 1.2.2 reads the float table that follows its permutation in the compiled library (bytes
    0x00, 0x3f, 0x80, 0xbf only), and its noise degenerates: for base 512..999 its std is about 2/3 of Perlin
    noise's and its high-frequency power about 3x lower, so matching it there would mean copying a bug.
    """
    rng = np.random.RandomState(2024)
    shape = (64, 64)
    ours, ref = [], []
    for _ in range(80):
        scale, persistence = int(rng.randint(10, 30)), 0.01 * int(rng.randint(-50, 50))
        ref.append(pnoise2_loop(shape, scale, persistence=persistence, base=int(rng.randint(2, 256))))
        ours.append(perlin_noise_2d(shape, scale, persistence=persistence, base=int(rng.randint(2, 1000))))
    mean_ours, mean_ref = np.mean([x.mean() for x in ours]), np.mean([x.mean() for x in ref])
    std_ours, std_ref = np.mean([x.std() for x in ours]), np.mean([x.std() for x in ref])
    spec_ours = np.mean([_radial_log_spectrum(x) for x in ours], axis=0)
    spec_ref = np.mean([_radial_log_spectrum(x) for x in ref], axis=0)
    assert abs(mean_ours - mean_ref) < 0.03
    assert 0.92 < std_ours / std_ref < 1.08
    np.testing.assert_allclose(spec_ours, spec_ref, rtol=0, atol=0.08)


# ----------------------------------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------------------------------
def _slice(seed: int = 0, shape=(1, 48, 40)) -> torch.Tensor:
    return torch.from_numpy(np.random.RandomState(seed).rand(*shape).astype(np.float32))


def test_rand_perlin_noise_adds_official_noise():
    img = _slice()
    t = RandPerlinNoise(prob=1.0).set_random_state(seed=0)
    out = t(img)
    assert out.shape == img.shape and out.dtype == torch.float32
    p = t.params
    assert 10 <= p["scale"] < 30 and -0.5 <= p["persistence"] < 0.5 and 0 <= p["base"] < 1000
    expected = img[0].numpy() + perlin_noise_2d((48, 40), p["scale"], persistence=p["persistence"], base=p["base"])
    np.testing.assert_array_equal(np.asarray(out[0]), expected)  # added as is: no clipping, no rescaling
    half = RandPerlinNoise(prob=1.0, amplitude=0.5).set_random_state(seed=0)(img)
    np.testing.assert_allclose(np.asarray(half - img), 0.5 * np.asarray(out - img), atol=1e-6)


def test_rand_perlin_noise_draws_the_official_distribution():
    t = RandPerlinNoise(prob=1.0).set_random_state(seed=1)
    draws = [t.sampler.draw(t.R) for _ in range(2000)]
    scales = {d["scale"] for d in draws}
    persistences = {round(d["persistence"] * 100) for d in draws}
    bases = [d["base"] for d in draws]
    assert scales == set(range(10, 30))
    assert persistences == set(range(-50, 50))  # 0.01 * randint(-50, 50)
    assert all(abs(d["persistence"] * 100 - round(d["persistence"] * 100)) < 1e-9 for d in draws)
    assert min(bases) >= 0 and max(bases) <= 999 and len(set(bases)) > 800
    assert OFFICIAL_PERLIN_PARAMS["scale_range"] == (10, 30)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RandPerlinNoise(prob=1.0),
        lambda: RandPerlinNoised(keys="image", prob=1.0),
        lambda: RandPerlinNoiseBatch(fraction=0.5),
    ],
    ids=["RandPerlinNoise", "RandPerlinNoised", "RandPerlinNoiseBatch"],
)
def test_same_seed_same_output_different_seed_differs(make):
    def run(seed: int) -> list[torch.Tensor]:
        t = make().set_random_state(seed=seed)
        outs = []
        for step in range(3):
            if isinstance(t, RandPerlinNoiseBatch):
                outs.append(t(_slice(step, (4, 1, 32, 32))))
            elif isinstance(t, RandPerlinNoised):
                outs.append(t({"image": _slice(step)})["image"])
            else:
                outs.append(t(_slice(step)))
        return outs

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(not torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[1])  # a fresh draw per call


def test_rand_perlin_noise_prob_zero_and_channels():
    img = _slice(shape=(2, 32, 24))
    assert torch.equal(RandPerlinNoise(prob=0.0).set_random_state(seed=0)(img), img)
    out = RandPerlinNoise(prob=1.0).set_random_state(seed=0)(img)
    torch.testing.assert_close(out[0] - img[0], out[1] - img[1])  # one noise image for every channel


def test_rand_perlin_noised_leaves_target_untouched():
    img = _slice()
    target = img.clone()
    data = {"image": img, "aux": img.clone(), "target": target}
    t = RandPerlinNoised(keys=["image", "aux"], prob=1.0).set_random_state(seed=3)
    out = t(data)
    assert out["target"] is target and torch.equal(out["target"], img)
    assert not torch.equal(out["image"], img)
    torch.testing.assert_close(out["image"], out["aux"])  # every key gets the same draw
    # equals the array transform with the same seed (MONAI's Rand*d convention)
    torch.testing.assert_close(out["image"], RandPerlinNoise(prob=1.0).set_random_state(seed=3)(img))
    assert torch.equal(data["image"], target)  # input dict's tensors not modified in place
    # in a Compose, seeded through Compose.set_random_state
    c1 = Compose([RandPerlinNoised(keys="image")]).set_random_state(seed=5)
    c2 = Compose([RandPerlinNoised(keys="image")]).set_random_state(seed=5)
    torch.testing.assert_close(c1({"image": img})["image"], c2({"image": img})["image"])


@pytest.mark.parametrize("batch_size, fraction, n_noisy", [(5, 0.5, 2), (16, 0.5, 8), (4, 0.0, 0), (3, 1.0, 3)])
def test_rand_perlin_noise_batch_noises_first_part_only(batch_size, fraction, n_noisy):
    clean = _slice(0, (batch_size, 1, 32, 32)).double()
    snapshot = clean.clone()
    t = RandPerlinNoiseBatch(fraction=fraction).set_random_state(seed=0)
    assert t.n_noisy(batch_size) == n_noisy
    out = t(clean)
    assert out.shape == clean.shape and out.dtype == torch.float64
    assert torch.equal(clean, snapshot)  # input untouched
    assert torch.equal(out[n_noisy:], clean[n_noisy:])  # the second half stays clean
    assert len(t.params) == n_noisy
    for i, p in enumerate(t.params):
        noise_i = perlin_noise_2d((32, 32), p["scale"], persistence=p["persistence"], base=p["base"])
        np.testing.assert_allclose((out[i, 0] - clean[i, 0]).numpy(), noise_i, atol=1e-6)


def test_rand_perlin_noise_batch_resumes_from_saved_state():
    clean = _slice(0, (6, 1, 32, 32))
    t = RandPerlinNoiseBatch().set_random_state(seed=11)
    t(clean)
    state = t.R.get_state()  # what a checkpoint stores
    expected = t(clean)
    resumed = RandPerlinNoiseBatch().set_random_state(seed=0)
    resumed.R.set_state(state)
    assert torch.equal(resumed(clean), expected)


# ----------------------------------------------------------------------------------------------------------------------
# validation: ValueError "`x` must be ..., not ..."
# ----------------------------------------------------------------------------------------------------------------------
INVALID = [
    (lambda: perlin_noise_2d((0, 5), 10), "`shape` must be"),
    (lambda: perlin_noise_2d((5, 5, 5), 10), "`shape` must be"),
    (lambda: perlin_noise_2d((5, 5), 0), "`scale` must be"),
    (lambda: perlin_noise_2d((5, 5), float("inf")), "`scale` must be"),
    (lambda: perlin_noise_2d((5, 5), 10, octaves=0), "`octaves` must be"),
    (lambda: perlin_noise_2d((5, 5), 10, octaves=2.5), "`octaves` must be"),
    (lambda: perlin_noise_2d((5, 5), 10, persistence=float("nan")), "`persistence` must be"),
    (lambda: perlin_noise_2d((5, 5), 10, lacunarity=0), "`lacunarity` must be"),
    (lambda: perlin_noise_2d((5, 5), 10, repeat=-140), "`repeat` must be"),
    (lambda: perlin_noise_2d((5, 5), 10, base=-1), "`base` must be"),
    (lambda: perlin_noise_2d((5, 5), 10, base=1.5), "`base` must be"),
    (lambda: perlin_noise_2d((5, 5), 10, octaves=10, persistence=-1.0), "`persistence` must"),
    (lambda: perlin_noise_2d((500, 5), 1e-6), "`scale` must keep lattice coordinates below 2"),
    (lambda: perlin_noise_2d_batch((5, 5), [10, 12], [0.1], [0, 1]),
     "`scale`, `persistence` and `base` must have the same length"),
    (lambda: RandPerlinNoise(prob=1.5), "`prob` must be"),
    (lambda: RandPerlinNoise(scale_range=(30, 10)), "`scale_range` must be"),
    (lambda: RandPerlinNoise(scale_range=(0, 10)), "`scale_range` must be"),
    (lambda: RandPerlinNoise(scale_range=(10.5, 20)), "`scale_range` must be"),
    (lambda: RandPerlinNoise(persistence_range=(0.5, -0.5)), "`persistence_range` must be"),
    (lambda: RandPerlinNoise(persistence_range=(0.0, 0.001)), "`persistence_range` must"),
    (lambda: RandPerlinNoise(persistence_range=(-1.0, 0.0)), "`persistence` must"),  # -1 in range: amplitude 0
    (lambda: RandPerlinNoise(persistence_range=(-2.0, 0.0)), "`persistence` must"),
    (lambda: RandPerlinNoise(base_range=(-1, 10)), "`base_range` must be"),
    (lambda: RandPerlinNoise(amplitude=float("nan")), "`amplitude` must be"),
    (lambda: RandPerlinNoise(prob=1.0)(torch.zeros(8, 8)), "`img` must be"),
    (lambda: RandPerlinNoised(keys="image", prob=-0.1), "`prob` must be"),
    (lambda: RandPerlinNoiseBatch(fraction=2), "`fraction` must be"),
    (lambda: RandPerlinNoiseBatch()(torch.zeros(1, 8, 8)), "`img` must be"),
]


@pytest.mark.parametrize("call, match", INVALID, ids=[f"{m.split('`')[1]}-{i}" for i, (_, m) in enumerate(INVALID)])
def test_invalid_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert ", not " in str(info.value)
