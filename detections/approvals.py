"""Human approvals of one delegation, as of t (DESIGN.md, "Decision semantics", "Approval").

Pure. :class:`ApprovalHistory` holds every ``approval_decided`` of one delegation (tenant,
principal, agent_id); :meth:`ApprovalHistory.status` gives, for a call of ``server/tool`` with an
arguments digest at t and the approvals already used by earlier calls, the :class:`ApprovalStatus`:
the deny that denies it, or the approval that would authorise it, or neither.

Choices where DESIGN is silent:

1. Several ``approval_decided`` with the same ``approval_id`` (of one delegation) are versions of one
   approval: the latest with ``event_time <= t`` (a tie: the larger event_id) is the approval at t,
   and only it is a candidate. A use is per approval_id, so a re-published approval stays used.
2. An approval with ``expires_at`` not after its own ``event_time`` is never a candidate (no t
   satisfies both ``event_time <= t`` and ``t < expires_at``).
"""

from __future__ import annotations

import bisect
from collections.abc import Container, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from schemas import ApprovalDecided

__all__ = ["ApprovalHistory", "ApprovalStatus"]


def _order(event: ApprovalDecided) -> tuple[datetime, str]:
    return (event.event_time, event.event_id)


def _candidate_order(event: ApprovalDecided) -> tuple[datetime, str]:
    """DESIGN: "by event_time, then larger approval_id" is later; earliest-issued, then smallest id first."""
    return (event.event_time, event.approval_id)


@dataclass(frozen=True)
class ApprovalStatus:
    """What approvals say about one call at t.

    ``denied``: the latest candidate, when it is a ``deny``; ``available``: otherwise the
    earliest-issued unused ``approve`` candidate (then the smallest approval_id), or None;
    ``candidates``: how many candidates there were (used ones included).
    """

    denied: ApprovalDecided | None = None
    available: ApprovalDecided | None = None
    candidates: int = 0


NONE: Final = ApprovalStatus()


class ApprovalHistory:
    """Every ``approval_decided`` of one delegation (tenant, principal, agent_id)."""

    def __init__(self, tenant: str, principal: str, agent_id: str) -> None:
        self.tenant: Final = tenant
        self.principal: Final = principal
        self.agent_id: Final = agent_id
        self._by_tool: dict[str, dict[str, list[ApprovalDecided]]] = {}
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[ApprovalDecided]:
        facts = [e for by_id in self._by_tool.values() for versions in by_id.values() for e in versions]
        return iter(sorted(facts, key=_order))

    def add(self, event: ApprovalDecided) -> bool:
        """Store a decision; False if its event_id is already stored."""
        if not isinstance(event, ApprovalDecided):
            raise TypeError(f"not an approval: {type(event).__name__}")
        if (event.tenant, event.principal, event.agent_id) != (self.tenant, self.principal, self.agent_id):
            msg = (
                f"approval for delegation {event.tenant}/{event.principal}/{event.agent_id} added to history of "
                f"{self.tenant}/{self.principal}/{self.agent_id}"
            )
            raise ValueError(msg)
        if event.event_id in self._ids:
            return False
        self._ids.add(event.event_id)
        # Versions of one approval_id are kept under every tool they name; the version at t is
        # chosen among all of them (see versions_at), so keep one list per approval_id, shared.
        shared = self._versions_of(event.approval_id)
        bisect.insort(shared, event, key=_order)
        self._by_tool.setdefault(event.tool, {})[event.approval_id] = shared
        return True

    def _versions_of(self, approval_id: str) -> list[ApprovalDecided]:
        for by_id in self._by_tool.values():
            found = by_id.get(approval_id)
            if found is not None:
                return found
        return []

    def candidates(self, tool: str, digest: str, t: datetime) -> list[ApprovalDecided]:
        """Candidate approvals of a call of ``tool`` (``server/tool``) whose arguments hash to ``digest``,
        at t, ordered earliest-issued first (then the smallest approval_id)."""
        by_id = self._by_tool.get(tool)
        if not by_id:
            return []
        out: list[ApprovalDecided] = []
        for versions in by_id.values():
            n = bisect.bisect_right(versions, t, key=lambda e: e.event_time)
            if n == 0:
                continue
            v = versions[n - 1]
            if v.tool != tool or (v.arguments_digest is not None and v.arguments_digest != digest):
                continue
            if v.expires_at is not None and not t < v.expires_at:
                continue
            out.append(v)
        out.sort(key=_candidate_order)
        return out

    def status(self, tool: str, digest: str, t: datetime, used: Container[str] = ()) -> ApprovalStatus:
        """The :class:`ApprovalStatus` of a call at t, given the approval ids earlier calls used."""
        found = self.candidates(tool, digest, t)
        if not found:
            return NONE
        if found[-1].decision == "deny":
            return ApprovalStatus(denied=found[-1], candidates=len(found))
        for approval in found:
            if approval.decision == "approve" and approval.approval_id not in used:
                return ApprovalStatus(available=approval, candidates=len(found))
        return ApprovalStatus(candidates=len(found))
