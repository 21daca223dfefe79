"""`instill check-claims`: every verdict written in the docs agrees with the finding it cites.

A verdict is one of `statistics.VERDICTS` written in bold (`**better**`, `**undecided**`, ...). The
sentence (or table row) that holds it cites the findings it rests on as links to the anchors of a
committed report's `findings.md` (`[n = 99](compare/findings.md#mine-vs-theirs-n99)`),
resolved relative to the document; the finding is read from the `findings.parquet` beside it. A
claim fails when its sentence has a verdict and no citation, cites a finding that does not exist,
or when its verdicts and its findings' verdicts differ (each bold verdict must be a cited finding's,
and each cited finding's verdict must be written). Verdicts in plain words ("beats", "level") are
not recognised: write them in the vocabulary, in bold, so that they can be checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from orchestrator.config import ConfigError
from orchestrator.report.statistics import VERDICTS

_BOLD = re.compile(r"\*\*(" + "|".join(VERDICTS) + r")\*\*", re.IGNORECASE)
_CITE = re.compile(r"\]\(([^)#\s]*findings\.md)#([^)\s]+)\)")
# A sentence ends at a full stop, question or exclamation mark followed by a space and a capital or a
# markup character; a table row, list item or heading is a sentence of its own.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z*`(\[])")


def sentences(markdown: str) -> list[tuple[int, str]]:
    """(line number, sentence) of a Markdown text: paragraphs joined across lines, then split."""
    out: list[tuple[int, str]] = []
    block: list[str] = []
    start = 0

    def flush():
        if block:
            out.extend((start, s) for s in _SENTENCE_END.split(" ".join(block)))
            block.clear()

    fenced = False
    for number, line in enumerate(markdown.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            fenced = not fenced
            continue
        if fenced:
            continue
        if not stripped or stripped.startswith(("|", "#", "- ", "* ", "1. ")):
            flush()
            if stripped:
                block.append(stripped)
                start = number
                flush()
            continue
        if not block:
            start = number
        block.append(stripped)
    flush()
    return out


def check(path: Path, cache: dict[Path, pd.DataFrame] | None = None) -> list[str]:
    """The failed claims of the Markdown file `path`, each as `file:line: why: sentence`."""
    cache = {} if cache is None else cache
    problems = []
    for line, sentence in sentences(path.read_text()):
        written = {w.lower() for w in _BOLD.findall(sentence)}
        cites = _CITE.findall(sentence)
        if not written and not cites:
            continue
        short = sentence if len(sentence) <= 160 else sentence[:157] + "..."
        where = f"{path}:{line}"
        if not cites:
            problems.append(f"{where}: verdict {sorted(written)} cites no finding: {short}")
            continue
        cited = set()
        for target, anchor in cites:
            try:
                cited.add(_verdict(path.parent / target, anchor, cache))
            except LookupError as missing:
                problems.append(f"{where}: {missing}: {short}")
        if cited and written != cited:
            says = sorted(written) or "no verdict"
            problems.append(f"{where}: the sentence says {says}, its findings say {sorted(cited)}: {short}")
    return problems


def _verdict(target: Path, anchor: str, cache: dict[Path, pd.DataFrame]) -> str:
    """The verdict of finding `anchor` of the report whose `findings.md` is `target`; LookupError
    saying why when there is none."""
    parquet = target.with_suffix(".parquet")
    if parquet not in cache:
        if not parquet.exists():
            raise LookupError(f"cites {target}, which has no findings.parquet beside it (`instill report --versus`)")
        cache[parquet] = pd.read_parquet(parquet).set_index("id")
    frame = cache[parquet]
    if anchor not in frame.index:
        raise LookupError(f"cites finding {anchor!r}, which {parquet} does not hold")
    return str(frame.loc[anchor, "verdict"])


def check_files(paths: list[Path]) -> list[str]:
    """The failed claims of every file; ConfigError when a file does not exist."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"check-claims: no such file: {', '.join(missing)}")
    cache: dict[Path, pd.DataFrame] = {}
    return [problem for path in paths for problem in check(path, cache)]
