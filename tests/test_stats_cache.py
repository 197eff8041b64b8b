"""--stats-cache: a second run on the same model and windows skips calibration and writes the
byte-identical model a run without the cache writes."""

import numpy as np
import pytest

import graphresize
from graphresize import pipeline
from graphresize.cli.main import main
from tests.models import optimize_tiny


def _optimize(src, dst, ratio, calib, **kw):
    return optimize_tiny(src, dst, calib, ratio, tokens=1024, **kw)


def _no_calibration(*args, **kwargs):
    raise AssertionError("calibrate ran although every statistic was cached")


@pytest.mark.parametrize("target", ["mlp", "all"])
def test_second_ratio_reads_the_cache_and_matches_an_uncached_run(llama_dynamo, calib_tokens, tmp_path, monkeypatch, target):
    cache = tmp_path / "stats"
    _optimize(llama_dynamo, tmp_path / "a.onnx", 0.3, calib_tokens, target=target, stats_cache=cache)
    entries = sorted(cache.glob("*.npz"))
    groups = graphresize.analyze(llama_dynamo)
    kinds = {"mlp"} if target == "mlp" else {"mlp", "residual"}
    assert len(entries) == sum(1 for g in groups if g.kind in kinds and g.resizable)

    _optimize(llama_dynamo, tmp_path / "plain.onnx", 0.5, calib_tokens, target=target)
    monkeypatch.setattr(pipeline, "calibrate", _no_calibration)
    _optimize(llama_dynamo, tmp_path / "cached.onnx", 0.5, calib_tokens, target=target, stats_cache=cache)
    assert sorted(cache.glob("*.npz")) == entries
    assert (tmp_path / "cached.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()


def test_other_windows_miss_the_cache(llama_dynamo, calib_tokens, tmp_path):
    cache = tmp_path / "stats"
    _optimize(llama_dynamo, tmp_path / "a.onnx", 0.3, calib_tokens, target="mlp", stats_cache=cache)
    first = set(cache.glob("*.npz"))
    _optimize(llama_dynamo, tmp_path / "b.onnx", 0.3, calib_tokens, target="mlp", stats_cache=cache, seed=1)
    second = set(cache.glob("*.npz")) - first
    assert len(second) == len(first)


def test_a_damaged_entry_is_recomputed(llama_dynamo, calib_tokens, tmp_path):
    cache = tmp_path / "stats"
    _optimize(llama_dynamo, tmp_path / "a.onnx", 0.3, calib_tokens, target="mlp", stats_cache=cache)
    victim = sorted(cache.glob("*.npz"))[0]
    good = dict(np.load(victim))
    victim.write_bytes(b"not a numpy archive")
    _optimize(llama_dynamo, tmp_path / "b.onnx", 0.3, calib_tokens, target="mlp", stats_cache=cache)
    np.testing.assert_array_equal(np.load(victim)["gram"], good["gram"])
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_cache_path_that_is_a_file_is_a_clean_error(llama_dynamo, calib_tokens, tmp_path, capsys):
    blocker = tmp_path / "stats"
    blocker.write_text("a file, not a folder")
    code = main(["optimize", str(llama_dynamo), "-o", str(tmp_path / "out.onnx"), "--ratio", "0.3", "--target", "mlp",
                 "--calib", str(calib_tokens), "--tokens", "1024", "--seq-len", "32", "--stats-cache", str(blocker), "-q"])
    err = capsys.readouterr().err
    assert code != 0 and "--stats-cache" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()
