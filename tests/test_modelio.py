"""Loading and atomic saving."""

import re

import numpy as np
import onnx_ir as ir
import pytest

from graphresize.errors import InputError
from graphresize.io import modelio
from graphresize.io.ort_utils import make_feeds, make_session


def test_large_models_are_saved_with_external_data(llama_dynamo, tmp_path, monkeypatch):
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 0)
    model = modelio.load_model(llama_dynamo)
    written = modelio.save_model_atomic(model, tmp_path / "big.onnx")
    assert [p.name for p in written][1:] == ["big.onnx"]
    assert re.fullmatch(r"big\.onnx\.[0-9a-f]{12}\.data", written[0].name)  # a name unique to this write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", written[0].name]  # no temp left
    reloaded = ir.load(tmp_path / "big.onnx")
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in reloaded.graph.initializers.values())
    ids = np.arange(16).reshape(2, 8)
    ref, new = make_session(ir.load(llama_dynamo)), make_session(reloaded)
    np.testing.assert_array_equal(new.run(None, make_feeds(new, ids))[0], ref.run(None, make_feeds(ref, ids))[0])


def test_missing_external_data_is_a_clean_error(llama_dynamo, tmp_path, monkeypatch):
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 0)
    data = modelio.save_model_atomic(modelio.load_model(llama_dynamo), tmp_path / "m.onnx")[0]
    data.unlink()
    with pytest.raises(InputError, match=f"external data file '{data.name}' is missing"):
        modelio.load_model(tmp_path / "m.onnx")


def test_failed_save_leaves_nothing(llama_dynamo, tmp_path, monkeypatch):
    model = modelio.load_model(llama_dynamo)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", boom)
    with pytest.raises(InputError, match="No space left on device"):
        modelio.save_model_atomic(model, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []
