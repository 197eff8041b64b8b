"""Publishing outputs (graphresize/io/publish.py): a reader of OUT.onnx sees the old model or the
new one, whole, never a graph beside another run's data, whatever is killed when; two runs to
one path without --overwrite: exactly one wins; non-regular paths are never written."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from tiny_graphs import VOCAB, calib_tokens, mlp_lm

from graphresize.cli.main import main
from graphresize.io import modelio, publish
from graphresize.io.modelio import file_sha256

ROOT = Path(__file__).resolve().parent.parent
OPT = ["--ratio", "0", "--ratio-mlp", "0.5", "--tokens", "512", "--seq-len", "16", "-q"]
IDS = np.arange(24).reshape(2, 12) % VOCAB


def _logits(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": IDS})[0]


def _external(src: Path, folder: Path) -> Path:
    """``src`` stored with external data in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / src.name
    ir.save(ir.load(src), out, external_data=src.name + ".data", size_threshold_bytes=0)
    return out


def _locations(path: Path) -> set[str]:
    values = ir.load(path).graph.initializers.values()
    return {v.const_value.location for v in values if isinstance(v.const_value, ir.ExternalTensor)}


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two different models (seeds 1 and 2) stored with external data."""
    root = tmp_path_factory.mktemp("publish_pair")
    return tuple(_external(mlp_lm(root / f"m{s}.onnx", seed=s), root / f"ext{s}") for s in (1, 2))


# ------------------------------------------------------------------------- kill during the save

_KILLER = textwrap.dedent(
    """
    import json, os, shutil, sys
    sys.path.insert(0, {root!r})
    from graphresize.io import modelio
    old, new, root, overwrite = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    old_model, new_model = modelio.load_model(old), modelio.load_model(new)
    hooked = ("rename", "replace", "link", "unlink", "rmdir")
    statuses = []
    for step in range(1, 40):
        target = os.path.join(root, f"k{{step}}", "out.onnx")
        os.mkdir(os.path.dirname(target))
        if overwrite:
            modelio.save_model_atomic(old_model, target)
        pid = os.fork()
        if pid == 0:  # the child saves and is killed at its step-th file operation
            calls = [0]

            def hook(real):
                def call(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == step:
                        os._exit(9)  # killed: no cleanup, no finally
                    return real(*args, **kwargs)
                return call

            for name in hooked:
                setattr(os, name, hook(getattr(os, name)))
            shutil.rmtree = hook(shutil.rmtree)
            modelio.save_model_atomic(new_model, target, overwrite=overwrite)
            os._exit(0)
        statuses.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        if statuses[-1] == 0:
            break
    print(json.dumps(statuses))
    """
)


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_kill_at_every_file_operation_leaves_old_or_new_whole(pair, tmp_path, overwrite, monkeypatch):
    """The save is killed at its k-th rename/link/unlink/rmtree, for every k until it completes
    (one forked child per k). Afterwards OUT.onnx is absent (nothing was there) or computes
    exactly the old or the new model's logits, and the next publish's clean-up leaves only
    OUT.onnx and its own data."""
    import json

    old, new = pair
    want_old, want_new = _logits(old), _logits(new)
    script = tmp_path / "killer.py"
    script.write_text(_KILLER.format(root=str(ROOT)))
    runs = tmp_path / "runs"
    runs.mkdir()
    proc = subprocess.run([sys.executable, str(script), str(old), str(new), str(runs), "1" if overwrite else "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    statuses = json.loads(proc.stdout)
    assert statuses[-1] == 0 and set(statuses[:-1]) == {9} and len(statuses) >= 4, statuses
    monkeypatch.setattr(publish, "FRESH_SECONDS", 0)
    seen = {"old": 0, "new": 0, "absent": 0}
    for step in range(1, len(statuses) + 1):
        folder = runs / f"k{step}"
        out = folder / "out.onnx"
        if not out.exists():
            assert not overwrite
            seen["absent"] += 1
        else:
            got = _logits(out)
            if np.array_equal(got, want_new):
                seen["new"] += 1
            else:
                np.testing.assert_array_equal(got, want_old, err_msg=f"step {step}: neither the old nor the new model")
                seen["old"] += 1
        publish.clean_stale(out, modelio._data_files_of)
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted({"out.onnx", *_locations(out)} if out.exists() else set()), (step, names)
    assert seen["new"] >= 1 and (seen["old"] if overwrite else seen["absent"]) >= 1, seen


# ------------------------------------------------------------------------- two runs, one output

_RACER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from graphresize.io import publish
    from graphresize.cli.main import main
    barrier, args = Path(sys.argv[1]), sys.argv[2:]
    real = publish.publish_model

    def after_everyone_checked(*a, **kw):  # both runs are past every early check, then race
        (barrier / str(os.getpid())).touch()
        deadline = time.time() + 60
        while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.01)
        return real(*a, **kw)

    publish.publish_model = after_everyone_checked
    raise SystemExit(main(args))
    """
)


@pytest.mark.parametrize("overwrite", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_two_processes_writing_one_output(pair, tmp_path, overwrite):
    """Without --overwrite exactly one run succeeds and the other ends with 'already exists',
    taking its data back; with it both succeed. Either way OUT.onnx computes what one of the
    two runs computed, with that run's data."""
    src = pair[0]
    calib = calib_tokens(tmp_path / "tokens.npy")
    script = tmp_path / "racer.py"
    script.write_text(_RACER.format(root=str(ROOT)))
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "small.onnx"
    extra = ["--overwrite"] if overwrite else []
    procs = [
        subprocess.Popen([sys.executable, str(script), str(barrier), "optimize", str(src), "-o", str(out), "--calib", str(calib),
                          "--seed", str(seed), "--no-report", *OPT, *extra], stderr=subprocess.PIPE, text=True)
        for seed in (1, 2)
    ]
    codes = [p.wait(timeout=300) for p in procs]
    errs = [p.stderr.read() for p in procs]
    if overwrite:
        assert codes == [0, 0], errs
    else:
        assert sorted(codes) == [0, 1], errs
        loser = errs[codes.index(1)]
        assert "already exists" in loser and len(loser.strip().splitlines()) == 1, loser
    # each seed's model, written alone
    expected = []
    for seed in (1, 2):
        alone = tmp_path / f"alone{seed}" / "small.onnx"
        alone.parent.mkdir()
        assert main([str(a) for a in ["optimize", src, "-o", alone, "--calib", calib, "--seed", seed, "--no-report", *OPT]]) == 0
        expected.append(_logits(alone))
    got = _logits(out)
    assert any(np.array_equal(got, e) for e in expected)
    assert not np.array_equal(expected[0], expected[1])
    names = {p.name for p in out_dir.iterdir()}
    referenced = _locations(out)
    assert not any(n.startswith(".") for n in names), names  # no temporary left
    if not overwrite:
        assert names == {"small.onnx", *referenced}  # the loser took its data back
    else:
        assert names - {"small.onnx", *referenced} <= {n for n in names if n.endswith(".data")} and len(names) <= 3


def test_exclusive_publish_loses_to_a_file_created_after_the_check(tmp_path):
    """The 'already exists' check holds at the moment of publishing, not only at start."""
    model = modelio.load_model(mlp_lm(tmp_path / "m.onnx"))
    out = tmp_path / "o" / "out.onnx"
    out.parent.mkdir()
    real = publish.publish_file

    def late_writer(tmp, target, *, overwrite):
        target.write_bytes(b"someone else")
        return real(tmp, target, overwrite=overwrite)

    publish.publish_file = late_writer
    try:
        with pytest.raises(publish.InputError, match="already exists"):
            modelio.save_model_atomic(model, out, overwrite=False)
    finally:
        publish.publish_file = real
    assert out.read_bytes() == b"someone else"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.onnx"]


# ------------------------------------------------------------------------- non-regular outputs


def _run(args) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
@pytest.mark.parametrize("kind", ["fifo", "devnull", "link_to_devnull", "socket"])
def test_non_regular_outputs_are_refused(kind, extra, pair, tmp_path, capsys):
    calib = calib_tokens(tmp_path / "tokens.npy")
    out = tmp_path / "out.onnx"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "devnull":  # a null device of our own: a regression must not replace the system's
        try:
            os.mknod(out, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("mknod needs privileges here (the link case covers devices)")
    elif kind == "link_to_devnull":
        out.symlink_to("/dev/null")
    else:
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(out))
    mode = os.stat(out).st_mode
    before = sorted(p.name for p in tmp_path.iterdir())
    code = _run(["optimize", pair[0], "-o", out, "--calib", calib, "--no-report", *OPT, *extra])
    err = capsys.readouterr().err
    assert code == 1 and "is not a regular file" in err and len(err.strip().splitlines()) == 1, err
    assert os.stat(out).st_mode == mode and not stat.S_ISREG(mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_a_fifo_report_path_is_refused_before_the_run(extra, pair, tmp_path, capsys):
    calib = calib_tokens(tmp_path / "tokens.npy")
    os.mkfifo(tmp_path / "r.json")
    code = _run(["optimize", pair[0], "-o", tmp_path / "out.onnx", "--calib", calib, "--report", tmp_path / "r.json", *OPT, *extra])
    err = capsys.readouterr().err
    assert code == 1 and "is not a regular file" in err, err
    assert not (tmp_path / "out.onnx").exists() and stat.S_ISFIFO(os.stat(tmp_path / "r.json").st_mode)


def test_an_existing_report_is_refused_without_overwrite(pair, tmp_path, capsys):
    calib = calib_tokens(tmp_path / "tokens.npy")
    (tmp_path / "out.report.json").write_text("{}")
    code = _run(["optimize", pair[0], "-o", tmp_path / "out.onnx", "--calib", calib, *OPT])
    assert code == 1 and "out.report.json: already exists" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists() and (tmp_path / "out.report.json").read_text() == "{}"
    assert _run(["optimize", pair[0], "-o", tmp_path / "out.onnx", "--calib", calib, "--overwrite", *OPT]) == 0
    assert (tmp_path / "out.report.json").read_text() != "{}"


# ------------------------------------------------------------------------- leftovers of killed runs


def test_stale_temp_folders_of_dead_runs_are_removed(pair, tmp_path, monkeypatch):
    """Leftovers named like ours with a dead pid (or too old) go; a live run's and anything
    not named like ours stay; the graph's own data stays."""
    out = tmp_path / "out.onnx"
    modelio.save_model_atomic(modelio.load_model(pair[0]), out)
    (data,) = _locations(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".out.onnx.grtmp.0123456789ab.{dead}"
    stale.mkdir()
    (stale / "out.onnx").write_bytes(b"x" * 1000)
    orphan = tmp_path / "out.onnx.0123456789ab.data"
    orphan.write_bytes(b"y")
    live = tmp_path / f".out.onnx.grtmp.ba9876543210.{os.getppid()}"
    live.mkdir()
    live_data = tmp_path / "out.onnx.ba9876543210.data"
    live_data.write_bytes(b"z")
    foreign = [tmp_path / ".out.onnx.abcdefgh", tmp_path / "out.onnx.notmine.data", tmp_path / "other.onnx.0123456789ab.data"]
    for path in foreign:
        path.write_bytes(b"keep")
    legacy = tmp_path / ".out.onnx.k3x_9q2a"  # an earlier version's mkdtemp folder, two days old
    legacy.mkdir()
    (legacy / "out.onnx.data").write_bytes(b"x" * 100)
    os.utime(legacy, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    young = tmp_path / ".out.onnx.aaaaaaaa"  # the same, an hour old: kept
    young.mkdir()
    os.utime(young, (time.time() - 3600, time.time() - 3600))
    foreign.append(young)
    monkeypatch.setattr(publish, "FRESH_SECONDS", 0)
    removed = publish.clean_stale(out, modelio._data_files_of)
    assert sorted(removed) == sorted([stale, orphan, legacy])
    assert all(p.exists() for p in [out, tmp_path / data, live, live_data, *foreign])
    np.testing.assert_array_equal(_logits(out), _logits(pair[0]))


def test_the_next_save_cleans_up_after_a_killed_one(pair, tmp_path, monkeypatch):
    """The cleanup runs as part of every save to the path."""
    out = tmp_path / "out.onnx"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".out.onnx.grtmp.0123456789ab.{dead}"
    stale.mkdir()
    (stale / "out.onnx.0123456789ab.data").write_bytes(b"x" * 1000)
    modelio.save_model_atomic(modelio.load_model(pair[1]), out, overwrite=False)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.onnx", *_locations(out)])


def test_input_files_untouched(pair, tmp_path):
    before = {p: file_sha256(p) for p in pair[0].parent.iterdir()}
    modelio.save_model_atomic(modelio.load_model(pair[0]), tmp_path / "x.onnx")
    assert {p: file_sha256(p) for p in pair[0].parent.iterdir()} == before
