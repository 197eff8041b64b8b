"""Tiny random-weight transformer models exported to ONNX, and helpers to run them.

Models are built from transformers config objects (never downloaded) with a fixed torch
seed, so the weights are the same on every run. ``export_tiny`` builds one, optionally
mutates it, exports it with :func:`graphresize.io.capture.export_onnx` and remembers the torch
model so that :func:`torch_outputs` can give reference outputs for any feeds.

    path = export_tiny("llama", "dynamo", out_dir=tmp, intermediate_size=96)
    feeds = make_feeds(path)
    got = run_ort(path, feeds)
    want = torch_outputs(path, feeds)
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

# The Llama-shaped families' sizes: hidden 64, MLP 128, 2 layers, 4 heads over 2 KV heads.
LLAMA_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
)

# family -> (config class name, model class name, default config kwargs)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(LLAMA_SIZES),
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(LLAMA_SIZES),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(
            LLAMA_SIZES,
            sliding_window=8,  # shorter than the test windows: the band mask is exercised
        ),
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            LLAMA_SIZES,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "phi": (
        "PhiConfig",
        "PhiForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=256,
            max_position_embeddings=128,
            partial_rotary_factor=0.5,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            n_embd=64,
            n_inner=256,
            n_layer=2,
            n_head=4,
            vocab_size=256,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=64,
            ffn_dim=256,
            word_embed_proj_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=256,
            max_position_embeddings=128,
        ),
    ),
    "gpt_neox": (  # packed query_key_value, per-head [q | k | v] layout, partial rotary
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=256,
            max_position_embeddings=128,
            rotary_pct=0.5,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "bert": (
        "BertConfig",
        "BertModel",
        dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=256,
            max_position_embeddings=128,
            type_vocab_size=2,
        ),
    ),
}

#: Seconds spent building + exporting each graph (path -> seconds), for the test summary.
EXPORT_TIMES: dict[str, float] = {}

# Exported path -> (torch model, with_past); lets tests compute torch reference outputs.
_MODELS: dict[str, tuple[object, bool]] = {}


def build_tiny(family: str, *, seed: int = 0, randomize_1d: bool = True, **config_overrides):
    """Build a tiny fp32 eval-mode model of ``family`` with seeded random weights.

    With ``randomize_1d`` the 1-D parameters (norm scales and biases, which Hugging Face
    initialises to exactly 1 and 0) get random values too: every norm and bias then is a
    distinct tensor, as in a trained model. Otherwise the dynamo exporter's optimizer
    deduplicates the identical constants into one shared initializer.
    """
    import torch
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    config_name, model_name, defaults = FAMILIES[family]
    kwargs = {**defaults, **config_overrides}
    kwargs.setdefault("attn_implementation", "eager")
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    if randomize_1d:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() != 1:
                    continue
                noise = torch.randn(param.shape, generator=gen)
                if name.endswith("bias"):
                    param.copy_(0.02 * noise)
                else:  # norm scale
                    param.copy_(1.0 + 0.1 * noise)
    return model.float().eval()


def export_tiny(
    family: str,
    style: str = "dynamo",
    *,
    with_past: bool | None = None,
    mutate: Callable | None = None,
    out_dir: str | os.PathLike | None = None,
    name: str | None = None,
    seed: int = 0,
    opset: int | None = None,
    optimize: bool = True,
    **config_overrides,
) -> Path:
    """Build a tiny ``family`` model, apply ``mutate(model)``, export it in ``style``.

    ``with_past`` defaults to True for the "optimum" style (Optimum's with-past layout) and
    False otherwise. ``config_overrides`` replace the tiny defaults in ``FAMILIES``. The
    graph is written to ``out_dir`` (a fresh temporary directory when None) as
    ``name``.onnx, ``name`` defaulting to ``{family}_{style}`` (made unique in ``out_dir``).
    """
    import torch

    from graphresize.io.capture import export_onnx

    if with_past is None:
        with_past = style == "optimum" and family != "bert"
    start = time.perf_counter()
    model = build_tiny(family, seed=seed, **config_overrides)
    if mutate is not None:
        with torch.no_grad():
            result = mutate(model)
        if result is not None:
            model = result.float().eval()
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="tiny-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name or f"{family}_{style}" + ("_past" if with_past and style != "optimum" else "")
    path = out_dir / f"{stem}.onnx"
    n = 1
    while name is None and path.exists():
        n += 1
        path = out_dir / f"{stem}_{n}.onnx"
    export_onnx(model, path, style=style, with_past=with_past, opset=opset, optimize=optimize)
    EXPORT_TIMES[str(path)] = time.perf_counter() - start
    _MODELS[str(path)] = (model, with_past)
    return path


def torch_model(path: str | os.PathLike):
    """The torch model that ``export_tiny`` exported to ``path`` (same process only)."""
    return _MODELS[str(path)][0]


# --------------------------------------------------------------------------- feeds / running

_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.BOOL: np.bool_,
}


@functools.lru_cache(maxsize=64)
def _graph_info(path: str, mtime: float):
    model = onnx.load(path, load_external_data=False)
    graph = model.graph
    inits = {t.name: list(t.dims) for t in graph.initializer}
    inputs = []
    for vi in graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
        inputs.append((vi.name, _ONNX_TO_NUMPY[tt.elem_type], dims))
    vocab = None
    for node in graph.node:  # the embedding Gather reading input_ids
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == "input_ids":
            shape = inits.get(node.input[0])
            if shape:
                vocab = shape[0]
                break
    if vocab is None:
        for vi in graph.output:
            if vi.name == "logits":
                last = vi.type.tensor_type.shape.dim[-1]
                vocab = last.dim_value or None
    return inputs, vocab or 100


def graph_inputs(path: str | os.PathLike):
    """``[(name, numpy dtype, dims)]`` of the graph inputs (dims: ints or axis names)."""
    return _graph_info(str(path), os.path.getmtime(path))[0]


def make_feeds(
    path: str | os.PathLike, batch: int = 2, seq: int = 8, seed: int = 0, past: int = 0
) -> dict[str, np.ndarray]:
    """Input feeds for every graph input.

    input_ids: random ints below the vocabulary size; attention_mask: ones over
    ``past + seq``; position_ids: ``past .. past+seq-1``; token_type_ids: zeros;
    past_key_values: zeros with ``past`` positions (random normal when ``past > 0``).
    """
    inputs, vocab = _graph_info(str(path), os.path.getmtime(path))
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for name, dtype, dims in inputs:
        if name == "input_ids":
            feeds[name] = rng.integers(0, vocab, size=(batch, seq)).astype(dtype)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, past + seq), dtype=dtype)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(past, past + seq), (batch, seq)).astype(dtype)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, seq), dtype=dtype)
        elif name.startswith("past_key_values"):
            shape = (batch, dims[1], past, dims[3])
            if past:
                feeds[name] = rng.standard_normal(shape).astype(dtype)
            else:
                feeds[name] = np.zeros(shape, dtype=dtype)
        else:
            raise ValueError(f"{path}: don't know how to feed input {name!r} {dims}")
    return feeds


@functools.lru_cache(maxsize=16)
def _session(path: str, mtime: float):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def run_ort(path: str | os.PathLike, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the graph on CPU; outputs by name, in graph order."""
    session = _session(str(path), os.path.getmtime(path))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def run_in_memory(model, seed: int = 1) -> list[np.ndarray]:
    """Outputs of an in-memory ``onnx_ir`` model in ORT CPU for seeded token ids [2, 16]
    (below 200, every tiny vocabulary), fed as ``graphresize.io.ort_utils.make_feeds`` does."""
    from graphresize.io.ort_utils import make_feeds, make_session

    session = make_session(model)
    ids = np.random.default_rng(seed).integers(0, 200, size=(2, 16))
    return session.run(None, make_feeds(session, ids))


def torch_outputs(path: str | os.PathLike, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of the torch model behind ``path`` for ``feeds``, named like the graph's."""
    import torch

    model, with_past = _MODELS[str(path)]
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    with torch.no_grad():
        if "logits" not in _output_names(path):
            out = model(**t)
            return {"last_hidden_state": out.last_hidden_state.numpy()}
        kwargs = {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}
        if "position_ids" in t:
            kwargs["position_ids"] = t["position_ids"]
        if not with_past:
            return {"logits": model(**kwargs, use_cache=False).logits.numpy()}
        from transformers import DynamicCache

        n = sum(1 for k in t if re.fullmatch(r"past_key_values\.\d+\.key", k))
        pairs = [(t[f"past_key_values.{i}.key"], t[f"past_key_values.{i}.value"]) for i in range(n)]
        cache = DynamicCache(ddp_cache_data=pairs, config=model.config)
        out = model(**kwargs, past_key_values=cache, use_cache=True)
        result = {"logits": out.logits.numpy()}
        for i, layer in enumerate(out.past_key_values.layers):
            result[f"present.{i}.key"] = layer.keys.numpy()
            result[f"present.{i}.value"] = layer.values.numpy()
        return result


def _output_names(path) -> list[str]:
    return [o.name for o in _session(str(path), os.path.getmtime(path)).get_outputs()]


# --------------------------------------------------------------------------- mutations


def duplicate_llama_mlp(model, copies: int = 2):
    """Make each Llama MLP out of ``copies`` identical groups of neurons.

    Neuron ``j`` of the intermediate layer copies neuron ``j % (intermediate // copies)``
    (same gate/up rows, same down_proj column), so an exact merge to
    ``intermediate // copies`` neurons exists (summing the merged down_proj columns).
    Usable as ``export_tiny("llama", ..., mutate=duplicate_llama_mlp)``.
    """
    for layer in model.model.layers:
        mlp = layer.mlp
        width = mlp.gate_proj.out_features
        if width % copies:
            raise ValueError(f"intermediate size {width} is not a multiple of {copies}")
        base = width // copies
        for k in range(1, copies):
            sl = slice(k * base, (k + 1) * base)
            mlp.gate_proj.weight[sl] = mlp.gate_proj.weight[:base]
            mlp.up_proj.weight[sl] = mlp.up_proj.weight[:base]
            mlp.down_proj.weight[:, sl] = mlp.down_proj.weight[:, :base]
    return model


# --------------------------------------------------------------------------- onnxruntime-genai


def save_tiny_checkpoint(family: str, out_dir: str | os.PathLike, seed: int = 0, **config_overrides) -> Path:
    """Save a tiny ``family`` model as a Hugging Face folder (safetensors, config) with a
    256-token word-level ``tokenizer.json`` (``t0`` … ``t255``), as model builders read it."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    build_tiny(family, seed=seed, **config_overrides).save_pretrained(out_dir)
    tokenizer = Tokenizer(WordLevel(vocab={f"t{i}": i for i in range(256)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t0"
    ).save_pretrained(out_dir)
    return out_dir


def export_genai(family: str, out_dir: str | os.PathLike, **config_overrides) -> Path:
    """Build ``family`` with onnxruntime-genai's model builder (fp32, CPU) from a tiny local
    checkpoint, in this process and offline; returns ``out_dir/model.onnx``
    (genai_config.json and the tokenizer beside it)."""
    import contextlib
    import io

    from onnxruntime_genai.models import builder

    start = time.perf_counter()
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="hf-") as hf, contextlib.redirect_stdout(io.StringIO()):
        save_tiny_checkpoint(family, hf, **config_overrides)
        cache = str(Path(hf) / "cache")
        args = (None, hf, str(out_dir), "fp32", "cpu", cache)
        builder.create_model(*args, **builder.parse_extra_options(*args, None))
    path = out_dir / "model.onnx"
    EXPORT_TIMES[str(path)] = time.perf_counter() - start
    return path


def zero_heads(src, dst, heads_per_layer):
    """Copy of ``src`` whose output-projection rows of query heads ``heads_per_layer`` are zero
    in every attention layer: those heads add nothing to the output, so removing them must
    change nothing."""
    import onnx_ir as ir

    from graphresize.analysis.attention.find import find_attention
    from graphresize.pipeline import load_prepared

    model = load_prepared(src)
    for block in find_attention(model):
        value = model.graph.initializers[block.output_weight]
        array = np.array(value.const_value.numpy(), copy=True)
        rows = np.moveaxis(array, block.output_axis, 0)
        for h in heads_per_layer:
            rows[h * block.head_dim : (h + 1) * block.head_dim] = 0.0
        value.const_value = ir.tensor(array, name=value.name)
    ir.save(model, dst)
    return dst


def optimize_tiny(src, dst, calib, ratio: float = 0.0, *, tokens: int = 2048, seq_len: int = 32, **options):
    """``graphresize.optimize`` as the tests run it on a tiny model: few calibration tokens in
    short windows, no progress bars; ``options`` are further ``OptimizeOptions`` fields."""
    import graphresize

    return graphresize.optimize(src, dst, ratio=ratio, calib=calib, tokens=tokens, seq_len=seq_len, progress=False, **options)


def prepared_residual(path):
    """The model as the residual methods see it (``load_prepared``: γ folded, LayerNorm → RMS)
    and its resizable residual groups, prepared; returns ``(model, groups)``."""
    import graphresize
    from graphresize.pipeline import load_prepared, prepare_residual

    model = load_prepared(path)
    residual = [g for g in graphresize.analyze(path).of_kind("residual") if g.resizable]
    return model, prepare_residual(model, residual)


def load_script(path: str | os.PathLike, name: str):
    """Import a benchmark or example script (not a package module) as module ``name``; it is
    registered in ``sys.modules`` first, as dataclasses look their module up there."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_cli(args, capsys) -> tuple[int, str, str]:
    """Run the ``graphresize`` command line in-process: exit code, stdout and stderr."""
    from graphresize.cli.main import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def rotate_stream_full_width(model, groups, out: Path, seed: int = 0) -> Path:
    """Rotate the (single, prepared) residual stream of ``model`` by a random orthogonal Q at
    full width, through the same passes as a resize (writers ·Q, readers Qᵀ·, norms rescaled,
    re-tie, cleanup), and save it to ``out``: its outputs must equal the original's."""
    import onnx_ir as ir
    from graphresize.passes import (
        RescaleNormsPass,
        ResizeGroupsPass,
        RetieWeightsPass,
        cleanup_passes,
    )

    from graphresize.pipeline import residual_layouts
    from graphresize.solve.transforms import ChannelTransform

    (group,) = groups.of_kind("residual")
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((group.width, group.width)))
    layouts = residual_layouts(model, groups, [group.id])
    ResizeGroupsPass(groups, {group.id: ChannelTransform(group.id, q, q.T, method="test")})(model)
    RescaleNormsPass(list(layouts.values()), {group.id: (group.width, group.width)})(model)
    RetieWeightsPass()(model)
    cleanup_passes()(model)
    ir.save(model, out)
    return out
