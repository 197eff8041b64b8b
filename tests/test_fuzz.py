"""Loader fuzzing: random byte corruptions of a small model end in a clean graphresize error
or a successful analysis, never a crash, a hang or another exception type.

200 seeded corruptions per model run in-process under an alarm (a hang fails the case);
one runs through a real process, where a crash would show as a signal exit code."""

from __future__ import annotations

import os
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


# ------------------------------------------------------------------ CLI fuzz: hostile flags and configs

FLAG_VALUES = {
    "--ratio": ["-1", "1.5", "nan", "inf", "0", "0.3", "1e309", "abc", "0.99"],
    "--ratio-mlp": ["-0.1", "2", "0.5", "nan"],
    "--ratio-residual": ["-0.1", "1", "0.25"],
    "--tokens": ["0", "-5", "99999999999", "16", "300"],
    "--seq-len": ["0", "-1", "100000", "8", "1"],
    "--batch-size": ["0", "-1", "3", "100000"],
    "--multiple-of": ["0", "-8", "1000000", "1"],
    "--reg": ["-1", "nan", "0", "1e308"],
    "--method": ["dotresize", "prune", "pca", "disp", "dotresize+disp", "bogus"],
    "--unmerge": ["auto", "lsq", "ot", "pinv", "x"],
    "--target": ["mlp", "residual", "all", "x"],
    "--min-top1": ["2", "-1", "nan", "0.1"],
    "--min-cosine": ["2", "0.1", "nan"],
    "--verify-tolerance": ["-1", "nan", "inf", "0"],
    "--ratio-heads": ["-1", "0.5", "1", "nan"],
    "--seed": ["-1", "99999999999999999999", "3"],
}
CONFIGS = [
    '{"holdout_windows": -3}', '{"holdout_windows": 0}', '{"seq_len": "abc"}', '{"ratio": [1]}', "not json{",
    '{"unknown_key": 1}', '{"optimize": 5}', '{"tokens": 1e30}', '{"ratio": 0.3, "target": "mlp"}', "[]", "",
    '{"kind_ratios": {"mlp": "x"}}', '{"kind_ratios": 7}', '{"output": ""}', '{"stats_cache": 3}',
]


def _hostile_case(rng: random.Random, root: Path, model: Path, calib: Path) -> list[str]:
    """One command line: a few random hostile flags, an odd output, sometimes a config."""
    out_dir = root / "out"
    outputs = [str(out_dir / "o.onnx")] * 4 + ["", str(out_dir), str(out_dir / "null"), str(out_dir / "fifo"),
                                               str(root / "missing" / "o.onnx"), str(model)]
    calibs = [str(calib)] * 5 + [str(root / "nope.npy"), str(model), str(root / "empty.npy"), str(root / "floats.npy"),
                                 str(root / "negative.npy"), str(root / "huge.npy")]
    if rng.random() < 0.25:  # a sane run with at most one odd flag: some cases must get through
        args = ["optimize", str(model), "-o", outputs[0], "--calib", str(calib), "--ratio", "0", "--ratio-mlp", "0.5",
                "--tokens", "256", "--seq-len", "16", "-q"]
        flag = rng.choice(sorted(FLAG_VALUES))
        return args + ([flag, rng.choice(FLAG_VALUES[flag])] if rng.random() < 0.5 else [])
    args = ["optimize", str(model), "-o", rng.choice(outputs), "--calib", rng.choice(calibs), "-q"]
    for flag in rng.sample(sorted(FLAG_VALUES), rng.randint(1, 4)):
        args += [flag, rng.choice(FLAG_VALUES[flag])]
    if "--ratio" not in args:
        args += ["--ratio", "0.3"]
    if rng.random() < 0.4:
        config = root / f"c{rng.randrange(10**6)}.json"
        config.write_text(rng.choice(CONFIGS))
        args += ["--config", str(config)]
    extra = rng.random()
    if extra < 0.15:
        args += ["--report", rng.choice(["", str(model), str(out_dir / "fifo"), str(out_dir)])]
    elif extra < 0.3:
        args += ["--stats-cache", rng.choice([str(model), str(root / "cache")])]
    if rng.random() < 0.3:
        args.append("--overwrite")
    if "--tokens" not in args:
        args += ["--tokens", "256", "--seq-len", "16"]
    return args


def test_cli_fuzz_hostile_flags(tmp_path, capsys):
    """60 seeded command lines of hostile flags, paths and configs: each ends with exit 0-4,
    at most one stderr line that is a graphresize error (argparse's usage text for exit 2),
    never 'internal error' or a traceback; the input is never modified; a failed run leaves
    the output folder as it was and a successful one leaves a model ONNX Runtime loads."""
    import numpy as np
    import onnxruntime as ort

    from graphresize.cli.main import main
    from graphresize.io.modelio import file_sha256

    source = mlp_lm(tmp_path / "model.onnx")
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).integers(0, 64, size=2048))
    np.save(tmp_path / "empty.npy", np.zeros(0, dtype=np.int64))
    np.save(tmp_path / "floats.npy", np.random.default_rng(0).random(2048))
    np.save(tmp_path / "negative.npy", -np.ones(2048, dtype=np.int64))
    np.save(tmp_path / "huge.npy", np.full(2048, 10**12, dtype=np.int64))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    os.mkfifo(out_dir / "fifo")
    (out_dir / "null").symlink_to("/dev/null")  # a device, through a link (a regression replaces the link, not /dev/null)
    digest = file_sha256(source)
    rng = random.Random(15)
    codes: dict[int, int] = {}
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for case in range(60):
            args = _hostile_case(rng, tmp_path, source, calib)
            before = sorted(p.name for p in out_dir.iterdir())
            signal.alarm(30)
            try:
                code = main(args)
            except SystemExit as exc:  # argparse
                code = exc.code
            except _Timeout:
                pytest.fail(f"case {case} took over 30 s: {args}")
            finally:
                signal.alarm(0)
            err = capsys.readouterr().err
            codes[code] = codes.get(code, 0) + 1
            assert code in (0, 1, 2, 3, 4), (args, code, err)
            assert "Traceback" not in err and "internal error" not in err, (args, err)
            if not err.startswith("usage:"):
                assert len(err.strip().splitlines()) <= 1, (args, err)
            assert file_sha256(source) == digest, args
            after = sorted(p.name for p in out_dir.iterdir())
            if code == 0 and (out_dir / "o.onnx").exists():
                ort.InferenceSession(str(out_dir / "o.onnx"), providers=["CPUExecutionProvider"])
                for name in set(after) - {"fifo", "null"}:
                    (out_dir / name).unlink()
            else:
                assert after == before, (args, err)
            assert not any(n.startswith(".") for n in after), (args, after)
    finally:
        signal.signal(signal.SIGALRM, previous)
    print(f"exit codes: {dict(sorted(codes.items()))}")
    assert codes.get(0, 0) >= 1 and sum(codes.values()) == 60, codes
    assert time.perf_counter() - start < 240
