"""Global allocation on the segment engine (``engine/allocate.py``).

Checks: the curves taken segment by segment over the dense model are the whole-model ones;
with dense final statistics the segment engine picks the same floor factor and widths as the
whole engine and writes the same model (to float rounding of the sums), never above the
budget; with sequential statistics the widths are the same and the weights differ; the
output runs in ONNX Runtime. Ratio 0 is the identity on both engines: tests/test_allocation.py.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from models import optimize_tiny

from graphresize.calibrate import tokens
from graphresize.calibrate.statistics import calibrate
from graphresize.engine import allocate
from graphresize.io.ort_utils import make_feeds as session_feeds
from graphresize.io.ort_utils import make_session
from graphresize.methods.prune import Prune
from graphresize.options import OptimizeOptions
from graphresize.pipeline import analyze_stage, load_prepared
from graphresize.plan import allocation_inputs

FLOORS = (0.0, 0.5, 0.9)


def _outputs(path, windows):
    session = ort.InferenceSession(str(path))
    return [session.run(None, session_feeds(session, windows[i : i + 1]))[0] for i in range(len(windows))]


def _mlp_groups(path):
    """The prepared model, the options of a global 0.3 prune, its changed MLP groups and the
    statistics the prune solver asks of each."""
    model = load_prepared(path)
    options = OptimizeOptions(ratio=0.3, target="mlp", method="prune", allocation="global", progress=False)
    found = analyze_stage(path, model, options, frozenset({"mlp"}))
    groups = [found.groups.by_id(e.group_id) for e in found.plan.changed()]
    return model, options, groups, {g.id: Prune().stat_requests(g, found.layouts) for g in groups}


def test_segment_curves_are_the_whole_model_curves(llama_dynamo):
    model, options, groups, requests = _mlp_groups(llama_dynamo)
    windows = np.random.default_rng(5).integers(0, 200, size=(8, 16))
    whole_requests = [r for g in groups for r in requests[g.id]] + allocation_inputs.stream_requests(model, groups)
    session = make_session(model, list(dict.fromkeys(n for r in whole_requests for n in r.names())))
    stats = calibrate(session, whole_requests, windows, batch_size=4, progress=False)
    want = allocation_inputs.curves(model, groups, stats.groups)
    store = allocate._GramStore()
    try:
        got = allocate.dense_curves(model, groups, requests, [windows[:4], windows[4:]], store, options)
        for g in groups:  # the stored solver statistics are the whole-model ones
            np.testing.assert_allclose(store.get(g.id).gram, stats.groups[g.id].gram, rtol=1e-6, atol=1e-6)
    finally:
        store.close()
    assert len(got) == len(want) == 2
    for a, b in zip(got, want, strict=True):
        assert a.group_id == b.group_id and a.params_per_channel == b.params_per_channel
        np.testing.assert_allclose(a.loss, b.loss, rtol=1e-6, atol=1e-9 * b.loss[0])
        assert a.stream_energy == pytest.approx(b.stream_energy, rel=1e-6) and a.stream_energy > 0


def test_sharded_curves_equal_the_single_process_curves(llama_dynamo, monkeypatch):
    """--workers: each segment's sums over contiguous shards of batches (engine/shards.py,
    serial runner here), then added: the same curves and stored Grams to float64 rounding."""
    from graphresize.engine import shards

    model, options, groups, requests = _mlp_groups(llama_dynamo)
    windows = np.random.default_rng(6).integers(0, 200, size=(10, 16))
    batches = [windows[i : i + 2] for i in range(0, 10, 2)]
    results = []
    for runner in (None, shards.SerialRunner(3)):
        monkeypatch.setattr(shards, "make_runner", lambda options, runner=runner: runner)
        store = allocate._GramStore()
        try:
            curves = allocate.dense_curves(model, groups, requests, batches, store, options)
            results.append((curves, {g.id: store.get(g.id) for g in groups}))
        finally:
            store.close()
    (single, grams), (sharded, sharded_grams) = results
    for a, b in zip(single, sharded, strict=True):
        np.testing.assert_allclose(b.loss, a.loss, rtol=1e-9, atol=1e-12 * a.loss[0])
        assert b.stream_energy == pytest.approx(a.stream_energy, rel=1e-12)
    for gid, st in grams.items():
        np.testing.assert_allclose(sharded_grams[gid].gram, st.gram, rtol=0, atol=1e-12 * np.abs(st.gram).max())
        assert sharded_grams[gid].count == st.count == windows.size


@pytest.mark.parametrize("ratio", [0.15, 0.3])
def test_segment_global_is_the_whole_engine_global(llama_dynamo, calib_tokens, tmp_path, ratio):
    kw = dict(target="mlp", method="prune", allocation="global", allocation_floors=FLOORS)
    whole = optimize_tiny(llama_dynamo, tmp_path / "whole.onnx", calib_tokens, ratio, **kw)
    seg = optimize_tiny(llama_dynamo, tmp_path / "seg.onnx", calib_tokens, ratio, engine="segment", **kw)
    a, b = whole.allocation, seg.allocation
    assert b is not None and b.widths() == a.widths() and b.floor_factor == a.floor_factor
    assert {e.group_id: e.new_width for e in seg.plan.entries} == b.widths()
    for ca, cb in zip(a.candidates, b.candidates, strict=True):
        assert cb["floor_factor"] == ca["floor_factor"] and cb["removed"] == ca["removed"]
        assert cb["holdout_kl"] == pytest.approx(ca["holdout_kl"], rel=1e-3)
    # the budget: at least r·B block parameters gone, exactly what the widths remove
    assert seg.params_before - seg.params_after == b.removed >= ratio * b.block_params
    assert seg.params_after == whole.params_after
    holdout = tokens.make_windows(np.load(calib_tokens), seq_len=32, tokens=2048, holdout_windows=4, seed=0,
                                  source=str(calib_tokens)).holdout
    for x, y in zip(_outputs(whole.output, holdout), _outputs(seg.output, holdout), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4)
    assert seg.verification.relative_error == pytest.approx(whole.verification.relative_error, rel=1e-3)


@pytest.mark.parametrize("engine", ["whole", "segment"])
def test_each_width_is_solved_once(llama_dynamo, calib_tokens, tmp_path, monkeypatch, engine):
    """Three floor factors scored, one set of widths over the two MLP groups: each group is
    solved once, and the final model is written from the scored candidate's solves (the
    segment engine solved them again before ``plan/solved.py``: 4 solves)."""
    from graphresize.methods.base import Method

    calls, solve = [], Method.solve
    monkeypatch.setattr(Method, "solve", lambda self, entry, stats, options: calls.append(entry) or solve(self, entry, stats, options))
    result = optimize_tiny(llama_dynamo, tmp_path / "m.onnx", calib_tokens, 0.3, target="mlp", method="prune",
                           allocation="global", allocation_floors=FLOORS, engine=engine)
    assert [c["holdout_kl"] is not None for c in result.allocation.candidates] == [True, True, True]
    assert sorted((e.group_id, e.new_width) for e in calls) == sorted(result.allocation.widths().items())
    assert len(calls) == 2 and result.params_after < result.params_before


def test_sequential_final_statistics_keep_the_widths(llama_dynamo, calib_tokens, tmp_path):
    kw = dict(target="mlp", method="prune", allocation="global", allocation_floors=FLOORS, engine="segment")
    dense = optimize_tiny(llama_dynamo, tmp_path / "d.onnx", calib_tokens, 0.3, **kw)
    seq = optimize_tiny(llama_dynamo, tmp_path / "s.onnx", calib_tokens, 0.3, allocation_stats="sequential", **kw)
    assert seq.allocation.widths() == dense.allocation.widths() and seq.params_after == dense.params_after
    holdout = tokens.make_windows(np.load(calib_tokens), seq_len=32, tokens=2048, holdout_windows=4, seed=0,
                                  source=str(calib_tokens)).holdout
    gap = max(float(np.abs(x - y).max()) for x, y in zip(_outputs(dense.output, holdout), _outputs(seq.output, holdout), strict=True))
    assert gap > 1e-4  # layer 1 was solved from the stream the pruned layer 0 made
    assert seq.verification.relative_error < 1.0


def test_bad_final_statistics_are_a_usage_error(llama_dynamo, calib_tokens, tmp_path):
    from graphresize.errors import UsageError

    with pytest.raises(UsageError, match="allocation_stats"):
        optimize_tiny(llama_dynamo, tmp_path / "x.onnx", calib_tokens, 0.3, target="mlp", allocation="global",
                      engine="segment", allocation_stats="both")
    assert not (tmp_path / "x.onnx").exists()


def test_no_sidecars_writes_no_allocation_plot(llama_dynamo, calib_tokens, tmp_path, capsys):
    """The width-profile PNG is a sidecar: written beside the output by a plain run, not with
    ``--no-sidecars`` (the report still holds the allocation)."""
    import json

    pytest.importorskip("matplotlib")
    from models import run_cli

    common = ["--ratio", "0.2", "--calib", calib_tokens, "--tokens", "1024", "--seq-len", "32", "--target", "mlp",
              "--allocation", "global", "--engine", "segment", "-q"]
    code, _, err = run_cli(["optimize", llama_dynamo, "-o", tmp_path / "a.onnx", *common], capsys)
    assert code == 0, err
    assert (tmp_path / "a.alloc.png").stat().st_size > 1000
    code, _, err = run_cli(["optimize", llama_dynamo, "-o", tmp_path / "b.onnx", *common, "--no-sidecars"], capsys)
    assert code == 0, err
    assert not (tmp_path / "b.alloc.png").exists()
    report = json.loads((tmp_path / "b.report.json").read_text())
    assert report["allocation"]["plot"] is None and report["allocation"]["removed"] >= 0.2 * report["allocation"]["block_params"]
