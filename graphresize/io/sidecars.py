"""Files that travel with a model: tokenizer, config and onnxruntime-genai's genai_config.json.

Rule: after a successful optimize, the files beside the input that a server needs (tokenizer
and Hugging Face config files) are copied beside the output when absent there, so the output
folder serves on its own; ``genai_config.json`` is written with ``model.decoder.filename``
naming the output graph. It describes no MLP width; when heads were removed,
``model.decoder.num_attention_heads`` / ``num_key_value_heads`` get the new counts
(``head_size`` stays: heads keep their dimension). onnxruntime-genai takes one count for all
layers, so when the counts differ per layer (``--head-method global``, a layer left unchanged)
or a residual width changed, it is not written (its sizes would be stale) and the report says why.

``config.json`` gets the sizes a loader reads back (optimum sizes its KV-cache feeds from
them): ``intermediate_size`` (``n_inner``, ``ffn_dim``) when every MLP has the same new width,
``hidden_size`` (``n_embd``, ``d_model``) for the residual stream, ``num_attention_heads`` /
``num_key_value_heads`` for uniform head counts, and then an explicit ``head_dim`` (Llama-style
configs derive it as hidden size ÷ heads, which no longer holds). A size that differs per
layer cannot be written; it stays as it was and the report says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from graphresize.errors import InputError
from graphresize.io import publish
from graphresize.io.capture import SIDECAR_FILES

GENAI_CONFIG = "genai_config.json"
#: Group kinds whose widths genai_config.json does not record (heads are rewritten).
_GENAI_SAFE_KINDS = frozenset({"mlp", "heads"})


HF_CONFIG = "config.json"
_WIDTH_KEYS = {"mlp": ("intermediate_size", "n_inner", "ffn_dim"), "residual": ("hidden_size", "n_embd", "d_model")}
_HEAD_KEYS = ("num_attention_heads", "n_head")
_KV_HEAD_KEYS = ("num_key_value_heads",)


def hf_config_edits(
    config: dict, widths: dict[str, list[tuple[int, int]]], heads: tuple[int, int] | str | None
) -> tuple[dict, list[str]]:
    """The ``config.json`` entries to change for the new ``widths`` (per kind, the (old, new)
    width of each changed group) and ``heads``, and what could not be described."""
    edits: dict = {}
    notes: list[str] = []
    hidden_key = next((k for k in _WIDTH_KEYS["residual"] if isinstance(config.get(k), int)), None)
    head_key = next((k for k in _HEAD_KEYS if isinstance(config.get(k), int)), None)
    for kind, pairs in widths.items():
        key = next((k for k in _WIDTH_KEYS.get(kind, ()) if isinstance(config.get(k), int)), None)
        if key is None or not pairs:
            continue
        new = {n for _, n in pairs}
        if len(new) == 1 and all(o == config[key] for o, _ in pairs):
            edits[key] = new.pop()
        else:
            notes.append(f"{key} left at {config[key]} ({kind} widths differ per layer: {min(new)}-{max(new)})")
    if isinstance(heads, str):
        notes.append(f"head counts left as they were ({heads})")
    elif heads is not None and head_key is not None:
        edits[head_key] = heads[0]
        kv_key = next((k for k in _KV_HEAD_KEYS if k in config), None)
        if kv_key is not None or heads[1] != heads[0]:
            edits[kv_key or _KV_HEAD_KEYS[0]] = heads[1]
    if (hidden_key in edits or head_key in edits) and "head_dim" not in config and hidden_key and head_key:
        edits["head_dim"] = config[hidden_key] // config[head_key]
    return edits, notes


def copy_sidecars(
    input_path: Path,
    output_path: Path,
    changed_kinds: set[str],
    heads: tuple[int, int] | str | None = None,
    widths: dict[str, list[tuple[int, int]]] | None = None,
) -> dict[str, list[str]]:
    """Copy or rewrite the files beside ``input_path`` for ``output_path``; return what was
    written and what was skipped (with why). ``heads`` is the new (query, KV) head count of
    every layer, or why the counts differ per layer, or None when no head was removed;
    ``widths`` the (old, new) width of every changed group, by kind."""
    src, dst = input_path.parent, output_path.parent
    written: list[str] = []
    skipped: list[str] = []
    same_dir = src.resolve() == dst.resolve()
    for name in SIDECAR_FILES:
        if not (src / name).is_file() or same_dir:
            continue
        if (dst / name).exists():
            skipped.append(f"{name} (already beside the output)")
            continue
        if name == HF_CONFIG and _rewrite_hf_config(src / name, dst / name, widths or {}, heads, skipped):
            written.append(str(dst / name))
            continue
        if _write_new(dst / name, (src / name).read_bytes()):
            written.append(str(dst / name))
        else:
            skipped.append(f"{name} (already beside the output)")
    genai = src / GENAI_CONFIG
    if genai.is_file():
        stale = sorted(changed_kinds - _GENAI_SAFE_KINDS)
        target = dst / GENAI_CONFIG
        if isinstance(heads, str):
            skipped.append(f"{GENAI_CONFIG} (attention heads removed, but {heads}: it takes one count for all layers)")
        elif stale:
            skipped.append(f"{GENAI_CONFIG} ({', '.join(stale)} widths changed)")
        elif same_dir or target.exists():
            skipped.append(f"{GENAI_CONFIG} (one is already beside the output)")
        else:
            data = json.loads(genai.read_text())
            decoder = data.get("model", {}).get("decoder")
            if not isinstance(decoder, dict):
                skipped.append(f"{GENAI_CONFIG} (no model.decoder section)")
            else:
                decoder["filename"] = output_path.name
                if heads is not None:
                    decoder["num_attention_heads"], decoder["num_key_value_heads"] = heads
                if _write_new(target, (json.dumps(data, indent=4) + "\n").encode()):
                    written.append(str(target))
                else:
                    skipped.append(f"{GENAI_CONFIG} (one is already beside the output)")
    return {"written": written, "skipped": skipped}


def _rewrite_hf_config(src: Path, dst: Path, widths: dict, heads, notes: list[str]) -> bool:
    """Write ``src`` with the new sizes to ``dst``; False (copy it as it is) when there is
    nothing to change or it is not a JSON object."""
    try:
        config = json.loads(src.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    edits, left = hf_config_edits(config, widths, heads)
    notes.extend(f"{HF_CONFIG}: {n}" for n in left)
    if not edits:
        return False
    config.update(edits)
    if not _write_new(dst, (json.dumps(config, indent=2) + "\n").encode()):
        notes.append(f"{HF_CONFIG} (already beside the output)")
    return True


def _write_new(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data``, whole or not at all (:mod:`graphresize.io.publish`); False
    when something already has that name (another run's file, a device, a pipe: never replaced)."""
    try:
        publish.write_bytes(data, path, overwrite=False)
    except InputError:
        if os.path.lexists(path):
            return False
        raise
    return True
