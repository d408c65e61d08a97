"""Self-contained HTML pages of results: one page to scroll instead of a folder of CSV, JSON and PNG files.

* :func:`write_predict_html` (``predict``'s ``report.html``): a row per study with the call, the three probabilities
  as bars, the residual overlay (the ``--save-residuals`` one, else the small preview predict draws for this page),
  the input checks passed, the seconds per step and, with ``--store-to``, where the SR and SEG were stored (SOP
  Instance UIDs), or the one-line error of a failed study. The table fits a 1,200-pixel-wide window: the overlay
  scales with the column, long ids (DICOM UIDs) wrap.
* :func:`write_markdown_html` (``evaluate``'s ``report.html``): the Markdown report (metrics tables, confusion
  matrices) rendered with markdown-it-py, its ROC and confusion PNGs embedded.

Each page is one file: inline CSS, images as base64 ``data:`` URIs, no script and no reference to anything outside
it, so it opens offline and can be archived or mailed as it is. Every text taken from the data is HTML-escaped (raw HTML
in the Markdown is escaped too). Studies appear by study id only, as in ``report.csv``: no patient identifier.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from covidctnet.core.files import atomic_write_text
from covidctnet.core.labels import CLASS_NAMES

__all__ = ["embed_png", "predict_html", "write_markdown_html", "write_predict_html"]

_CLASS_COLOURS = {"control": "#2e7d32", "covid": "#c62828", "cap": "#ef6c00"}
_STEPS = ("read", "preprocess", "denoise", "classify")
_NOTICE = "Research software, not a medical device."

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
.meta { color: #555; margin: 0.2em 0; }
.notice { color: #8a4b00; }
table { border-collapse: collapse; margin: 1em 0; width: 100%; max-width: 80em; }
th, td { border: 1px solid #ccc; padding: 0.4em 0.6em; vertical-align: top; text-align: left; }
th { background: #f2f2f2; }
td.id { max-width: 12em; overflow-wrap: anywhere; }
td.image { width: 40%; }
.stored { color: #555; font-size: 0.8em; margin-top: 0.4em; overflow-wrap: anywhere; }
tr.study.failed td { background: #fff3f3; }
.badge { display: inline-block; padding: 0.2em 0.6em; border-radius: 3px; font-weight: bold; color: #fff;
  background: #37474f; }
.badge.error { background: #b71c1c; }
.label { color: #555; font-size: 0.9em; }
.probs { min-width: 13em; }
.prob { display: flex; align-items: center; margin: 0.15em 0; font-size: 0.9em; }
.prob .name { width: 4.5em; }
.prob .track { flex: none; width: 5em; height: 0.9em; background: #eee; margin: 0 0.4em; }
.prob .fill { height: 100%; }
.prob .value { width: 3.2em; text-align: right; font-variant-numeric: tabular-nums; }
.prob.top .name, .prob.top .value { font-weight: bold; }
img { max-width: 100%; display: block; }
img.overlay { width: 100%; max-width: 36em; min-width: 12em; height: auto; }
.checks span { display: inline-block; background: #e8f0fe; border-radius: 3px; padding: 0 0.3em; margin: 0.1em;
  font-size: 0.85em; }
.seconds { font-variant-numeric: tabular-nums; font-size: 0.9em; white-space: nowrap; }
.message { color: #8e0000; font-family: ui-monospace, monospace; font-size: 0.9em; white-space: pre-wrap;
  overflow-wrap: anywhere; }
.missing { color: #777; font-style: italic; }
"""


def embed_png(path: str | os.PathLike) -> str:
    """The PNG at ``path`` as a ``data:image/png;base64,…`` URI (for an ``<img src>``)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        # no network, no script: only inline styles and data: images may load, even if a value slipped through
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _probability_bars(row: Mapping[str, Any]) -> str:
    probs = [float(row[f"p_{c}"]) for c in CLASS_NAMES]
    top = max(range(len(probs)), key=probs.__getitem__)
    bars = []
    for i, (name, p) in enumerate(zip(CLASS_NAMES, probs)):
        width = min(max(p, 0.0), 1.0) * 100
        bars.append(
            f"<div class=\"prob{' top' if i == top else ''}\"><span class=\"name\">{_e(name)}</span>"
            f"<span class=\"track\"><span class=\"fill\" style=\"display:block;width:{width:.1f}%;"
            f"background:{_CLASS_COLOURS.get(name, '#555')}\"></span></span>"
            f"<span class=\"value\">{p:.3f}</span></div>"
        )
    return "".join(bars)


def _seconds(seconds: Mapping[str, float] | None) -> str:
    if not seconds:
        return ""
    steps = [s for s in _STEPS if s in seconds] + [s for s in seconds if s not in _STEPS]
    lines = [f"{_e(s)} {float(seconds[s]):.1f} s" for s in steps]
    lines.append(f"<b>total {sum(float(v) for v in seconds.values()):.1f} s</b>")
    return "<br>".join(lines)


def _study_row(row: Mapping[str, Any], out_dir: Path) -> str:
    sid = _e(row.get("study_id"))
    label = f"<div class=\"label\">label: {_e(row['label'])}</div>" if row.get("label") else ""
    if row.get("status") != "ok":
        return (
            f"<tr class=\"study failed\" data-status=\"error\"><td class=\"id\">{sid}{label}</td>"
            "<td><span class=\"badge error\">error</span></td>"
            f"<td colspan=\"4\" class=\"message\">{_e(row.get('error'))}</td></tr>"
        )
    overlay = row.get("overlay") or row.get("preview")
    if overlay and (out_dir / overlay).is_file():
        image = f"<img class=\"overlay\" alt=\"residual overlay of {sid}\" src=\"{embed_png(out_dir / overlay)}\">"
    else:
        image = "<span class=\"missing\">no overlay (predict with --save-residuals)</span>"
    checks = "".join(f"<span>{_e(c)}</span>" for c in str(row.get("checks") or "").split())
    stored = row.get("stored")
    if stored:
        stored = (f"<div class=\"stored\">stored to {_e(stored.get('to'))}: "
                  f"{' '.join(_e(u) for u in stored.get('sop_instance_uids', []))}</div>")
    return (
        f"<tr class=\"study ok\" data-status=\"ok\"><td class=\"id\">{sid}{label}{stored or ''}</td>"
        f"<td><span class=\"badge\">{_e(row.get('predicted'))}</span></td>"
        f"<td class=\"probs\">{_probability_bars(row)}</td><td class=\"image\">{image}</td>"
        f"<td class=\"checks\">{checks}</td>"
        f"<td class=\"seconds\">{_seconds(row.get('seconds'))}</td></tr>"
    )


def predict_html(report: Mapping[str, Any], out_dir: str | os.PathLike) -> str:
    """The page of a ``predict`` report.

    Args:
        report: the content of ``report.json`` (``model``, ``weights_sha256``, ``backend``, ``precision``,
            ``studies``: rows with ``study_id``, ``status``, ``error``, ``predicted``, ``p_<class>``, ``checks``,
            ``seconds``, ``overlay`` or ``preview`` (a PNG file name relative to ``out_dir``) and ``stored``
            (``{"to": ..., "sop_instance_uids": [...]}``)).
        out_dir: the folder the overlay names are relative to.
    """
    out_dir = Path(out_dir)
    studies: Sequence[Mapping[str, Any]] = report.get("studies", [])
    n_ok = sum(1 for r in studies if r.get("status") == "ok")
    sha = str(report.get("weights_sha256") or "")
    head = [
        "<h1>covidctnet predict</h1>",
        (f"<p class=\"meta\">model <b>{_e(report.get('model'))}</b> (weights_sha256 {_e(sha[:12])}…), "
         f"backend {_e(report.get('backend'))}, precision {_e(report.get('precision'))}, preprocessing profile "
         f"{_e(report.get('preprocess_profile'))}</p>"),
        f"<p class=\"meta\">{len(studies)} studies: {n_ok} predicted, {len(studies) - n_ok} failed</p>",
        f"<p class=\"meta notice\">{_e(_NOTICE)} The call is the class of highest probability.</p>",
    ]
    table = [
        "<table class=\"studies\">",
        ("<thead><tr><th>study</th><th>call</th><th>probabilities</th><th>residual overlay</th><th>checks passed</th>"
         "<th>seconds</th></tr></thead>"),
        "<tbody>",
        *(_study_row(r, out_dir) for r in studies),
        "</tbody>",
        "</table>",
    ]
    return _page("covidctnet predict report", "\n".join(head + table))


def write_predict_html(path: str | os.PathLike, report: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write :func:`predict_html` to ``path`` atomically."""
    atomic_write_text(path, predict_html(report, out_dir))
    return Path(path)


def write_markdown_html(path: str | os.PathLike, markdown: str, image_dir: str | os.PathLike, title: str) -> Path:
    """Render a Markdown report (CommonMark + tables) to one HTML page, its PNG images embedded.

    Args:
        path: the HTML file to write (atomically).
        markdown: the report's text; raw HTML in it is shown as text, not interpreted.
        image_dir: the folder relative image paths are read from (a missing image keeps its name and alt text).
        title: the page title.
    """
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    for token in tokens:
        for child in token.children or []:
            if child.type == "image":
                src = Path(image_dir) / str(child.attrGet("src") or "")
                if src.suffix.lower() == ".png" and src.is_file():
                    child.attrSet("src", embed_png(src))
    body = md.renderer.render(tokens, md.options, {})
    atomic_write_text(path, _page(title, body))
    return Path(path)
