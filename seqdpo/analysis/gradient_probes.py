"""Gradient cosines between objectives with their reliability and an interval, from block gradients.

A probe set of n pairs of an objective is cut into K blocks (`np.array_split`, K = diagnostics.probe_blocks);
one backward pass per block gives the gradient g_b of the block's mean loss. Every number below is read
off the Gram matrix of all blocks of all objectives, G[u, v] = <g_u, g_v> (per parameter group), so
nothing larger than K x objectives gradients is held, and only while one probe runs:

    gradient of objective j     g_j = sum_b (n_b / n) g_b over j's blocks (= the gradient of the mean loss)
    cosine                      cos(g_i, g_j) = <g_i, g_j> / (|g_i| |g_j|)
    split-half cosine f_j       cos(g_j[S], g_j[S']) for a balanced split S | S' of j's blocks, averaged
                                over all such splits: what two independent halves of the SAME objective
                                agree on.
    reliability r_j             r = 2 f / (1 + f) (Spearman-Brown): the split-half agreement stepped up
                                to the full probe, an estimate of cos^2(g_j, its expectation). It is a
                                ceiling, not a floor: 1 = the probe measures the direction exactly; near 0
                                = the probe is noise, and so is any cosine between objectives measured
                                with it. None when f <= -1 or j has fewer than 2 blocks.
    interval                    95 % delete-one-block jackknife: c_(b) = the cosine without block b (of i or
                                of j), var = sum over i's blocks of (K_i - 1)/K_i (c_(b) - mean_i)^2 + the
                                same over j's, interval = c +- t(0.975, min(K_i, K_j) - 1) sqrt(var),
                                clipped to [-1, 1]. A percentile bootstrap is no good here: resampling
                                blocks with replacement adds noise to both gradients and pulls every
                                draw towards 0, so its interval can miss the point estimate.
                                The interval is the sampling spread at this probe size; the noise itself
                                also shrinks every cosine towards 0 (next line), which no interval fixes.
    corrected                   the cosine disattenuated for that shrinkage (Spearman's correction):
                                cos / sqrt(r_i r_j), an estimate of the cosine of the expected gradients.
                                Only when both reliabilities reach diagnostics.min_reliability (else None,
                                `corrected_status` "unreliable": the probe is too small to tell); a value
                                past +-1 (the reliabilities are themselves noisy) is clipped to +-1 and
                                flagged "clipped"; otherwise "ok".

Blocks rather than single pairs carry the interval because one backward pass per pair would multiply the
probe's cost by the block size; K = 8 blocks of 8 pairs is the default.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable

import numpy as np
import torch

from seqdpo.analysis import gradients as G
from seqdpo.analysis.intervals import t_quantile

TOTAL = "total"


def block_gradients(
    loss_fn: Callable[[list[dict]], torch.Tensor],
    params: dict[str, torch.nn.Parameter],
    features: list[dict],
    blocks: int,
) -> tuple[list[dict[str, torch.Tensor]], np.ndarray]:
    """(gradient of each block's mean loss, block sizes): one backward per block."""
    if len(features) == 0:
        raise ValueError("block_gradients needs at least one feature")
    idx = [b for b in np.array_split(np.arange(len(features)), min(blocks, len(features))) if len(b)]
    grads = [G.objective_gradient(loss_fn, params, [features[i] for i in b], len(b)) for b in idx]
    return grads, np.array([len(b) for b in idx], dtype=float)


class ProbeGram:
    """Gram matrices of the block gradients of several objectives: `total`, and per layer / module type."""

    def __init__(self, block_grads: dict[str, list[dict[str, torch.Tensor]]], sizes: dict[str, np.ndarray],
                 per_group: bool = False):
        self.objectives = list(block_grads)
        self.rows: dict[str, np.ndarray] = {}
        flat: list[dict[str, torch.Tensor]] = []
        for name in self.objectives:
            self.rows[name] = np.arange(len(flat), len(flat) + len(block_grads[name]))
            flat += block_grads[name]
        self.sizes = sizes
        self.gram: dict[str, np.ndarray] = {}
        keys = sorted(flat[0]) if flat else []
        for key in keys:
            x = torch.stack([g[key].double().flatten() for g in flat])
            gk = (x @ x.T).numpy()
            groups = [TOTAL]
            if per_group:
                layer, module = G.layer_of(key), G.module_type_of(key)
                groups += ([f"layer:{layer}"] if layer is not None else []) + ([f"module:{module}"] if module is not None else [])
            for grp in groups:
                self.gram[grp] = self.gram.get(grp, 0) + gk

    def _weights(self, name: str, blocks: np.ndarray | None = None) -> np.ndarray:
        """Row weights of the mean gradient of `name` over `blocks` (indices into its blocks; repeats allowed)."""
        w = np.zeros(sum(len(r) for r in self.rows.values()))
        blocks = np.arange(len(self.rows[name])) if blocks is None else np.asarray(blocks)
        np.add.at(w, self.rows[name][blocks], self.sizes[name][blocks])
        return w / w.sum()

    def cosine(self, a: str, b: str, group: str = TOTAL) -> float:
        return _cos(self.gram[group], self._weights(a), self._weights(b))

    def norm(self, name: str) -> float:
        w = self._weights(name)
        return math.sqrt(max(float(w @ self.gram[TOTAL] @ w), 0.0))

    def split_half(self, name: str) -> float | None:
        """Split-half cosine of `name` with itself, averaged over the balanced splits of its blocks."""
        k = len(self.rows[name])
        if k < 2:
            return None
        # Splits containing block 0 on the left enumerate each unordered split once.
        cos = [
            _cos(self.gram[TOTAL], self._weights(name, np.array(left)), self._weights(name, np.array(sorted(set(range(k)) - set(left)))))
            for left in itertools.combinations(range(k), k // 2)
            if 0 in left
        ]
        return float(np.nanmean(cos))

    def reliability(self, name: str) -> float | None:
        """Spearman-Brown reliability of the full probe's direction, 2 f / (1 + f) from the split-half cosine f."""
        f = self.split_half(name)
        return None if f is None or not f > -1 else 2 * f / (1 + f)

    def interval(self, a: str, b: str) -> tuple[float, float] | tuple[None, None]:
        """95 % delete-one-block jackknife interval of cos(g_a, g_b) (module docstring)."""
        ka, kb = len(self.rows[a]), len(self.rows[b])
        point = self.cosine(a, b)
        if min(ka, kb) < 2 or not math.isfinite(point):
            return None, None
        g, var = self.gram[TOTAL], 0.0
        for name, k, other in ((a, ka, self._weights(b)), (b, kb, self._weights(a))):
            drop = [_cos(g, self._weights(name, np.delete(np.arange(k), i)), other) for i in range(k)]
            var += (k - 1) / k * float(np.sum((np.array(drop) - np.mean(drop)) ** 2))
        half = _t975(min(ka, kb) - 1) * math.sqrt(var)
        return max(point - half, -1.0), min(point + half, 1.0)

    def groups(self, prefix: str) -> list[str]:
        return sorted((g[len(prefix) + 1 :] for g in self.gram if g.startswith(prefix + ":")), key=G.group_sort_key)


def _t975(df: int) -> float:
    return t_quantile(0.975, df)


def _cos(g: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    denom = math.sqrt(max(float(u @ g @ u), 0.0)) * math.sqrt(max(float(v @ g @ v), 0.0))
    return float(u @ g @ v) / denom if denom > 0 else float("nan")


def pair_cosines(gram: ProbeGram, current: str, earlier: set[str], min_reliability: float,
                 per_group: bool = False) -> dict[str, Any]:
    """{"<current>__<other>": {total, ci_low, ci_high, corrected, corrected_status, reliability: {current, other},
    earlier[, per_layer, per_module]}}."""
    out: dict[str, Any] = {}
    if current not in gram.rows:
        return out
    rel = {n: gram.reliability(n) for n in gram.objectives}
    for other in gram.objectives:
        if other == current:
            continue
        lo, hi = gram.interval(current, other)
        total = gram.cosine(current, other)
        value, status = corrected(total, rel[current], rel[other], min_reliability)
        res: dict[str, Any] = {
            "total": total, "ci_low": lo, "ci_high": hi, "corrected": value, "corrected_status": status,
            "reliability": {current: rel[current], other: rel[other]}, "earlier": other in earlier,
        }
        if per_group:
            for label, prefix in (("per_layer", "layer"), ("per_module", "module")):
                res[label] = {grp: gram.cosine(current, other, f"{prefix}:{grp}") for grp in gram.groups(prefix)}
        out[f"{current}__{other}"] = res
    return out


UNRELIABLE, CLIPPED, OK = "unreliable", "clipped", "ok"


def corrected(cos: float, rel_a: float | None, rel_b: float | None, min_reliability: float) -> tuple[float | None, str]:
    """(cos / sqrt(r_a r_b) bounded to [-1, 1], status) from the reliabilities r (module docstring)."""
    if rel_a is None or rel_b is None or min(rel_a, rel_b) < min_reliability or not math.isfinite(cos):
        return None, UNRELIABLE
    value = cos / math.sqrt(rel_a * rel_b)
    return (value, OK) if abs(value) <= 1 else (math.copysign(1.0, value), CLIPPED)


def mean_gradient(block_grads: list[dict[str, torch.Tensor]], sizes: np.ndarray) -> dict[str, torch.Tensor]:
    """The gradient of the mean loss over all blocks' pairs (block gradients weighted by block size)."""
    w = sizes / sizes.sum()
    return {k: sum(float(wi) * g[k] for wi, g in zip(w, block_grads)) for k in block_grads[0]}


def trace_steps(max_steps: int, points: int) -> list[int]:
    """`points` optimizer steps spread evenly over a stage of `max_steps` steps, both ends included."""
    if points <= 1 or max_steps <= 0:
        return [0]
    return sorted({round(i * max_steps / (points - 1)) for i in range(points)})
