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


def _damage_wrong_shape(path):
    np.savez(path, gram=np.zeros((3, 3)), total=np.zeros(3), count=np.int64(5))


def _damage_garbage(path):
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)  # a zip header, then noise


def _damage_values(path):
    """Right shapes, types, key and checksum field, one value altered."""
    data = dict(np.load(path))
    data["gram"] = data["gram"].copy()
    data["gram"][0, 0] += 1.0
    np.savez(path, **data)


def _damage_other_key(path):
    """A whole, valid entry of another request copied over this one."""
    others = sorted(p for p in path.parent.glob("*.npz") if p != path)
    path.write_bytes(others[0].read_bytes())


def _damage_object_array(path):
    np.savez(path, gram=np.array([{"a": 1}], dtype=object), total=np.zeros(3), count=np.int64(1))


@pytest.mark.parametrize("damage", [_damage_wrong_shape, _damage_garbage, _damage_values, _damage_other_key, _damage_object_array])
def test_corrupt_entries_are_recomputed_replaced_and_reported(llama_dynamo, calib_tokens, tmp_path, capsys, damage):
    """Each kind of damage: the run succeeds, writes the model an uncached run writes, replaces
    the entry with a good one and names it in the summary and the report; a third run reads
    everything from the cache."""
    import json

    cache = tmp_path / "stats"
    _optimize(llama_dynamo, tmp_path / "a.onnx", 0.3, calib_tokens, target="mlp", stats_cache=cache)
    victim = sorted(cache.glob("*.npz"))[1]
    good = victim.read_bytes()
    damage(victim)
    args = ["optimize", str(llama_dynamo), "-o", str(tmp_path / "b.onnx"), "--ratio", "0.3", "--target", "mlp", "--method", "dotresize", "--allocation", "uniform",
            "--calib", str(calib_tokens), "--tokens", "1024", "--seq-len", "32", "--stats-cache", str(cache)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "damaged entries recomputed" in err and victim.name in err, err
    report = json.loads((tmp_path / "b.report.json").read_text())
    assert [r.split(":")[0] for r in report["calibration"]["stats_rejected"]] == [victim.name]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert victim.read_bytes() == good  # replaced by the recomputed entry (np.savez is deterministic)
    result = _optimize(llama_dynamo, tmp_path / "c.onnx", 0.3, calib_tokens, target="mlp", stats_cache=cache)
    assert result.stats_rejected == () and result.stats_cached == len(list(cache.glob("*.npz")))


def test_a_fifo_entry_does_not_hang_the_run(llama_dynamo, calib_tokens, tmp_path):
    import os

    cache = tmp_path / "stats"
    _optimize(llama_dynamo, tmp_path / "a.onnx", 0.3, calib_tokens, target="mlp", stats_cache=cache)
    victim = sorted(cache.glob("*.npz"))[0]
    victim.unlink()
    os.mkfifo(victim)
    result = _optimize(llama_dynamo, tmp_path / "b.onnx", 0.3, calib_tokens, target="mlp", stats_cache=cache)
    assert result.stats_rejected == (f"{victim.name}: not a regular file",)
    assert victim.is_file() and (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
