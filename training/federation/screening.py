"""Screening: every update of a round is checked against the others before aggregation (design.md §7), so that one
broken or hostile site cannot wreck the model.

In order, each check over the updates that passed the ones before:
1. its case count: above the site's declared dataset size (`coordinator declare`) or the plan's cap it would own
   FedAvg's weights (n_k / n): a site claiming 10⁶ cases;
2. what the rule itself needs (`Strategy.refusal`, e.g. softmax by validation loss needs val_dice);
3. its norm: ‖w_k − w‖ above `max_norm_ratio` times the median of the others' (a ×100 scaled update). Only a norm
   far above is refused: a small change moves the aggregate little;
4. its direction: the cosine of w_k − w with the mean of the others' changes below `min_cosine`, and with most of
   the others' one by one (a sign-flipped update). The second condition keeps an honest site from being refused
   because a flipped update cancels the others' mean (three sites, one flipped); between two updates neither is
   the odd one out, so this check needs three.

The changes are compared through their Gram matrix, summed a block of elements at a time in float64 (no float64 copy
of an update); integer tensors (normalization counters) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from training.federation.aggregation import SUM_BLOCK, SiteUpdate, Strategy

SCREENING_COMMENTS = {
    "max_norm_ratio": "refuse an update whose change from the global weights has a norm above this many times the "
                      "median of the others'",
    "min_cosine": "refuse an update whose change points away from the others' (cosine below this with their mean "
                  "and with most of them; needs three updates)",
    "max_cases": "refuse an update reporting more local training cases than this (and more than its site declared)",
}


@dataclass(frozen=True)
class ScreeningLimits:
    """The plan's `[federation.screening]` table."""

    max_norm_ratio: float = 10.0
    min_cosine: float = 0.0
    max_cases: int = 100_000

    def __post_init__(self) -> None:
        ratio, cosine, cases = self.max_norm_ratio, self.min_cosine, self.max_cases
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 1 < ratio < math.inf:
            raise ValueError(f"federation.screening.max_norm_ratio: must be a number > 1, got {ratio!r}")
        if isinstance(cosine, bool) or not isinstance(cosine, (int, float)) or not -1 <= cosine <= 1:
            raise ValueError(f"federation.screening.min_cosine: must be a number in [-1, 1], got {cosine!r}")
        if isinstance(cases, bool) or not isinstance(cases, int) or cases < 1:
            raise ValueError(f"federation.screening.max_cases: must be an integer ≥ 1, got {cases!r}")
        object.__setattr__(self, "max_norm_ratio", float(ratio))
        object.__setattr__(self, "min_cosine", float(cosine))

    @classmethod
    def from_table(cls, table: Any) -> ScreeningLimits:
        if not isinstance(table, Mapping):
            raise ValueError(f"federation.screening: must be a table, got {table!r}")
        unknown = sorted(set(table) - {field.name for field in fields(cls)})
        if unknown:
            raise ValueError(f"plan: unknown key(s) in [federation.screening]: {', '.join(unknown)}")
        return cls(**table)


def screen(global_weights: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate], limits: ScreeningLimits,
           declared_cases: Mapping[str, int], rule: Strategy) -> dict[str, str]:
    """Why each refused update is refused, by site (the others pass)."""
    refused: dict[str, str] = {}
    for update in updates:
        reason = case_count_refusal(update.num_cases, declared_cases.get(update.site), limits.max_cases)
        reason = reason or rule.refusal(update)
        if reason:
            refused[update.site] = reason
    remaining = [update for update in updates if update.site not in refused]
    if len(remaining) < 2:
        return refused
    gram = change_gram(global_weights, remaining)
    norms = np.sqrt(np.diag(gram))
    for k, update in enumerate(remaining):
        typical = float(np.median(np.delete(norms, k)))
        if typical > 0 and norms[k] > limits.max_norm_ratio * typical:
            refused[update.site] = (f"its change from the global weights has norm {norms[k]:.3g}, "
                                    f"{norms[k] / typical:.3g}× the median of the others' ({typical:.3g}; the plan "
                                    f"allows {limits.max_norm_ratio:g}×)")
    keep = [k for k, update in enumerate(remaining) if update.site not in refused]
    if len(keep) < 3:
        return refused
    kept = gram[np.ix_(keep, keep)]
    count, row_sums, total = len(keep), kept.sum(axis=1), kept.sum()
    kept_norms = np.sqrt(np.diag(kept))
    for i, k in enumerate(keep):
        # Δ_k · mean of the others = (Σ_j G_kj − G_kk)/(K−1); ‖Σ_{j≠k} Δ_j‖² = Σ G − 2 Σ_j G_kj + G_kk.
        others_norm = math.sqrt(max(total - 2 * row_sums[i] + kept[i, i], 0.0)) / (count - 1)
        scale = kept_norms[i] * others_norm
        if scale == 0:
            continue
        cosine = (row_sums[i] - kept[i, i]) / (count - 1) / scale
        pairwise = [kept[i, j] / (kept_norms[i] * kept_norms[j]) for j in range(count)
                    if j != i and kept_norms[j] > 0]
        against = sum(value < limits.min_cosine for value in pairwise)
        if cosine < limits.min_cosine and 2 * against > count - 1:
            refused[remaining[k].site] = (f"its change from the global weights points away from the others' "
                                          f"(cosine {cosine:.2f} with their mean, below {limits.min_cosine:g} with "
                                          f"{against} of {count - 1})")
    return refused


def case_count_refusal(num_cases: int, declared: int | None, cap: int) -> str | None:
    """Why a reported case count is not believed, or None."""
    if num_cases > cap:
        return f"it reports {num_cases} training cases, above the plan's cap of {cap}"
    if declared is not None and num_cases > declared:
        return f"it reports {num_cases} training cases, above its declared dataset size of {declared}"
    return None


def change_gram(global_weights: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]) -> np.ndarray:
    """G_ij = Δ_i · Δ_j over the floating-point tensors, Δ_k = w_k − w (float64, a block at a time)."""
    gram = np.zeros((len(updates), len(updates)), np.float64)
    changes = np.empty((len(updates), SUM_BLOCK), np.float64)
    for name, reference in global_weights.items():
        if not np.issubdtype(reference.dtype, np.floating):
            continue
        base = np.asarray(reference).reshape(-1)
        sources = [np.asarray(update.weights[name]).reshape(-1) for update in updates]
        for start in range(0, base.size, SUM_BLOCK):
            stop = min(start + SUM_BLOCK, base.size)
            block = changes[:, : stop - start]
            for row, source in zip(block, sources):
                np.subtract(source[start:stop], base[start:stop], out=row, dtype=np.float64)
            gram += block @ block.T
    return gram


__all__ = ["SCREENING_COMMENTS", "ScreeningLimits", "case_count_refusal", "change_gram", "screen"]
