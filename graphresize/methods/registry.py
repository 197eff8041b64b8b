"""The one list of resizing methods: ``--method`` choices, option validation, the report and the
benchmark rows all read it.

A method is declared by one ``MethodSpec`` line below (or ``register(...)`` from elsewhere,
as the tests do): its name, a one-line help, the ``"module:Class"`` of its strategy (imported
only when a run uses it, so ``--help`` stays fast) and its benchmark rows. The strategy class
implements :class:`graphresize.methods.base.Method`.
"""

from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One ``--method``: ``name``, ``help`` (a phrase for ``--help``), ``strategy``
    (``"package.module:Class"``) and ``bench`` (benchmark rows: ``OptimizeOptions`` keyword
    arguments plus a ``label``, see ``benchmarks/methods.py``)."""

    name: str
    help: str
    strategy: str
    bench: tuple[dict, ...] = ()


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` (a new name, or replace one of the same name) and return it."""
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Every registered method name, in declaration order (the first is the default)."""
    return tuple(_REGISTRY)


def specs() -> tuple[MethodSpec, ...]:
    return tuple(_REGISTRY.values())


def get(name: str):
    """The strategy object of method ``name`` (its module imported now); KeyError if unknown."""
    module, _, attr = _REGISTRY[name].strategy.partition(":")
    return getattr(importlib.import_module(module), attr)()


# name, help, strategy, benchmark rows: one line per method.
register(MethodSpec("dotresize", "merge neurons by optimal transport (default)", "graphresize.methods.dotresize:DotResize",
                    ({"label": "dotresize-mlp", "method": "dotresize", "target": "mlp"},
                     {"label": "dotresize-residual", "method": "dotresize", "target": "residual", "unmerge": "pinv"},
                     {"label": "dotresize-all", "method": "dotresize", "target": "all"})))
register(MethodSpec("prune", "prune by activation norm", "graphresize.methods.prune:Prune",
                    ({"label": "prune-mlp", "method": "prune", "target": "mlp"},
                     {"label": "prune-all", "method": "prune", "target": "all"},
                     {"label": "prune-mlp+heads", "method": "prune", "target": "mlp", "head_ratio": 0.34, "head_method": "query"},
                     # recovery by distillation (README "Recovery (healing)"; ~15-25 min of healing on 2 shared
                     # cores): 96 steps of 4 windows drawn from 32,768 calibration tokens; 0.2 and 0.3 only
                     {"label": "prune-mlp+heal96", "method": "prune", "target": "mlp", "heal_steps": 96, "heal_lr": 3e-4,
                      "heal_tokens": 32768, "ratios": (0.2, 0.3)},
                     # the CLI default recipe (methods/defaults.py): one budget of block parameters
                     {"label": "prune-global", "method": "prune", "target": "mlp", "allocation": "global"},
                     # the best measured row (benchmarks/heal.md): 192 steps over 65,536 calibration tokens
                     {"label": "prune-global+heal192", "method": "prune", "target": "mlp", "allocation": "global",
                      "heal_steps": 192, "heal_lr": 3e-4, "heal_tokens": 65536, "ratios": (0.2, 0.3)},
                     # issue 19's two points (benchmarks/heal.md "Two parameter counts"): 20% and 30% of
                     # the 134.5M parameters removed (107.6M / 94.15M, tied count): the uniform row at that
                     # count, the default recipe one-shot, and the default recipe + optimize --heal
                     {"label": "prune-mlp-20/30%", "method": "prune", "target": "mlp", "ratios": (0.34, 0.51)},
                     {"label": "prune-global-20/30%", "method": "prune", "target": "mlp", "allocation": "global",
                      "ratios": (0.254, 0.38)},
                     {"label": "prune-global+heal", "method": "prune", "target": "mlp", "allocation": "global",
                      "heal_steps": 256, "heal_lr": 3e-4, "heal_tokens": 262144, "ratios": (0.254, 0.38)})))
register(MethodSpec("pca", "rotate the residual stream by its principal directions (pca, residual only)",
                    "graphresize.methods.pca:PCA", ({"label": "pca-residual", "method": "pca", "target": "residual"},)))
register(MethodSpec("disp", "let each block read/write its own subset of the full-width stream, in whole 8-feature blocks "
                    "(Gather on the block axis; MLP groups use dotresize)",
                    "graphresize.methods.disp:Disp", ({"label": "disp", "method": "disp", "target": "residual"},)))
register(MethodSpec("disp-free", "disp with free subsets of single features (DISP-LLM's granularity): element-wise "
                    "GatherElements, about twice the index-node time", "graphresize.methods.disp:DispFree",
                    ({"label": "disp-free", "method": "disp-free", "target": "residual"},)))
register(MethodSpec("disp-nested", "disp with nested subsets (prefixes of one feature order): the stream permuted once, then "
                    "Slice/Pad only; faster, lower one-shot quality", "graphresize.methods.disp:DispNested",
                    ({"label": "disp-nested", "method": "disp-nested", "target": "residual"},)))
register(MethodSpec("dotresize+disp", "rotate the stream into its principal basis first and give every block a prefix of it "
                    "(nested subsets: Slice/Pad only)", "graphresize.methods.dotresize_disp:DotResizeDisp",
                    ({"label": "dotresize+disp", "method": "dotresize+disp", "target": "residual"},)))
register(MethodSpec("slicegpt", "one principal basis per norm junction with shortcut matrices on the skips (SliceGPT; residual only)",
                    "graphresize.methods.slicegpt:SliceGPT", ({"label": "slicegpt", "method": "slicegpt", "target": "residual", "stats_cache": None},)))
