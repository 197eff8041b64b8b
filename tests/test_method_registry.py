"""Adding a method is one strategy class plus one registry line: a ``random`` selection
baseline, registered only here, runs through the CLI choices, option validation and the
pipeline like a built-in one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphresize
from graphresize.errors import UsageError
from graphresize.methods import registry
from graphresize.methods.base import Method
from graphresize.solve.transforms import ChannelTransform


class RandomSelection(Method):
    """Keep a seeded random subset of each MLP group's neurons; readers unchanged."""

    def check(self, options, kinds):
        if "residual" in kinds:
            raise UsageError("--method random selects MLP neurons only: use --target mlp")

    def solve_mlp(self, entry, stats, options):
        keep = np.sort(np.random.default_rng(options.seed).choice(entry.width, entry.new_width, replace=False))
        selection = np.zeros((entry.width, entry.new_width))
        selection[keep, np.arange(entry.new_width)] = 1.0
        return ChannelTransform(entry.group_id, selection, selection.T, method="random", info={"support": keep.tolist()})


@pytest.fixture
def random_method():
    registry.register(registry.MethodSpec("random", "keep random neurons (test baseline)", f"{__name__}:RandomSelection"))
    yield
    registry.unregister("random")


def test_registered_method_is_a_cli_choice(random_method):
    from graphresize.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["optimize", "m.onnx", "-o", "o.onnx", "--ratio", "0.5", "--method", "random"])
    assert args.method == "random"
    (optimize,) = [a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("optimize")]
    assert "random: keep random neurons" in " ".join(optimize.format_help().split())


def test_unregistered_method_is_refused(tmp_path):
    with pytest.raises(UsageError, match="unknown --method 'random'"):
        graphresize.optimize(tmp_path / "m.onnx", tmp_path / "o.onnx", ratio=0.5, method="random")


def test_random_method_runs_end_to_end(random_method, llama_dynamo, calib_tokens, tmp_path):
    with pytest.raises(UsageError, match="MLP neurons only"):
        graphresize.optimize(llama_dynamo, tmp_path / "o.onnx", ratio=0.5, method="random", calib=calib_tokens)
    result = graphresize.optimize(llama_dynamo, tmp_path / "o.onnx", ratio=0.5, target="mlp", method="random",
                                  calib=calib_tokens, tokens=2048, seq_len=32, progress=False)
    mlps = [e for e in result.plan.changed() if e.kind == "mlp"]
    assert len(mlps) == 2 and all(e.new_width == 64 for e in mlps)
    assert {t.method for t in result.transforms.values()} == {"random"}
    assert result.params_after < result.params_before
    # a random half of the neurons, readers not refit: the output moves, but stays finite
    assert 1e-3 < result.verification.relative_error < 10
    shapes = [tuple(t.dims) for t in onnx.load(tmp_path / "o.onnx").graph.initializer if len(t.dims) == 2]
    assert (64, 64) in shapes and not any(128 in s for s in shapes)  # MLP 128 -> 64 in every projection


def test_benchmark_rows_come_from_the_registry():
    rows = [row for spec in registry.specs() for row in spec.bench]
    assert {row["method"] for row in rows} == set(registry.names())
    assert len({row["label"] for row in rows}) == len(rows)
