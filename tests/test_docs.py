"""The documentation names no folder of the machine it was written on (issue 30, item 4): a reader has none of them."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MACHINE_FOLDERS = re.compile(r"(?<![\w.~-])/(?:work|tmp|root)/")
"""The folders this project's machines keep work, scratch files and caches in."""

# docs/validation.md is being rewritten by the lead (issue 30, item 4); take it off this list once that is done
NOT_YET: set[str] = set()


def _documents() -> list[Path]:
    docs = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    assets = REPO / "covidctnet" / "assets"
    return docs + sorted(assets.rglob("MODEL_CARD.md")) + sorted(assets.rglob("config.yaml"))


def test_docs_name_no_folder_of_this_machine():
    found = {str(p.relative_to(REPO)): MACHINE_FOLDERS.findall(p.read_text()) for p in _documents()
             if str(p.relative_to(REPO)) not in NOT_YET}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_pattern_finds_what_it_guards():
    assert MACHINE_FOLDERS.findall("see /work/runs17/DECISIONS.txt and /tmp/x, /root/.cache") == ["/work/", "/tmp/",
                                                                                                 "/root/"]
    assert MACHINE_FOLDERS.findall("../shared/data, runs/work/, ~/.cache/torch, https://x.org/tmp/a") == []
