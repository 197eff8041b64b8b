"""DISP: per-block subsets of a full-width residual stream (--method disp)."""

import dataclasses
import json
from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
from graphresize.passes import DispPass, ResizeGroupsPass, cleanup_passes

import graphresize
from graphresize.analysis.residual import ResidualLayout
from graphresize.calibrate.statistics import calibrate
from graphresize.cli.main import main
from graphresize.cli.report import optimize_report
from graphresize.errors import UsageError
from graphresize.io.ort_utils import make_session
from graphresize.methods import registry
from graphresize.methods.disp import apply_disp
from graphresize.pipeline import OptimizeOptions, load_prepared, prepare_residual, residual_layouts
from graphresize.solve import disp
from graphresize.solve.transforms import ChannelTransform
from tests.models import export_tiny, optimize_tiny, prepared_residual, run_in_memory

FIXTURES = ["llama_dynamo", "gpt2", "opt"]


def _prepared(path):
    model, groups = prepared_residual(path)
    (group,) = groups.of_kind("residual")
    layout = residual_layouts(model, groups, [group.id])[group.id]
    writers = disp.find_writers(model.graph, group)
    assert not isinstance(writers, str), writers
    assert len(writers) == disp.block_junctions(layout) == 4  # 2 layers × (attention, MLP)
    return model, group, layout, writers


def _selection(group, layout, writers, ins, outs):
    n = disp.block_junctions(layout)
    return disp.DispSelection(
        group.id, group.width, 0.0,
        tuple(disp.Subset(j.output, "in", ("attn", "mlp")[i % 2], i // 2, tuple(k)) for i, (j, k) in enumerate(zip(layout.junctions[:n], ins, strict=True))),
        tuple(disp.Subset(w.node, "out", ("attn", "mlp")[i % 2], i // 2, tuple(k)) for i, (w, k) in enumerate(zip(writers, outs, strict=True))),
    )


@pytest.mark.parametrize("fixture", FIXTURES)
def test_all_keep_selection_is_an_identity(fixture, request):
    path = request.getfixturevalue(fixture)
    before = run_in_memory(load_prepared(path))
    model, group, layout, writers = _prepared(path)
    count = len(list(model.graph))
    full = [range(group.width)] * 4
    DispPass(layout, writers, _selection(group, layout, writers, full, full))(model)
    assert len(list(model.graph)) == count  # a full-width subset emits nothing
    for want, got in zip(before, run_in_memory(model), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# Features the mutated Llama never writes / never reads (see _sparse_blocks).
ODD = list(range(1, 64, 2))
LOW = list(range(16))


def _sparse_blocks(model):
    """Layer 0 attention writes only even features (o_proj rows), layer 1's MLP writes only
    features 16+ (down_proj rows); layer 0's q/k/v never read odd features, layer 1's
    gate/up never read features below 16."""
    a0, m1 = model.model.layers[0], model.model.layers[1]
    a0.self_attn.o_proj.weight[ODD, :] = 0
    m1.mlp.down_proj.weight[LOW, :] = 0
    for proj in (a0.self_attn.q_proj, a0.self_attn.k_proj, a0.self_attn.v_proj):
        proj.weight[:, ODD] = 0
    m1.mlp.gate_proj.weight[:, LOW] = 0
    m1.mlp.up_proj.weight[:, LOW] = 0


@pytest.fixture(scope="session")
def llama_sparse_blocks(tmp_path_factory):
    return export_tiny("llama", "dynamo", out_dir=tmp_path_factory.mktemp("disp_sparse"), mutate=_sparse_blocks)


def test_blocks_with_zero_features_are_reproduced_exactly(llama_sparse_blocks):
    """Subsets that drop exactly the zero rows/columns change nothing: GatherElements reads
    and writes (odd/even, not contiguous; the write gathers from the writer's own zero column,
    no Pad) and Slice and Pad (a contiguous block); one Shape per side for the expanded
    indices, no opset raise."""
    before = run_in_memory(load_prepared(llama_sparse_blocks))
    model, group, layout, writers = _prepared(llama_sparse_blocks)
    full, even, high = range(64), range(0, 64, 2), range(16, 64)
    selection = _selection(group, layout, writers, [even, full, full, high], [even, full, full, high])
    DispPass(layout, writers, selection)(model)
    cleanup_passes()(model)
    disp_ops = [node.op_type for node in model.graph if ".disp_" in node.name]
    assert sorted(disp_ops) == sorted(["Shape", "Concat", "Expand", "GatherElements", "Slice", "Pad",
                                       "Shape", "Concat", "Expand", "GatherElements"])
    assert model.opset_imports[""] == load_prepared(llama_sparse_blocks).opset_imports[""]
    for want, got in zip(before, run_in_memory(model), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the importance selection ranks the zero output features last
    scores = disp.output_scores(load_prepared(llama_sparse_blocks).graph, writers)
    assert set(np.argsort(scores[0])[:32]) == set(ODD)


def test_allocate_one_global_budget():
    rng = np.random.default_rng(0)
    scores = [rng.random(64) * (1 + 4 * (i % 3 == 0) * (np.arange(64) < 32)) for i in range(6)]
    keeps = disp.allocate(scores, 0.3, multiple_of=8)
    widths = [len(k) for k in keeps]
    assert all(w % 8 == 0 and 8 <= w <= 64 for w in widths)
    assert len(set(widths)) > 1  # widths differ per site
    assert abs(sum(widths) / (64 * 6) - 0.7) < 0.1
    assert disp.allocate(scores, 0.0) == [tuple(range(64))] * 6
    assert [len(k) for k in disp.allocate(scores, 0.3, uniform=True)] == [48] * 6  # 0.7·64 = 44.8, rounded to 8


@pytest.mark.parametrize("fixture", FIXTURES)
def test_ratio_runs_in_ort_with_a_profile_and_plot(fixture, request, tmp_path, calib_tokens):
    """``--method disp`` on the tiny exports: per-block subsets that are unions of aligned
    8-feature blocks of the permuted stream, read and written by block ``Gather`` (no
    GatherElements, no Expand), the report says ``block: 8``, the output runs with a bounded
    hold-out error, and the profile is reported and drawn."""
    path = request.getfixturevalue(fixture)
    out = tmp_path / "out.onnx"
    result = optimize_tiny(path, out, calib_tokens, 0.3, target="residual", method="disp")
    selection = result.disp
    assert selection is not None and len(selection.inputs) == len(selection.outputs) == 4
    assert selection.block == 8 and optimize_report(result)["disp"]["block"] == 8
    for site in selection.inputs + selection.outputs:
        keep = site.keep
        assert len(keep) % 8 == 0 and all(keep[i] % 8 == 0 and keep[i + 7] == keep[i] + 7 for i in range(0, len(keep), 8))
    assert any(s.width < selection.width for s in selection.inputs + selection.outputs)
    ops = Counter(n.op_type for n in ir.load(out).graph if ".disp_" in n.name)
    assert not ops.keys() & {"GatherElements", "Expand", "ScatterElements"} and ops["Gather"] > 0
    assert 0.55 < selection.kept_share() < 0.85
    assert not [e for e in result.plan.changed() if e.kind == "residual"]  # the stream keeps its width
    outputs = run_in_memory(ir.load(out))
    assert all(np.isfinite(o).all() for o in outputs)
    assert 0.0 < result.verification.relative_error < 0.7  # measured 0.34 (gpt2) to 0.50 (llama)
    assert result.params_after < result.params_before
    report = json.loads(json.dumps(optimize_report(result)))
    assert [row["layer"] for row in report["disp"]["profile"]] == [0, 1]
    assert set(report["disp"]["profile"][0]) == {"layer", "attn_in", "attn_out", "mlp_in", "mlp_out"}
    pytest.importorskip("matplotlib")
    assert result.disp_plot == tmp_path / "out.disp.png"
    assert result.disp_plot.read_bytes()[:4] == b"\x89PNG"


def test_disp_with_target_all_resizes_mlp_by_default_method(llama_dynamo, tmp_path, calib_tokens):
    result = graphresize.optimize(
        llama_dynamo, tmp_path / "o.onnx", ratio=0.3, calib=calib_tokens, tokens=2048, seq_len=32, progress=False,
        method="disp",
    )
    mlp = [e for e in result.plan.changed() if e.kind == "mlp"]
    assert mlp and all(result.transforms[e.group_id].info.get("method") != "disp" for e in mlp)
    assert result.disp is not None
    assert all(np.isfinite(o).all() for o in run_in_memory(ir.load(tmp_path / "o.onnx")))


def test_disp_refuses_mlp_target(llama_dynamo, tmp_path, calib_tokens):
    with pytest.raises(UsageError, match="disp"):
        graphresize.optimize(
            llama_dynamo, tmp_path / "o.onnx", ratio=0.3, calib=calib_tokens, method="disp", target="mlp", progress=False
        )


@pytest.mark.parametrize(("dtype", "opset", "ops"), [
    (np.float16, 9, ["MatMul", "Gather", "Add"]),
    (np.float16, 18, ["MatMul", "Shape", "Concat", "Expand", "GatherElements", "Add"]),
    (np.float32, 14, ["MatMul", "Shape", "Slice", "Concat", "Expand", "GatherElements", "Add"]),
    (np.float32, 18, ["MatMul", "Shape", "Concat", "Expand", "GatherElements", "Add"]),
])
def test_scattered_write_forms(dtype, opset, ops):
    """A non-contiguous write is ``x + GatherElements(u, Expand(inv))`` in any dtype, ``u``
    the kept columns and one zero column the writer computes itself (no Pad), the ``Add`` kept
    for the skip-norm fusion (below opset 15 the index shape is ``Slice(Shape(x))``, Shape has
    no ``end``); below opset 11 ``x + Gather(u, inv)``; no Cast and no opset raise."""
    elem = ir.DataType.FLOAT16 if dtype == np.float16 else ir.DataType.FLOAT
    x = ir.Value(name="x", shape=ir.Shape([1, 3, 8]), type=ir.TensorType(elem))
    h = ir.Value(name="h", shape=ir.Shape([1, 3, 8]), type=ir.TensorType(elem))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(dtype)
    w[:, [1, 4, 6]] = 0
    weight = ir.Value(name="w", shape=ir.Shape([8, 8]), type=ir.TensorType(elem), const_value=ir.tensor(w, name="w"))
    mm = ir.node("MatMul", [h, weight], name="writer")
    add = ir.node("Add", [x, mm.outputs[0]], name="residual")
    add.outputs[0].name, add.outputs[0].dtype, add.outputs[0].shape = "y", elem, ir.Shape([1, 3, 8])
    mm.outputs[0].name = "mm"
    graph = ir.Graph([x, h], [add.outputs[0]], nodes=[mm, add], initializers=[weight], opset_imports={"": opset})
    model = ir.Model(graph, ir_version=8)
    feeds = {"x": rng.standard_normal((1, 3, 8)).astype(dtype), "h": rng.standard_normal((1, 3, 8)).astype(dtype)}
    (want,) = make_session(model).run(None, feeds)
    keep = (0, 2, 3, 5, 7)
    writer = disp.Writer("writer", "w", 1, None, None, "residual", 0)
    layout = ResidualLayout("residual", (), (), None)
    DispPass(layout, [writer], disp.DispSelection("residual", 8, 0.0, (), (disp.Subset("writer", "out", "attn", 0, keep),)))(model)
    cleanup_passes()(model)
    assert model.opset_imports[""] == opset
    assert sorted(n.op_type for n in model.graph) == sorted(ops)
    assert model.graph.outputs[0].name == "y"
    narrow = np.asarray(model.graph.initializers["w"].const_value.numpy())
    np.testing.assert_array_equal(narrow, np.concatenate([w[:, list(keep)], np.zeros((8, 1), dtype)], axis=1))
    (got,) = make_session(model).run(None, feeds)
    assert got.dtype == dtype
    tol = 1e-3 if dtype == np.float16 else 1e-6
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=tol, atol=tol)


def _mask_weights(model, layout, writers, ins, outs):
    """The DISP approximation spelled without index nodes: reader rows outside ``S_in`` and
    writer columns outside ``S_out`` set to zero in the full-width graph."""
    graph = model.graph
    for readers, keep in zip(layout.readers, ins, strict=False):
        for reader in readers:
            array = np.array(graph.initializers[reader.weight].const_value.numpy())
            drop = np.setdiff1d(np.arange(array.shape[reader.axis]), list(keep))
            np.moveaxis(array, reader.axis, 0)[drop] = 0
            graph.initializers[reader.weight].const_value = ir.tensor(array, name=reader.weight)
    for writer, keep in zip(writers, outs, strict=True):
        array = np.array(graph.initializers[writer.weight].const_value.numpy())
        drop = np.setdiff1d(np.arange(array.shape[writer.axis]), list(keep))
        np.moveaxis(array, writer.axis, 0)[drop] = 0
        graph.initializers[writer.weight].const_value = ir.tensor(array, name=writer.weight)


def test_index_nodes_equal_masked_weights(llama_dynamo):
    """On dense random weights (every dropped feature matters), the index-node graph equals
    the full-width graph with the dropped reader rows and writer columns zeroed, to float
    rounding: random scattered subsets of different widths (GatherElements / Pad + Gather),
    one contiguous block (Slice / Pad) and one full width."""
    rng = np.random.default_rng(3)
    model, group, layout, writers = _prepared(llama_dynamo)
    d = group.width

    def scattered(k):
        return sorted(rng.choice(d, k, replace=False).tolist())

    ins = [scattered(40), range(8, 56), scattered(48), scattered(40)]
    outs = [scattered(48), scattered(40), range(d), range(0, 48)]
    reference = load_prepared(llama_dynamo)
    _mask_weights(reference, layout, writers, ins, outs)
    want = run_in_memory(reference)
    DispPass(layout, writers, _selection(group, layout, writers, ins, outs))(model)
    cleanup_passes()(model)
    disp_ops = [node.op_type for node in model.graph if ".disp_" in node.name]
    assert disp_ops.count("Concat") == 3  # reads: widths 40 and 48; writes: the full width
    assert disp_ops.count("GatherElements") == 5 and disp_ops.count("Pad") == 1  # 3 reads, 2 scattered writes; 1 contiguous write
    assert disp_ops.count("Shape") == 2 and disp_ops.count("Expand") == 5  # one Shape per side
    got = run_in_memory(model)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # the torch executor used by `heal` runs the same index nodes (Pad included)
    _assert_heal_executor_agrees(model, got[0])


def _assert_heal_executor_agrees(model, want) -> None:
    """The torch executor ``heal`` trains through gives ``want`` (the ORT logits of
    ``run_in_memory``'s token ids) on ``model``."""
    torch = pytest.importorskip("torch")
    from graphresize.io.ort_utils import make_feeds
    from graphresize.recover.torch_graph import TorchGraph

    feeds = make_feeds(make_session(model), np.random.default_rng(1).integers(0, 200, size=(2, 16)))
    with torch.no_grad():
        outs = TorchGraph(model)({k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()})
    np.testing.assert_allclose(outs[0].numpy(), want, rtol=1e-4, atol=1e-4)


def test_lsq_readout_reads_a_dropped_feature_back():
    """A dropped feature that is a linear combination of kept ones is read back exactly;
    all-keep is the identity."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((500, 8))
    rows[:, 5] = 2 * rows[:, 1] - rows[:, 3]
    gram = rows.T @ rows
    keep = (0, 1, 2, 3, 4, 6, 7)
    readout = disp.lsq_readout(gram, keep, ridge=0.0)
    assert readout.shape == (7, 8)
    np.testing.assert_allclose(rows[:, keep] @ readout, rows, atol=1e-9)
    np.testing.assert_array_equal(disp.lsq_readout(gram, range(8)), np.eye(8))
    # plain selection loses feature 5 entirely
    assert np.linalg.norm(rows[:, keep] @ np.eye(8)[list(keep)] - rows) > 1


def test_nested_selection_becomes_prefixes():
    rng = np.random.default_rng(1)
    scores = [rng.random(32) for _ in range(4)]
    in_sites, out_sites = ["a", "b"], ["c", "d"]
    selection = disp.select("g", 32, scores[:2], scores[2:], in_sites, out_sites, 0.4, multiple_of=4, nested=True)
    order = disp.global_order(scores)
    for site in selection.inputs + selection.outputs:
        assert set(site.keep) == set(order[: site.width].tolist())
    moved = selection.reindexed(order)
    assert [s.keep for s in moved.inputs + moved.outputs] == [tuple(range(s.width)) for s in selection.inputs + selection.outputs]
    assert len({s.width for s in selection.inputs + selection.outputs}) > 1


@pytest.mark.parametrize("fixture", FIXTURES)
def test_stream_permutation_changes_nothing(fixture, request):
    """A permutation of the residual features (embedding columns, reader rows, writer
    columns, LM head, norm gains) is exact."""
    path = request.getfixturevalue(fixture)
    before = run_in_memory(load_prepared(path))
    model, group, layout, writers = _prepared(path)
    groups = prepare_residual(load_prepared(path), [g for g in graphresize.analyze(path).of_kind("residual") if g.resizable])
    perm = np.eye(group.width)[:, np.random.default_rng(0).permutation(group.width)]
    ResizeGroupsPass(groups, {group.id: ChannelTransform(group.id, perm, perm.T, method="permutation")})(model)
    cleanup_passes()(model)
    for want, got in zip(before, run_in_memory(model), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _stats(model, groups, layouts, calib_tokens):
    (gid,) = layouts
    requests = registry.get("dotresize+disp").stat_requests(groups.by_id(gid), layouts)
    assert [r.key for r in requests] == [f"{gid}#j{i}" for i in range(4)]
    session = make_session(model, list(dict.fromkeys(n for r in requests for n in r.names())))
    windows = np.load(calib_tokens)[:1024].reshape(32, 32)
    return calibrate(session, requests, windows, progress=False)


@pytest.mark.parametrize("fixture", ["llama_dynamo", "gpt2"])
def test_composed_all_keep_is_an_identity(fixture, request, calib_tokens):
    """``dotresize+disp`` with nothing dropped: the principal rotation and the permutation
    into the shared order alone, exact; no index node is emitted."""
    path = request.getfixturevalue(fixture)
    before = run_in_memory(load_prepared(path))
    model = load_prepared(path)
    groups = prepare_residual(model, [g for g in graphresize.analyze(path).of_kind("residual") if g.resizable])
    (group,) = groups.of_kind("residual")
    layouts = residual_layouts(model, groups, [group.id])
    stats = _stats(model, groups, layouts, calib_tokens)
    selection = apply_disp(model, groups, layouts, stats, OptimizeOptions(ratio=0.0, method="dotresize+disp"))
    assert selection.nested and selection.basis == "principal" and selection.kept_share() == 1.0
    cleanup_passes()(model)
    ops = {node.op_type for node in model.graph}
    assert not ops & {"GatherElements", "ScatterElements", "Pad"}
    for want, got in zip(before, run_in_memory(model), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=5e-5)


def test_composed_method_from_the_cli_uses_contiguous_blocks(llama_dynamo, tmp_path, calib_tokens, capsys):
    """``--method dotresize+disp`` (MLP merged by OT, stream rotated, nested subsets): only
    Slice and Pad index nodes, runs in ORT fp32, per-block widths in the report."""
    out = tmp_path / "o.onnx"
    code = main(["optimize", str(llama_dynamo), "-o", str(out), "--ratio", "0.3", "--method", "dotresize+disp",
                 "--calib", str(calib_tokens), "--tokens", "2048", "--seq-len", "32", "-q"])
    assert code == 0, capsys.readouterr().err
    model = ir.load(out)
    ops = [node.op_type for node in model.graph]
    assert "GatherElements" not in ops and "ScatterElements" not in ops
    assert ops.count("Pad") >= 1
    report = json.loads(out.with_name("o.report.json").read_text())
    assert report["disp"]["nested"] and report["disp"]["basis"] == "principal" and report["disp"]["readers"] == "select"
    assert 0.55 < report["disp"]["kept_share"] < 0.85
    assert 0.0 < report["verification"]["relative_error"] < 0.5  # measured 0.33
    assert any(g["kind"] == "mlp" and g["new_width"] < g["width"] for g in report["groups"])
    assert all(np.isfinite(o).all() for o in run_in_memory(model))


def test_range_order_makes_nested_subsets_prefixes_and_refuses_free_ones():
    rng = np.random.default_rng(2)
    order = rng.permutation(32)
    nested = disp.DispSelection("g", 32, 0.3, (disp.Subset("a", "in", "attn", 0, tuple(sorted(order[:8].tolist()))),
                                               disp.Subset("b", "in", "mlp", 0, tuple(sorted(order[:24].tolist())))),
                                (disp.Subset("c", "out", "attn", 0, tuple(sorted(order[:16].tolist()))),
                                 disp.Subset("d", "out", "mlp", 0, tuple(range(32)))))
    found = disp.range_order(nested)
    moved = nested.reindexed(found)
    assert [s.keep for s in moved.inputs + moved.outputs] == [tuple(range(w)) for w in (8, 24, 16, 32)]
    free = dataclasses.replace(nested, inputs=(disp.Subset("a", "in", "attn", 0, (0, 2, 4, 6)),
                                               disp.Subset("b", "in", "mlp", 0, (1, 2, 3, 4, 5))))
    assert disp.range_order(free) is None  # {0,2,4,6} and {1..5} overlap without nesting, c and d add no order
    ranges = dataclasses.replace(nested, inputs=(disp.Subset("a", "in", "attn", 0, tuple(range(4, 12))),), outputs=())
    np.testing.assert_array_equal(disp.range_order(ranges), np.arange(32))  # already ranges: the stream's own order


def test_slice_form_equals_gather_form_for_the_same_selection(llama_dynamo):
    """Nested subsets written twice: as they are (GatherElements on both sides, in the
    stream's own order) and after one permutation of the stream (``range_order``: every
    subset a prefix, Slice / Pad only, no index constants). Same outputs to float rounding."""
    order = np.random.default_rng(4).permutation(64)
    ins, outs = [order[:40], order[:48], order[:56], order[:32]], [order[:48], order[:40], order, order[:24]]
    ins, outs = [sorted(k.tolist()) for k in ins], [sorted(k.tolist()) for k in outs]
    gathered, group, layout, writers = _prepared(llama_dynamo)
    selection = _selection(group, layout, writers, ins, outs)
    DispPass(layout, writers, selection)(gathered)
    cleanup_passes()(gathered)
    sliced = _prepared(llama_dynamo)[0]
    found = disp.range_order(selection)
    assert found is not None
    groups = prepare_residual(load_prepared(llama_dynamo), [g for g in graphresize.analyze(llama_dynamo).of_kind("residual") if g.resizable])
    perm = np.eye(group.width)[:, found]
    ResizeGroupsPass(groups, {group.id: ChannelTransform(group.id, perm, perm.T, method="permutation")})(sliced)
    DispPass(layout, writers, selection.reindexed(found))(sliced)
    cleanup_passes()(sliced)
    gather_ops = sorted(node.op_type for node in gathered.graph if ".disp_" in node.name)
    slice_ops = sorted(node.op_type for node in sliced.graph if ".disp_" in node.name)
    assert gather_ops.count("GatherElements") == 7 and "ScatterElements" not in gather_ops
    assert slice_ops == ["Pad"] * 3 + ["Slice"] * 4  # one per narrowed site, nothing else
    for want, got in zip(run_in_memory(gathered), run_in_memory(sliced), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_range_order_of_nested_subsets_is_their_shared_order():
    """Subsets selected as prefixes of ``global_order`` get exactly that order back (the
    permutation ``dotresize+disp`` has always applied)."""
    rng = np.random.default_rng(5)
    scores = [rng.random(48) for _ in range(6)]
    selection = disp.select("g", 48, scores[:3], scores[3:], ["a", "b", "c"], ["d", "e", "f"], 0.35, multiple_of=4, nested=True)
    shared = disp.global_order(scores)
    np.testing.assert_array_equal(disp.range_order(selection, shared), shared)
    moved = selection.reindexed(disp.range_order(selection))  # any tie order: still prefixes
    assert all(s.keep == tuple(range(s.width)) for s in moved.inputs + moved.outputs)


def test_nested_method_from_the_cli_uses_slices_with_per_block_widths(llama_dynamo, tmp_path, calib_tokens, capsys):
    """``--method disp-nested``: the stream's own basis, one global budget (widths differ per
    block), every subset a prefix after one permutation: only Slice and Pad index nodes."""
    out = tmp_path / "o.onnx"
    code = main(["optimize", str(llama_dynamo), "-o", str(out), "--ratio", "0.3", "--method", "disp-nested", "--target", "residual",
                 "--calib", str(calib_tokens), "--tokens", "2048", "--seq-len", "32", "-q"])
    assert code == 0, capsys.readouterr().err
    model = ir.load(out)
    ops = [node.op_type for node in model.graph if ".disp_" in node.name]
    report = json.loads(out.with_name("o.report.json").read_text())["disp"]
    narrowed = [s for s in report["sites"] if s["width"] < 64]
    assert report["nested"] and report["basis"] == "stream" and len({s["width"] for s in report["sites"]}) > 1
    assert sorted(set(ops)) == ["Pad", "Slice"] and len(ops) == len(narrowed)
    assert all(np.isfinite(o).all() for o in run_in_memory(model))


def _blocks(*starts, size=8):
    return [j for a in starts for j in range(a, a + size)]


@pytest.mark.parametrize("fixture", ["llama_dynamo", "gpt2"])
def test_block_subsets_gather_whole_blocks_and_equal_masked_weights(fixture, request):
    """A selection of whole aligned 8-feature blocks (``block=8``) reads and writes by ``Gather``
    on the block axis of a ``[..., D/8, 8]`` view (no Expand, no GatherElements; the writer
    computes a zero block): outputs equal those of the element-wise forms of the same subsets
    (GatherElements, checked against masked weights above), in ORT and in the torch executor
    ``heal`` uses; GPT-2's writers carry a bias (its zero block too). A contiguous subset is
    still a Slice / Pad, and an unaligned one falls back to GatherElements."""
    path = request.getfixturevalue(fixture)
    model, group, layout, writers = _prepared(path)
    assert group.width == 64
    ins = [_blocks(0, 16, 40), _blocks(8, 24, 32, 56), range(8, 56), _blocks(0, 48)]
    outs = [_blocks(16, 40, 56), [1, 2, 3, 5, 8, 13, 21, 34], _blocks(0, 8, 24, 32, 48), range(64)]
    reference, *_ = _prepared(path)
    DispPass(layout, writers, _selection(group, layout, writers, ins, outs))(reference)
    cleanup_passes()(reference)
    assert Counter(n.op_type for n in reference.graph)["GatherElements"] == 6
    want = run_in_memory(reference)
    selection = dataclasses.replace(_selection(group, layout, writers, ins, outs), block=8)
    DispPass(layout, writers, selection)(model)
    cleanup_passes()(model)
    disp_ops = Counter(node.op_type for node in model.graph if ".disp_" in node.name)
    # reads: 3 blocked, 1 contiguous; writes: 2 blocked, 1 unaligned, 1 full width
    assert disp_ops["Gather"] == 5 and disp_ops["Reshape"] == 10 and disp_ops["Slice"] == 1
    assert disp_ops["GatherElements"] == 1 and disp_ops["Expand"] == 1 and "Pad" not in disp_ops
    writer = model.graph.initializers[writers[0].weight].const_value.numpy()
    assert np.moveaxis(writer, writers[0].axis, 0).shape[0] == 24 + 8  # 3 blocks and the zero block
    assert not np.moveaxis(writer, writers[0].axis, 0)[24:].any()
    got = run_in_memory(model)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    _assert_heal_executor_agrees(model, got[0])


def test_block_allocation_keeps_whole_blocks_of_the_block_order():
    """``block=8``: each site keeps its top-scoring blocks of 8 consecutive features of
    ``block_order``, its count rounded to whole blocks; ``select`` records that order."""
    rng = np.random.default_rng(0)
    scores = [rng.random(32) + 0.01 for _ in range(4)]
    order = disp.block_order(disp.allocate(scores, 0.5, multiple_of=8), 8, disp.global_order(scores))
    blocks = [set(order[i * 8:(i + 1) * 8].tolist()) for i in range(4)]
    keeps = disp.allocate(scores, 0.5, multiple_of=8, block=8)
    for keep, s in zip(keeps, scores, strict=True):
        assert len(keep) % 8 == 0 and 8 <= len(keep) <= 32
        held = [b for b in blocks if b <= set(keep)]
        assert sum(len(b) for b in held) == len(keep)  # a union of whole blocks
        sums = [s[list(b)].sum() for b in blocks]
        assert sorted(sums, reverse=True)[: len(held)] == sorted((s[list(b)].sum() for b in held), reverse=True)
    assert sum(len(k) for k in keeps) == 64  # half of 4 x 32, in whole blocks
    selection = disp.select("g", 32, scores[:2], scores[2:], ["a", "b"], ["c", "d"], 0.5, 8, block=8)
    assert selection.order == tuple(order.tolist())
    assert [s.keep for s in selection.inputs + selection.outputs] == keeps


def test_block_order_groups_features_held_by_the_same_sites():
    """Golden: two sites, 16 features each held by site 0 only, by site 1 only, by both, by
    neither, interleaved in the global order. Blocks of consecutive global-order features mix
    the four kinds (each site would have to keep half-wanted blocks); ``block_order`` makes
    every block pure, so the block subsets equal the free ones exactly."""
    kinds = np.tile(np.arange(4), 16)  # feature j is of kind j % 4: 0 site 0, 1 site 1, 2 both, 3 neither
    high = {0: (5.0, 1.0), 1: (1.0, 5.0), 2: (5.0, 5.0), 3: (1.0, 1.0)}
    scores = [np.array([high[k][site] + 0.001 * (63 - j) for j, k in enumerate(kinds)]) for site in range(2)]
    free = disp.allocate(scores, 0.5, multiple_of=8)
    assert [set(kinds[list(k)]) for k in free] == [{0, 2}, {1, 2}]
    order = disp.block_order(free, 8, disp.global_order(scores))
    assert sorted(order.tolist()) == list(range(64))
    assert [len(set(kinds[order[i:i + 8]])) for i in range(0, 64, 8)] == [1] * 8
    consecutive = disp.global_order(scores)
    assert max(len(set(kinds[consecutive[i:i + 8]])) for i in range(0, 64, 8)) > 1
    assert disp.allocate(scores, 0.5, multiple_of=8, block=8) == free
    assert disp.allocate(scores, 0.5, multiple_of=8, block=8, order=consecutive) != free


@pytest.mark.parametrize("fixture", FIXTURES)
def test_disp_free_keeps_single_features_end_to_end(fixture, request, tmp_path, calib_tokens):
    """``disp-free`` on the tiny exports keeps single-feature subsets (some not a union of
    aligned 8-feature blocks), read and written by element-wise GatherElements."""
    free = optimize_tiny(request.getfixturevalue(fixture), tmp_path / "free.onnx", calib_tokens, 0.3, target="residual", method="disp-free")
    assert free.disp.block == 1 and optimize_report(free)["disp"]["block"] == 1
    blocks_of = [{j // 8 for j in s.keep} for s in free.disp.inputs + free.disp.outputs]
    assert any(8 * len(b) != len(s.keep) for b, s in zip(blocks_of, free.disp.inputs + free.disp.outputs, strict=True))
    free_ops = Counter(n.op_type for n in ir.load(tmp_path / "free.onnx").graph if ".disp_" in n.name)
    assert free_ops["GatherElements"] > 0 and "Gather" not in free_ops


def test_site_labels_of_sequential_and_parallel_blocks(llama_dynamo, phi):
    """Golden: Llama's blocks alternate attention and MLP (two inputs a layer, one writer
    each); Phi-1/2's parallel blocks read one norm per layer and both writers follow it."""
    model, group, layout, writers = _prepared(llama_dynamo)
    assert disp.site_labels(model.graph, layout, writers) == (
        [("attn", 0), ("mlp", 0), ("attn", 1), ("mlp", 1)], [("attn", 0), ("mlp", 0), ("attn", 1), ("mlp", 1)])
    model, groups = prepared_residual(phi)
    (group,) = groups.of_kind("residual")
    layout = residual_layouts(model, groups, [group.id])[group.id]
    writers = disp.find_writers(model.graph, group)
    assert disp.site_labels(model.graph, layout, writers) == (
        [(disp.PARALLEL, 0), (disp.PARALLEL, 1)], [("attn", 0), ("mlp", 0), ("attn", 1), ("mlp", 1)])
    assert disp.site_labels(model.graph, layout, writers[:3]).startswith("writers per block input [2, 1]")


@pytest.mark.parametrize("block", [1, 8])
def test_parallel_blocks_equal_masked_weights(phi, block):
    """Phi-1/2 (attention and MLP read one norm and both write through one ``Add``): the
    index-node graph equals the full-width graph with the dropped reader rows, writer columns
    and writer bias entries zeroed, to float rounding, for free subsets (``block`` 1) and for
    unions of aligned 8-feature blocks; both writers of a layer are rewritten in the one Add.
    (The reference is the prepared model itself: its readers carry the LayerNorm bias folded
    in at full width, which a selection keeps.)"""
    rng = np.random.default_rng(5)
    model, groups = prepared_residual(phi)
    (group,) = groups.of_kind("residual")
    layout = residual_layouts(model, groups, [group.id])[group.id]
    writers = disp.find_writers(model.graph, group)
    d = group.width

    def subset(k):
        if block > 1:
            return sorted(j for b in rng.choice(d // block, k // block, replace=False) for j in range(b * block, (b + 1) * block))
        return sorted(rng.choice(d, k, replace=False).tolist())

    ins, outs = [subset(40), subset(48)], [subset(48), subset(40), list(range(d)), subset(32)]
    reference, _ = prepared_residual(phi)  # gains and LayerNorm biases folded into the readers as in ``model``
    _mask_weights(reference, layout, writers, ins, outs)
    for writer, keep in zip(writers, outs, strict=True):
        bias = reference.graph.initializers[writer.bias]
        array = np.array(bias.const_value.numpy())
        array[np.setdiff1d(np.arange(d), keep)] = 0
        bias.const_value = ir.tensor(array, name=writer.bias)
    want = run_in_memory(reference)
    labels = disp.site_labels(model.graph, layout, writers)
    n = disp.block_junctions(layout)
    selection = disp.DispSelection(
        group.id, d, 0.0,
        tuple(disp.Subset(j.output, "in", b, layer, tuple(k)) for j, k, (b, layer) in zip(layout.junctions[:n], ins, labels[0], strict=True)),
        tuple(disp.Subset(w.node, "out", b, layer, tuple(k)) for w, k, (b, layer) in zip(writers, outs, labels[1], strict=True)),
        block=block,
    )
    assert selection.profile()[0] == {"layer": 0, "attn_in": 40, "mlp_in": 40, "attn_out": 48, "mlp_out": 40}
    DispPass(layout, writers, selection)(model)
    cleanup_passes()(model)
    ops = Counter(node.op_type for node in model.graph if ".disp_" in node.name)
    assert ops["GatherElements" if block == 1 else "Gather"] == 2 + 3  # 2 reads, 3 scattered writes
    got = run_in_memory(model)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    _assert_heal_executor_agrees(model, got[0])


@pytest.mark.parametrize("method", ["disp", "disp-free", "disp-nested"])
def test_disp_on_parallel_blocks_end_to_end(phi, tmp_path, calib_tokens, method):
    """Phi-1/2 through ``optimize``: one input subset per layer (attention and MLP read the
    same), two writer subsets, a profile with equal ``attn_in`` / ``mlp_in``, finite outputs and
    a hold-out error like the sequential tiny models' (measured 0.49-0.59)."""
    result = optimize_tiny(phi, tmp_path / "o.onnx", calib_tokens, 0.3, target="residual", method=method)
    selection = result.disp
    assert [s.block for s in selection.inputs] == [disp.PARALLEL] * 2
    assert [s.block for s in selection.outputs] == ["attn", "mlp"] * 2
    assert all(row["attn_in"] == row["mlp_in"] for row in selection.profile())
    assert any(s.width < selection.width for s in selection.inputs + selection.outputs)
    assert all(np.isfinite(o).all() for o in run_in_memory(ir.load(tmp_path / "o.onnx")))
    assert 0.0 < result.verification.relative_error < 0.7
