"""Files that travel with a model: tokenizer, config and onnxruntime-genai's genai_config.json.

Rule: after a successful optimize, the files beside the input that a server needs (tokenizer
and Hugging Face config files) are copied beside the output when absent there, so the output
folder serves on its own; ``genai_config.json`` is written with ``model.decoder.filename``
naming the output graph. It describes no MLP width; when heads were removed,
``model.decoder.num_attention_heads`` / ``num_key_value_heads`` get the new counts
(``head_size`` stays: heads keep their dimension). onnxruntime-genai takes one count for all
layers, so when the counts differ per layer (``--head-method global``, a layer left unchanged)
or a residual width changed, it is not written (its sizes would be stale) and the report says why.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from graphresize.capture import SIDECAR_FILES

GENAI_CONFIG = "genai_config.json"
#: Group kinds whose widths genai_config.json does not record (heads are rewritten).
_GENAI_SAFE_KINDS = frozenset({"mlp", "heads"})


def copy_sidecars(
    input_path: Path, output_path: Path, changed_kinds: set[str], heads: tuple[int, int] | str | None = None
) -> dict[str, list[str]]:
    """Copy or rewrite the files beside ``input_path`` for ``output_path``; return what was
    written and what was skipped (with why). ``heads`` is the new (query, KV) head count of
    every layer, or why the counts differ per layer, or None when no head was removed."""
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
        shutil.copyfile(src / name, dst / name)
        written.append(str(dst / name))
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
                target.write_text(json.dumps(data, indent=4) + "\n")
                written.append(str(target))
    return {"written": written, "skipped": skipped}
