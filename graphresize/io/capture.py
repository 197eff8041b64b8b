"""Export Hugging Face transformer models to ONNX in the layouts graphresize reads.

``export_onnx`` turns a causal LM or an encoder (an ``nn.Module`` already built, or a
Hugging Face model directory) into an ONNX graph in one of three styles:

``"dynamo"``
    ``torch.onnx.export(..., dynamo=True)``. With ``optimize=True`` the onnxscript
    optimizer folds weight transposes, so MLP weights become anonymous ``[in, out]``
    initializers such as ``val_76``.
``"legacy"``
    The TorchScript exporter (``dynamo=False``) with constant folding: weights become
    ``onnx::MatMul_*`` initializers.
``"optimum"``
    The Optimum I/O layout: inputs ``input_ids, attention_mask, position_ids,
    past_key_values.{i}.key, past_key_values.{i}.value``, outputs ``logits,
    present.{i}.key, present.{i}.value``, exported through the TorchScript exporter
    like Optimum itself.

Causal LMs map ``input_ids, attention_mask`` to ``logits`` (no cache) unless
``with_past`` is set, which adds ``position_ids`` and the key/value cache in the Optimum
layout. Encoders map ``input_ids, attention_mask, token_type_ids`` to
``last_hidden_state``. Batch and sequence axes are dynamic (``batch_size``,
``sequence_length``, ``past_sequence_length``).

torch and transformers are an optional extra (``graphresize[export]``): they are imported
only inside the functions here.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import shutil
import types
import warnings
from pathlib import Path
from typing import Any

from graphresize.errors import InputError, UnsupportedModelError, UsageError

STYLES = ("dynamo", "legacy", "optimum")

#: Opset used when ``opset`` is None, for every style (the dynamo exporter's own default).
DEFAULT_OPSET = 18

#: Files copied beside the graph when exporting from a model directory.
SIDECAR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)

# Above this many bytes of parameters the dynamo exporter writes weights as external data.
_EXTERNAL_DATA_BYTES = 1_800_000_000

_NOISY_LOGGERS = (
    "torch.onnx",
    "torch.__trace",
    "torch.export",
    "torch._dynamo",
    "torch._export",
    "torch.fx.experimental.symbolic_shapes",
    "onnxscript",
    "onnx_ir",
)

BATCH = "batch_size"
SEQ = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "past_sequence_length + sequence_length"


def _require_torch():
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UsageError(
            "exporting needs torch and transformers: pip install 'graphresize[export]'"
        ) from exc
    return torch


@contextlib.contextmanager
def _quiet():
    """Silence exporter warnings, progress prints and chatty loggers (errors still raise)."""
    saved = {}
    for name in _NOISY_LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = lg.level
        lg.setLevel(logging.ERROR)
    hf_verbosity = None
    try:
        from transformers.utils import logging as hf_logging

        hf_verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        hf_logging = None
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        if hf_logging is not None and hf_verbosity is not None:
            hf_logging.set_verbosity(hf_verbosity)


# --------------------------------------------------------------------------- loading


def _is_causal_architecture(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_model(model_dir: str | os.PathLike):
    """Load a Hugging Face model directory in fp32 eval mode (causal LM head when it has one)."""
    torch = _require_torch()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir}: not a model directory (no config.json)")
    with _quiet():
        config = AutoConfig.from_pretrained(model_dir)
        auto = AutoModelForCausalLM if _is_causal_architecture(config) else AutoModel
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        try:
            model = auto.from_pretrained(model_dir, attn_implementation="eager", **kwargs)
        except (ValueError, TypeError):
            model = auto.from_pretrained(model_dir, **kwargs)
    return model.float().eval()


def _copy_sidecars(model_dir: Path, out_dir: Path) -> list[Path]:
    copied = []
    for name in SIDECAR_FILES:
        src = model_dir / name
        if src.is_file():
            dst = out_dir / name
            if src.resolve() != dst.resolve():
                shutil.copyfile(src, dst)
            copied.append(dst)
    return copied


# --------------------------------------------------------------------------- wrappers


def _accepts(module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _is_causal_lm(model) -> bool:
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate):
        with contextlib.suppress(Exception):
            if can_generate():
                return True
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _with_forward(model, forward):
    """A shallow copy of ``model`` whose ``forward`` is ``forward`` bound to it.

    The copy shares every submodule and parameter with ``model``, so exported weights keep
    their Hugging Face names (``model.layers.0.mlp.up_proj.weight``), with no wrapper prefix.
    """
    clone = copy.copy(model)
    clone.forward = types.MethodType(forward, clone)
    return clone.eval()


def _hf_forward(module, **kwargs):
    """Call the model class's own forward (the instance's is the export wrapper)."""
    return type(module).forward(module, **kwargs)


def _causal_forward(with_position_ids: bool):
    if with_position_ids:

        def forward(self, input_ids, attention_mask, position_ids):
            out = _hf_forward(
                self,
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
            return out.logits

    else:

        def forward(self, input_ids, attention_mask):
            return _hf_forward(
                self, input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits

    return forward


def _run_with_past(self, input_ids, attention_mask, position_ids, past, with_position_ids):
    from transformers import DynamicCache

    cache = DynamicCache(config=self.config)
    if len(cache.layers) != len(past) // 2:
        cache = DynamicCache(ddp_cache_data=[(None, None)] * (len(past) // 2))
    for layer, key, value in zip(cache.layers, past[0::2], past[1::2], strict=True):
        # Set the states directly: ``layer.update`` would concatenate them onto an empty
        # tensor, which the TorchScript exporter records as a stray Concat node.
        layer.lazy_initialization(key, value)
        layer.keys, layer.values = key, value
    kwargs = {"position_ids": position_ids} if with_position_ids else {}
    out = _hf_forward(
        self,
        input_ids=input_ids,
        attention_mask=attention_mask,
        past_key_values=cache,
        use_cache=True,
        **kwargs,
    )
    present = []
    for layer in out.past_key_values.layers:
        present += [layer.keys, layer.values]
    return (out.logits, *present)


def _past_forward(with_position_ids: bool, flat: bool):
    """Forward taking the cache as one tuple (dynamo) or as trailing tensors (TorchScript)."""
    if flat:

        def forward(self, input_ids, attention_mask, position_ids, *past):
            return _run_with_past(
                self, input_ids, attention_mask, position_ids, past, with_position_ids
            )

    else:

        def forward(self, input_ids, attention_mask, position_ids, past):
            return _run_with_past(
                self, input_ids, attention_mask, position_ids, past, with_position_ids
            )

    return forward


def _encoder_forward(with_token_type_ids: bool, output: str):
    if with_token_type_ids:

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = _hf_forward(
                self,
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            )
            return out[output]

    else:

        def forward(self, input_ids, attention_mask):
            return _hf_forward(self, input_ids=input_ids, attention_mask=attention_mask)[output]

    return forward


class _Plan:
    """What to export: wrapper module, sample inputs, names and dynamic axes."""

    def __init__(self, module, args, input_names, output_names, axes):
        self.module = module
        self.args = args  # tuple; for with_past the last element is a tuple of cache tensors
        self.input_names = input_names
        self.output_names = output_names
        self.axes = axes  # flat input/output name -> {axis: name}


def _cache_shapes(model, input_ids, attention_mask) -> list[tuple[int, ...]]:
    """Run the model once with a cache to learn the per-layer key/value shapes."""
    import torch

    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    cache = getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no key/value cache to export with_past"
        )
    shapes = []
    for layer in layers:
        shapes += [tuple(layer.keys.shape), tuple(layer.values.shape)]
    return shapes


def _plan(model, style: str, with_past: bool, seq_len: int) -> _Plan:
    import torch

    config = model.config
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    gen = torch.Generator().manual_seed(0)
    batch = 2
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    mask = torch.ones(batch, seq_len, dtype=torch.long)

    if not _is_causal_lm(model):
        if with_past:
            raise UsageError(f"{type(model).__name__} is not a causal LM: with_past does not apply")
        with_tt = (
            _accepts(model, "token_type_ids") and (getattr(config, "type_vocab_size", 0) or 0) > 0
        )
        with torch.no_grad():
            probe = model(input_ids=input_ids, attention_mask=mask)
        output = "last_hidden_state" if "last_hidden_state" in probe else "logits"
        if output not in probe:
            raise UnsupportedModelError(
                f"{type(model).__name__}: output has neither last_hidden_state nor logits"
            )
        module = _with_forward(model, _encoder_forward(with_tt, output))
        args: tuple = (input_ids, mask)
        names = ["input_ids", "attention_mask"]
        if with_tt:
            args += (torch.zeros(batch, seq_len, dtype=torch.long),)
            names.append("token_type_ids")
        axes = {n: {0: BATCH, 1: SEQ} for n in names}
        axes[output] = {0: BATCH, 1: SEQ}
        return _Plan(module, args, names, [output], axes)

    with_pos = _accepts(model, "position_ids")
    if not with_past:
        pos_input = style == "optimum" and with_pos
        module = _with_forward(model, _causal_forward(pos_input))
        args = (input_ids, mask)
        names = ["input_ids", "attention_mask"]
        if pos_input:
            args += (torch.arange(seq_len).expand(batch, seq_len).contiguous(),)
            names.append("position_ids")
        axes = {n: {0: BATCH, 1: SEQ} for n in names}
        axes["logits"] = {0: BATCH, 1: SEQ}
        return _Plan(module, args, names, ["logits"], axes)

    # With past: trace with a non-empty cache whose length differs from batch and sequence,
    # so shape-dependent branches (empty cache) take the general path and dims stay distinct.
    shapes = _cache_shapes(model, input_ids, mask)
    past_len = seq_len + 3
    num_layers = len(shapes) // 2
    past = tuple(torch.randn(s[0], s[1], past_len, *s[3:], generator=gen) for s in shapes)
    module = _with_forward(model, _past_forward(with_pos, flat=style != "dynamo"))
    full_mask = torch.ones(batch, past_len + seq_len, dtype=torch.long)
    position_ids = torch.arange(past_len, past_len + seq_len).expand(batch, seq_len).contiguous()
    past_names = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    names = ["input_ids", "attention_mask", "position_ids", *past_names]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: BATCH, 1: SEQ},
        "attention_mask": {0: BATCH, 1: TOTAL},
        "position_ids": {0: BATCH, 1: SEQ},
        "logits": {0: BATCH, 1: SEQ},
    }
    for n in past_names:
        axes[n] = {0: BATCH, 2: PAST}
    for n in present_names:
        axes[n] = {0: BATCH, 2: TOTAL}
    return _Plan(
        module,
        (input_ids, full_mask, position_ids, past),
        names,
        ["logits", *present_names],
        axes,
    )


# --------------------------------------------------------------------------- exporters


def _export_legacy(plan: _Plan, out_path: Path, opset: int) -> None:
    import torch

    args = plan.args
    if isinstance(args[-1], tuple):  # the with-past forward takes the cache as *past
        args = (*args[:-1], *args[-1])
    torch.onnx.export(
        plan.module,
        args,
        str(out_path),
        dynamo=False,
        input_names=plan.input_names,
        output_names=plan.output_names,
        dynamic_axes=plan.axes,
        opset_version=opset,
        do_constant_folding=True,
    )


def _export_dynamo(plan: _Plan, out_path: Path, opset: int, optimize: bool) -> None:
    import torch

    dims: dict[str, Any] = {}

    def dim(name: str):
        if name not in dims:
            dims[name] = torch.export.Dim(name.replace(" ", "").replace("+", "_plus_"))
        return dims[name]

    params = list(inspect.signature(plan.module.forward).parameters)
    dynamic_shapes: dict[str, Any] = {}
    for param, name in zip(params, plan.input_names, strict=False):
        if param == "past":
            break
        dynamic_shapes[param] = {ax: dim(n) for ax, n in plan.axes[name].items()}
    if isinstance(plan.args[-1], tuple):
        past_names = plan.input_names[len(plan.args) - 1 :]
        dynamic_shapes["past"] = tuple(
            {ax: dim(n) for ax, n in plan.axes[name].items()} for name in past_names
        )
    nbytes = sum(p.numel() * p.element_size() for p in plan.module.parameters())
    program = torch.onnx.export(
        plan.module,
        plan.args,
        dynamo=True,
        input_names=plan.input_names,
        output_names=plan.output_names,
        dynamic_shapes=dynamic_shapes,
        opset_version=opset,
        optimize=optimize,
        verbose=False,
        report=False,
        verify=False,
    )
    _name_input_axes(program.model, plan.axes)
    program.save(str(out_path), external_data=nbytes > _EXTERNAL_DATA_BYTES)


def _name_input_axes(model, axes: dict[str, dict[int, str]]) -> None:
    """Give graph-input dynamic axes the same names the TorchScript path uses."""
    import onnx_ir as ir

    for value in model.graph.inputs:
        wanted = axes.get(value.name)
        if not wanted or value.shape is None:
            continue
        dims = list(value.shape.dims)
        for ax, name in wanted.items():
            if ax < len(dims) and not isinstance(dims[ax], int):
                dims[ax] = ir.SymbolicDim(name)
        value.shape = ir.Shape(dims)


# --------------------------------------------------------------------------- entry point


def export_onnx(
    model_or_dir,
    out_path: str | os.PathLike,
    *,
    style: str = "dynamo",
    with_past: bool = False,
    opset: int | None = None,
    optimize: bool = True,
    seq_len: int = 8,
) -> Path:
    """Export a causal LM or encoder to ONNX and return the path of the written graph.

    ``model_or_dir`` is an ``nn.Module`` (a ``PreTrainedModel``; it is put in eval mode and
    cast to fp32 in place) or a Hugging Face model directory, loaded with
    ``AutoModelForCausalLM`` when its architecture is a causal LM and ``AutoModel``
    otherwise. From a directory, the config and tokenizer files are copied beside the graph.
    ``optimize`` applies to the dynamo style only; ``seq_len`` is the traced sample length.
    """
    if style not in STYLES:
        raise UsageError(f"unknown export style {style!r}; choose one of {', '.join(STYLES)}")
    if seq_len < 2:
        raise UsageError("seq_len must be at least 2")
    torch = _require_torch()
    opset = DEFAULT_OPSET if opset is None else int(opset)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    model_dir = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        model_dir = Path(model_or_dir)
        model = load_model(model_dir)
    elif isinstance(model_or_dir, torch.nn.Module):
        model = model_or_dir
    else:
        raise UsageError(f"expected an nn.Module or a model directory, got {type(model_or_dir)!r}")
    if getattr(model, "config", None) is None:
        raise UsageError(f"{type(model).__name__} is not a Hugging Face model (no .config)")
    model = model.float().eval()

    for stale in (out_path, out_path.with_name(out_path.name + ".data")):
        if stale.exists():
            stale.unlink()
    with torch.no_grad(), _quiet():
        plan = _plan(model, style, with_past, seq_len)
        if style == "dynamo":
            _export_dynamo(plan, out_path, opset, optimize)
        else:
            _export_legacy(plan, out_path, opset)
    if model_dir is not None:
        _copy_sidecars(model_dir, out_path.parent)
    return out_path
