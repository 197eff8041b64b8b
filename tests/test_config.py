"""Config files for ``optimize --config``: values used, command line wins, bad keys refused."""

import json
from pathlib import Path

import pytest

from graphresize.cli import config
from graphresize.cli import options as cliopts
from graphresize.cli.main import build_parser, main
from graphresize.errors import InputError, UsageError
from graphresize.pipeline import OptimizeOptions

TOML = """
model = "in/model.onnx"
output = "/abs/small.onnx"
ratio = 0.25
calib = "text.txt"
tokens = 1024
seq-len = 32
seed = 5
provider = "cpu"
verify_tolerance = 0.5

[optimize]
holdout_windows = 3
kind_ratios = { mlp = 0.5 }
"""


def _prepare(argv):
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    merge = cliopts.prepare(args, build_parser())
    # what cmd_optimize builds from the arguments (the fields it maps explicitly)
    options = OptimizeOptions(
        ratio=args.ratio, calib=args.calib, tokens=args.tokens, seq_len=args.seq_len, seed=args.seed,
        kind_ratios={"mlp": args.ratio_mlp} if args.ratio_mlp is not None else {},
    )
    return args, merge, merge.finish(options)


@pytest.fixture
def toml_file(tmp_path):
    path = tmp_path / "resize.toml"
    path.write_text(TOML)
    return path


def test_file_values_fill_flags_and_fields(toml_file):
    args, merge, options = _prepare(["optimize", "--config", str(toml_file)])
    base = toml_file.parent
    assert args.model == base / "in" / "model.onnx"  # relative to the file's folder
    assert args.output == Path("/abs/small.onnx")
    assert (options.ratio, options.tokens, options.seq_len, options.seed) == (0.25, 1024, 32, 5)
    assert options.calib == base / "text.txt"
    assert options.holdout_windows == 3 and dict(options.kind_ratios) == {"mlp": 0.5}
    assert options.verify_tolerance == 0.5 and options.provider == "cpu"  # flags with no CLI mapping
    assert args.report == Path("/abs/small.report.json")
    effective = merge.effective(options)
    assert effective["sources"]["seq_len"] == "config" and effective["sources"]["batch_size"] == "default"
    assert effective["settings"]["holdout_windows"] == 3


def test_command_line_wins(toml_file):
    argv = ["optimize", "--config", str(toml_file), "--seed", "0", "--tokens", "2048", "--ratio-mlp", "0.4", "-o", "here.onnx"]
    args, merge, options = _prepare(argv)
    assert options.seed == 0  # given with its default value: still wins over the file's 5
    assert options.tokens == 2048 and args.output == Path("here.onnx")
    assert dict(options.kind_ratios) == {"mlp": 0.4}
    assert options.seq_len == 32  # not on the command line: from the file
    sources = merge.effective(options)["sources"]
    assert (sources["seed"], sources["tokens"], sources["seq_len"]) == ("cli", "cli", "config")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_json_and_yaml(tmp_path, suffix):
    data = {"model": "m.onnx", "output": "o.onnx", "ratio": 0.1, "seq_len": 16, "optimize": {"tokens": 64}}
    path = tmp_path / f"resize{suffix}"
    if suffix == ".yaml":
        yaml = pytest.importorskip("yaml")
        path.write_text(yaml.safe_dump(data))
    else:
        path.write_text(json.dumps(data))
    _, _, options = _prepare(["optimize", "--config", str(path)])
    assert (options.ratio, options.seq_len, options.tokens) == (0.1, 16, 64)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ratoi = 0.3", "unknown key 'ratoi' (did you mean 'ratio'?)"),
        ("[optimize]\nbogus_key = 1", "unknown key 'bogus_key'"),
        ("seq_len = 'x'", "config key 'seq_len': expected an integer"),
        ("seq_len = 1.5", "config key 'seq_len': expected an integer"),
        ("method = 'magic'", "'magic' is not one of"),
        ("overwrite = 1", "expected true or false"),
        ("kind_ratios = 0.3", "expected a table"),
        ("debug = true", "unknown key 'debug'"),
        ("ratio = ", "not valid TOML"),
    ],
)
def test_bad_config_is_usage_error(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    code = main(["optimize", "m.onnx", "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_missing_file_and_wrong_suffix(tmp_path, capsys):
    assert main(["optimize", "m.onnx", "-o", "o.onnx", "--ratio", "0.3", "--config", str(tmp_path / "none.toml")]) == 1
    assert "config file not found" in capsys.readouterr().err
    with pytest.raises(UsageError, match="must end in"):
        config.read_file(tmp_path / "resize.ini")
    with pytest.raises(InputError):
        config.read_file(tmp_path / "none.json")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["optimize", "-o", "o.onnx", "--ratio", "0.3"], "MODEL is required"),
        (["optimize", "m.onnx", "-o", "o.onnx"], "--ratio is required"),
    ],
)
def test_required_options(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_fields_are_read_from_the_dataclass():
    """Every OptimizeOptions field is a valid key, so fields added later need no change here."""
    import dataclasses

    fields = config.option_types()
    assert set(fields) == {f.name for f in dataclasses.fields(OptimizeOptions)}
    assert config.coerce_field("x", {"mlp": 1}, fields["kind_ratios"], Path(".")) == {"mlp": 1.0}
    assert config.coerce_field("x", None, fields["tokenizer"], Path(".")) is None
    assert config.coerce_field("x", "t", fields["tokenizer"], Path("/b")) == Path("/b/t")
    with pytest.raises(UsageError):
        config.coerce_field("x", "many", fields["tokens"], Path("."))


def test_default_report_path():
    assert cliopts.default_report_path(Path("d/small.onnx")) == Path("d/small.report.json")
    assert cliopts.default_report_path(Path("d/model")) == Path("d/model.report.json")
