"""Seed-paired accuracy differences and the issue-9 verdicts built on them (text and vision).

Every method of a table trains with the same seeds, and a seed fixes the batch order and the
head's initialisation for all of them, so two methods are compared seed by seed: the mean of the
per-seed differences and its Student-t interval say how much of a gap the seeds can confirm.
"""

from __future__ import annotations

from typing import Any

import torch

LEVEL = 0.95
ACCURACY_TARGETS = (("lora", "LoRA r=8", 0.5), ("adalora", "AdaLoRA", 0.0))
"""Issue 9's accuracy targets, each at ≤ LoRA r=8's parameters: (baseline method, its name, the
gap in points GeoLoRA must reach)."""
TARGET_ROWS = ("geolora", "geolora_budget")
"""The GeoLoRA rows the targets are checked for: the defaults, and an exact budget of LoRA r=8's
adapter parameters."""
DIAGNOSTICS = (
    ("geolora_rank8", "lora"),
    ("geolora", "geolora_rank8"),
    ("geolora", "lora_r4"),
    ("geolora_budget", "geolora_rank8"),
    ("geolora_rank8_scalar", "lora"),
    ("geolora_scalar", "lora"),
    ("geolora", "geolora_scalar"),
    ("geolora_scalar", "adalora"),
)
"""The paired gaps that say where a target row's gap comes from, as (row, against): GeoLoRA's step
at a fixed rank 8 against LoRA r=8 (the step alone), the defaults against that fixed rank (what the
rank rule costs or saves), the defaults against LoRA r=4 (LoRA at about the defaults' size), the
budget row against the fixed rank (the same size, ranks placed by the rule or uniform), the fixed
rank with the base rule ``riemannian_adam`` (the default until 2026-12-07) against LoRA r=8 (the
step under that rule), the defaults against the defaults with that rule (what the default rule
gains), and that row against LoRA r=8 and AdaLoRA."""
FIXED_RANK = {"r": 8, "r_min": 8, "r_max": 8}
SCALAR_RULE = {"base_rule": "riemannian_adam"}
GEOLORA_DIAGNOSTIC_ROWS = {
    "geolora_rank8": FIXED_RANK,
    "geolora_rank8_scalar": FIXED_RANK | SCALAR_RULE,
    "geolora_scalar": SCALAR_RULE,
}
"""The GeoLoRA rows of :data:`DIAGNOSTICS` and the options each sets on top of a table's GeoLoRA
defaults: LoRA r=8's rank with no rank decision (``r = r_min = r_max = 8``), the base rule
``riemannian_adam`` (one scalar second moment per adapter; the default until 2026-12-07), or
both."""
GEOLORA_DIAGNOSTIC_LABELS = {
    "geolora_rank8": "GeoLoRA, fixed rank 8 (no rank rule)",
    "geolora_rank8_scalar": "GeoLoRA, fixed rank 8, riemannian_adam",
    "geolora_scalar": "GeoLoRA, riemannian_adam",
}
"""The table label of each row of :data:`GEOLORA_DIAGNOSTIC_ROWS`."""


def paired_difference(
    a: dict[int, float], b: dict[int, float], level: float = LEVEL
) -> dict[str, Any]:
    """Accuracy ``a`` minus ``b`` in points, seed by seed over the seeds both ran: the
    differences, their mean, std (n−1) and the Student-t interval of the mean at ``level``,
    ``mean ± t_{(1+level)/2, n−1} · std / √n`` (``low``/``high`` are ``None`` below two seeds,
    ``mean`` with no common seed)."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    diffs = [100 * (a[s] - b[s]) for s in seeds]
    out: dict[str, Any] = {"seeds": seeds, "diffs": diffs, "mean": None, "std": None}
    out.update(low=None, high=None, level=level)
    if not diffs:
        return out
    t = torch.tensor(diffs, dtype=torch.float64)
    out["mean"] = float(t.mean())
    if len(diffs) > 1:
        out["std"] = float(t.std())
        quantile = float(stats.t.ppf((1 + level) / 2, len(diffs) - 1))
        half = quantile * out["std"] / len(diffs) ** 0.5
        out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out


def gap(name: str, other: str, diff: dict[str, Any]) -> str:
    """``name − other: +x pt paired over n seed(s), 95 % interval a … b`` from
    :func:`paired_difference` (no interval with one seed)."""
    interval = (
        f", {100 * diff['level']:g} % interval {diff['low']:+.2f} … {diff['high']:+.2f}"
        if diff["low"] is not None
        else ""
    )
    seeds = len(diff["seeds"])
    return f"{name} − {other}: {diff['mean']:+.2f} pt paired over {seeds} seed(s){interval}"


def verdict(name: str, other: str, diff: dict[str, Any], target: float, size_ratio: float) -> str:
    """One line: ``name − other`` from :func:`paired_difference`, at ``size_ratio`` × LoRA r=8's
    parameters, against a target gap of ``target`` points at ≤ 1× (met by the mean; the interval
    says whether the seeds confirm it)."""
    met = diff["mean"] >= target and size_ratio <= 1
    if diff["low"] is None:
        seeds_say = "one seed: no interval"
    elif diff["low"] > target:
        seeds_say = f"the interval lies above +{target:g}: confirmed by the seeds"
    elif diff["high"] < target:
        seeds_say = f"the interval lies below +{target:g}: missed beyond seed noise"
    else:
        seeds_say = f"the interval contains +{target:g}: within seed noise"
    return (
        f"- {gap(name, other, diff)}, at {size_ratio:.2f}× LoRA r=8's parameters (target "
        f"≥ +{target:g} pt at ≤ 1×: {'met' if met else 'missed'}; {seeds_say})."
    )


def target_verdicts(
    accs: dict[str, dict[int, float]], params: dict[str, float], labels: dict[str, str]
) -> list[str]:
    """:func:`verdict` for every row of :data:`TARGET_ROWS` against every baseline of
    :data:`ACCURACY_TARGETS` that ran; ``accs`` maps a row to its test accuracy by seed,
    ``params`` to its mean final parameters (the size ratio is against LoRA r=8's)."""
    if "lora" not in accs:
        return []
    out = []
    for row in (r for r in TARGET_ROWS if r in accs):
        for other, name, target in (t for t in ACCURACY_TARGETS if t[0] in accs):
            diff = paired_difference(accs[row], accs[other])
            out.append(verdict(labels[row], name, diff, target, params[row] / params["lora"]))
    return out


def diagnostic_gaps(
    accs: dict[str, dict[int, float]], params: dict[str, float], labels: dict[str, str]
) -> list[str]:
    """The paired gaps of :data:`DIAGNOSTICS` whose rows both ran, each with its size ratio
    (``accs``, ``params`` as in :func:`target_verdicts`)."""
    return [
        f"- {gap(labels[row], labels[other], paired_difference(accs[row], accs[other]))}, at "
        f"{params[row] / params[other]:.2f}× {labels[other]}'s parameters."
        for row, other in DIAGNOSTICS
        if row in accs and other in accs
    ]
