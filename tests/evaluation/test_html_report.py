"""report.html pages: self-contained, escaped, one row per study, and what headless Chromium shows of them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from browser import colour_bands, layout, render, study_rows
from PIL import Image

from covidctnet.evaluation.evaluate import EvaluateConfig, evaluate
from covidctnet.evaluation.html_report import predict_html, write_markdown_html, write_predict_html

OK_BADGE = (0x37, 0x47, 0x4F)  # the call badge of a predicted study (html_report's CSS)
ERROR_BADGE = (0xB7, 0x1C, 0x1C)  # the badge of a failed study


def _overlay(path: Path, seed: int) -> str:
    """A stand-in overlay PNG (noise), 300x100 like predict's three-view strip."""
    pixels = np.random.default_rng(seed).integers(0, 256, (100, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path.name


def _report(out: Path, n_ok: int = 3) -> dict:
    studies = []
    for i in range(n_ok):
        p = np.roll([0.7, 0.2, 0.1], i)
        studies.append({
            "study_id": f"s{i}", "status": "ok", "error": "", "p_control": p[0], "p_covid": p[1], "p_cap": p[2],
            "predicted": ("control", "covid", "cap")[int(np.argmax(p))], "checks": "finite hounsfield chest_coverage",
            "seconds": {"read": 1.0, "preprocess": 0.5, "denoise": 40.0, "classify": 2.0},
            "overlay": _overlay(out / f"s{i}_overlay.png", i), "label": "covid"})
    studies.append({"study_id": "bad<b>&", "status": "error", "error": "/x/bad.nii.gz: truncated <script>alert(1)</script>"})
    return {"model": "tiny & <model>", "weights_sha256": "ab" * 32, "backend": "torch", "precision": "fp32",
            "preprocess_profile": "default", "studies": studies}


def test_predict_page_is_self_contained_and_escaped(tmp_path):
    page = predict_html(_report(tmp_path), tmp_path)
    assert study_rows(page) == {"ok": 3, "error": 1}
    assert page.count('src="data:image/png;base64,') == 3
    # nothing is fetched: every src is a data URI, no link, no script, no external style
    assert not re.search(r'src="(?!data:image/png;base64,)', page)
    assert not re.search(r"<script|href=|@import|url\(|https?://", page)
    assert "bad&lt;b&gt;&amp;" in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "tiny &amp; &lt;model&gt;" in page
    assert "total 43.5 s" in page  # 1.0 + 0.5 + 40.0 + 2.0
    assert page.count("chest_coverage") == 3
    # the bars: width = probability
    assert 'width:70.0%' in page and 'width:20.0%' in page and 'width:10.0%' in page


def test_predict_page_without_overlays_says_how_to_get_them(tmp_path):
    report = _report(tmp_path, n_ok=1)
    (tmp_path / "s0_overlay.png").unlink()
    page = predict_html(report, tmp_path)
    assert "data:image" not in page and "--save-residuals" in page


def test_chromium_shows_one_row_per_study(tmp_path):
    """The page as a browser shows it: the DOM's rows, and the screenshot's badges (one per row), not blank."""
    out = tmp_path / "out"
    out.mkdir()
    page = write_predict_html(out / "report.html", _report(out, n_ok=3), out)
    dom, shot = render(page, tmp_path)
    assert study_rows(dom) == {"ok": 3, "error": 1}
    assert shot.std() > 20 and (shot < 250).any(axis=2).mean() > 0.05  # not a blank page
    assert colour_bands(shot, OK_BADGE) == 3
    assert colour_bands(shot, ERROR_BADGE) == 1


def test_evaluate_page_embeds_the_figures_and_renders_the_tables(tmp_path):
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for i in range(24):
        y = i % 3
        p = rng.dirichlet([1, 1, 1]) + np.eye(3)[y]
        p /= p.sum()
        call = ("control", "covid", "cap")[int(np.argmax(p))]
        rows.append(f"s{i},{p[0]:.6f},{p[1]:.6f},{1 - p[0] - p[1]:.6f},{call},ok,,m,h\n")
        labels.append(f"s{i},{('control', 'covid', 'cap')[y]}\n")
    rows.append("<i>bad,,,,,error,boom,m,h\n")
    (tmp_path / "report.csv").write_text("study_id,p_control,p_covid,p_cap,predicted,status,error,model,weights_sha256\n"
                                         + "".join(rows))
    (tmp_path / "labels.csv").write_text("study_id,label\n" + "".join(labels) + "<i>bad,covid\n")
    out = tmp_path / "out"
    result = evaluate(tmp_path / "report.csv", tmp_path / "labels.csv", out, EvaluateConfig(n_bootstrap=50))
    page = (out / "report.html").read_text()
    figures = [f for f in result["files"] if f.endswith(".png")]
    assert len(figures) == 4 and page.count('src="data:image/png;base64,') == 4
    n_tables = sum(line.startswith("|---") for line in (out / "report.md").read_text().splitlines())
    assert n_tables >= 4 and page.count("<table>") == n_tables  # every Markdown table of report.md
    assert "&lt;i&gt;bad" in page and "<i>bad" not in page  # the excluded study id is shown as text
    dom, shot = render(out / "report.html", tmp_path)
    assert dom.count("<table>") == n_tables and shot.std() > 20


def test_markdown_page_keeps_a_missing_image_as_its_name(tmp_path):
    page = write_markdown_html(tmp_path / "r.html", "# T\n\n![roc](roc.png)\n\n<b>x</b>\n", tmp_path, "t").read_text()
    assert 'src="roc.png"' in page and "&lt;b&gt;x&lt;/b&gt;" in page


@pytest.mark.parametrize("n_ok", [0, 5])
def test_row_count_follows_the_studies(tmp_path, n_ok):
    assert study_rows(predict_html(_report(tmp_path, n_ok), tmp_path)) == ({"ok": n_ok} if n_ok else {}) | {"error": 1}


def test_predict_page_fits_1200_pixels_with_uids_and_small_overlays(tmp_path):
    """The widest rows predict writes: DICOM UIDs as study ids, the stored SR and SEG UIDs, the small preview
    overlay (600x220 pixels) of a run without --save-residuals, a long error. Chromium at 1,200 pixels: nothing
    overflows and every overlay is decoded and shown at a readable width."""
    report = _report(tmp_path, n_ok=3)
    for i, row in enumerate(report["studies"][:3]):
        row["study_id"] = "1.2.826.0.1.3680043.8.498." + str(10**37 + i)  # 64 characters, no break opportunity
        pixels = np.random.default_rng(i).integers(0, 256, (220, 600, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"p{i}.png")
        row["preview"], row["overlay"] = f"p{i}.png", None
        row["stored"] = {"to": "dicomweb+https://pacs.example.org:443/dicom-web",
                         "sop_instance_uids": [row["study_id"] + "1", row["study_id"] + "2"]}
    report["studies"][-1]["error"] = "dicomweb+https://pacs.example.org/dicom-web/studies/" + "1.2" * 30 + ": 401"
    write_predict_html(tmp_path / "report.html", report, tmp_path)
    shown = layout(tmp_path / "report.html", tmp_path, width=1200)
    assert shown["inner"] == 1200, shown
    assert shown["scroll"] <= 1200 and shown["right"] <= 1200, shown
    assert [w for w, _ in shown["images"]] == [600, 600, 600], shown
    assert all(w >= 250 for _, w in shown["images"]), shown
