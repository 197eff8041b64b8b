"""examples/serve_smollm2.py: greedy generation in ONNX Runtime, with and without a KV cache."""

from pathlib import Path

import pytest

from tests.models import load_script

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "serve_smollm2.py"


@pytest.fixture(scope="module")
def serve():
    return load_script(EXAMPLE, "serve_smollm2")


def test_kv_cache_decoding_matches_full_recompute(serve, llama_dynamo, llama_optimum):
    plain = serve.Generator(llama_dynamo)
    cached = serve.Generator(llama_optimum)  # the same weights, Optimum's with-past layout
    assert not plain.past and cached.past
    prompt = [5, 17, 42, 7, 99]
    want = list(plain.generate(prompt, 12, stop=set()))
    assert len(want) == 12
    assert list(cached.generate(prompt, 12, stop=set())) == want
    assert list(plain.generate(prompt, 12, stop={want[3]})) == want[:3]


def test_tokenizer_found_through_the_report(serve, tmp_path):
    src = tmp_path / "dense"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "small.report.json").write_text(f'{{"input": {{"path": "{src / "model.onnx"}"}}}}')
    assert serve.find_tokenizer(out / "small.onnx", None) == src / "tokenizer.json"
    with pytest.raises(SystemExit):
        serve.find_tokenizer(tmp_path / "elsewhere" / "m.onnx", None)
