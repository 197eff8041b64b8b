"""Emit the graph in the fused form ONNX Runtime runs fastest (RMSNorm, skip-norm, rotary, attention).

The fusions are onnxscript's (``onnxscript.rewriter.ort_fusions``), applied one named step
at a time in the order of ``onnxscript``'s own ``optimize_for_ort``, so that a step whose
result ONNX Runtime cannot load, or whose outputs drift, can be left out on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from graphresize.passes.fuse_gqa import fuse_gqa
from graphresize.passes.pack_matmuls import PackParallelMatMulsPass
from graphresize.passes.reshape_dims import ReshapeDimsPass
from graphresize.passes.rotary_cache import FUSION_DOMAIN, RotaryCachePass
from graphresize.passes.static_dims import StaticShapeDimsPass, forget_unnamed_shapes

#: A graph with one of these is left unfused: onnxscript's folding rewrites If/Loop with constant
#: inputs, and graphresize leaves control flow as it is.
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
#: ``accept(model)`` -> ``None`` when the fused ``model`` is acceptable, else why not (one line).
Accept = Callable[[ir.Model], "str | None"]


class FusionFormPass(ir.passes.InPlacePass):
    """Spell two exact identities the way onnxscript's ORT patterns expect them (the
    TorchScript exporter writes RMS norms otherwise):

    * ``Div(1, x)`` -> ``Reciprocal(x)`` (one IEEE division either way), for a rank-0 constant 1;
    * ``ReduceMean`` without ``noop_with_empty_axes`` gets it written out as its default, 0.

    Written by hand: a few lines on ``onnx_ir``.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "ReduceMean" and "noop_with_empty_axes" not in node.attributes and len(node.inputs) == 2:
                node.attributes["noop_with_empty_axes"] = ir.AttrInt64("noop_with_empty_axes", 0)
                modified = True
            elif node.op_type == "Div" and _is_scalar_one_over(node):
                reciprocal = ir.node("Reciprocal", [node.inputs[1]], name=f"{node.name}_reciprocal")
                model.graph.insert_before(node, reciprocal)
                ir.convenience.replace_all_uses_with(node.outputs[0], reciprocal.outputs[0])
                name, node.outputs[0].name = node.outputs[0].name, None
                reciprocal.outputs[0].name = name
                reciprocal.outputs[0].shape, reciprocal.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
                model.graph.remove(node, safe=True)
                modified = True
        return ir.passes.PassResult(model, modified)


def _is_scalar_one_over(node: ir.Node) -> bool:
    """``Div(1, x)`` with a rank-0 constant 1 (ONNX's Div takes one dtype for both), its
    output not a graph output."""
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None or node.outputs[0].is_graph_output():
        return False
    one = ir.convenience.get_const_tensor(node.inputs[0])
    if one is None:
        return False
    array = np.asarray(one.numpy())
    return array.ndim == 0 and float(array) == 1.0  # a broadcast 1 could change the output's shape


def _steps(max_positions: int | None = None, pack: bool = False) -> tuple[tuple[str, Callable[[ir.Model], int]], ...]:
    """The fusion steps of ``onnxscript.rewriter.ort_fusions.optimize_for_ort`` as named
    callables returning how many sites each rewrote (read from its ``_core``; onnxscript 0.5-0.7),
    with graphresize's own steps among them:

    * ``rotary_cache`` (:class:`RotaryCachePass`, cos/sin caches of ``max_positions`` rows, or
      computed in the graph when None): the rotary form current exporters write, which
      onnxscript's ``cos_sin_cache`` does not match;
    * onnxscript's ``gqa`` and ``packed_qkv_for_gqa`` are left out: once the rotary caches
      fire, its GroupQueryAttention matches the dynamo exports, but it reads the sequence
      lengths off the attention mask as if padding were on the right (a left-padded batch gives
      other outputs: relative difference 0.9-1.5) and, without a KV cache, writes a graph ONNX
      Runtime cannot load; every attempt cost a refused all-steps check;
    * ``pack_matmuls`` (:class:`PackParallelMatMulsPass`), last and only with ``pack``: the
      query/key/value and gate/up projections of one input as one MatMul and a Split, once
      every attention fusion has matched the separate projections. Off for ORT CPU, where it
      measured no gain (SmolLM2 with past, side by side with the packed graph, unpacked ÷
      packed: prompt 0.97-0.98, batch 8 0.98-1.01, decode 0.99; the Split copies back what the
      wider GEMM saves); on for CUDA, where it turns five projection launches per layer into
      two (not measured: no GPU yet).

    Unlike ``optimize_for_ort``, the preparation and the clean-up do not run onnxscript's
    general ``optimize`` (its default rewrite rules cost about 50 s on SmolLM2-135M and enable
    no fusion there or on the tiny test models): constant folding, ONNX shape inference (the dimensions Reshapes infer
    filled in, :class:`ReshapeDimsPass`; static dimensions read through ``Shape`` folded,
    :class:`StaticShapeDimsPass`, and the shapes inferred again) and the shape rules before; function inlining and unused-node removal after.
    """
    from onnxscript.optimizer import _constant_folding as folding
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import ORT_PATTERN_REWRITE_RULES, _core, shape_optimization
    from onnxscript.rewriter.rules.common import _gemm_to_matmul_add

    def pre(model: ir.Model) -> int:
        rewrite(model, [_gemm_to_matmul_add.gemm_to_matmul_add_rule])
        fold = folding.FoldConstantsPass(
            shape_inference=True, input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
            output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
        )
        common_passes.ShapeInferencePass()(model)
        ReshapeDimsPass()(model)
        fold(model)
        if StaticShapeDimsPass()(model).modified:  # shape-computed bounds became constants: infer again
            fold(model)
            common_passes.RemoveUnusedNodesPass()(model)
            forget_unnamed_shapes(model)
            common_passes.ShapeInferencePass()(model)
            ReshapeDimsPass()(model)
        shape_optimization.rules.apply_to_model(model)
        common_passes.RemoveUnusedNodesPass()(model)
        return 0

    def fused(func, **kwargs) -> Callable[[ir.Model], int]:
        return lambda model: int(func(model, **kwargs) or 0)

    def rotary_cache(model: ir.Model) -> int:
        step = RotaryCachePass(max_positions)
        step(model)
        return step.count

    def pack_matmuls(model: ir.Model) -> int:
        step = PackParallelMatMulsPass()
        step(model)
        return step.count

    def cse(model: ir.Model) -> int:
        common_passes.CommonSubexpressionEliminationPass()(model)
        return 0

    def finish(model: ir.Model) -> int:
        before = sum(1 for _ in model.graph)
        ir.passes.Sequential(  # inline what a fusion introduced but nothing consumed
            common_passes.InlinePass(), common_passes.RemoveUnusedNodesPass(),
            common_passes.RemoveUnusedFunctionsPass(), common_passes.RemoveUnusedOpsetsPass(),
        )(model)
        rewrite(model, ORT_PATTERN_REWRITE_RULES)
        ir.passes.Sequential(
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
            common_passes.RemoveInitializersFromInputsPass(),
            common_passes.ShapeInferencePass(),
        )(model)
        return max(0, before - sum(1 for _ in model.graph))

    c = _core
    return (
        ("prepare", pre),
        ("erf_gelu", fused(c.fuse_erfgelu)),
        ("rms_normalization", fused(c.fuse_rms_normalization)),
        ("skip_layer_normalization", fused(c.fuse_skip_layer_normalization)),
        ("skip_rms_normalization", fused(c.fuse_skip_rms_normalization)),
        ("rotary_embedding", fused(c.fuse_rotary_embedding)),
        ("cos_sin_cache", fused(c.fuse_cos_sin_cache)),
        ("rotary_cache", rotary_cache),
        ("cse", cse),
        ("partial_rotary_embedding", fused(c.fuse_partial_rotary_embedding)),
        ("sdpa", fused(c.fuse_sdpa, apply_shape_inference=True)),
        ("mha1", fused(c.fuse_mha1)),
        ("mha2", fused(c.fuse_mha2)),
        ("mha_scale", fused(c.fuse_mha_scale)),
        ("mha_bias", fused(c.fuse_mha_bias)),
        ("attention", fused(c.fuse_attention)),
        ("gelu", fused(c.fuse_gelu)),
        ("bias_gelu", fused(c.fuse_bias_gelu)),
        ("sdpa_via_mha", fused(c.replace_sdpa_by_mha)),
        ("gqa_exact", fuse_gqa),
        ("ort_rules", finish),
        *((("pack_matmuls", pack_matmuls),) if pack else ()),
    )


def _copy(model: ir.Model) -> ir.Model:
    """A copy to rewrite; the tensors are shared (external ones keep their files), not copied."""
    return model.clone()


class FuseForOrtPass(ir.passes.InPlacePass):
    """Rewrite the graph into ONNX Runtime's fused contrib ops, keeping only what checks out.

    Rule: apply every onnxscript ORT fusion step (``_steps``) after :class:`FusionFormPass`;
    if ``accept`` refuses the result (ORT cannot load it, or its outputs differ from the
    unfused graph's beyond tolerance), start again from the unfused graph and apply the steps
    in groups, each kept only if ``accept`` takes it: a group is one step, or a step leaving
    intermediate ops ONNX Runtime cannot run together with the steps after it until none is
    left (``sdpa`` and the ``mha*`` steps that replace its op). A refused group is retried
    leaving out one of its steps that fired, the last first; a step left out (or a group's first
    step, when no retry is taken) is named in ``skipped`` with the reason, so a faulty fusion is
    skipped and the alternatives after it still fire. Graph inputs and outputs (KV-cache names
    included) are never renamed. A graph with control flow (``CONTROL_FLOW``) is left unfused.

    ``pack``: also pack the parallel projections (``pack_matmuls``, for CUDA). In place: the
    fall-back builds on a copy and moves its graph into ``model``. ``counts``
    (sites per step that fired; ``ort_rules``: nodes fewer after the last rules and clean-up) and
    ``skipped`` (step -> reason) describe the last call.
    """

    def __init__(self, accept: Accept | None = None, max_positions: int | None = None, pack: bool = False) -> None:
        super().__init__()
        self.accept = accept
        self.max_positions = max_positions
        self.pack = pack
        self.counts: dict[str, int] = {}
        self.skipped: dict[str, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        flow = sorted({n.op_type for n in model.graph if n.op_type in CONTROL_FLOW})
        if flow:
            self.counts, self.skipped = {}, {"all steps": f"control flow ({', '.join(flow)}) is left as it is"}
            return ir.passes.PassResult(model, False)
        FusionFormPass()(model)
        names = _io_names(model)
        snapshot = _copy(model) if self.accept is not None else None
        steps = _steps(self.max_positions, self.pack)
        counts = {name: step(model) for name, step in steps}
        reason = self._check(model, names)
        if reason is None:
            self.counts, self.skipped = {k: v for k, v in counts.items() if v}, {}
            return ir.passes.PassResult(model, True)
        self.counts, self.skipped = {}, {"all steps at once": reason}
        current, i = snapshot, 0
        while i < len(steps):
            candidate, end, fired = _group(current, steps, i)
            reason = self._check(candidate, names)
            if reason is not None:
                for left_out in reversed([k for k, v in fired.items() if v]):
                    retry, retry_end, retry_fired = _group(current, steps, i, left_out)
                    if self._check(retry, names) is None:
                        self.skipped[left_out] = reason
                        candidate, end, fired, reason = retry, retry_end, retry_fired, None
                        break
            if reason is not None:
                self.skipped[steps[i][0]] = reason
                i += 1
                continue
            current, i = candidate, end
            self.counts.update({k: v for k, v in fired.items() if v})
        model.graph = current.graph
        model.functions.clear()
        model.functions.update(current.functions)
        return ir.passes.PassResult(model, True)

    def _check(self, model: ir.Model, names: tuple[list[str], list[str]]) -> str | None:
        if _io_names(model) != names:
            return f"graph inputs/outputs renamed: {_io_names(model)} (was {names})"
        return self.accept(model) if self.accept is not None else None


def _group(model: ir.Model, steps, start: int, left_out: str | None = None) -> tuple[ir.Model, int, dict[str, int]]:
    """Apply ``steps`` from ``start`` to a copy of ``model`` until the graph holds no
    intermediate op (domain ``ai.onnxruntime._fusion``, which ONNX Runtime cannot run) and at
    least one step ran, leaving out the step named ``left_out``. Returns the copy, the index
    after the last step applied, and the sites per step applied."""
    candidate, fired, i = _copy(model), {}, start
    while i < len(steps):
        name, step = steps[i]
        i += 1
        if name != left_out:
            fired[name] = step(candidate)
        if fired and not any(n.domain == FUSION_DOMAIN for n in candidate.graph):
            break
    return candidate, i, fired


def _io_names(model: ir.Model) -> tuple[list[str], list[str]]:
    return [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]
