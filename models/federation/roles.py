"""The one role vocabulary of a federation: what a certificate, a bundle, a hello and a site policy say a site is."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["SiteRole"]


class SiteRole(StrEnum):
    """trainer ⊃ evaluator ⊃ node: a trainer may also evaluate and pull, an evaluator pull, a node only pulls."""

    TRAINER = "trainer"
    EVALUATOR = "evaluator"
    NODE = "node"

    def permits(self, requested: SiteRole | str) -> bool:
        """True when `requested` is this role or a narrower one: a hello or a policy narrows, never widens."""
        return _RANK[SiteRole(requested)] <= _RANK[self]


_RANK = {SiteRole.NODE: 0, SiteRole.EVALUATOR: 1, SiteRole.TRAINER: 2}
