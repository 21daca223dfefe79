"""`instill check-claims`: every verdict written in the docs agrees with the finding it cites.

A verdict is one of `statistics.VERDICTS` written in bold (`**better**`, `**undecided**`, ...). The
sentence (or table row, or list item) that holds it cites the findings it rests on as links to the
anchors of a committed report's `findings.md`, resolved relative to the document; each finding is
read from the `findings.parquet` beside it. A bold verdict governs the citations after it, up to the
next verdict (citations before the first verdict belong to the first). A claim fails when a verdict
governs no citation, a citation no verdict, a cited finding does not exist, or a cited finding's
verdict is not the one that governs it. Inline code is not read. Verdicts in plain words ("beats",
"level") are not recognised: write them in the vocabulary, in bold, so that they can be checked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from orchestrator.config import ConfigError
from orchestrator.report.statistics import FEW_SEEDS, VERDICTS

_TOKEN = re.compile(
    r"\*\*(?P<verdict>" + "|".join(VERDICTS) + r")\*\*|\]\((?P<target>[^)#\s]*findings\.md)#(?P<anchor>[^)\s]+)\)",
    re.IGNORECASE,
)
_CODE = re.compile(r"`[^`]*`")
# A sentence ends at a full stop, question or exclamation mark followed by a space and a capital or a
# markup character; a table row, list item or heading is a sentence of its own.
_SENTENCE_END = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\bcf\.)(?<!\bvs\.)(?<=[.!?])\s+(?=[A-Z*`(\[])")


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
        if not stripped or stripped.startswith(("|", "#")):  # a blank line ends a block; a row is one
            flush()
            if stripped:
                out.append((number, stripped))
            continue
        if re.match(r"([-*]|\d+\.)\s", stripped):  # a list item starts a block, continued below
            flush()
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
        tokens = list(_TOKEN.finditer(_CODE.sub("", sentence)))
        if not tokens:
            continue
        short = sentence if len(sentence) <= 160 else sentence[:157] + "..."
        where = f"{path}:{line}"
        verdicts = [t["verdict"].lower() for t in tokens if t["verdict"]]
        if not verdicts:
            problems.append(f"{where}: cites findings but states no verdict: {short}")
            continue
        governed, at = [0] * len(verdicts), -1
        for token in tokens:
            if token["verdict"]:
                at += 1
                continue
            owner = max(at, 0)  # citations before the first verdict belong to it
            governed[owner] += 1
            try:
                found = _verdict(_target(path, token["target"]), token["anchor"], cache)
            except LookupError as missing:
                problems.append(f"{where}: {missing}: {short}")
                continue
            if found != verdicts[owner]:
                says = verdicts[owner]
                problems.append(f"{where}: **{says}** cites {token['anchor']}, whose verdict is {found}: {short}")
        unbacked = [verdict for verdict, n in zip(verdicts, governed, strict=True) if not n]
        problems += [f"{where}: **{verdict}** cites no finding: {short}" for verdict in unbacked]
    return problems


def _target(document: Path, link: str) -> Path:
    """The `findings.md` a document's link points at, normalised (one cache key per report)."""
    return Path(os.path.normpath(document.parent / link))


def _finding(target: Path, anchor: str, cache: dict[Path, pd.DataFrame]) -> pd.Series:
    """Finding `anchor` of the report whose `findings.md` is `target`; LookupError saying why when
    there is none."""
    parquet = target.with_suffix(".parquet")
    if parquet not in cache:
        if not parquet.exists():
            raise LookupError(f"cites {target}, which has no findings.parquet beside it (`instill report --versus`)")
        cache[parquet] = pd.read_parquet(parquet).set_index("id")
    frame = cache[parquet]
    if anchor not in frame.index:
        raise LookupError(f"cites finding {anchor!r}, which {parquet} does not hold")
    return frame.loc[anchor]


def _verdict(target: Path, anchor: str, cache: dict[Path, pd.DataFrame]) -> str:
    return str(_finding(target, anchor, cache)["verdict"])


def cited(paths: list[Path], cache: dict[Path, pd.DataFrame] | None = None) -> pd.DataFrame:
    """Each finding the files cite, once: its report folder (as cited, normalised), id, verdict and
    seeds (pairs), and `few_seeds` (fewer than `FEW_SEEDS`, where the report's interval may undercover
    bimodal outcomes: docs/STATISTICS.md). Citations that resolve to no finding are left out
    (`check_files` names them). `cache`: findings tables already read, as `check_files` fills it."""
    cache = {} if cache is None else cache
    rows = {}
    for path in paths:
        for _, sentence in sentences(path.read_text()):
            for token in _TOKEN.finditer(_CODE.sub("", sentence)):
                if not token["target"]:
                    continue
                target = _target(path, token["target"])
                try:
                    found = _finding(target, token["anchor"], cache)
                except LookupError:
                    continue
                seeds = pd.to_numeric(found.get("seeds"), errors="coerce")
                rows[(str(target.parent), token["anchor"])] = (str(found["verdict"]), seeds)
    frame = pd.DataFrame(
        [(report, anchor, verdict, seeds) for (report, anchor), (verdict, seeds) in rows.items()],
        columns=["report", "id", "verdict", "seeds"],
    )
    return frame.assign(few_seeds=frame["seeds"] < FEW_SEEDS)  # a finding without seeds: not counted as few


def seeds_summary(found: pd.DataFrame) -> str:
    """One line: how many cited findings rest on fewer than `FEW_SEEDS` seeds, decisive ones apart."""
    if found.empty:
        return "no finding cited"
    few = found[found["few_seeds"]]
    decisive = found["verdict"].isin([v for v in VERDICTS if v not in ("undecided", "gated")])
    counts = ", ".join(f"{n} at {k:g}" for k, n in found["seeds"].value_counts().sort_index().items())
    return (
        f"{len(found)} finding(s) cited ({counts} seeds); {len(few)} rest on fewer than {FEW_SEEDS} seeds, "
        f"{int((found['few_seeds'] & decisive).sum())} of them better, worse or equivalent "
        "(their intervals may undercover bimodal outcomes: docs/STATISTICS.md)"
    )


def check_files(paths: list[Path], cache: dict[Path, pd.DataFrame] | None = None) -> list[str]:
    """The failed claims of every file; ConfigError when a file does not exist. `cache`: findings
    tables read, kept for a later `cited`."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"check-claims: no such file: {', '.join(missing)}")
    cache = {} if cache is None else cache
    return [problem for path in paths for problem in check(path, cache)]
