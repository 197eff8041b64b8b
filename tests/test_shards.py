"""Segment calibration as map + reduce over window shards (engine/shards.py): the sharded
statistics equal the single-process ones to float64 rounding, the written model is the same
numbers, and a shard that fails twice ends the run with one line and nothing written. The
Ray tests start a 2-worker local cluster once (slow: Ray's start-up)."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnx.numpy_helper as nh
import pytest
from models import optimize_tiny, run_cli
from test_engine import _found, _run, _windows

from graphresize.engine import shards
from graphresize.pipeline import load_prepared


def test_shard_bounds_cover_every_batch_once():
    assert shards.shard_bounds(7, 3) == [(0, 2), (2, 5), (5, 7)]
    assert shards.shard_bounds(2, 5) == [(0, 1), (1, 2)]
    assert shards.shard_bounds(4, 1) == [(0, 4)]


def _sharded_run(model, found, calib, runner, monkeypatch):
    monkeypatch.setattr(shards, "make_runner", lambda options: runner)
    return _run(model, found, calib)


def _same_stats(a, b):
    assert a.keys() == b.keys()
    for key in a:
        scale = np.abs(a[key].gram).max()
        np.testing.assert_allclose(b[key].gram, a[key].gram, rtol=0, atol=1e-12 * scale)
        np.testing.assert_allclose(b[key].total, a[key].total, rtol=1e-12)
        assert b[key].count == a[key].count


def test_serial_shards_equal_the_single_process_statistics(llama_dynamo, monkeypatch):
    calib = _windows(10, 16, seed=4)
    model = load_prepared(llama_dynamo)
    single = _run(model, _found(model, width_of=lambda w: w // 2), calib)
    other = load_prepared(llama_dynamo)
    sharded = _sharded_run(other, _found(other, width_of=lambda w: w // 2), calib, shards.SerialRunner(3), monkeypatch)
    _same_stats(single.stats.groups, sharded.stats.groups)
    assert single.stats.groups["mlp.1"].count == calib.size  # the later segment too, on the pruned stream


def test_serial_shard_failure_is_one_line(llama_dynamo, monkeypatch):
    monkeypatch.setenv(shards.FAIL_ENV, "1")
    model = load_prepared(llama_dynamo)
    with pytest.raises(shards.ShardError, match="calibration shard 1 failed: injected failure"):
        _sharded_run(model, _found(model, width_of=lambda w: w // 2), _windows(6, 16), shards.SerialRunner(2), monkeypatch)


def test_workers_need_the_segment_engine(llama_dynamo, calib_tokens, tmp_path, capsys):
    code, _, err = run_cli(["optimize", llama_dynamo, "-o", tmp_path / "o.onnx", "--calib", calib_tokens, "--ratio", "0.3",
                            "--workers", "2", "--engine", "whole", "-q"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "add --engine segment" in err
    assert not (tmp_path / "o.onnx").exists()
    if importlib.util.find_spec("ray") is None:  # the recipe's engine is the segment engine: only Ray is missing
        code, _, err = run_cli(["optimize", llama_dynamo, "-o", tmp_path / "o.onnx", "--calib", calib_tokens, "--ratio", "0.3",
                                "--workers", "2", "-q"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "need Ray" in err
        assert not (tmp_path / "o.onnx").exists()


needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (graphresize[ray])")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=256 * 2**20)
    yield ray
    ray.shutdown()


def _weights(path):
    return {t.name: nh.to_array(t) for t in onnx.load(path).graph.initializer}


@pytest.mark.slow
@needs_ray
def test_ray_shards_equal_the_single_process_run(ray_cluster, llama_dynamo, calib_tokens, tmp_path, monkeypatch):
    calib = _windows(10, 16, seed=4)
    model = load_prepared(llama_dynamo)
    single = _run(model, _found(model, width_of=lambda w: w // 2), calib)
    other = load_prepared(llama_dynamo)
    runner = shards.RayRunner(workers=2)
    assert runner.shards == 2
    sharded = _sharded_run(other, _found(other, width_of=lambda w: w // 2), calib, runner, monkeypatch)
    _same_stats(single.stats.groups, sharded.stats.groups)
    monkeypatch.undo()
    # the CLI path: the written model is the same numbers as the single-process one
    a = optimize_tiny(llama_dynamo, tmp_path / "a.onnx", calib_tokens, 0.5, engine="segment", target="mlp", method="prune")
    b = optimize_tiny(llama_dynamo, tmp_path / "b.onnx", calib_tokens, 0.5, engine="segment", target="mlp", method="prune", workers=2)
    wa, wb = _weights(a.output), _weights(b.output)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], rtol=1e-6, atol=1e-7)
    assert b.params_after == a.params_after < a.params_before


@pytest.mark.slow
@needs_ray
def test_ray_shard_failing_twice_ends_the_run_with_nothing_written(ray_cluster, llama_dynamo, calib_tokens, tmp_path, monkeypatch):
    from graphresize.errors import GraphresizeError

    monkeypatch.setenv(shards.FAIL_ENV, "1")
    with pytest.raises(GraphresizeError, match=r"^calibration shard 1 failed twice \(Ray\): .*injected failure") as info:
        optimize_tiny(llama_dynamo, tmp_path / "f.onnx", calib_tokens, 0.5, engine="segment", target="mlp", method="prune", workers=2)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
    # a shard failing once is retried by Ray and the run completes
    monkeypatch.setenv(shards.FAIL_ENV, "1:once")
    done = optimize_tiny(llama_dynamo, tmp_path / "g.onnx", calib_tokens, 0.5, engine="segment", target="mlp", method="prune", workers=2)
    assert done.output.exists() and done.params_after < done.params_before
