"""Generate the SYNTHETIC example reader study in this folder (truth, model report, 4 readers).

Every number here is made up by a seeded random generator: no patient, scan, radiologist or trained model is behind
it. It only exists so that ``covidctnet reader-study`` can be tried at once and its output read; it says nothing about
CovidCTNet's or anyone's accuracy.

Run ``python examples/reader_study/make_example.py`` to rewrite the CSVs (the output is byte-for-byte deterministic;
``tests/test_reader_study.py`` checks the committed files against it).

The story: 45 cases (15 control, 15 COVID-19, 15 CAP). The "model" gives softmax-like probabilities with a bonus on the
true class. Each "reader" is right with a reader-specific probability that drops on harder cases (a case difficulty
shared by all readers, so their errors are correlated, as real readers' are); wrong reads confuse COVID-19 and CAP
more often than either with control. Readers 1 and 2 also give a 1-5 confidence that the case is COVID-19.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

CLASSES = ("control", "covid", "cap")
SEED = 20210305  # fixed: the files in this folder are this seed's output
N_PER_CLASS = 15
READER_ACCURACY = (0.86, 0.80, 0.74, 0.70)
READERS_WITH_SCORES = (0, 1)
# P(wrong label | true class), rows = truth, columns = the wrong label chosen
CONFUSION = {
    "control": {"covid": 0.4, "cap": 0.6},
    "covid": {"control": 0.3, "cap": 0.7},
    "cap": {"control": 0.35, "covid": 0.65},
}


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def generate(out_dir: Path) -> list[Path]:
    """Write truth.csv, model_report.csv and reader_1.csv … reader_4.csv into ``out_dir``; return their paths."""
    rng = np.random.default_rng(SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    truth = np.repeat(np.arange(3), N_PER_CLASS)
    truth = truth[rng.permutation(truth.size)]
    n = truth.size
    ids = [f"SYN-{i + 1:03d}" for i in range(n)]
    difficulty = rng.uniform(0.0, 1.0, size=n)

    # model: logits with a bonus on the true class that shrinks on difficult cases
    logits = rng.normal(0.0, 1.0, size=(n, 3))
    logits[np.arange(n), truth] += 2.6 * (1.0 - 0.6 * difficulty)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    probs = np.round(probs, 6)

    paths = [out_dir / "truth.csv", out_dir / "model_report.csv"]
    _write(paths[0], ["case_id", "label"], [[cid, CLASSES[t]] for cid, t in zip(ids, truth)])
    _write(
        paths[1],
        ["study_id", "p_control", "p_covid", "p_cap", "predicted", "status", "error", "model", "weights_sha256"],
        [
            [
                cid,
                *(f"{p:.6f}" for p in row),
                CLASSES[int(np.argmax(row))],
                "ok",
                "",
                "SYNTHETIC-example-not-a-model",
                "",
            ]
            for cid, row in zip(ids, probs)
        ],
    )
    for r, accuracy in enumerate(READER_ACCURACY):
        rows = []
        for cid, t, d in zip(ids, truth, difficulty):
            p_right = accuracy * (1.15 - 0.3 * d)
            true_name = CLASSES[t]
            if rng.uniform() < min(p_right, 0.99):
                label = true_name
            else:
                wrong = CONFUSION[true_name]
                label = str(rng.choice(list(wrong), p=list(wrong.values())))
            row = [cid, label]
            if r in READERS_WITH_SCORES:
                # 1-5 confidence of COVID-19: high when the reader calls COVID-19, a little higher on true COVID-19
                base = 4.2 if label == "covid" else 1.8
                base += 0.6 if true_name == "covid" else 0.0
                row.append(str(int(np.clip(np.round(base + rng.normal(0.0, 0.8)), 1, 5))))
            rows.append(row)
        path = out_dir / f"reader_{r + 1}.csv"
        _write(path, ["case_id", "label", "score"] if r in READERS_WITH_SCORES else ["case_id", "label"], rows)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="output folder (default: here)"
    )
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
