"""Loader fuzzing: random byte corruptions of a small model end in a clean graphresize error
or a successful analysis, never a crash, a hang or another exception type.

200 seeded corruptions per model run in-process under an alarm (a hang fails the case);
one runs through a real process, where a crash would show as a signal exit code."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_graphs import mlp_lm

from graphresize.errors import GraphresizeError
from graphresize.pipeline import analyze

CASES = 200
SECONDS_PER_CASE = 5
KINDS = ("flip", "insert", "delete", "truncate")


def corrupt(data: bytes, seed: int) -> tuple[str, bytes]:
    """One corruption of ``data``, fixed by ``seed``: 1-8 bit flips, insertions or deletions
    of 1-4 bytes, or a truncation."""
    rng = random.Random(seed)
    kind = KINDS[seed % len(KINDS)]
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        if kind == "flip":
            out[i] ^= 1 << rng.randrange(8)
        elif kind == "insert":
            out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif kind == "delete":
            del out[i : i + rng.randint(1, 4)]
        else:
            del out[i:]
            break
    return kind, bytes(out)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A model with MLPs, an If and a Loop (subgraphs are parsed too)."""
    return mlp_lm(tmp_path_factory.mktemp("fuzz") / "model.onnx", ("Relu", "If", "Loop"))


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


@pytest.mark.parametrize("model", ["source", "llama_dynamo"])
def test_corruptions_fail_cleanly(model, request, tmp_path):
    data = request.getfixturevalue(model).read_bytes()
    outcomes: dict[str, int] = {}
    previous = signal.signal(signal.SIGALRM, _alarm)
    start = time.perf_counter()
    try:
        for seed in range(CASES):
            kind, blob = corrupt(data, seed)
            path = tmp_path / f"{seed}.onnx"
            path.write_bytes(blob)
            signal.alarm(SECONDS_PER_CASE)
            try:
                analyze(path)
                outcome = "ok"
            except GraphresizeError as exc:
                outcome = type(exc).__name__
                assert "\n" not in str(exc), (seed, kind, str(exc))
            except _Timeout:
                pytest.fail(f"seed {seed} ({kind}): analysis took over {SECONDS_PER_CASE} s")
            except Exception as exc:
                pytest.fail(f"seed {seed} ({kind}): unhandled {type(exc).__name__}: {exc}")
            finally:
                signal.alarm(0)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            path.unlink()
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert sum(outcomes.values()) == CASES
    assert outcomes.get("InputError", 0) > CASES // 2 and outcomes.get("ok", 0) > 0, outcomes
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("seed", [6])
def test_corrupt_file_in_a_real_process(seed, source, tmp_path):
    """One case through the module entry point: exit 0, 1 or 3, at most one stderr line."""
    kind, blob = corrupt(source.read_bytes(), seed)
    path = tmp_path / "bad.onnx"
    path.write_bytes(blob)
    proc = subprocess.run(
        [sys.executable, "-m", "graphresize", "analyze", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode in (0, 1, 3), (kind, proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") <= 1 and "Traceback" not in proc.stderr, proc.stderr
