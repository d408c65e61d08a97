"""Apply the evidence selection rule of docs/evidence_selection_rule.md to trained candidates (issue 25).

For each candidate (a score column of the slice table, computed with a given model), on the shared labelled series:

* ``within``: mean of the within-patient lung-slice AUCs on P001 and cap001 (DeLong 95% CIs per patient);
* ``pooled``: P001's and cap001's infected lung slices against all lung slices of normal001;
* insertion check (learned candidates): MosMed-shaped lesions inserted into the normal001 excerpt at ground-glass and
  consolidation densities (``tests/inference/test_lesion_insertion.py``'s insertion); the share of inserted slices
  whose score rises;

then the rule: figure of merit ``min(within, pooled)``; eligible learned candidates need a rise on >= 75% of the
inserted slices for both densities; a learned candidate replaces ``hu`` only when its figure of merit is higher by
>= 0.02. Writes ``OUT/selection.md`` and ``OUT/selection.json``.

    python benchmarks/evidence_selection.py -o runs/selection \\
        --candidate B1=lesion_score:runs/B1/model --candidate A1=residual_mean_pos:runs/A1/model \\
        --candidate A1-scan=residual_mean_pos@scan:runs/A1/model

``hu`` (``hu_score``) is always a candidate. ``@scan`` standardises the score by the scan's own lung slices
((score − median) / IQR). A model directory with a ``lesion`` component is scored with the bundled denoiser beside
it; one with a ``denoiser`` component as the denoiser.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from covidctnet.core.model_dir import load_model_dir  # noqa: E402
from covidctnet.core.slice_table import read_slices_csv  # noqa: E402
from covidctnet.evaluation.stats import delong_auc_ci  # noqa: E402
from covidctnet.inference.lesion_maps import cached_lesion_model  # noqa: E402
from covidctnet.inference.residuals import cached_denoiser  # noqa: E402
from covidctnet.inference.slice_scores import SliceScoresConfig, score_volume, slice_scores  # noqa: E402
from covidctnet.io.volume import read_volume  # noqa: E402
from covidctnet.models.registry import DEMO_MODEL, LESION_COMPONENT  # noqa: E402
from covidctnet.preprocessing.lungmask3d import ras_lung_mask  # noqa: E402
from covidctnet.preprocessing.preprocess import recorded_preprocess  # noqa: E402
from tests.data_paths import require_data  # noqa: E402
from tests.inference.test_lesion_insertion import INSERTED, insert_lesions, lesion_shapes  # noqa: E402

PATIENTS = ("covid-P001", "cap-cap001")
NORMAL = "control-normal001"
LUNG_FRACTION = 0.25
MARGIN, ELIGIBLE = 0.02, 0.75


def labels_by_z(path: Path) -> dict[str, list[tuple[float, int]]]:
    out: dict[str, list[tuple[float, int]]] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["study_id"], []).append((float(row["z_mm"]), int(row["infected"])))
    return out


def lung_rows(rows: list[dict]) -> list[dict]:
    top = max(r["lung_ml"] for r in rows)
    return [r for r in rows if r["lung_ml"] >= LUNG_FRACTION * top and np.isfinite(r["hu_score"])]


def column(rows: list[dict], spec: str) -> np.ndarray:
    name, _, mode = spec.partition("@")
    values = np.array([r[name] for r in rows], dtype=np.float64)
    if mode == "scan":
        q1, med, q3 = np.percentile(values, [25, 50, 75])
        values = (values - med) / max(q3 - q1, 1e-12)
    return values


def auc_ci(y: np.ndarray, s: np.ndarray) -> dict:
    est = delong_auc_ci(y, s)
    return {"auc": float(est.value), "ci": [float(est.ci_low), float(est.ci_high)], "n": int(y.size),
            "n_pos": int(y.sum())}


def score_tables(name: str, model: Path, out: Path, data: Path) -> dict[str, list[dict]]:
    components = load_model_dir(model).config.get("components") or {}
    lesion = model if LESION_COMPONENT in components else None
    denoiser = model if "denoiser" in components else DEMO_MODEL
    inputs = [data / "ct-dicom-full" / s for s in (*PATIENTS, NORMAL)]
    summary = slice_scores(inputs, out / name, denoiser, SliceScoresConfig(device="cpu", backend="torch"),
                           lesion_model=lesion)
    if summary.n_failed:
        raise SystemExit(f"{name}: slice-scores failed on {summary.n_failed} studies")
    return {s: read_slices_csv(out / name / f"{s}_slices.csv") for s in (*PATIENTS, NORMAL)}


def evaluate(tables: dict[str, list[dict]], spec: str, labels: dict) -> dict:
    result: dict = {"within": {}}
    pos_scores, neg_scores = [], []
    for study in PATIENTS:
        rows = lung_rows(tables[study])
        zs = {round(z, 1): y for z, y in labels[study]}
        y = np.array([zs[round(r["z_mm"], 1)] for r in rows])
        s = column(rows, spec)
        result["within"][study] = auc_ci(y, s)
        pos_scores.append(s[y == 1])
    neg_scores.append(column(lung_rows(tables[NORMAL]), spec))
    pos, neg = np.concatenate(pos_scores), np.concatenate(neg_scores)
    result["pooled"] = auc_ci(np.r_[np.ones(pos.size, int), np.zeros(neg.size, int)], np.r_[pos, neg])
    result["mean_within"] = float(np.mean([b["auc"] for b in result["within"].values()]))
    result["merit"] = min(result["mean_within"], result["pooled"]["auc"])
    return result


def insertion_check(model: Path, spec: str) -> dict:
    """Share of inserted slices whose score rises, for ground glass (-600 HU) and consolidation (0 HU)."""
    name = spec.partition("@")[0]
    components = load_model_dir(model).config.get("components") or {}
    den_dir = model if "denoiser" in components else DEMO_MODEL
    den, pre = cached_denoiser(str(den_dir), "cpu", "torch"), recorded_preprocess(load_model_dir(den_dir))
    lesion = cached_lesion_model(str(model), "cpu") if LESION_COMPONENT in components else None
    volume = read_volume(require_data("ct-dicom", NORMAL))
    hu, affine, lungs = ras_lung_mask(volume)
    shapes = lesion_shapes(float(np.linalg.norm(affine[:3, 0])), hu.shape[:2], 16)
    cfg = SliceScoresConfig(device="cpu", backend="torch")
    clean = dataclasses.replace(volume, array=np.ascontiguousarray(hu, np.float32), affine=affine,
                                slice_positions=None)
    before = np.array([r[name] for r in score_volume(clean, den, pre, cfg, lungs=lungs, lesion_model=lesion)])
    out = {}
    for label, density in (("ground_glass", -600.0), ("consolidation", 0.0)):
        sick_hu, done = insert_lesions(hu, lungs.mask > 0, shapes, INSERTED, density)
        sick = dataclasses.replace(clean, array=sick_hu.astype(np.float32))
        after = np.array([r[name] for r in score_volume(sick, den, pre, cfg, lungs=lungs, lesion_model=lesion)])
        rise = after[done] - before[done]
        out[label] = {"rising": int((rise > 0).sum()), "inserted": len(done), "share": float(np.mean(rise > 0))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--candidate", action="append", default=[], help="NAME=COLUMN[@scan]:MODEL_DIR")
    ap.add_argument("--data", type=Path, default=require_data())
    args = ap.parse_args()
    labels = labels_by_z(args.data / "ct-dicom-full" / "slice_labels.csv")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    cands = [c.partition("=") for c in args.candidate]
    for name, _, rest in cands:
        spec, _, model = rest.partition(":")
        tables = score_tables(name, Path(model), args.out, args.data)
        results[name] = {"column": spec, "model": model, **evaluate(tables, spec, labels),
                         "insertion": insertion_check(Path(model), spec)}
        if "hu" not in results:
            results["hu"] = {"column": "hu_score", "model": "(none)", **evaluate(tables, "hu_score", labels)}
        print(name, json.dumps({k: results[name][k] for k in ("mean_within", "pooled", "merit", "insertion")}),
              flush=True)
    hu = results["hu"]["merit"]
    eligible = {n: r for n, r in results.items() if n != "hu" and
                all(v["share"] >= ELIGIBLE for v in r["insertion"].values())}
    best = max(eligible, key=lambda n: eligible[n]["merit"], default=None)
    winner = best if best is not None and eligible[best]["merit"] >= hu + MARGIN else "hu"
    summary = {"winner": winner, "candidates": results, "rule": "docs/evidence_selection_rule.md"}
    (args.out / "selection.json").write_text(json.dumps(summary, indent=1))
    lines = ["| candidate | score | P001 within | cap001 within | mean within | pooled vs normal001 | min (merit) | "
             "insertion GGO / consolidation |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda b: f"{b['auc']:.2f} ({b['ci'][0]:.2f}–{b['ci'][1]:.2f})"  # noqa: E731
    for n, r in results.items():
        ins = r.get("insertion")
        ins_text = (f"{ins['ground_glass']['rising']}/{ins['ground_glass']['inserted']} / "
                    f"{ins['consolidation']['rising']}/{ins['consolidation']['inserted']}") if ins else "—"
        lines.append(f"| {n} | `{r['column']}` | {fmt(r['within'][PATIENTS[0]])} | {fmt(r['within'][PATIENTS[1]])} "
                     f"| {r['mean_within']:.3f} | {fmt(r['pooled'])} | {r['merit']:.3f} | {ins_text} |")
    lines += ["", f"Winner by the rule: **{winner}**."]
    (args.out / "selection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
