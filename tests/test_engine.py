"""The segment-by-segment engine (``--engine segment``, ``graphresize/engine/``).

Checks: the cut runs the model exactly (segments in order reproduce the whole graph's outputs,
also with the stream spilled to disk); the engine at full width (every MLP group solved and
rewritten, nothing removed) reproduces the outputs to 1e-5; the first segment's statistics
equal the whole-model ones while a later segment's differ once an earlier segment was pruned
(and equal them when nothing was); the global residual transform keeps whole-model statistics
(same model as the whole engine); unsupported runs fall back to the whole engine.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from models import optimize_tiny, run_cli

from graphresize.calibrate import tokens
from graphresize.calibrate.statistics import StatRequest, calibrate
from graphresize.engine import sequential
from graphresize.engine.segments import cut_model
from graphresize.io.ort_utils import make_feeds, make_session
from graphresize.methods.prune import Prune
from graphresize.options import OptimizeOptions
from graphresize.pipeline import load_prepared
from graphresize.plan.widths import GroupPlan


def _windows(n: int = 8, seq: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, size=(n, seq))


def _whole(model, windows: np.ndarray) -> list[np.ndarray]:
    session = make_session(model)
    name = session.get_outputs()[0].name
    return [session.run([name], make_feeds(session, windows[i : i + 1]))[0] for i in range(len(windows))]


@pytest.mark.parametrize("fixture", ["llama_dynamo", "llama_optimum", "gpt2", "mistral", "qwen2"])
def test_segments_reproduce_the_whole_graph(fixture, request):
    model = load_prepared(request.getfixturevalue(fixture))
    cut = cut_model(model)
    layers = 2
    assert len(cut.segments) == 2 * layers + 1  # attention and MLP per layer, then the head
    assert cut.segments[0].stream_in in cut.side_outputs  # the embedding output comes from the side model
    windows = _windows()
    want = _whole(model, windows)
    got = sequential.forward(model, windows)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_spilled_stream_gives_the_same_outputs(llama_dynamo):
    model = load_prepared(llama_dynamo)
    windows = _windows(4)
    in_memory = sequential.forward(model, windows, batch_size=2)
    on_disk = sequential.forward(model, windows, batch_size=2, spill_bytes=0)
    for a, b in zip(in_memory, on_disk, strict=True):
        np.testing.assert_array_equal(a, b)


def _found(model, kind="mlp", width_of=lambda w: w):
    """A stand-in for the analyze stage: every resizable group of ``kind`` with the new width
    ``width_of(width)`` (the real plan lists only groups that change)."""
    from graphresize.analysis.groups import find_groups

    groups = find_groups(model)
    entries = tuple(GroupPlan(g.id, g.kind, g.width, width_of(g.width)) for g in groups.resizable({kind}))
    return types.SimpleNamespace(groups=groups, layouts={}, plan=types.SimpleNamespace(changed=lambda: entries))


def _run(model, found, calib: np.ndarray, **options):
    windows = types.SimpleNamespace(calib=calib, holdout=calib[:2])
    opts = OptimizeOptions(ratio=0.0, progress=False, batch_size=2, **options)
    return sequential.run(model, found, windows, Prune(), opts, lambda stage: None, keep_stats=True)


def _dense_stats(model, found, calib: np.ndarray):
    requests = [StatRequest.anchor(found.groups.by_id(e.group_id)) for e in found.plan.changed()]
    session = make_session(model, [r.values[0][0] for r in requests])
    return calibrate(session, requests, calib, batch_size=2, progress=False).groups


def test_full_width_engine_reproduces_the_outputs(llama_dynamo):
    """Ratio 0 through the whole engine loop: every MLP group's statistics taken, solved
    (prune keeping every neuron), rewritten, the segment re-cut and run on."""
    model = load_prepared(llama_dynamo)
    calib, windows = _windows(6, 16, seed=1), _windows(3, 16, seed=2)
    before = _whole(model, windows)
    outcome = _run(model, _found(model), calib, unmerge="ot")
    assert len(outcome.transforms) == 2  # both MLP groups went through solve and rewrite
    after = _whole(model, windows)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_ratio_zero_optimize_reproduces_the_outputs(llama_dynamo, calib_tokens, tmp_path):
    result = optimize_tiny(llama_dynamo, tmp_path / "z.onnx", calib_tokens, 0.0, engine="segment")
    assert result.params_after == result.params_before
    assert result.verification.max_abs_error < 1e-5


def test_first_segment_statistics_are_the_dense_ones_later_are_sequential(llama_dynamo):
    calib = _windows(6, 16, seed=3)
    dense_model = load_prepared(llama_dynamo)
    found = _found(dense_model, width_of=lambda w: w // 2)
    dense = _dense_stats(dense_model, found, calib)
    model = load_prepared(llama_dynamo)
    outcome = _run(model, _found(model, width_of=lambda w: w // 2), calib)
    first, later = "mlp.0", "mlp.1"
    np.testing.assert_allclose(outcome.stats.groups[first].gram, dense[first].gram, rtol=1e-5, atol=1e-6)
    assert outcome.stats.groups[first].count == dense[first].count == calib.size
    # layer 1 reads the stream that the pruned layer 0 made: its Gram moved
    gap = np.linalg.norm(outcome.stats.groups[later].gram - dense[later].gram) / np.linalg.norm(dense[later].gram)
    assert gap > 1e-3
    # control: with nothing pruned, the same later statistics are the dense ones
    same = load_prepared(llama_dynamo)
    control = _run(same, _found(same), calib, unmerge="ot")
    np.testing.assert_allclose(control.stats.groups[later].gram, dense[later].gram, rtol=1e-5, atol=1e-6)


def test_residual_stream_keeps_whole_model_statistics(llama_dynamo, calib_tokens, tmp_path):
    """--target residual: one transform for the stream, from the dense statistics; both
    engines write the same model (to float rounding of the sums)."""
    import onnxruntime as ort

    whole = optimize_tiny(llama_dynamo, tmp_path / "whole.onnx", calib_tokens, 0.25, target="residual")
    seg = optimize_tiny(llama_dynamo, tmp_path / "seg.onnx", calib_tokens, 0.25, target="residual", engine="segment")
    assert seg.params_after == whole.params_after < seg.params_before
    windows = _windows(2, 16, seed=4)
    a, b = (ort.InferenceSession(str(p)) for p in (whole.output, seg.output))
    for i in range(len(windows)):
        ya = a.run(None, make_feeds(a, windows[i : i + 1]))[0]
        yb = b.run(None, make_feeds(b, windows[i : i + 1]))[0]
        np.testing.assert_allclose(yb, ya, rtol=1e-4, atol=1e-4)
    assert seg.verification.relative_error == pytest.approx(whole.verification.relative_error, rel=1e-3)


@pytest.mark.parametrize("target", ["mlp", "all"])
def test_segment_engine_optimize(llama_dynamo, calib_tokens, tmp_path, target):
    """A real run: the widths of the whole engine, a model that loads, a verification from
    the segment-by-segment hold-out outputs that matches a whole-model session's."""
    import onnxruntime as ort

    result = optimize_tiny(llama_dynamo, tmp_path / "seg.onnx", calib_tokens, 0.5 if target == "mlp" else 0.25,
                           target=target, method="prune", engine="segment")
    whole = optimize_tiny(llama_dynamo, tmp_path / "whole.onnx", calib_tokens, 0.5 if target == "mlp" else 0.25,
                          target=target, method="prune")
    assert result.params_after == whole.params_after < result.params_before
    assert [e.new_width for e in result.plan.changed()] == [e.new_width for e in whole.plan.changed()]
    session = ort.InferenceSession(str(result.output))
    holdout = tokens.make_windows(np.load(calib_tokens), seq_len=32, tokens=2048, holdout_windows=4, seed=0,
                                  source=str(calib_tokens)).holdout
    reference = _whole(load_prepared(llama_dynamo), holdout)
    got = [session.run(None, make_feeds(session, holdout[i : i + 1]))[0] for i in range(len(holdout))]
    diff = np.concatenate([(g - r).ravel() for g, r in zip(got, reference, strict=True)])
    norm = np.linalg.norm(np.concatenate([r.ravel() for r in reference]))
    assert np.linalg.norm(diff) / norm == pytest.approx(result.verification.relative_error, rel=1e-4)


def test_unsupported_runs_fall_back_to_the_whole_engine(llama_dynamo, calib_tokens, tmp_path):
    """DISP chooses its widths at the rewrite: --engine segment runs the whole engine, same bytes."""
    a = optimize_tiny(llama_dynamo, tmp_path / "a.onnx", calib_tokens, 0.25, target="residual", method="disp")
    b = optimize_tiny(llama_dynamo, tmp_path / "b.onnx", calib_tokens, 0.25, target="residual", method="disp", engine="segment")
    assert a.output.read_bytes() == b.output.read_bytes()


def test_engine_flag_and_config_key(llama_dynamo, calib_tokens, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(["optimize", llama_dynamo, "-o", out, "--ratio", "0.5", "--target", "mlp", "--calib", calib_tokens,
                            "--tokens", "1024", "--seq-len", "32", "--engine", "segment", "-q", "--no-sidecars"], capsys)
    assert code == 0, err
    config = tmp_path / "c.toml"
    config.write_text('engine = "sideways"\n')
    code, _, err = run_cli(["optimize", llama_dynamo, "-o", tmp_path / "p.onnx", "--ratio", "0.5", "--calib", calib_tokens,
                            "--config", config, "-q"], capsys)
    assert code == 2 and "engine" in err and "Traceback" not in err
