"""An Olive pass that narrows an ONNX model with graphresize.

Olive looks passes up in its package config; :func:`package_config` is Olive's own with this
pass added, so a workflow names it like a built-in one::

    from olive.workflows import run
    from graphresize.olive import package_config

    run({"input_model": {"type": "ONNXModel", "model_path": "model.onnx"},
         "passes": {"resize": {"type": "GraphResize", "ratio": 0.3, "calib": "wiki.txt"}},
         "output_dir": "out"}, package_config=package_config())

Rule: the pass options are the fields of :class:`graphresize.pipeline.OptimizeOptions` (read
from the dataclass, so options added later appear here too); paths are strings. The report
is written beside the output as ``model.report.json``. A graphresize error fails the pass
with its one-line message. olive-ai is not a dependency of graphresize: install it to use
this module.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from olive.hardware import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.package_config import OlivePackageConfig
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam

from graphresize import pipeline
from graphresize.cli import config as _config
from graphresize.cli import report

#: Options the pass sets itself (Olive owns the output path and the log).
_FIXED = {"overwrite": True, "progress": False}


def _olive_type(hint: Any) -> Any:
    """The pydantic type Olive validates an OptimizeOptions field with (paths as strings)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return Optional[_olive_type(inner[0])] if len(inner) == 1 else Any  # noqa: UP045 (pydantic types)
    if origin in (Mapping, dict, typing.Mapping):
        return dict
    if hint in (bool, int, float, str):
        return hint
    if isinstance(hint, type) and issubclass(hint, Path):
        return str
    return Any


def _params() -> dict[str, PassConfigParam]:
    params = {}
    for field in dataclasses.fields(pipeline.OptimizeOptions):
        if field.name in _FIXED:
            continue
        hint = _config.option_types()[field.name]
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = None if required else (field.default if field.default is not dataclasses.MISSING else field.default_factory())
        if isinstance(default, Path):
            default = str(default)
        params[field.name] = PassConfigParam(
            type_=_olive_type(hint), required=required, default_value=default,
            description=f"graphresize optimize option {field.name!r}",
        )
    return params


class GraphResize(Pass):
    """Narrow the widths of a transformer ONNX graph (graphresize optimize)."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return _params()

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig], output_model_path: str) -> ONNXModelHandler:
        output = Path(resolve_onnx_path(output_model_path, Path(model.model_path).name))
        output.parent.mkdir(parents=True, exist_ok=True)
        fields = _config.option_types()
        options = {}
        for name in _params():
            value = getattr(config, name, None)
            if value is not None:
                options[name] = _config.coerce_field(name, value, fields[name], Path("."))
        options.update(_FIXED)
        ratio = options.pop("ratio")
        result = pipeline.optimize(model.model_path, output, ratio=ratio, **options)
        data = report.optimize_report(result, config={"file": None, "settings": _config.jsonable({"ratio": ratio, **options}), "sources": {}})
        report.write_json(data, output.with_name(output.stem + ".report.json"))
        return ONNXModelHandler(model_path=str(output.parent), onnx_file_name=output.name)


def package_config() -> dict:
    """Olive's default package config with the GraphResize pass added (for ``olive.workflows.run``)."""
    data = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    data["passes"]["GraphResize"] = {
        "module_path": "graphresize.olive.GraphResize",
        "supported_providers": ["*"],
        "supported_accelerators": ["*"],
        "supported_precisions": ["*"],
        "supported_algorithms": [],
        "supported_quantization_encodings": [],
    }
    return data
