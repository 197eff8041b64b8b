"""The exporter × family × target table (benchmarks/exporter_table.md, copied into the README)
is what ``benchmarks/exporter_table.py`` measures: a few of its cells are measured again here
on the session's tiny exports (the same configs and calibration tokens) and must agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.models import load_script

REPO = Path(__file__).resolve().parents[1]


def _bench():
    return load_script(REPO / "benchmarks" / "exporter_table.py", "bench_exporter_table")


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def rows(bench):
    found = bench.read_rows(REPO / "benchmarks" / "exporter_table.md")
    assert len(found) >= 8
    return found


def test_readme_holds_the_table(rows):
    readme = (REPO / "README.md").read_text()
    for (family, exporter), cells in rows.items():
        assert f"| {family} | {exporter} | " + " | ".join(cells[t] for t in ("mlp", "residual", "heads")) + " |" in readme


@pytest.mark.parametrize(("fixture", "family", "exporter", "target"), [
    ("llama_dynamo", "llama", "dynamo", "heads"),
    ("gpt2_legacy", "gpt2", "legacy", "residual"),
    ("opt_optimum", "opt", "optimum", "residual"),
    ("bert", "bert", "dynamo", "residual"),
])  # fmt: skip
def test_cells_are_measured_again(fixture, family, exporter, target, bench, rows, request, tmp_path):
    want = rows.get((family, exporter))
    if want is None:
        pytest.skip(f"{family}/{exporter} not in the table")
    got = bench.cell(request.getfixturevalue(fixture), target, bench.calib(tmp_path), tmp_path)
    if want[target].startswith("ok "):
        assert got.startswith("ok ") and abs(float(got[3:]) - float(want[target][3:])) <= 0.02, got
    else:
        assert got == want[target]
