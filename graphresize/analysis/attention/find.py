"""Find every attention layer of a model: decomposed cores traced by ``heads.Tracer``, fused
attention ops read by ``fused.fused_block``."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from graphresize.analysis.attention.fused import fused_block
from graphresize.analysis.attention.heads import (
    AttentionBlock,
    NotRecognised,
    Tracer,
    is_core,
    node_scope,
)
from graphresize.analysis.channels import ATTENTION_OPS


def find_attention(model: ir.Model) -> tuple[AttentionBlock, ...]:
    """Every attention layer of ``model`` in graph order (pure: changes nothing).

    Expects names and value shapes as ``prepare_passes`` leaves them."""
    graph = model.graph
    blocks: list[tuple[int, AttentionBlock]] = []
    position = {id(node): i for i, node in enumerate(graph)}
    for node in graph:
        if node.op_type in ATTENTION_OPS and node.op_type != "RotaryEmbedding":
            try:
                block = fused_block(node)
            except NotRecognised as exc:
                block = AttentionBlock(layer=0, scope=node_scope(node), reason=str(exc), op=f"{node.domain or 'ai.onnx'}::{node.op_type}")
            blocks.append((position[id(node)], block))
        elif node.op_type == "MatMul" and is_core(node):
            try:
                block = Tracer(node).block()
            except NotRecognised as exc:
                block = AttentionBlock(layer=0, scope=node_scope(node), reason=str(exc))
            blocks.append((position[id(node)], block))
    blocks.sort(key=lambda item: item[0])
    return tuple(dataclasses.replace(b, layer=i) for i, (_, b) in enumerate(blocks))
