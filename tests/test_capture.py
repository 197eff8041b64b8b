"""graphresize.io.capture: exported graphs run in ONNX Runtime and match torch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from models import (
    build_tiny,
    duplicate_llama_mlp,
    export_tiny,
    make_feeds,
    run_ort,
    torch_outputs,
)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from graphresize.errors import UsageError  # noqa: E402
from graphresize.io.capture import export_onnx  # noqa: E402

FIXTURES = ["llama_dynamo", "llama_legacy", "llama_optimum", "gpt2", "gpt2_legacy", "opt", "bert"]
RTOL, ATOL = 1e-4, 1e-5


def _assert_matches(path, feeds):
    got = run_ort(path, feeds)
    want = torch_outputs(path, feeds)
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=name)
    return got


def _initializers(path):
    return onnx.load(str(path), load_external_data=False).graph.initializer


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize(("batch", "seq"), [(2, 8), (3, 5), (1, 1)])
def test_graph_matches_torch(fixture, batch, seq, request):
    path = request.getfixturevalue(fixture)
    feeds = make_feeds(path, batch=batch, seq=seq, seed=batch * 10 + seq)
    got = _assert_matches(path, feeds)
    first = next(iter(got.values()))
    assert first.shape[:2] == (batch, seq)
    assert np.isfinite(first).all()
    assert np.abs(first).max() > 1e-3  # random weights give non-trivial outputs


@pytest.mark.parametrize("fixture", FIXTURES)
def test_graph_is_fp32_and_self_contained(fixture, request):
    path = request.getfixturevalue(fixture)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert not path.with_name(path.name + ".data").exists()
    types = {t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.FLOAT in types
    assert not types & {
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
    }
    out = model.graph.output[0].type.tensor_type
    assert out.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param for d in out.shape.dim[:2]] == ["batch_size", "sequence_length"]


def test_optimum_layout_names(llama_optimum):
    model = onnx.load(str(llama_optimum), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    outputs = [o.name for o in model.graph.output]
    past = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert inputs == ["input_ids", "attention_mask", "position_ids", *past]
    assert outputs == ["logits"] + [
        f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")
    ]

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    by_name = {vi.name: vi for vi in [*model.graph.input, *model.graph.output]}
    assert dims(by_name["input_ids"]) == ["batch_size", "sequence_length"]
    assert dims(by_name["position_ids"]) == ["batch_size", "sequence_length"]
    assert dims(by_name["attention_mask"])[0] == "batch_size"
    # 2 KV heads (GQA) of size 64 / 4 = 16
    assert dims(by_name["past_key_values.0.key"]) == ["batch_size", 2, "past_sequence_length", 16]
    assert dims(by_name["logits"]) == ["batch_size", "sequence_length", 256]


@pytest.mark.parametrize(("batch", "seq", "past"), [(2, 1, 5), (1, 4, 3), (3, 6, 0)])
def test_optimum_with_nonempty_past(llama_optimum, batch, seq, past):
    feeds = make_feeds(llama_optimum, batch=batch, seq=seq, past=past, seed=past)
    got = _assert_matches(llama_optimum, feeds)
    assert got["present.1.value"].shape == (batch, 2, past + seq, 16)


def test_styles_name_weights_differently(llama_dynamo, llama_legacy):
    legacy = {t.name for t in _initializers(llama_legacy)}
    dynamo = {t.name for t in _initializers(llama_dynamo)}
    assert any(n.startswith("onnx::MatMul_") for n in legacy)
    assert not any(n.startswith("onnx::") for n in dynamo)
    assert "model.layers.0.input_layernorm.weight" in dynamo | legacy


def test_same_weights_in_every_style(llama_dynamo, llama_legacy, llama_optimum):
    feeds = make_feeds(llama_dynamo, batch=2, seq=6, seed=3)
    ref = run_ort(llama_dynamo, feeds)["logits"]
    np.testing.assert_allclose(run_ort(llama_legacy, feeds)["logits"], ref, rtol=RTOL, atol=ATOL)
    opt_feeds = make_feeds(llama_optimum, batch=2, seq=6, seed=3)
    np.testing.assert_array_equal(opt_feeds["input_ids"], feeds["input_ids"])
    got = run_ort(llama_optimum, opt_feeds)["logits"]
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_export_tiny_mutate_and_overrides(tmp_path):
    path = export_tiny(
        "llama", "legacy", out_dir=tmp_path, mutate=duplicate_llama_mlp, intermediate_size=96
    )
    assert path.parent == tmp_path and path.name == "llama_legacy.onnx"
    shapes = sorted(tuple(t.dims) for t in _initializers(path) if len(t.dims) == 2)
    assert shapes.count((64, 96)) == 4 and shapes.count((96, 64)) == 2  # gate+up, down x 2
    _assert_matches(path, make_feeds(path, seed=1))
    again = export_tiny("llama", "legacy", out_dir=tmp_path, intermediate_size=96)
    assert again.name == "llama_legacy_2.onnx"


def test_export_from_directory_copies_sidecars(tmp_path):
    model = build_tiny("llama")
    src = tmp_path / "hf"
    model.save_pretrained(src)
    tokenizer = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0, "<unk>": 1}}}
    (src / "tokenizer.json").write_text(json.dumps(tokenizer))
    (src / "tokenizer_config.json").write_text(json.dumps({"unk_token": "<unk>"}))
    out = export_onnx(src, tmp_path / "onnx" / "model.onnx", style="legacy")
    assert out == tmp_path / "onnx" / "model.onnx"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out.parent / name).read_bytes() == (src / name).read_bytes()
    # the directory's model is the seeded tiny model: same logits as exporting it directly
    direct = export_onnx(model, tmp_path / "direct.onnx", style="legacy")
    assert "forward" not in vars(model)  # the export wrapper is a copy; the model is untouched
    feeds = make_feeds(out, seed=2)
    np.testing.assert_allclose(
        run_ort(out, feeds)["logits"], run_ort(direct, feeds)["logits"], rtol=RTOL, atol=ATOL
    )


def test_dynamo_with_past(tmp_path):
    path = export_tiny("gpt2", "dynamo", with_past=True, out_dir=tmp_path)
    for past in (0, 3):
        feeds = make_feeds(path, batch=2, seq=4, past=past)
        got = _assert_matches(path, feeds)
        assert got["present.0.key"].shape == (2, 4, past + 4, 16)


def test_bad_arguments(tmp_path):
    with pytest.raises(UsageError):
        export_onnx(build_tiny("bert"), tmp_path / "x.onnx", style="tflite")
    with pytest.raises(UsageError):
        export_onnx(build_tiny("bert"), tmp_path / "x.onnx", style="legacy", with_past=True)
    with pytest.raises(UsageError):
        export_onnx(object(), tmp_path / "x.onnx")
    with pytest.raises(UsageError):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")


@pytest.mark.parametrize("fixture", FIXTURES)
def test_left_padded_attention_mask(fixture, request):
    path = request.getfixturevalue(fixture)
    feeds = make_feeds(path, batch=2, seq=6, seed=4)
    feeds["attention_mask"][0, :2] = 0
    if "position_ids" in feeds:
        feeds["position_ids"] = np.array([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]], dtype=np.int64)
    _assert_matches(path, feeds)
