"""Healing (recovery by distillation): the torch executor, the training, the file entry."""

from __future__ import annotations

import sys

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

from graphresize.passes import prepare_passes  # noqa: E402
from models import make_feeds, run_ort  # noqa: E402

import graphresize  # noqa: E402
from graphresize.errors import UnsupportedModelError, UsageError  # noqa: E402
from graphresize.io.modelio import file_sha256, load_model  # noqa: E402
from graphresize.recover import apply_weights, heal_file, heal_model  # noqa: E402
from graphresize.recover.distill import changed_initializers, schedule, torch_feeds  # noqa: E402
from graphresize.recover.torch_graph import TorchGraph  # noqa: E402

HEAL = dict(steps=40, lr=3e-3, batch_size=8, seed=0, progress=False)


def _torch_run(path, feeds):
    module = TorchGraph(ir.load(path))
    with torch.no_grad():
        return module({k: torch.from_numpy(v) for k, v in feeds.items()})


@pytest.mark.parametrize("fixture", ["llama_dynamo", "llama_legacy", "gpt2", "gpt2_legacy", "opt", "bert"])
def test_executor_matches_ort(fixture, request):
    path = request.getfixturevalue(fixture)
    feeds = make_feeds(path, batch=2, seq=12)
    want = run_ort(path, feeds)
    got = _torch_run(path, feeds)
    assert len(got) == len(want)
    for g, (name, w) in zip(got, want.items(), strict=True):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g.numpy(), w, atol=1e-4, rtol=1e-4)


def test_executor_names_an_unknown_op(llama_dynamo):
    model = ir.load(llama_dynamo)
    node = next(n for n in model.graph if n.op_type == "Sigmoid")
    node.op_type = "FancySigmoid"
    with pytest.raises(UnsupportedModelError, match="no rule for op FancySigmoid"):
        TorchGraph(model)


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A tiny Llama (legacy export, seconds) with weights 5× the default scale: its next-token
    distributions are far from uniform, so pruning costs a measurable KL."""
    from models import export_tiny

    return export_tiny("llama", "legacy", out_dir=tmp_path_factory.mktemp("sharp"), initializer_range=0.1)


@pytest.fixture(scope="module")
def pruned(sharp, calib_tokens, tmp_path_factory):
    """``sharp`` with half its MLP neurons pruned (16 × 32-token calibration windows)."""
    out = tmp_path_factory.mktemp("heal") / "pruned.onnx"
    graphresize.optimize(sharp, out, ratio=0.5, target="mlp", method="prune", calib=calib_tokens,
                         tokens=512, seq_len=32, progress=False)
    return out


def _models(dense_path, narrow_path):
    dense = load_model(dense_path)
    prepare_passes()(dense)
    return dense, load_model(narrow_path)


def _windows(seed, n=16, seq=32):
    return np.random.default_rng(seed).integers(0, 200, size=(n, seq)).astype(np.int64)


@pytest.fixture(scope="module")
def healed(sharp, pruned):
    """(dense, narrow, untouched copy of the narrow initializers, result): 40 steps of 8 of 128
    random windows; KL measured on 4 other windows."""
    dense, narrow = _models(sharp, pruned)
    before = {n: v.const_value.numpy().copy() for n, v in narrow.graph.initializers.items() if v.const_value is not None}
    result = heal_model(dense, narrow, _windows(1, n=128), check_windows=_windows(2, n=4), **HEAL)
    return dense, narrow, before, result


def test_changed_initializers_are_the_narrowed_mlp_weights(sharp, pruned):
    dense, narrow = _models(sharp, pruned)
    names = changed_initializers(dense, narrow)
    shapes = {n: tuple(narrow.graph.initializers[n].const_value.shape) for n in names}
    # 2 layers × gate, up (hidden 64 → 64 neurons) and down (64 → 64, refit)
    assert len(names) == 6, shapes
    assert sorted(shapes.values()) == [(64, 64)] * 6


def test_heal_lowers_held_out_kl(healed):
    _, _, _, result = healed
    assert result.kl_windows == "holdout"
    assert result.kl_before > 0.05  # measured 0.133
    assert result.kl_after < 0.9 * result.kl_before, (result.kl_before, result.kl_after)  # measured 0.109
    assert result.loss_last < 0.8 * result.loss_first
    assert result.steps == 40 and result.tokens_seen == 40 * 8 * 32
    assert result.params_trained == 6 * 64 * 64
    assert result.seconds > 0 and result.peak_rss_mb > 0


def test_heal_changes_only_the_narrowed_weights(healed, pruned):
    dense, narrow, before, result = healed
    # heal_model leaves the model alone; apply_weights changes exactly the trained tensors
    for name, array in before.items():
        np.testing.assert_array_equal(narrow.graph.initializers[name].const_value.numpy(), array)
    copy = load_model(pruned)
    apply_weights(copy, result)
    changed = {n for n, a in before.items() if not np.array_equal(copy.graph.initializers[n].const_value.numpy(), a)}
    assert changed == set(changed_initializers(dense, narrow)) == set(result.trained)
    assert all(copy.graph.initializers[n].dtype == ir.DataType.FLOAT for n in changed)
    assert all(copy.graph.initializers[n].const_value.shape == narrow.graph.initializers[n].const_value.shape for n in changed)


def test_healed_model_in_ort_has_the_kl_the_trainer_reported(healed, pruned):
    """The written weights scored in ONNX Runtime give the KL the trainer measured in torch."""
    from graphresize.io.ort_utils import make_session
    from graphresize.verify.evaluate import evaluate_text

    dense, _, _, result = healed
    model = apply_weights(load_model(pruned), result)
    ref, got = make_session(dense), make_session(model)
    check = _windows(2, n=4)
    kl = [evaluate_text(got, w, seq_len=32, reference=ref)[1].kl for w in check]  # positions 0..30 of each window
    assert abs(np.mean(kl) - result.kl_after) < 0.05 * result.kl_after  # the trainer's mean counts position 31 too


def test_same_seed_same_bytes(sharp, pruned, calib_tokens, tmp_path):
    kw = dict(tokens=512, seq_len=32, steps=4, lr=1e-3, batch_size=4, progress=False)
    digest = file_sha256(pruned)
    a = heal_file(sharp, pruned, tmp_path / "a.onnx", calib_tokens, seed=3, **kw)
    heal_file(sharp, pruned, tmp_path / "b.onnx", calib_tokens, seed=3, **kw)
    c = heal_file(sharp, pruned, tmp_path / "c.onnx", calib_tokens, seed=4, **kw)
    assert file_sha256(tmp_path / "a.onnx") == file_sha256(tmp_path / "b.onnx")
    assert file_sha256(tmp_path / "a.onnx") != file_sha256(tmp_path / "c.onnx")
    assert a.calib_windows == 16 and a.check_windows == 4
    assert a.heal.kl_after < a.heal.kl_before and c.heal.kl_after < c.heal.kl_before
    assert file_sha256(pruned) == digest  # the input is only read
    assert load_model(tmp_path / "a.onnx").graph.num_nodes() == load_model(pruned).graph.num_nodes()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_heals_deterministically_in_fp32_weights(sharp, pruned, precision):
    """Both precisions lower the held-out KL; bf16 autocast keeps float32 master weights (the
    arrays written back are float32 and not bf16-rounded) and the same seed gives the same
    arrays; the thread count is restored afterwards."""
    dense, narrow = _models(sharp, pruned)
    threads = torch.get_num_threads()
    kw = {**HEAL, "steps": 20, "precision": precision, "threads": 1}
    a = heal_model(dense, narrow, _windows(1, n=128), check_windows=_windows(2, n=4), **kw)
    b = heal_model(dense, narrow, _windows(1, n=128), check_windows=_windows(2, n=4), **kw)
    assert torch.get_num_threads() == threads
    assert a.settings.bf16 == (precision == "bf16")
    assert a.kl_after < 0.95 * a.kl_before, (a.kl_before, a.kl_after)  # fp32 0.133 -> 0.117, bf16 -> 0.118
    assert a.weights.keys() == b.weights.keys()
    for name, array in a.weights.items():
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, b.weights[name])
    if precision == "bf16":  # master weights: not representable in bf16 after the updates
        w = next(iter(a.weights.values()))
        assert not np.array_equal(w, torch.from_numpy(w).to(torch.bfloat16).float().numpy())


# --- memory: the LM head in chunks, shared frozen arrays, the dense model released ---------


@pytest.mark.parametrize("fixture", ["llama_dynamo", "llama_legacy", "gpt2", "gpt2_legacy", "opt"])
def test_found_head_reproduces_the_logits(fixture, request):
    """``find_head`` names the operands of the logits' MatMul: the graph run up to them and the
    product give the graph's logits, bit for bit."""
    from graphresize.recover.loss import find_head

    model = ir.load(request.getfixturevalue(fixture))
    name = "logits" if "logits" in [v.name for v in model.graph.outputs] else model.graph.outputs[0].name
    head = find_head(model.graph, name)
    assert head is not None
    feeds = {k: torch.from_numpy(v) for k, v in make_feeds(request.getfixturevalue(fixture), batch=2, seq=12).items()}
    with torch.no_grad():
        whole = TorchGraph(model, outputs=[name])(feeds)[0]
        hidden, weight = TorchGraph(model, outputs=[head.hidden, head.weight])(feeds)
    assert weight.dim() == 2 and hidden.shape[-1] == weight.shape[0]
    assert torch.equal(torch.matmul(hidden, weight), whole)


def test_encoder_without_a_head_has_none(bert):
    from graphresize.recover.loss import find_head

    model = ir.load(bert)
    assert find_head(model.graph, model.graph.outputs[0].name) is None


def _loss_and_grads(module, feeds, teacher, bf16, chunk):
    from graphresize.recover.loss import head_topk_kl, topk_kl

    for p in module.params:
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        outs = module(feeds)
    if chunk is None:
        loss = topk_kl(outs[0], *teacher, 1.5)
    else:
        loss = head_topk_kl(outs[0], outs[1], *teacher, 1.5, bf16=bf16, chunk=chunk)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in module.named_trainable().items()}


@pytest.mark.parametrize("bf16", [False, True])
def test_chunked_head_loss_equals_the_whole_loss_and_gradient(sharp, pruned, bf16):
    """The head and the loss in chunks of positions (7: not a divisor of the 3 × 32 positions;
    32; more than all) give the whole computation's loss, and its gradient for every trained
    tensor, the head weight included (trained here too), to float rounding."""
    from graphresize.recover.loss import find_head

    dense, narrow = _models(sharp, pruned)
    head = find_head(narrow.graph, "logits")
    assert head is not None
    head_weight = head.weight
    assert head_weight in narrow.graph.initializers  # the legacy export stores the head transposed
    names = [*changed_initializers(dense, narrow), head_weight]
    feeds = torch_feeds(narrow, _windows(5, n=3))
    with torch.no_grad():  # top-8 targets from the dense model, at temperature 1.5
        logp = torch.log_softmax(TorchGraph(dense, outputs=["logits"])(torch_feeds(dense, _windows(5, n=3)))[0] / 1.5, -1)
        top = torch.topk(logp, 8, dim=-1)
    teacher = (top.values, top.indices)
    whole_loss, whole = _loss_and_grads(TorchGraph(narrow, trainable=names, outputs=["logits"]), feeds, teacher, bf16, None)
    split = TorchGraph(narrow, trainable=names, outputs=[head.hidden, head.weight])
    for chunk in (7, 32, 1000):
        loss, grads = _loss_and_grads(split, feeds, teacher, bf16, chunk)
        assert loss == pytest.approx(whole_loss, rel=1e-6)
        assert grads.keys() == whole.keys()
        for name in names:
            # bf16: the whole head-weight gradient is rounded to bf16 once, the chunks' each (measured 3e-3, 4e-3);
            # fp32, and every tensor before the head: measured 0 (chunks of 32 and 1000) or 4e-7 at most (7)
            tol = 1e-2 if bf16 and name == head_weight else 1e-6
            scale = float(whole[name].abs().max())
            assert scale > 0 and float((grads[name] - whole[name]).abs().max()) <= tol * scale, (chunk, name)


def test_frozen_tensors_share_the_models_arrays(pruned, tmp_path):
    """After ``HoldAsArraysPass`` the model holds numpy arrays with the same bytes (it saves to the
    same file), and ``TorchGraph``'s frozen tensors are those arrays, not copies; the trained
    ones are copies (training never writes the model)."""
    from graphresize.io.modelio import save_model_atomic
    from graphresize.recover.arrays import HoldAsArraysPass

    model = load_model(pruned)
    assert any(isinstance(v.const_value, ir.TensorProtoTensor) for v in model.graph.initializers.values())
    assert HoldAsArraysPass()(model).modified
    assert not any(isinstance(v.const_value, ir.TensorProtoTensor) for v in model.graph.initializers.values())
    save_model_atomic(model, tmp_path / "same.onnx")
    assert file_sha256(tmp_path / "same.onnx") == file_sha256(pruned)
    inits = model.graph.initializers
    trained = next(n for n, v in inits.items() if v.dtype == ir.DataType.FLOAT and v.const_value.size > 1)
    module = TorchGraph(model, trainable=[trained])
    assert len(module._frozen) == len(inits) - 1
    for name, tensor in module._frozen.items():
        if tensor.numel():
            assert tensor.data_ptr() == inits[name].const_value.numpy().ctypes.data, name
    param = module.named_trainable()[trained]
    assert param.data_ptr() != inits[trained].const_value.numpy().ctypes.data


def test_dense_given_as_a_file_is_released_before_the_training(sharp, pruned, monkeypatch):
    """``heal_model(path, ...)`` loads the dense model, computes its targets and drops it: no
    reference is left when the training starts; the result is the one a loaded dense model
    gives, and a ``HealSettings`` object is the same as its fields by name."""
    import gc
    import weakref

    import graphresize.recover as recover
    from graphresize.recover import HealSettings, distill

    loaded, alive = [], []
    load_dense, train = recover.load_dense, distill.train

    def tracked_load(path):
        model = load_dense(path)
        loaded.append(weakref.ref(model))
        return model

    def tracked_train(*args, **kwargs):
        gc.collect()
        alive.append(loaded[-1]() is not None)
        return train(*args, **kwargs)

    monkeypatch.setattr(recover, "load_dense", tracked_load)
    monkeypatch.setattr(distill, "train", tracked_train)
    kw = dict(steps=3, lr=3e-3, batch_size=8, seed=0)
    by_path = heal_model(sharp, load_model(pruned), _windows(1, n=32), HealSettings(**kw), check_windows=_windows(2, n=4),
                         progress=False)
    assert alive == [False]
    dense, narrow = _models(sharp, pruned)
    by_model = heal_model(dense, narrow, _windows(1, n=32), check_windows=_windows(2, n=4), progress=False, **kw)
    assert by_path.settings == by_model.settings == HealSettings(**kw)
    assert by_path.kl_before == by_model.kl_before and by_path.kl_after == by_model.kl_after
    for name, array in by_model.weights.items():
        np.testing.assert_array_equal(by_path.weights[name], array)


def test_auto_precision_follows_the_cpu():
    from graphresize.recover.distill import HealSettings, cpu_has_bf16

    assert HealSettings(precision="auto").bf16 == cpu_has_bf16()
    assert HealSettings(precision="bf16").bf16 and not HealSettings(precision="fp32").bf16


def test_schedule_cycles_through_every_window():
    plan = schedule(10, 6, 4, seed=0)
    assert plan.shape == (6, 4)
    first, second = plan.reshape(-1)[:10], plan.reshape(-1)[10:20]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    np.testing.assert_array_equal(plan, schedule(10, 6, 4, seed=0))


def test_missing_torch_is_a_usage_error(monkeypatch, sharp, pruned):
    dense, narrow = _models(sharp, pruned)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(UsageError, match=r"healing needs torch.*graphresize\[heal\]"):
        heal_model(dense, narrow, _windows(1), **HEAL)


def test_nothing_to_heal_is_a_usage_error(sharp):
    dense, _ = _models(sharp, sharp)
    same = load_model(sharp)
    prepare_passes()(same)
    with pytest.raises(UsageError, match="nothing to heal"):
        heal_model(dense, same, _windows(1), **HEAL)


def test_bad_settings_are_usage_errors(sharp, pruned):
    dense, narrow = _models(sharp, pruned)
    with pytest.raises(UsageError):
        heal_model(dense, narrow, _windows(1), **{**HEAL, "steps": 0})
    with pytest.raises(UsageError):
        heal_model(dense, narrow, _windows(1)[0], **HEAL)
    with pytest.raises(UsageError, match="--heal-precision"):
        heal_model(dense, narrow, _windows(1), **{**HEAL, "precision": "fp8"})
    with pytest.raises(UsageError, match="--heal-threads"):
        heal_model(dense, narrow, _windows(1), **{**HEAL, "threads": -1})


@pytest.mark.slow
def test_executor_matches_ort_on_smollm2():
    """SmolLM2-135M (dynamo export, opset 18): the torch executor's logits are ORT's to 1e-4
    (relative to the largest logit)."""
    import os
    from pathlib import Path

    from graphresize.io.ort_utils import make_feeds as ort_feeds
    from graphresize.io.ort_utils import make_session

    path = Path(os.environ.get("GRAPHRESIZE_CACHE", Path.home() / ".cache" / "graphresize")) / "smollm2-onnx" / "model.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is not built (make demo)")
    model = load_model(path)
    ids = np.random.default_rng(0).integers(0, 49152, size=(2, 48)).astype(np.int64)
    session = make_session(model)
    want = session.run(["logits"], ort_feeds(session, ids))[0]
    del session
    module = TorchGraph(model, outputs=["logits"])
    with torch.no_grad():
        got = module(torch_feeds(model, ids))[0].numpy()
    scale = float(np.abs(want).max())
    assert float(np.abs(got - want).max()) < 1e-4 * scale


# --- the command line: optimize --heal-steps, graphresize heal -----------------------------

PRUNE_ARGS = ["--ratio", "0.5", "--target", "mlp", "--method", "prune", "--allocation", "uniform", "--tokens", "4096", "--seq-len", "32", "-q"]
# 128 calibration windows of 32 random tokens: healing generalises slowly on random text, so
# 80 steps (on 16 windows, 40 steps over-fit and raise the KL on other windows)
HEAL_ARGS = ["--heal-steps", "80", "--heal-lr", "3e-3", "--heal-batch-size", "8"]


def _ort_kl(dense_path, model_path, windows):
    """Mean KL(dense ‖ model) in ONNX Runtime over ``windows`` (``graphresize eval --reference``)."""
    from graphresize.io.ort_utils import make_session
    from graphresize.verify.evaluate import evaluate_text

    ref, got = make_session(load_model(dense_path)), make_session(load_model(model_path))
    return float(np.mean([evaluate_text(got, w, seq_len=windows.shape[1], reference=ref)[1].kl for w in windows]))


def _initializers(path):
    return {n: v.const_value.numpy() for n, v in load_model(path).graph.initializers.items() if v.const_value is not None}


@pytest.fixture(scope="module")
def cli_healed(sharp, calib_tokens, tmp_path_factory):
    """``optimize`` run twice on ``sharp`` from the command line: without and with ``--heal-steps``."""
    import json

    from models import run_cli

    out = tmp_path_factory.mktemp("cli_heal")
    capsys = _NoCapture()
    plain, healed = out / "plain.onnx", out / "healed.onnx"
    assert run_cli(["optimize", sharp, "-o", plain, "--calib", calib_tokens, *PRUNE_ARGS], capsys)[0] == 0
    assert run_cli(["optimize", sharp, "-o", healed, "--calib", calib_tokens, *PRUNE_ARGS, *HEAL_ARGS], capsys)[0] == 0
    report = json.loads(healed.with_name("healed.report.json").read_text())
    plain_report = json.loads(plain.with_name("plain.report.json").read_text())
    return plain, healed, report, plain_report


class _NoCapture:
    def readouterr(self):
        return "", ""


def test_optimize_heal_steps_lowers_held_out_kl(sharp, cli_healed):
    plain, healed, report, plain_report = cli_healed
    check = _windows(2, n=4)  # windows neither run trained or calibrated on
    kl_plain, kl_healed = _ort_kl(sharp, plain, check), _ort_kl(sharp, healed, check)
    assert kl_plain > 0.05  # measured 0.110
    assert kl_healed < 0.97 * kl_plain, (kl_plain, kl_healed)  # measured 0.104
    heal = report["heal"]
    assert heal["steps"] == 80 and heal["lr"] == 3e-3 and heal["batch_size"] == 8
    assert heal["threads"] == 1 and heal["precision"] in ("bf16", "fp32")
    assert heal["kl_windows"] == "holdout" and heal["kl_after"] < 0.97 * heal["kl_before"]  # measured 0.122 -> 0.115
    assert heal["params_trained"] == 6 * 64 * 64 and heal["seconds"] > 0
    assert "heal" in report["timings_s"] and "heal" in report["peak_rss_mb"]
    assert report["options"]["heal_steps"] == 80
    assert plain_report["heal"] is None and "heal" not in plain_report["timings_s"]
    assert report["parameters"] == plain_report["parameters"]


def test_optimize_heal_changes_only_the_narrowed_weights(cli_healed):
    plain, healed, _, _ = cli_healed
    a, b = _initializers(plain), _initializers(healed)
    assert a.keys() == b.keys()
    changed = {n for n in a if not np.array_equal(a[n], b[n])}
    assert len(changed) == 6 and all(a[n].shape == (64, 64) for n in changed)


def test_heal_tokens_trains_on_more_windows_with_the_same_hold_out(sharp, calib_tokens, tmp_path):
    """``heal_tokens`` above ``tokens``: other training windows (other weights), the same hold-out
    windows (the same KL before); at or below ``tokens`` it changes nothing."""
    kw = dict(ratio=0.5, target="mlp", method="prune", calib=calib_tokens, tokens=1024, seq_len=32, progress=False,
              heal_steps=3, heal_lr=3e-3, heal_batch_size=8, heal_precision="fp32")
    runs = {}
    for label, extra in (("base", 0), ("same", 1024), ("more", 8192)):
        out = tmp_path / f"{label}.onnx"
        runs[label] = (out, graphresize.optimize(sharp, out, heal_tokens=extra, **kw).heal)
    assert file_sha256(runs["same"][0]) == file_sha256(runs["base"][0])
    assert file_sha256(runs["more"][0]) != file_sha256(runs["base"][0])
    assert runs["more"][1].kl_before == runs["base"][1].kl_before  # the same hold-out windows
    assert runs["more"][1].kl_after != runs["base"][1].kl_after


def test_heal_steps_zero_writes_the_same_bytes(sharp, calib_tokens, cli_healed, tmp_path):
    from models import run_cli

    plain = cli_healed[0]
    out = tmp_path / "zero.onnx"
    assert run_cli(["optimize", sharp, "-o", out, "--calib", calib_tokens, *PRUNE_ARGS, "--heal-steps", "0"], _NoCapture())[0] == 0
    assert file_sha256(out) == file_sha256(plain)


def test_heal_command_changes_only_the_narrowed_weights(sharp, pruned, calib_tokens, tmp_path, capsys):
    import json

    from models import run_cli

    digest = file_sha256(pruned)
    out = tmp_path / "h.onnx"
    code, stdout, err = run_cli(["heal", sharp, pruned, "-o", out, "--calib", calib_tokens, "--tokens", "512", "--seq-len", "32",
                                 "--steps", "20", "--lr", "3e-3", "--batch-size", "8", "--json"], capsys)
    assert code == 0, err
    data = json.loads(stdout)
    assert data["steps"] == 20 and data["calib_windows"] == 16 and data["check_windows"] == 4
    assert data["kl_after"] < data["kl_before"]
    assert "heal:" in err and "hold-out KL" in err
    a, b = _initializers(pruned), _initializers(out)
    changed = {n for n in a if not np.array_equal(a[n], b[n])}
    dense, narrow = _models(sharp, pruned)
    assert a.keys() == b.keys() and changed == set(changed_initializers(dense, narrow))
    assert file_sha256(pruned) == digest
    # the same seed twice: the same bytes
    again = tmp_path / "h2.onnx"
    code, _, err = run_cli(["heal", sharp, pruned, "-o", again, "--calib", calib_tokens, "--tokens", "512", "--seq-len", "32",
                            "--steps", "20", "--lr", "3e-3", "--batch-size", "8", "-q"], capsys)
    assert code == 0, err
    assert file_sha256(again) == file_sha256(out)


def test_heal_command_bad_inputs(sharp, pruned, gpt2, calib_tokens, tmp_path, capsys):
    from models import run_cli

    out = tmp_path / "h.onnx"
    base = ["--calib", calib_tokens, "--tokens", "512", "--seq-len", "32", "--steps", "2", "-q"]
    cases = [
        (["heal", sharp, sharp, "-o", out, *base], 2, "nothing to heal"),  # not narrowed
        (["heal", sharp, gpt2, "-o", out, *base], 2, "not a model narrowed from it"),  # another model
        (["heal", sharp, tmp_path / "missing.onnx", "-o", out, *base], 1, "not found"),
        (["heal", sharp, pruned, "-o", pruned, *base], 1, "output path is the input"),
        (["heal", sharp, pruned, "-o", sharp, *base], 2, "output path is the dense model"),
        (["heal", sharp, pruned, "-o", out, *base, "--steps", "0"], 2, "must be positive"),
        (["heal", sharp, pruned, "-o", out, "--calib", tmp_path / "none.txt", "--steps", "2", "-q"], 2, "calibration file not found"),
    ]
    for args, want, message in cases:
        code, _, err = run_cli(args, capsys)
        assert code == want and message in err and len(err.strip().splitlines()) == 1, (args, code, err)
    assert not out.exists()
    out.write_bytes(b"keep")
    code, _, err = run_cli(["heal", sharp, pruned, "-o", out, *base], capsys)
    assert code == 1 and out.read_bytes() == b"keep", err


def test_heal_without_torch_is_a_usage_error_before_work(monkeypatch, sharp, pruned, calib_tokens, tmp_path, capsys):
    from models import run_cli

    monkeypatch.setitem(sys.modules, "torch", None)
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(["optimize", sharp, "-o", out, "--calib", calib_tokens, *PRUNE_ARGS, "--heal-steps", "2"], capsys)
    assert code == 2 and "healing needs torch" in err and not out.exists()
    code, _, err = run_cli(["heal", sharp, pruned, "-o", out, "--calib", calib_tokens, "-q"], capsys)
    assert code == 2 and "healing needs torch" in err and not out.exists()


def test_heal_options_are_checked_and_read_from_config(sharp, calib_tokens, tmp_path, capsys):
    import json

    from models import run_cli

    out = tmp_path / "o.onnx"
    for flags in (["--heal-steps", "-1"], ["--heal-steps", "2", "--heal-lr", "0"], ["--heal-steps", "2", "--heal-batch-size", "0"],
                  ["--heal-steps", "2", "--heal-threads", "-1"]):
        code, _, err = run_cli(["optimize", sharp, "-o", out, "--calib", calib_tokens, *PRUNE_ARGS, *flags], capsys)
        assert code == 2 and "--heal-" in err and not out.exists(), (flags, err)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"heal_steps": "many"}))
    code, _, err = run_cli(["optimize", sharp, "-o", out, "--calib", calib_tokens, *PRUNE_ARGS, "--config", config], capsys)
    assert code == 2 and "heal_steps" in err and not out.exists(), err
    config.write_text(json.dumps({"heal_steps": 2, "heal_precision": "fp8"}))
    code, _, err = run_cli(["optimize", sharp, "-o", out, "--calib", calib_tokens, *PRUNE_ARGS, "--config", config], capsys)
    assert code == 2 and "heal_precision" in err and not out.exists(), err


# --- optimize --heal: the measured recipe --------------------------------------------------

def _prepared(model, *flags):
    from graphresize.cli import options as cliopts
    from graphresize.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(argv := ["optimize", str(model), "--ratio", "0.3", *map(str, flags)])
    args.argv = argv
    return args, cliopts.prepare(args, parser)


def test_heal_recipe_fills_only_the_heal_flags_not_given(sharp, tmp_path):
    import json

    from graphresize.recover.recipe import HEAL_RECIPE

    recipe = HEAL_RECIPE.settings
    assert recipe["heal_steps"] > 0 and recipe["heal_tokens"] > 16384 and recipe["heal_lr"] > 0
    args, merge = _prepared(sharp)  # no --heal: healing stays off, --heal-* keep their flag defaults
    assert (args.heal_steps, args.heal_tokens, args.heal_lr, args.heal_batch_size) == (0, 0, 3e-4, 4)
    assert "heal_steps" not in merge.sources
    args, merge = _prepared(sharp, "--heal")
    assert {k: getattr(args, k) for k in recipe} == dict(recipe)
    assert all(merge.sources[k] == "recipe" for k in recipe)
    args, merge = _prepared(sharp, "--heal", "--heal-steps", 5, "--heal-lr", 1e-3)
    assert (args.heal_steps, args.heal_lr, args.heal_tokens) == (5, 1e-3, recipe["heal_tokens"])
    assert merge.sources["heal_steps"] == "cli" and merge.sources["heal_tokens"] == "recipe"
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"heal": True, "heal_tokens": 4096}))
    args, merge = _prepared(sharp, "--config", config)
    assert (args.heal_steps, args.heal_tokens) == (recipe["heal_steps"], 4096)
    with pytest.raises(UsageError, match="--heal-steps is 0"):
        _prepared(sharp, "--heal", "--heal-steps", 0)


def test_optimize_heal_runs_the_recipe_with_given_flags_winning(sharp, calib_tokens, tmp_path):
    """``--heal --heal-steps 3``: three steps at the recipe's learning rate on the recipe's
    (here: every) calibration window; the report says which settings came from the recipe."""
    import json

    from models import run_cli

    from graphresize.recover.recipe import HEAL_RECIPE

    out = tmp_path / "h.onnx"
    code, _, err = run_cli(["optimize", sharp, "-o", out, "--calib", calib_tokens, *PRUNE_ARGS, "--heal", "--heal-steps", "3",
                            "--heal-precision", "fp32"], _NoCapture())
    assert code == 0, err
    report = json.loads(out.with_name("h.report.json").read_text())
    assert report["heal"]["steps"] == 3 and report["heal"]["lr"] == HEAL_RECIPE.settings["heal_lr"]
    assert report["options"]["heal_tokens"] == HEAL_RECIPE.settings["heal_tokens"]
    assert report["config"]["sources"]["heal_tokens"] == "recipe" and report["config"]["sources"]["heal_steps"] == "cli"
    assert report["heal"]["kl_after"] < report["heal"]["kl_before"]


def test_heal_help_states_the_recipe():
    """``--help`` names the recipe's values without importing the recovery package (the parser
    is built before any heavy import; tests/test_hostile.py runs it in 150 MB)."""
    from graphresize.cli.config import subparser
    from graphresize.cli.main import build_parser
    from graphresize.recover.recipe import HEAL_RECIPE

    action = next(a for a in subparser(build_parser(), "optimize")._actions if a.dest == "heal")
    for key, value in HEAL_RECIPE.settings.items():
        assert f"--{key.replace('_', '-')} {value:g}" in action.help, (key, action.help)
