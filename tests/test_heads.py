"""Attention heads: recognition per export style, exact removal of dead heads, GQA rounding,
KV-cache decoding with the narrowed graph."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphresize.passes import ResizeHeadsPass

import graphresize
from graphresize.analysis.attention.find import find_attention
from graphresize.analysis.attention.heads import KV
from graphresize.cli.main import main
from graphresize.io.ort_utils import make_feeds, make_session
from graphresize.pipeline import load_prepared
from graphresize.solve.heads import HeadSelection, head_count, head_scores, select_heads
from tests.models import optimize_tiny, zero_heads

FIXTURES = ["llama_dynamo", "llama_legacy", "llama_optimum", "gpt2", "gpt2_legacy", "opt", "bert"]
SHAPES = {"llama": (4, 2, 16), "gpt2": (4, 4, 16), "opt": (4, 4, 16), "bert": (4, 4, 16)}


def _outputs(model_or_path, ids, **extra):
    model = ir.load(model_or_path) if not isinstance(model_or_path, ir.Model) else model_or_path
    session = make_session(model)
    feeds = make_feeds(session, ids)
    feeds.update(extra)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _ids(seed=1, batch=2, seq=16):
    return np.random.default_rng(seed).integers(0, 200, size=(batch, seq))


def _optimize(src, dst, calib, head_ratio, ratio=0.0, **kw):
    return optimize_tiny(src, dst, calib, ratio, head_ratio=head_ratio, **kw)




@pytest.mark.parametrize("fixture", FIXTURES)
def test_every_layer_is_recognised(fixture, request):
    path = request.getfixturevalue(fixture)
    blocks = find_attention(load_prepared(path))
    assert [b.layer for b in blocks] == [0, 1]
    for block in blocks:
        assert block.reason is None
        assert (block.num_heads, block.num_kv_heads, block.head_dim) == SHAPES[fixture.split("_")[0]]
        assert [p.role for p in block.projections] == ["q", "k", "v"]
        assert block.output_weight and block.anchor
    if fixture == "llama_optimum":
        names = sorted(c.name for c in blocks[0].cache)
        assert names == ["past_key_values.0.key", "past_key_values.0.value", "present.0.key", "present.0.value"]
        assert {(c.axis, c.unit) for c in blocks[0].cache} == {(1, KV)}
    if fixture.startswith("gpt2"):  # packed c_attn: one weight, three segments
        assert len({p.weight for p in blocks[0].projections}) == 1
        assert [p.offset for p in blocks[0].projections] == [0, 64, 128]


def test_score_is_the_heads_output_energy():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(500, 64))
    rows = rng.normal(size=(64, 8))
    rows[16:32] = 0.0  # head 1 silent
    scores = head_scores(acts.T @ acts, rows, 4, 16)
    want = [np.sum((acts[:, h * 16 : (h + 1) * 16] @ rows[h * 16 : (h + 1) * 16]) ** 2) for h in range(4)]
    np.testing.assert_allclose(scores, want, rtol=1e-9)
    assert scores[1] == 0.0


def test_zero_heads_removed_is_identity_in_the_pass(llama_dynamo):
    """A selection that keeps every head leaves the graph as it was."""
    model = load_prepared(llama_dynamo)
    blocks = find_attention(model)
    keep = {b.layer: HeadSelection(b.layer, tuple(range(b.num_heads)), tuple(range(b.num_kv_heads)), ()) for b in blocks}
    before = _outputs(load_prepared(llama_dynamo), _ids())
    ResizeHeadsPass(blocks, keep)(model)
    after = _outputs(model, _ids())
    np.testing.assert_allclose(after["logits"], before["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture", ["llama_dynamo", "gpt2"])
def test_ratio_rounding_to_zero_heads_is_identity(fixture, request, tmp_path, calib_tokens):
    src = request.getfixturevalue(fixture)
    result = _optimize(src, tmp_path / "out.onnx", calib_tokens, head_ratio=0.1)
    assert all(r["new_heads"] == r["heads"] for r in result.heads.layers())
    assert "rounded to 0" in result.heads.note
    for name, value in _outputs(src, _ids()).items():
        np.testing.assert_allclose(_outputs(tmp_path / "out.onnx", _ids())[name], value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("fixture", "dead", "ratio", "kept"),
    [
        ("llama_dynamo", (2, 3), 0.5, (0, 1)),  # GQA: KV head 1 with its query heads 2, 3
        ("llama_legacy", (0, 1), 0.5, (2, 3)),
        ("gpt2", (2,), 0.25, (0, 1, 3)),
        ("gpt2_legacy", (1,), 0.25, (0, 2, 3)),
        ("opt", (0,), 0.25, (1, 2, 3)),
        ("bert", (3,), 0.25, (0, 1, 2)),
    ],
)
def test_dead_heads_are_removed_without_output_change(fixture, dead, ratio, kept, request, tmp_path, calib_tokens):
    src = zero_heads(request.getfixturevalue(fixture), tmp_path / "dead.onnx", dead)
    result = _optimize(src, tmp_path / "out.onnx", calib_tokens, head_ratio=ratio)
    assert [r["kept"] for r in result.heads.layers()] == [list(kept)] * 2
    assert result.params_after < result.params_before
    before, after = _outputs(src, _ids()), _outputs(tmp_path / "out.onnx", _ids())
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-5, atol=1e-5)
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"), full_check=True)  # no stale head counts in shapes
    blocks = find_attention(load_prepared(tmp_path / "out.onnx"))  # the new graph is still recognised
    assert [b.num_heads for b in blocks] == [len(kept)] * 2


def test_gqa_ratio_rounds_to_whole_kv_groups_and_says_so(llama_dynamo, tmp_path, calib_tokens, capsys):
    result = graphresize.optimize(
        llama_dynamo, tmp_path / "out.onnx", ratio=0.0, calib=calib_tokens, tokens=2048, seq_len=32, head_ratio=0.3
    )
    note = result.heads.note
    assert "cannot be met exactly with 2 KV groups" in note and "rounded to 0.5" in note
    assert "heads: --ratio-heads 0.3 cannot be met exactly" in capsys.readouterr().err
    assert {(r["new_heads"], r["new_kv_heads"]) for r in result.heads.layers()} == {(2, 1)}
    block = find_attention(load_prepared(llama_dynamo))[0]
    assert head_count(block, 0.74).removed == 1  # never the last KV group
    assert head_count(block, 0.75).removed == 1


def test_refit_is_exact_for_silent_heads():
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(400, 32))
    rows = rng.normal(size=(32, 8))
    rows[16:] = 0.0
    from graphresize.analysis.attention.heads import AttentionBlock

    block = AttentionBlock(layer=0, scope="", num_heads=2, num_kv_heads=2, head_dim=16)
    sel = select_heads(block, acts.T @ acts, rows, 0.5)
    assert sel.keep_q == (0,) and sel.keep_kv == (0,)
    np.testing.assert_allclose(sel.output_rows, rows[:16], atol=1e-6)


def test_kv_cache_decoding_matches_the_full_pass(llama_optimum, tmp_path, calib_tokens):
    """The narrowed with-past graph: prefill + one cached step equals one pass over all tokens,
    and equals the original graph (the removed KV head was dead)."""
    src = zero_heads(llama_optimum, tmp_path / "dead.onnx", (2, 3))
    _optimize(src, tmp_path / "out.onnx", calib_tokens, head_ratio=0.5)
    out = ir.load(tmp_path / "out.onnx")
    shapes = {v.name: list(v.shape) for v in [*out.graph.inputs, *out.graph.outputs]}
    assert shapes["past_key_values.0.key"][1] == 1 and shapes["present.1.value"][1] == 1
    ids = _ids(seq=12)
    full = _outputs(out, ids)
    session = make_session(out)
    prefill = session.run(None, make_feeds(session, ids[:, :8]))
    names = [o.name for o in session.get_outputs()]
    present = dict(zip(names, prefill, strict=True))
    feeds = {
        "input_ids": ids[:, 8:],
        "attention_mask": np.ones((2, 12), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(8, 12), (2, 4)).astype(np.int64),
    }
    for name in present:
        if name.startswith("present."):
            feeds[name.replace("present.", "past_key_values.")] = present[name]
    assert feeds["past_key_values.0.key"].shape == (2, 1, 8, 16)
    step = dict(zip(names, session.run(None, feeds), strict=True))
    np.testing.assert_allclose(step["logits"], full["logits"][:, 8:], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(step["present.1.key"], full["present.1.key"], rtol=1e-4, atol=1e-4)
    original = _outputs(src, ids)
    np.testing.assert_allclose(full["logits"], original["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(full["present.0.value"], original["present.0.value"][:, :1], rtol=1e-5, atol=1e-5)


def test_heads_with_mlp_and_cli_report(llama_legacy, tmp_path, calib_tokens):
    report = tmp_path / "r.json"
    code = main([
        "optimize", str(llama_legacy), "-o", str(tmp_path / "out.onnx"), "--ratio", "0.25", "--allocation", "uniform", "--ratio-heads", "0.5",
        "--calib", str(calib_tokens), "--tokens", "2048", "--seq-len", "32", "--report", str(report), "-q",
    ])
    assert code == 0
    data = json.loads(report.read_text())
    assert data["options"]["head_ratio"] == 0.5
    assert [(r["heads"], r["new_heads"], r["new_kv_heads"]) for r in data["heads"]["layers"]] == [(4, 2, 1)] * 2
    assert [g.width for g in graphresize.analyze(tmp_path / "out.onnx").of_kind("mlp")] == [96, 96]
    assert np.isfinite(_outputs(tmp_path / "out.onnx", _ids())["logits"]).all()


def test_bad_head_ratio_is_a_usage_error(llama_dynamo, tmp_path, calib_tokens):
    code = main(["optimize", str(llama_dynamo), "-o", str(tmp_path / "o.onnx"), "--ratio", "0", "--ratio-heads", "1.0",
                 "--calib", str(calib_tokens), "-q"])
    assert code == 2


def _block(layer, heads, kv_heads, hd=8):
    from graphresize.analysis.attention.heads import AttentionBlock

    return AttentionBlock(layer=layer, scope="", num_heads=heads, num_kv_heads=kv_heads, head_dim=hd)


def test_refit_removes_a_redundant_head_that_pruning_keeps():
    """Head 2 repeats head 0's activations: with refitted output rows it costs nothing to
    remove, although its output energy is the largest."""
    rng = np.random.default_rng(2)
    acts = rng.normal(size=(600, 32))
    acts[:, 16:24] = acts[:, 0:8]
    rows = rng.normal(size=(32, 4))
    rows[16:24] *= 3.0
    rows[8:16] *= 0.5  # head 1: least energy
    gram = acts.T @ acts
    block = _block(0, 4, 4)
    assert select_heads(block, gram, rows, 0.25, method="prune").keep_q == (0, 2, 3)
    sel = select_heads(block, gram, rows, 0.25, method="refit")
    assert sel.keep_q == (0, 1, 3)
    np.testing.assert_allclose(acts[:, sel_features(sel.keep_q)] @ sel.output_rows, acts @ rows, atol=1e-6)


def sel_features(heads, hd=8):
    return [h * hd + i for h in heads for i in range(hd)]


def test_global_budget_goes_where_the_loss_is_least():
    from graphresize.solve.heads import global_removal

    rng = np.random.default_rng(3)
    items = []
    for layer, silent in ((0, (1, 2)), (1, ())):
        acts = rng.normal(size=(400, 32))
        rows = rng.normal(size=(32, 4))
        for kv in silent:
            rows[kv * 8 : (kv + 1) * 8] = 0.0
        items.append((_block(layer, 4, 4), acts.T @ acts, rows))
    removed = global_removal(items, 0.25)  # 2 of 8 units
    assert sorted(removed[0]) == [1, 2] and removed[1] == []
    gqa = [(_block(layer, 4, 2), g, r) for layer, (_, g, r) in enumerate(items)]
    removed = global_removal(gqa, 0.75)  # 3 of 4 KV groups, but each layer keeps one
    assert [len(removed[0]), len(removed[1])] == [1, 1]


def test_query_heads_removed_evenly_inside_every_kv_group(llama_dynamo, tmp_path, calib_tokens):
    """GQA, --head-method query: one dead query head in each KV group goes, every KV head
    stays, the repeat count drops from 2 to 1, and nothing changes."""
    src = zero_heads(llama_dynamo, tmp_path / "dead.onnx", (1, 3))
    result = _optimize(src, tmp_path / "out.onnx", calib_tokens, head_ratio=0.5, head_method="query")
    assert [(r["kept"], r["new_kv_heads"]) for r in result.heads.layers()] == [([0, 2], 2)] * 2
    before, after = _outputs(src, _ids()), _outputs(tmp_path / "out.onnx", _ids())
    np.testing.assert_allclose(after["logits"], before["logits"], rtol=1e-5, atol=1e-5)
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"), full_check=True)
    blocks = find_attention(load_prepared(tmp_path / "out.onnx"))
    assert [(b.num_heads, b.num_kv_heads) for b in blocks] == [(2, 2)] * 2


def test_query_mode_leaves_a_computed_repeat_count_alone(llama_legacy, tmp_path, calib_tokens):
    result = _optimize(llama_legacy, tmp_path / "out.onnx", calib_tokens, head_ratio=0.5, head_method="query")
    rows = result.heads.layers()
    assert all(r["new_heads"] == 4 and "repeat count computed at run time" in r["unchanged"] for r in rows)


def test_energy_pruning_also_removes_dead_heads_exactly(gpt2, tmp_path, calib_tokens):
    src = zero_heads(gpt2, tmp_path / "dead.onnx", (2,))
    result = _optimize(src, tmp_path / "out.onnx", calib_tokens, head_ratio=0.25, head_method="prune", unmerge="ot")
    assert [r["kept"] for r in result.heads.layers()] == [[0, 1, 3]] * 2
    assert all(s.output_rows is None for s in result.heads.selections.values())  # plain row slicing
    np.testing.assert_allclose(_outputs(tmp_path / "out.onnx", _ids())["logits"], _outputs(src, _ids())["logits"], atol=1e-5)


def _genai(folder, **decoder):
    folder.mkdir()
    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx", **decoder}}}))
    return folder


def test_genai_config_gets_the_new_head_counts(llama_dynamo, tmp_path, calib_tokens):
    src = _genai(tmp_path / "dense", head_size=16, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    (src / "model.onnx").write_bytes(llama_dynamo.read_bytes())
    (tmp_path / "small").mkdir()
    code = main(["optimize", str(src / "model.onnx"), "-o", str(tmp_path / "small" / "m.onnx"), "--ratio", "0",
                 "--ratio-heads", "0.5", "--calib", str(calib_tokens), "--tokens", "1024", "--seq-len", "32", "-q"])
    assert code == 0
    genai = json.loads((tmp_path / "small" / "genai_config.json").read_text())
    assert genai["model"]["decoder"] == {
        "filename": "m.onnx", "head_size": 16, "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1
    }


def test_genai_config_is_not_written_when_layers_differ(tmp_path):
    from graphresize.io.sidecars import copy_sidecars
    from graphresize.methods.heads import HeadsOutcome

    blocks = (_block(0, 4, 2), _block(1, 4, 2))
    sel = {0: HeadSelection(0, (0, 1), (0,), ())}
    heads = HeadsOutcome(0.5, "global", blocks, sel, None).new_counts()
    assert heads == "head counts differ per layer (2/1, 4/2)"
    assert HeadsOutcome(0.5, "refit", blocks, {**sel, 1: HeadSelection(1, (2, 3), (1,), ())}, None).new_counts() == (2, 1)
    assert HeadsOutcome(0.5, "refit", blocks, {}, None).new_counts() is None
    src = _genai(tmp_path / "dense", num_attention_heads=4, num_key_value_heads=2)
    (tmp_path / "small").mkdir()
    done = copy_sidecars(src / "model.onnx", tmp_path / "small" / "m.onnx", set(), heads=heads)
    assert not (tmp_path / "small" / "genai_config.json").exists()
    assert done["skipped"] == ["genai_config.json (attention heads removed, but head counts differ per layer (2/1, 4/2): "
                               "it takes one count for all layers)"]


def test_ot_merge_is_exact_when_the_merged_head_attends_alike():
    """Heads 0 and 1 each write through 2 of their 4 value directions: one merged head (with
    the pattern of the kept one, values combined from both) carries both outputs exactly on
    the calibration features, where refitting the kept head's rows cannot."""
    from graphresize.solve.head_merge import ot_merge_heads

    rng = np.random.default_rng(4)
    hd = 4
    acts = rng.normal(size=(500, 3 * hd))
    rows = rng.normal(size=(3 * hd, 6))
    rows[2:hd] = 0.0  # head 0 writes through 2 directions, head 1 through 2 others
    rows[hd + 2 : 2 * hd] = 0.0
    rows[2 * hd :] *= 10.0  # head 2: never the one removed
    gram = acts.T @ acts
    block = _block(0, 3, 3, hd=hd)
    sel = ot_merge_heads(block, gram, rows, 0.34)
    assert sel.keep_q in ((0, 2), (1, 2)) and sel.method == "ot"
    merged = acts[:, : 2 * hd] @ sel.value_map[: 2 * hd, :hd]  # the merged head's features
    np.testing.assert_allclose(merged @ sel.output_rows[:hd], acts[:, : 2 * hd] @ rows[: 2 * hd], atol=1e-6)
    np.testing.assert_allclose(sel.value_map[2 * hd :, hd:], np.eye(hd))  # head 2 unchanged
    refit = select_heads(block, gram, rows, 0.34, method="refit")
    lost = acts @ rows - acts[:, sel_features(refit.keep_q, hd)] @ refit.output_rows
    assert np.linalg.norm(lost) > 1e-2 * np.linalg.norm(acts @ rows)


@pytest.mark.parametrize(("fixture", "dead", "ratio", "kept"), [("llama_dynamo", (2, 3), 0.5, (0, 1)), ("gpt2", (2,), 0.25, (0, 1, 3))])
def test_ot_merge_of_dead_heads_changes_nothing(fixture, dead, ratio, kept, request, tmp_path, calib_tokens):
    src = zero_heads(request.getfixturevalue(fixture), tmp_path / "dead.onnx", dead)
    result = _optimize(src, tmp_path / "out.onnx", calib_tokens, head_ratio=ratio, head_method="ot")
    assert [r["kept"] for r in result.heads.layers()] == [list(kept)] * 2
    assert all(s.value_map is not None for s in result.heads.selections.values())
    before, after = _outputs(src, _ids()), _outputs(tmp_path / "out.onnx", _ids())
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-4, atol=1e-4)


def test_heads_share_the_pipelines_calibration_pass(llama_dynamo, tmp_path, calib_tokens, monkeypatch):
    """The heads stage reads its Grams from the one calibration pass: no session of its own."""
    import graphresize.methods.heads as head_stage

    def no_session(*args, **kwargs):
        raise AssertionError("the heads stage opened its own session")

    monkeypatch.setattr(head_stage, "make_session", no_session)
    result = _optimize(llama_dynamo, tmp_path / "out.onnx", calib_tokens, head_ratio=0.5, ratio=0.25)
    assert {(r["new_heads"], r["new_kv_heads"]) for r in result.heads.layers()} == {(2, 1)}
