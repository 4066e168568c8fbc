"""benchmarks/multi_adapter.py: its arguments are checked, and --write replaces only the generated
part of a doc's Measurements section (the prose above it and the notes under its heading stay)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import multi_adapter  # noqa: E402

REPORT = "Command: `python benchmarks/multi_adapter.py --new` on x86_64.\n\n| new table |"


def test_bad_rounds_are_refused(capsys):
    with pytest.raises(SystemExit) as err:
        multi_adapter.main(["--quick", "--decode-rounds", "0"])
    assert err.value.code == 2 and "--decode-rounds" in capsys.readouterr().err


def test_write_replaces_only_the_previous_report(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nProse above.\n\n## Measurements\n\nNotes that a person wrote.\n\n"
                   "Command: `python benchmarks/multi_adapter.py --old` on x86_64.\n\n| old table |\n")
    multi_adapter.write_report(doc, REPORT)
    assert doc.read_text() == ("# Title\n\nProse above.\n\n## Measurements\n\nNotes that a person wrote.\n\n"
                               + REPORT + "\n")
    multi_adapter.write_report(doc, REPORT)  # idempotent
    assert doc.read_text().count("## Measurements") == 1 and doc.read_text().count("| new table |") == 1


def test_write_into_a_new_doc_or_one_without_the_section(tmp_path):
    new = tmp_path / "sub" / "new.md"
    multi_adapter.write_report(new, REPORT)
    assert new.read_text() == "# Multi-adapter inference\n\n## Measurements\n\n" + REPORT + "\n"
    plain = tmp_path / "plain.md"
    plain.write_text("# Other doc\n\nIts text.\n")
    multi_adapter.write_report(plain, REPORT)
    assert plain.read_text() == "# Other doc\n\nIts text.\n\n## Measurements\n\n" + REPORT + "\n"
