"""Who took part, round after round: the record behind a run's ``degraded`` status.

:class:`Participation` counts, for every node (one client per node) or virtual client
(packed mode), the rounds it was sampled in and the rounds it failed in (an error reply,
no reply in time, or a rejected reply), with the first error it gave. A run is
*degraded* when some node or client failed in every round it was sampled, or when some
round measured fewer than two clients although two or more were sampled
(:meth:`Participation.degraded`): the drift metrics then compare nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Tally:
    """One node's or client's record."""

    sampled: int = 0
    failed: int = 0
    first_error: str = ""


class Participation:
    """Sampled/failed counts per node or client, and the rounds that measured fewer than two clients."""

    def __init__(self, unit: str) -> None:
        self.unit = unit  # "node" or "client"
        self.tallies: dict[int, Tally] = {}
        self.thin_rounds: list[int] = []  # rounds with >= 2 sampled but < 2 measured

    def record(self, sampled, failed: dict[int, str]) -> None:
        """One round: every id in ``sampled`` took part; ``failed`` maps the ids that failed to their error."""
        for i in sampled:
            tally = self.tallies.setdefault(int(i), Tally())
            tally.sampled += 1
            if i in failed:
                tally.failed += 1
                tally.first_error = tally.first_error or (failed[i].strip().splitlines() or [""])[-1][:300]

    def record_measured(self, server_round: int, sampled: int, measured: int) -> None:
        """A round's measured count; fewer than two of two or more sampled makes the run degraded."""
        if sampled >= 2 and measured < 2:
            self.thin_rounds.append(int(server_round))

    def always_failed(self) -> list[dict]:
        """Each node or client that failed in every round it was sampled: id, counts, first error."""
        return [
            {self.unit: i, "rounds-sampled": t.sampled, "rounds-failed": t.failed, "first-error": t.first_error}
            for i, t in sorted(self.tallies.items())
            if t.sampled > 0 and t.failed == t.sampled
        ]

    def failing(self) -> list[dict]:
        """Each node or client that failed at least once (the summary lists them with their first error)."""
        return [
            {self.unit: i, "rounds-sampled": t.sampled, "rounds-failed": t.failed, "first-error": t.first_error}
            for i, t in sorted(self.tallies.items())
            if t.failed > 0
        ]

    def degraded(self) -> str:
        """Why the run is degraded ("" when it is not)."""
        reasons = []
        dead = self.always_failed()
        if dead:
            first = dead[0]
            reasons.append(
                f"{len(dead)} {self.unit}(s) failed in every round they were sampled ({self.unit} {first[self.unit]}: "
                f"{first['first-error'] or 'no reply'})"
            )
        if self.thin_rounds:
            reasons.append(
                f"fewer than 2 clients were measured in {len(self.thin_rounds)} round(s) (first: round "
                f"{self.thin_rounds[0]}): the drift metrics compare nothing there and are null"
            )
        return "; ".join(reasons)
