"""Errors that end a graphresize run with a one-line message and a documented exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # input/output problem: missing, corrupt or unwritable file
EXIT_USAGE = 2  # bad arguments (argparse uses 2 as well)
EXIT_UNSUPPORTED = 3  # the model cannot be resized (quantized, nothing to resize, ...)
EXIT_VERIFY = 4  # the rewritten graph does not load or run in ONNX Runtime


class GraphresizeError(Exception):
    """Base error: its message is printed as one line, its ``exit_code`` ends the process."""

    exit_code = EXIT_ERROR


class InputError(GraphresizeError):
    """An input or output path is missing, unreadable, corrupt or unsafe to write."""


class UsageError(GraphresizeError):
    """An option is out of range or options contradict each other."""

    exit_code = EXIT_USAGE


class UnsupportedModelError(GraphresizeError):
    """The model holds nothing this tool can resize, or a form it refuses to touch."""

    exit_code = EXIT_UNSUPPORTED


class VerificationError(GraphresizeError):
    """The rewritten graph failed to load or run in ONNX Runtime."""

    exit_code = EXIT_VERIFY


_OOM_MARKS = ("bad_alloc", "arena alloc failed", "failed to allocate", "cannot allocate memory", "out of memory", "failed to map segment")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out: ``MemoryError``, or a library's error that names it
    (ONNX Runtime's ``bad_alloc``, protobuf's "Arena alloc failed" while parsing, a shared
    library that could not be mapped under an address-space limit, ``ENOMEM``)."""
    if isinstance(exc, MemoryError) or getattr(exc, "errno", None) == 12:
        return True
    text = str(exc).lower()
    return any(mark in text for mark in _OOM_MARKS)
