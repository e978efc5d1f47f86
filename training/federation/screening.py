"""Screening: every update of a round is checked against the others before aggregation (design.md §7), so that one
broken or hostile site cannot wreck the model.

In order, each check over the updates that passed the ones before:
1. its case count: above the site's declared dataset size (`coordinator declare`) or the plan's cap it would own
   FedAvg's weights (n_k / n): a site claiming 10⁶ cases;
2. its normalization statistics: a negative running variance no training produces (it would make the aggregate's
   negative too);
3. what the rule itself needs (`Strategy.refusal`, e.g. softmax by validation loss needs val_dice);
4. its norm: ‖w_k − w‖ above `max_norm_ratio` times the median of the others' (a ×100 scaled update), for the
   learned parameters and for the normalization layers' running statistics apart. Only a norm far above is
   refused: a small change moves the aggregate little;
5. its direction: the cosine of the learned parameters' w_k − w with the mean of the others' changes below
   `min_cosine`, and with most of the others' one by one, while the others agree with each other (their mean
   pairwise cosine at least `min_cosine`): a sign-flipped update. The second condition keeps an honest site from
   being refused because a flipped update cancels the others' mean (three sites, one flipped); the third keeps
   honest sites whose changes all point apart (non-IID sites late in a run: three at cosines −0.01 to −0.09 with
   each other, benchmarks/hostile_site.py) from being refused all at once, which stalled the round and would have
   suspended every site. Between two updates neither is the odd one out, so this check needs three.

Why the running statistics are screened apart: they follow each site's image intensities rather than its loss, and
on a batch-normalized network their change outweighs the learned parameters' (×10–100 in norm on the tiny network:
benchmarks/hostile_site.py). Screened together, a ×100 change of the parameters alone passed the norm check, and an
honest site's statistics made its change look opposed to the others' (cosine −0.02: refused). Their direction is
not checked: honest sites' differ as their scanners do.

The changes are compared through their Gram matrices, summed a block of elements at a time in float64 (no float64
copy of an update); integer tensors (normalization counters) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from training.federation.aggregation import SUM_BLOCK, SiteUpdate, Strategy

# PyTorch's names of a normalization layer's running statistics (the last part of a state-dict key).
RUNNING_STATISTICS = ("running_mean", "running_var")
PARAMETERS, STATISTICS = "learned parameters", "normalization statistics"

SCREENING_COMMENTS = {
    "max_norm_ratio": "refuse an update whose change from the global weights has a norm above this many times the "
                      "median of the others' (learned parameters and normalization statistics apart)",
    "min_cosine": "refuse an update whose learned parameters' change points away from the others' (cosine below this "
                  "with their mean and with most of them; needs three updates)",
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
        reason = reason or statistics_refusal(update.weights) or rule.refusal(update)
        if reason:
            refused[update.site] = reason
    remaining = [update for update in updates if update.site not in refused]
    if len(remaining) < 2:
        return refused
    grams = change_grams(global_weights, remaining)
    for what, gram in grams.items():
        norms = np.sqrt(np.diag(gram))
        for k, ratio in enumerate(norm_ratios(gram)):
            if remaining[k].site not in refused and ratio > limits.max_norm_ratio:
                refused[remaining[k].site] = (
                    f"the change of its {what} from the global weights has norm {norms[k]:.3g}, {ratio:.3g}× the "
                    f"median of the others' ({norms[k] / ratio:.3g}; the plan allows {limits.max_norm_ratio:g}×)")
    keep = [k for k, update in enumerate(remaining) if update.site not in refused]
    if len(keep) < 3 or PARAMETERS not in grams:
        return refused
    with_mean, pairwise = cosines(grams[PARAMETERS][np.ix_(keep, keep)])
    for i, k in enumerate(keep):
        others = [j for j in range(len(keep)) if j != i]
        against = int(np.sum(pairwise[i, others] < limits.min_cosine))
        among_others = pairwise[np.ix_(others, others)][np.triu_indices(len(others), 1)]
        agreement = float(np.mean(among_others)) if np.isfinite(among_others).all() else math.nan
        if with_mean[i] < limits.min_cosine and 2 * against > len(others) and agreement >= limits.min_cosine:
            refused[remaining[k].site] = (f"the change of its {PARAMETERS} from the global weights points away from "
                                          f"the others' (cosine {with_mean[i]:.2f} with their mean, below "
                                          f"{limits.min_cosine:g} with {against} of {len(others)}; theirs "
                                          f"{agreement:.2f} with each other)")
    return refused


def change_grams(global_weights: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate]) -> dict[str, np.ndarray]:
    """The Gram matrices of the updates' changes: of the learned parameters, and of the normalization statistics
    where the model has any."""
    groups: dict[str, list[str]] = {PARAMETERS: [], STATISTICS: []}
    for name, value in global_weights.items():
        if np.issubdtype(value.dtype, np.floating):
            groups[STATISTICS if is_running_statistic(name) else PARAMETERS].append(name)
    return {what: change_gram(global_weights, updates, names) for what, names in groups.items() if names}


def norm_ratios(gram: np.ndarray) -> np.ndarray:
    """Each change's norm over the median of the others' norms (NaN where that median is 0)."""
    norms = np.sqrt(np.diag(gram))
    typical = np.array([np.median(np.delete(norms, k)) for k in range(len(norms))])
    return np.divide(norms, typical, out=np.full(len(norms), np.nan), where=typical > 0)


def cosines(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each change's cosine with the mean of the others' changes, and the pairwise cosines (NaN where a norm is 0)."""
    count, diagonal = len(gram), np.diag(gram)
    norms, row_sums = np.sqrt(diagonal), gram.sum(axis=1)
    # Δ_k · mean of the others = (Σ_j G_kj − G_kk)/(K−1); ‖Σ_{j≠k} Δ_j‖² = Σ G − 2 Σ_j G_kj + G_kk.
    others_norms = np.sqrt(np.maximum(gram.sum() - 2 * row_sums + diagonal, 0.0)) / (count - 1)
    scales = norms * others_norms
    with_mean = np.divide((row_sums - diagonal) / (count - 1), scales, out=np.full(count, np.nan), where=scales > 0)
    products = np.outer(norms, norms)
    pairwise = np.divide(gram, products, out=np.full(gram.shape, np.nan), where=products > 0)
    return with_mean, pairwise


def is_running_statistic(name: str) -> bool:
    """Whether a state-dict key names a normalization layer's running mean or variance."""
    return name.rsplit(".", 1)[-1] in RUNNING_STATISTICS


def statistics_refusal(weights: Mapping[str, np.ndarray]) -> str | None:
    """Why an update's normalization statistics cannot come from training (a negative running variance), or None."""
    for name, value in weights.items():
        if name.rsplit(".", 1)[-1] == "running_var" and bool((np.asarray(value) < 0).any()):
            return f"its normalization statistic {name} has negative variances"
    return None


def case_count_refusal(num_cases: int, declared: int | None, cap: int) -> str | None:
    """Why a reported case count is not believed, or None."""
    if num_cases > cap:
        return f"it reports {num_cases} training cases, above the plan's cap of {cap}"
    if declared is not None and num_cases > declared:
        return f"it reports {num_cases} training cases, above its declared dataset size of {declared}"
    return None


def change_gram(global_weights: Mapping[str, np.ndarray], updates: Sequence[SiteUpdate],
                names: Iterable[str] | None = None) -> np.ndarray:
    """G_ij = Δ_i · Δ_j over the floating-point tensors (those in `names` where given), Δ_k = w_k − w.

    A block of changes is taken and multiplied in float32 and the blocks' products are summed in float64: ≈ 1e-6
    relative, ample for limits like 10× and cosines, in a third of the time float64 took (≈ 0.1 s for three 5.7 M
    updates, while the round waits for its close)."""
    gram = np.zeros((len(updates), len(updates)), np.float64)
    changes = np.empty((len(updates), SUM_BLOCK), np.float32)
    for name in global_weights if names is None else names:
        reference = global_weights[name]
        if not np.issubdtype(reference.dtype, np.floating):
            continue
        base = np.asarray(reference).reshape(-1)
        sources = [np.asarray(update.weights[name]).reshape(-1) for update in updates]
        for start in range(0, base.size, SUM_BLOCK):
            stop = min(start + SUM_BLOCK, base.size)
            block = changes[:, : stop - start]
            for row, source in zip(block, sources):
                np.subtract(source[start:stop], base[start:stop], out=row, dtype=np.float32)
            gram += (block @ block.T).astype(np.float64)
    return gram


__all__ = ["SCREENING_COMMENTS", "ScreeningLimits", "case_count_refusal", "change_gram", "change_grams", "cosines",
           "is_running_statistic", "norm_ratios", "screen", "statistics_refusal"]
