"""Publishing output files so that no reader ever sees a partial file or another run's data.

Rules:

* a file is written under a temporary name in the target's folder and then made visible with
  one atomic call: ``os.replace`` with ``--overwrite``; without it a hard link
  (``os.link``), which fails when the name exists, so that of two runs racing for one path
  exactly one wins and the other ends with "already exists" (on a file system without hard
  links an ``O_EXCL`` placeholder is created first and then replaced: the claim still holds,
  but a reader may see an empty file for that instant);
* a path that exists and is not a regular file (a device, a named pipe, a socket, a folder;
  a symbolic link is judged by what it points to) is refused, with or without ``--overwrite``;
* a graph with external data is published as a unit (see :func:`publish_model`): its data
  files carry a name unique to the run (``OUT.onnx.<tag>.data``), the graph that names them
  is published last, and only then are the data files of the graph it replaced removed; a
  reader of ``OUT.onnx`` sees the old graph with the old data or the new graph with the new
  data, never a mix; a kill at any point leaves ``OUT.onnx`` as one of those two;
* temporary folders (``.OUT.onnx.grtmp.<tag>.<pid>``) and unpublished data files of runs that
  died (their process is gone, or they are older than ``STALE_SECONDS``) are removed by the
  next publish to the same path, and so are an earlier version's ``.OUT.onnx.XXXXXXXX``
  folders once a day old and holding only that graph's files; nothing else is touched.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from graphresize.errors import InputError

#: A temporary folder or data file older than this is stale even if its pid is alive again.
STALE_SECONDS = 7 * 24 * 3600
#: A temporary folder of graphresize 0.1.0 (no pid in its name) older than this is stale.
LEGACY_STALE_SECONDS = 24 * 3600
#: A data file published less than this long ago is never taken for an orphan.
FRESH_SECONDS = 60
_TMP_MARK = "grtmp"
_NO_LINK = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def check_target(path: Path, *, overwrite: bool, what: str = "") -> None:
    """Raise ``InputError`` when ``path`` exists and may not be replaced: it is not a regular
    file (never), or it is one and ``overwrite`` is off."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # absent (the folder is checked elsewhere)
        if os.path.islink(path):
            raise InputError(f"{path}: is a dangling symbolic link; remove it or choose another path") from None
        return
    except OSError as exc:
        raise InputError(f"{path}: cannot inspect ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{path}: is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{path}: is not a regular file ({_kind(info.st_mode)}); {what or 'outputs'} are only written to regular files")
    if not overwrite:
        raise InputError(f"{path}: already exists (pass --overwrite to replace it)")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def new_tag() -> str:
    """A name part unique to one publish: 12 random hex digits."""
    return secrets.token_hex(6)


def temp_dir(target: Path, tag: str) -> Path:
    """Create the temporary folder of one publish beside ``target``."""
    folder = target.parent / f".{target.name}.{_TMP_MARK}.{tag}.{os.getpid()}"
    try:
        folder.mkdir()
    except OSError as exc:
        raise InputError(f"{target}: cannot write ({exc.strerror or exc})") from None
    return folder


def publish_file(tmp: Path, target: Path, *, overwrite: bool) -> None:
    """Make the finished file ``tmp`` (same folder or file system as ``target``) visible as
    ``target`` in one step; ``tmp`` is gone afterwards, whatever happens."""
    try:
        check_target(target, overwrite=overwrite)
        if overwrite:
            os.replace(tmp, target)
            return
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise InputError(f"{target}: already exists (another run created it meanwhile; pass --overwrite to replace it)") from None
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            _claim_then_replace(tmp, target)
    except OSError as exc:
        raise InputError(f"{target}: cannot write ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _claim_then_replace(tmp: Path, target: Path) -> None:
    """Without hard links: create ``target`` exclusively (empty), then rename over it."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise InputError(f"{target}: already exists (another run created it meanwhile; pass --overwrite to replace it)") from None
    os.close(fd)
    os.replace(tmp, target)


def write_bytes(data: bytes, target: Path, *, overwrite: bool) -> None:
    """Write ``data`` to ``target`` under the rules above (a temporary file, then one step)."""
    tmp = target.parent / f".{target.name}.{_TMP_MARK}.{new_tag()}.{os.getpid()}"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(f"{target}: cannot write ({exc.strerror or exc})") from None
    publish_file(tmp, target, overwrite=overwrite)


def write_figure(fig, target: Path) -> Path | None:
    """A matplotlib figure as a PNG at ``target`` (replaced if it exists), whole or not at all
    under the rules above; None when ``target`` cannot take a regular file."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    try:
        write_bytes(buffer.getvalue(), Path(target), overwrite=True)
    except InputError:
        return None
    return Path(target)


def publish_model(tmp_dir: Path, target: Path, tag: str, *, overwrite: bool, old_data: Iterable[str], keep: Iterable[Path] = ()) -> list[Path]:
    """Publish the graph ``tmp_dir/<target.name>`` and its data files (every other file in
    ``tmp_dir``, already named with ``tag``) as ``target``; return the files published.

    Data files first (their names are new, so nothing a reader can open changes), the graph
    last; on a lost race the data files are taken back. ``old_data``: the data files named by
    the graph being replaced, removed after it is (never one of ``keep``, the input's files).
    """
    parent = target.parent
    data = sorted(p.name for p in tmp_dir.iterdir() if p.name != target.name)
    published: list[Path] = []
    try:
        for name in data:
            if (parent / name).exists() or os.path.islink(parent / name):
                raise InputError(f"{target}: {parent / name} exists already; cannot publish beside it")
            os.rename(tmp_dir / name, parent / name)
            published.append(parent / name)
        publish_file(tmp_dir / target.name, target, overwrite=overwrite)
    except BaseException:
        for path in published:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    keep = {Path(k).resolve() for k in keep}
    for name in set(old_data) - set(data):
        path = parent / name
        if path.resolve() not in keep:
            with contextlib.suppress(OSError):
                path.unlink()
    return [*published, target]


def data_name(target: Path, tag: str) -> str:
    """The external data file name of one publish of ``target``: ``OUT.onnx.<tag>.data``
    (onnx_ir names shards ``OUT-0000i-of-0000n.onnx.<tag>.data``)."""
    return f"{target.name}.{tag}.data"


def clean_stale(target: Path, referenced: Callable[[Path], set[str]]) -> list[Path]:
    """Remove what earlier publishes to ``target`` that died left beside it: their temporary
    folders and files, and data files of theirs that the graph now at ``target`` does not
    read (``referenced(target)``: the names it reads). A leftover belongs to a dead run when
    its pid no longer exists (on this machine) or it is older than ``STALE_SECONDS``. Returns
    what was removed.

    Order matters under concurrency: live runs are found first, the graph is read after, so a
    run that finished in between has its graph read (and its data kept)."""
    parent = target.parent if str(target.parent) else Path(".")
    tmp_re = re.compile(rf"^\.{re.escape(target.name)}\.{_TMP_MARK}\.([0-9a-f]{{12}})\.(\d+)$")
    whole = rf"(?:{re.escape(target.name)}|{re.escape(target.stem)}-\d+-of-\d+{re.escape(target.suffix)})"
    data_re = re.compile(rf"^{whole}\.([0-9a-f]{{12}})\.data$")  # OUT.onnx.<tag>.data, OUT-0000i-of-0000n.onnx.<tag>.data
    legacy_re = re.compile(rf"^\.{re.escape(target.name)}\.[a-z0-9_]{{8}}$")  # mkdtemp folders of graphresize <= 0.1.0
    removed: list[Path] = []
    live_tags = set()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        found = tmp_re.match(entry.name)
        if found is None:
            if legacy_re.match(entry.name) and _legacy_leftover(entry, target):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
            continue
        if _alive(int(found.group(2))) and not _old(entry):
            live_tags.add(found.group(1))
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        removed.append(path)
    names = referenced(target)
    for entry in entries:
        found = data_re.match(entry.name)
        if found is None or entry.name in names or found.group(1) in live_tags:
            continue
        try:  # a rename sets ctime: a data file renamed moments ago may belong to a run not seen above
            if not entry.is_file(follow_symlinks=False) or time.time() - entry.stat(follow_symlinks=False).st_ctime < FRESH_SECONDS:
                continue
        except OSError:
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _legacy_leftover(entry: os.DirEntry, target: Path) -> bool:
    """An earlier version's temporary folder: a folder older than ``LEGACY_STALE_SECONDS``
    holding only the graph and its data files (no pid to ask, so age alone decides)."""
    try:
        if not entry.is_dir(follow_symlinks=False) or time.time() - entry.stat(follow_symlinks=False).st_mtime < LEGACY_STALE_SECONDS:
            return False
        names = os.listdir(entry.path)
    except OSError:
        return False
    return all(n.startswith(target.name) or n.startswith(target.stem + "-") for n in names)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def _old(entry: os.DirEntry) -> bool:
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_SECONDS
    except OSError:
        return True
