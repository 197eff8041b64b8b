"""Half-precision models: the solve runs in float64, weights are written back in the model's
dtype, and the result stays close to the fp32 model resized the same way.

fp16 runs end to end in ONNX Runtime's CPU provider. bf16 does not (the CPU provider has no
bfloat16 kernels for Sin, MatMul ...): ``optimize`` refuses it cleanly with exit code 3; its
analysis and rewrite are checked by applying the fp32 run's transforms to the bf16 graph and
running the result converted back to fp32.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphresize.passes import ResizeGroupsPass, cleanup_passes
from onnx import TensorProto, numpy_helper

import graphresize
from graphresize.analysis.groups import find_groups
from graphresize.cli.main import main
from graphresize.pipeline import OptimizeOptions, load_prepared

NP_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: ml_dtypes.bfloat16}


# The MLP width only (the residual stream keeps its width) on pipelines with a ``target`` option.
MLP_ONLY = dict(tokens=1024, seq_len=32, progress=False)
if "target" in OptimizeOptions.__dataclass_fields__:
    MLP_ONLY["target"] = "mlp"


def retype(model: onnx.ModelProto, src: int, dst: int) -> onnx.ModelProto:
    """A copy of ``model`` with every ``src`` float type (initializers, constants, value types,
    Cast targets) turned into ``dst``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())

    def tensor(t: onnx.TensorProto) -> None:
        if t.data_type == src:
            array = numpy_helper.to_array(t).astype(np.float32).astype(NP_TYPES[dst])
            t.CopyFrom(numpy_helper.from_array(array, t.name))

    def graph(g: onnx.GraphProto) -> None:
        for t in g.initializer:
            tensor(t)
        for vi in (*g.value_info, *g.input, *g.output):
            if vi.type.tensor_type.elem_type == src:
                vi.type.tensor_type.elem_type = dst
        for node in g.node:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == src:
                    attr.i = dst
                elif attr.type == onnx.AttributeProto.TENSOR:
                    tensor(attr.t)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    graph(attr.g)

    graph(model.graph)
    return model


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("precision") / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, 200, size=6000))
    return path


@pytest.fixture(scope="module")
def resized32(llama_dynamo, calib, tmp_path_factory):
    """The fp32 model resized by 0.3: (result, output path)."""
    out = tmp_path_factory.mktemp("precision32") / "small32.onnx"
    return graphresize.optimize(llama_dynamo, out, ratio=0.3, calib=calib, **MLP_ONLY), out


def _logits(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(1).integers(0, 200, (2, 16))
    feeds = {i.name: ids if i.name == "input_ids" else np.ones_like(ids) for i in session.get_inputs()}
    return session.run(["logits"], feeds)[0].astype(np.float32)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _initializer_types(path: Path) -> dict[str, int]:
    return {t.name: t.data_type for t in onnx.load(path).graph.initializer}


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_fp16_model_is_resized_in_fp16(keep_io_types, llama_dynamo, resized32, calib, tmp_path):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src = tmp_path / "m16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(llama_dynamo), keep_io_types=keep_io_types), src)
    out = tmp_path / "small16.onnx"
    result = graphresize.optimize(src, out, ratio=0.3, calib=calib, **MLP_ONLY)
    result32, out32 = resized32
    assert [e.new_width for e in result.plan.changed()] == [e.new_width for e in result32.plan.changed()] == [88, 88]
    assert all(t.merge.dtype == t.unmerge.dtype == np.float64 for t in result.transforms.values())
    # Every resized weight is written back in fp16 (no fp32 weight appears).
    types = _initializer_types(out)
    resized = {p.name for g in result.groups.of_kind("mlp") for p in g.params}
    assert resized and {types[name] for name in resized} == {TensorProto.FLOAT16}
    assert TensorProto.FLOAT not in types.values()
    assert _relative(_logits(out), _logits(out32)) < 0.01
    assert abs(result.verification.relative_error - result32.verification.relative_error) < 0.01


def test_bf16_model_analysis_and_rewrite(llama_dynamo, resized32, calib, tmp_path, capsys):
    fp32 = onnx.load(llama_dynamo)
    src = tmp_path / "mbf16.onnx"
    onnx.save(retype(fp32, TensorProto.FLOAT, TensorProto.BFLOAT16), src)
    result32, out32 = resized32

    # optimize: a clean refusal, since ONNX Runtime cannot calibrate a bf16 graph on CPU.
    code = main(["optimize", str(src), "--ratio", "0.3", "-o", str(tmp_path / "x.onnx"), "--calib", str(calib), "-q"])
    err = capsys.readouterr().err
    assert code == 3 and "bfloat16" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()

    # analysis: the same MLP groups as fp32.
    model = load_prepared(src)
    groups = find_groups(model)
    assert [(g.id, g.width, g.resizable) for g in groups.of_kind("mlp")] == [
        (g.id, g.width, g.resizable) for g in result32.groups.of_kind("mlp")
    ]
    # rewrite with the fp32 run's transforms: weights stay bf16, values match fp32's to bf16 precision.
    ResizeGroupsPass(groups, result32.transforms)(model)
    cleanup_passes()(model)
    import onnx_ir as ir

    out = tmp_path / "small_bf16.onnx"
    ir.save(model, out)
    types = _initializer_types(out)
    assert TensorProto.FLOAT not in types.values()
    weights32 = {t.name: numpy_helper.to_array(t) for t in onnx.load(out32).graph.initializer}
    for g in groups.of_kind("mlp"):
        for p in g.params:
            assert types[p.name] == TensorProto.BFLOAT16
            got = model.graph.initializers[p.name].const_value.numpy().astype(np.float32)
            want = weights32[p.name]
            assert got.shape == want.shape and _relative(got, want) < 0.02
    # run it converted back to fp32: close to the fp32-resized model.
    back = tmp_path / "small_bf16_as_fp32.onnx"
    onnx.save(retype(onnx.load(out), TensorProto.BFLOAT16, TensorProto.FLOAT), back)
    assert _relative(_logits(back), _logits(out32)) < 0.05
