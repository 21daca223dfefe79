"""`instill check-claims`: a verdict written in a document must agree with the finding it cites."""

import pandas as pd
import pytest

from orchestrator.claims import check_files, sentences
from orchestrator.config import ConfigError
from orchestrator.report import findings, paired_differences
from tests.orchestrator.report.synthetic import curves_table


@pytest.fixture
def report(tmp_path):
    """A committed report folder `docs/cmp/` with the findings of a method that is clearly better
    than `ref` at n = 100 and level with it (undecided, no margin) at n = 200."""
    method = {100: [0.9, 0.92, 0.91], 200: [0.5, 0.6, 0.55]}
    table = curves_table({"method": method, "ref": {100: [0.5, 0.52, 0.5], 200: [0.55, 0.5, 0.6]}})
    found = findings(paired_differences(table, "ref"))
    folder = tmp_path / "docs" / "cmp"
    folder.mkdir(parents=True)
    found.to_parquet(folder / "findings.parquet")
    return found.set_index("n_train")["id"]


def _doc(tmp_path, text: str):
    path = tmp_path / "docs" / "CLAIMS.md"
    path.write_text(text)
    return path


def test_a_verdict_that_agrees_with_its_finding_passes(tmp_path, report):
    doc = _doc(
        tmp_path,
        f"# Results\n\nThe method is **better** than ref at n = 100 ([finding](cmp/findings.md#{report[100]})).\n"
        f"At n = 200 the comparison is **undecided**\n([finding](cmp/findings.md#{report[200]})). Prose is free.\n"
        f"| n | verdict |\n|---|---|\n| 100 | **better** ([f](cmp/findings.md#{report[100]})) |\n",
    )
    assert check_files([doc]) == []


def test_a_changed_verdict_a_missing_finding_or_no_citation_fail_naming_the_sentence(tmp_path, report):
    doc = _doc(
        tmp_path,
        f"The method is **better** at n = 200 ([finding](cmp/findings.md#{report[200]})).\n\n"
        "It is **equivalent** everywhere.\n\n"
        "It is **worse** at n = 5 ([finding](cmp/findings.md#method-vs-ref-n5)).\n\n"
        f"A citation without its verdict ([finding](cmp/findings.md#{report[100]})).\n",
    )
    problems = check_files([doc])
    assert len(problems) == 4, problems
    assert f"CLAIMS.md:1: **better** cites {report[200]}, whose verdict is undecided" in problems[0]
    assert "CLAIMS.md:3: **equivalent** cites no finding" in problems[1]
    assert "'method-vs-ref-n5', which" in problems[2]
    assert "cites findings but states no verdict" in problems[3]


def test_each_verdict_governs_the_citations_after_it(tmp_path, report):
    better, undecided = report[100], report[200]
    ok = (
        f"It is **better** at n = 100 ([f](cmp/findings.md#{better})) and **undecided** at 200 "
        f"([f](cmp/findings.md#{undecided})).\n"
    )
    assert check_files([_doc(tmp_path, ok)]) == []
    swapped = (
        ok.replace(f"#{better})", "#TMP)").replace(f"#{undecided})", f"#{better})").replace("#TMP)", f"#{undecided})")
    )
    assert len(check_files([_doc(tmp_path, swapped)])) == 2  # the same set of verdicts, each citing the other's


def test_list_items_continue_on_their_lines_and_inline_code_is_not_read(tmp_path, report):
    text = (
        f"- A list item whose verdict\n  comes later: **better** ([f](cmp/findings.md#{report[100]})).\n\n"
        "Write `**worse**` in bold, e.g. [a link](x.md).\n"
    )
    assert check_files([_doc(tmp_path, text)]) == []


def test_a_finding_changed_in_the_report_fails_the_document_that_cites_it(tmp_path, report):
    doc = _doc(tmp_path, f"The method is **better** at n = 100 ([f](cmp/findings.md#{report[100]})).\n")
    assert check_files([doc]) == []
    parquet = tmp_path / "docs" / "cmp" / "findings.parquet"
    frame = pd.read_parquet(parquet)
    frame.loc[frame["n_train"] == 100, "verdict"] = "undecided"
    frame.to_parquet(parquet)
    assert len(check_files([doc])) == 1


def test_a_missing_file_is_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        check_files([tmp_path / "nope.md"])


def test_sentences_join_lines_and_keep_table_rows_and_code_apart():
    text = "One sentence\nacross lines. Another one, e.g. [this].\n\n| a | b |\n```\n**better**\n```\n- item\n  on\n"
    expected = [
        (1, "One sentence across lines."),
        (1, "Another one, e.g. [this]."),
        (4, "| a | b |"),
        (8, "- item on"),
    ]
    assert sentences(text) == expected


def test_the_command_exits_1_naming_each_failed_claim_0_when_all_agree_2_on_a_missing_file(tmp_path, report, capsys):
    from orchestrator.cli import main

    good = _doc(tmp_path, f"The method is **better** at n = 100 ([f](cmp/findings.md#{report[100]})).\n")
    assert main(["check-claims", str(good)]) == 0
    bad = tmp_path / "docs" / "BAD.md"
    bad.write_text(f"The method is **worse** at n = 100 ([f](cmp/findings.md#{report[100]})).\n")
    assert main(["check-claims", str(good), str(bad)]) == 1
    assert f"BAD.md:1: **worse** cites {report[100]}, whose verdict is better" in capsys.readouterr().out
    assert main(["check-claims", str(good), "--seeds"]) == 0
    out = capsys.readouterr().out
    assert "below_15" in out and "1 finding(s) cited (1 at 3 seeds); 1 rest on fewer than 15 seeds" in out
    assert main(["check-claims", str(tmp_path / "missing.md")]) == 2


def test_cited_findings_carry_their_seed_counts_and_the_summary_counts_the_few(tmp_path, report):
    from orchestrator.claims import cited, seeds_summary

    doc = _doc(
        tmp_path,
        f"It is **better** at n = 100 ([f](cmp/findings.md#{report[100]})), again ([f](cmp/findings.md#{report[100]})),"
        f" and **undecided** at 200 ([f](cmp/findings.md#{report[200]})); a dead link ([f](cmp/findings.md#nope)).\n",
    )
    found = cited([doc])
    assert sorted(found["verdict"]) == ["better", "undecided"]  # each finding once, the dead link left out
    assert set(found["seeds"]) == {3} and found["few_seeds"].all()
    assert found["report"].str.endswith("docs/cmp").all()
    line = seeds_summary(found)
    assert line.startswith("2 finding(s) cited (2 at 3 seeds); 2 rest on fewer than 15 seeds, 1 of them better")
    assert seeds_summary(found.iloc[:0]) == "no finding cited"
