"""Tests of covidctnet.evaluation.raters that the reader study's known-answer tests (test_reader_study.py) do not
reach: the majority vote's tie-break."""

from __future__ import annotations

import numpy as np

from covidctnet.evaluation.raters import majority_vote


def test_majority_vote_ties():
    votes = majority_vote(
        np.array(
            [
                ["covid", "cap", "cap", "covid"],  # covid / cap tie -> covid
                ["control", "cap", "control", "cap"],  # control / cap tie -> cap
                ["control", "control", "cap", "covid"],  # clear majority
                ["noncovid", "covid", "noncovid", "noncovid"],
            ],
            dtype=object,
        )
    )
    assert votes.tolist() == ["covid", "cap", "control", "noncovid"]
