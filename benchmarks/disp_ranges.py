"""How contiguous can one permutation of the residual stream make a DISP graph's subsets?

    python benchmarks/disp_ranges.py disp.onnx [--width 576]

RMSNorm is invariant under a permutation of the stream's features (the norm weight permutes
with them), so one permutation applied to the embedding, every reader's rows, every writer's
columns and the final norm changes no output. A subset read by ``GatherElements`` or written
by ``ScatterElements`` that becomes one contiguous range could be a ``Slice`` / ``Pad``; one
that becomes ``r`` ranges needs ``r`` slices and a ``Concat``. The number of ranges of all
subsets in a feature order is half the Hamming length of the path through the features'
membership vectors (with the empty vector at both ends), so the best order is a shortest
Hamiltonian path; this script reads the subsets from the graph's index constants, and prints
the ranges per subset in the graph's own order and in a nearest-neighbour + 2-opt order.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx_ir as ir


def index_sets(model: ir.Model, width: int) -> np.ndarray:
    """Membership (subsets × features) of every ``GatherElements``/``ScatterElements`` index
    constant (found on the index input or up its chain of producers)."""
    rows = []
    for node in model.graph:
        if node.op_type not in ("GatherElements", "ScatterElements"):
            continue
        value, found = node.inputs[1], None
        while found is None and value is not None:
            if value.const_value is not None:
                found = value.const_value.numpy()
                break
            producer = value.producer()
            if producer is None:
                break
            consts = [v.const_value.numpy() for v in producer.inputs if v is not None and v.const_value is not None]
            found = next((c for c in consts if c.dtype.kind == "i" and c.size > 1), None)
            value = producer.inputs[0] if producer.inputs else None
        if found is not None:
            rows.append(np.isin(np.arange(width), found.reshape(-1)))
    return np.array(rows, dtype=bool)


def ranges(members: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Contiguous ranges of each subset when the features are laid out in ``order``."""
    y = members[:, order].astype(np.int8)
    return y[:, 0] + ((y[:, 1:] == 1) & (y[:, :-1] == 0)).sum(axis=1)


def short_path(members: np.ndarray, starts: int = 8, seed: int = 0) -> np.ndarray:
    """A feature order of small total Hamming length: nearest neighbour from a few starts, then
    2-opt, with the empty vector fixed at both ends."""
    x = members.T.astype(np.int32)
    d = len(x)
    ham = np.zeros((d + 1, d + 1), dtype=np.int64)
    ham[:d, :d] = (x[:, None, :] != x[None, :, :]).sum(-1)
    ham[d, :d] = ham[:d, d] = x.sum(1)
    rng = np.random.default_rng(seed)
    best, best_len = None, None
    for start in [*np.argsort(x.sum(1))[: starts // 2], *rng.integers(0, d, starts - starts // 2)]:
        order, left = [int(start)], np.ones(d, dtype=bool)
        left[start] = False
        while left.any():
            cand = np.flatnonzero(left)
            nxt = int(cand[np.argmin(ham[order[-1], cand])])
            order.append(nxt)
            left[nxt] = False
        tour = np.array([d, *order, d])
        for _ in range(100):
            improved = False
            for i in range(1, d):
                a, b, c, e = tour[i - 1], tour[i], tour[i + 1 : d + 1], tour[i + 2 : d + 2]
                delta = ham[a, c] + ham[b, e] - ham[a, b] - ham[c, e]
                j = int(np.argmin(delta))
                if delta[j] < 0:
                    tour[i : i + j + 2] = tour[i : i + j + 2][::-1].copy()
                    improved = True
            if not improved:
                break
        length = int(ham[tour[:-1], tour[1:]].sum())
        if best_len is None or length < best_len:
            best, best_len = tour[1:-1].copy(), length
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--width", type=int, default=576, help="residual width (default 576, SmolLM2-135M)")
    args = parser.parse_args(argv)
    members = index_sets(ir.load(args.model), args.width)
    if not len(members):
        print("no GatherElements/ScatterElements index constants in this graph", file=sys.stderr)
        return 1
    distinct = len({tuple(c) for c in members.T})
    print(f"{len(members)} index subsets of {args.width} features, {distinct} distinct feature membership vectors")
    for name, order in (("graph order", np.arange(args.width)), ("shortest-path order", short_path(members))):
        r = ranges(members, order)
        print(f"{name}: ranges per subset mean {r.mean():.1f}, median {np.median(r):.0f}, max {r.max()}; "
              f"one range {int((r == 1).sum())}, at most 3 ranges {int((r <= 3).sum())}; total {int(r.sum())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
