"""The command line: ``graphresize analyze|optimize|export|eval|bench`` (``main.main``, the
console script), the pipeline-step flags (``options``), ``--config`` files (``config``) and the
JSON report (``report``). Nothing heavy is imported here: the stages load on use."""
