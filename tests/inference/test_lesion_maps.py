"""Lesion maps of the bundled lesion model: its recorded preprocessing, and probabilities only inside the lungs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from covidctnet.core.errors import ModelDirError
from covidctnet.core.model_dir import load_model_dir
from covidctnet.inference.lesion_maps import cached_lesion_model, lesion_preprocess, lesion_probability
from covidctnet.models.registry import DEMO_MODEL
from covidctnet.preprocessing.preprocess import recorded_preprocess

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_lesion_preprocess_is_the_recorded_one_and_checked():
    model = cached_lesion_model(str(DEMO_MODEL), "cpu")
    assert lesion_preprocess(model) == recorded_preprocess(load_model_dir(DEMO_MODEL))
    with pytest.raises(ModelDirError, match=r"config\.yaml: preprocess"):
        lesion_preprocess(dataclasses.replace(model, preprocess={**model.preprocess, "hu_min": "air"}))
    with pytest.raises(ModelDirError, match="differs from the lesion model's input"):
        lesion_preprocess(dataclasses.replace(model, preprocess={**model.preprocess, "size_xy": 64}))


def test_probability_only_inside_the_lungs():
    model = cached_lesion_model(str(DEMO_MODEL), "cpu")
    s = model.size_xy
    array = np.random.default_rng(0).random((s, s, 3), dtype=np.float32)
    lung = np.zeros(array.shape, bool)
    lung[s // 4 : s // 2, s // 4 : s // 2, 1] = True  # one slice with lung, two without
    prob = lesion_probability(array, lung, model, batch_size=2)
    assert prob.dtype == np.float32 and prob.shape == array.shape
    assert not prob[~lung].any() and 0 <= prob.min() and prob.max() <= 1 and prob[lung].any()
    with pytest.raises(ValueError, match="must both be"):
        lesion_probability(array[:, :, :2], lung, model)
