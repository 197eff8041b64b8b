"""The command line: ``graphresize analyze|optimize|export|eval`` (``main``), the pipeline-step
flags (``options``), ``--config`` files (``config``) and the JSON report (``report``)."""


def main(argv=None) -> int:
    """Entry point of the ``graphresize`` script (kept light: the stages import on use)."""
    from graphresize.cli.main import main as _main

    return _main(argv)
