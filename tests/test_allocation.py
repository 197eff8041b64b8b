"""``--allocation global``: loss curves, the one-budget greedy, and the pipeline hook."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from models import make_feeds, optimize_tiny, run_cli, run_ort
from onnx import numpy_helper

from graphresize.plan.allocation import GroupCurve, allocate, error_curve, step_of


def _curve(gid: str, rng, width: int = 64, ppc: int = 48, energy: float = 1.0, scale: float = 1.0, layer: int = 0) -> GroupCurve:
    acts = rng.standard_normal((400, width)) * np.linspace(2.0, 0.2, width)
    return GroupCurve(gid, layer, width, ppc, scale * error_curve(acts.T @ acts, rng.standard_normal((width, 16))), energy)


def test_error_curve_is_the_prune_readout_error():
    """E(k) equals ‖(A − A_S·U)·W‖² for the least-squares readout U of the k strongest neurons."""
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((500, 24)) @ rng.standard_normal((24, 24)) * rng.uniform(0.1, 3.0, 24)
    consumer = rng.standard_normal((24, 7))
    gram = acts.T @ acts
    curve = error_curve(gram, consumer)
    order = np.argsort(-np.diag(gram), kind="stable")
    ridge = 2e-6 * np.mean(np.diag(gram)) * np.square(consumer).sum()  # what the δI in the Cholesky adds at most
    assert curve[24] == 0.0
    assert curve[0] == pytest.approx(np.square(acts @ consumer).sum(), rel=1e-9, abs=ridge)
    for k in (1, 5, 12, 23):
        kept = acts[:, order[:k]]
        readout, *_ = np.linalg.lstsq(kept, acts, rcond=None)
        direct = np.square((acts - kept @ readout) @ consumer).sum()
        assert curve[k] == pytest.approx(direct, rel=1e-6, abs=ridge)
    assert np.all(np.diff(curve) <= 1e-9 * curve[0])  # more width, never more error


@pytest.mark.parametrize("seed", range(6))
def test_budget_never_exceeded(seed):
    rng = np.random.default_rng(seed)
    curves = [_curve(f"mlp.{i}", rng, width=int(rng.choice([40, 64, 96])), ppc=int(rng.integers(10, 80)),
                     energy=float(rng.uniform(0.1, 10)), layer=i) for i in range(6)]
    block = int(sum(c.width * c.params_per_channel for c in curves) * 1.4)
    ratio = float(rng.uniform(0.05, 0.5))
    for floor in (0.0, 0.5, 0.9):
        got = allocate(curves, ratio, block, floor_factor=floor, multiple_of=8)
        kept = block - got.removed
        assert kept <= block * (1 - ratio)  # the budget: never more parameters than (1 − r)·B
        assert got.removed == sum((c.width - e.new_width) * c.params_per_channel for c, e in zip(curves, got.entries, strict=True))
        largest_step = max(step_of(c.width, 8) * c.params_per_channel for c in curves)
        assert got.removed - got.target_removed < largest_step
        for c, e in zip(curves, got.entries, strict=True):
            assert e.new_width % step_of(c.width, 8) == 0 and e.floor <= e.new_width <= c.width


def test_ratio_zero_keeps_every_width():
    rng = np.random.default_rng(1)
    curves = [_curve(f"mlp.{i}", rng, layer=i) for i in range(3)]
    got = allocate(curves, 0.0, 10_000)
    assert [e.new_width for e in got.entries] == [64, 64, 64] and got.removed == 0


def test_layer_that_dominates_its_stream_keeps_more_width():
    """Same curves; layer 1's MLP output is 100× larger against its stream (as SmolLM2's layers
    0 and 11): it keeps more width than the others, which lose more than uniform would."""
    rng = np.random.default_rng(2)
    base = _curve("mlp.0", rng)
    curves = [GroupCurve(f"mlp.{i}", i, base.width, base.params_per_channel, base.loss, 1.0 if i != 1 else 0.01) for i in range(4)]
    got = allocate(curves, 0.3, 4 * 64 * 48)
    widths = [e.new_width for e in got.entries]
    assert widths[1] > max(widths[0], widths[2], widths[3])
    assert widths[1] >= round(got.uniform_share * 64)
    assert got.entries[1].energy_ratio == pytest.approx(100 * got.entries[0].energy_ratio)


def test_floors_the_budget_cannot_meet_are_a_usage_error():
    from graphresize.errors import UsageError

    rng = np.random.default_rng(3)
    curves = [_curve(f"mlp.{i}", rng, layer=i) for i in range(2)]
    with pytest.raises(UsageError, match="cannot remove"):
        allocate(curves, 0.9, 2 * 64 * 48)  # more than the MLPs hold


def _block_params(path) -> int:
    from graphresize.pipeline import analyze, load_prepared
    from graphresize.plan.allocation_inputs import block_parameters

    return block_parameters(load_prepared(path), analyze(path))


def test_global_removes_the_block_share_and_reports_it(llama_dynamo, calib_tokens, tmp_path):
    ratio = 0.2
    result = optimize_tiny(llama_dynamo, tmp_path / "g.onnx", calib_tokens, ratio, target="mlp", method="prune",
                           allocation="global", allocation_floors=(0.5, 0.9))
    block = _block_params(llama_dynamo)
    alloc = result.allocation
    assert alloc is not None and alloc.block_params == block
    assert result.params_before - result.params_after == alloc.removed >= ratio * block
    assert result.params_after <= result.params_before - ratio * block
    assert [c["floor_factor"] for c in alloc.candidates] == [0.5, 0.9]
    assert all(c["holdout_kl"] is not None and c["holdout_kl"] >= 0 for c in alloc.candidates)
    chosen = min(alloc.candidates, key=lambda c: c["holdout_kl"])
    assert alloc.floor_factor == chosen["floor_factor"]
    widths = {e.group_id: e.new_width for e in result.plan.entries}
    assert widths == alloc.widths()
    assert all(w % 8 == 0 for w in widths.values())


@pytest.mark.parametrize("engine", ["whole", "segment"])
def test_global_at_ratio_zero_is_the_identity(engine, llama_dynamo, calib_tokens, tmp_path):
    out = tmp_path / "same.onnx"
    result = optimize_tiny(llama_dynamo, out, calib_tokens, 0.0, target="mlp", allocation="global", engine=engine)
    assert result.params_after == result.params_before and not result.plan.changed()
    feeds = make_feeds(llama_dynamo, seq=12)
    want, got = run_ort(llama_dynamo, feeds), run_ort(out, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5)


def test_energy_dominant_layer_keeps_width_in_a_model(llama_dynamo, calib_tokens, tmp_path):
    """Scale the first MLP's down_proj by 50: its output dominates the stream, so the global
    allocation keeps it wider than every other MLP."""
    from graphresize.pipeline import analyze

    groups = [g for g in analyze(llama_dynamo).of_kind("mlp")]
    first = next(p.name for p in groups[0].params if p.role == "consumer")
    model = onnx.load(llama_dynamo)
    for init in model.graph.initializer:
        if init.name == first:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 50.0, init.name))
    src = tmp_path / "loud.onnx"
    onnx.save(model, src)
    result = optimize_tiny(src, tmp_path / "out.onnx", calib_tokens, 0.15, target="mlp", method="prune",
                           allocation="global", allocation_floors=(0.0,))
    widths = result.allocation.widths()
    assert widths[groups[0].id] > max(w for gid, w in widths.items() if gid != groups[0].id)


def test_cli_global_needs_mlp_target(llama_dynamo, calib_tokens, tmp_path, capsys):
    code, _, err = run_cli(["optimize", llama_dynamo, "-o", tmp_path / "x.onnx", "--ratio", "0.2", "--calib", calib_tokens,
                            "--target", "all", "--allocation", "global"], capsys)  # the plain run's recipe is mlp
    assert code == 2 and "--target mlp" in err and not (tmp_path / "x.onnx").exists()


def test_cli_report_and_plot(llama_dynamo, calib_tokens, tmp_path, capsys):
    out = tmp_path / "g.onnx"
    code, _, err = run_cli(["optimize", llama_dynamo, "-o", out, "--ratio", "0.2", "--calib", calib_tokens, "--tokens", "1024",
                            "--seq-len", "32", "--target", "mlp", "--allocation", "global", "-q"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "g.report.json").read_text())
    alloc = report["allocation"]
    assert alloc["removed"] >= 0.2 * alloc["block_params"]
    assert len(alloc["layers"]) == len([g for g in report["groups"] if g["kind"] == "mlp"])
    assert report["config"]["settings"]["allocation"] == "global"
    if alloc["plot"] is not None:
        assert (tmp_path / "g.alloc.png").stat().st_size > 1000


def test_error_curve_of_a_rank_deficient_float32_gram():
    """Fewer tokens than neurons, Gram summed in float32 (as the calibration does): the curve
    still comes out, decreasing from the output energy to 0."""
    rng = np.random.default_rng(3)
    acts = np.maximum(rng.standard_normal((64, 512)).astype(np.float32), 0) * rng.uniform(0, 50, 512).astype(np.float32)
    gram = (acts.T @ acts).astype(np.float64)
    consumer = rng.standard_normal((512, 32))
    curve = error_curve(gram, consumer)
    assert curve[-1] == 0 and np.all(np.diff(curve) <= 1e-9 * curve[0])
    assert curve[0] == pytest.approx(np.square(acts.astype(np.float64) @ consumer).sum(), rel=1e-3)
