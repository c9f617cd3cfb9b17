"""The performance notes cite records that exist, and list every journal entry once, in order."""

import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "results" / "bench"
DOCS = ("NOTES.md", "JOURNAL.md", "README.md")


def expand(name: str) -> list[str]:
    """Expand shell braces: ``a{1..3}b`` and ``a{x,y}b``, nested left to right."""
    m = re.search(r"\{([^{}]*)\}", name)
    if not m:
        return [name]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
    options = (
        [str(i) for i in range(int(span[1]), int(span[2]) + 1)] if span else m.group(1).split(",")
    )
    return [e for o in options for e in expand(name[: m.start()] + o + name[m.end() :])]


def cited_records(text: str) -> list[str]:
    """Record names in backticks: dated ones, or ones abbreviated with a leading ellipsis."""
    names = re.findall(r"`((?:20\d\d-|…|\.\.\.)[^`\s]*\.(?:json|log))`", text)
    return [e for n in names for e in expand(n)]


def test_expand():
    assert expand("a{1..2}_{x,y}") == ["a1_x", "a1_y", "a2_x", "a2_y"]
    assert expand("a.json") == ["a.json"]


@pytest.mark.parametrize("doc", DOCS)
def test_cited_records_exist(doc):
    cited = cited_records((BENCH / doc).read_text())
    assert len(cited) >= 10
    missing = []
    for name in cited:
        pattern = re.sub(r"^(…|\.\.\.)", "*", name)
        if not list(BENCH.glob(pattern)):
            missing.append(name)
    assert not missing, f"{doc} cites records that are not in results/bench: {missing}"


def test_notes_list_every_journal_entry_once_in_order():
    journal = re.findall(r"^### (\d+)\. ", (BENCH / "JOURNAL.md").read_text(), flags=re.M)
    notes = (BENCH / "NOTES.md").read_text().split("## Entries at a glance", 1)[1]
    rows = re.findall(r"^\| (\d+) \|", notes, flags=re.M)
    numbers = [int(n) for n in journal]
    assert numbers == list(range(1, len(numbers) + 1))
    assert [int(r) for r in rows] == numbers
