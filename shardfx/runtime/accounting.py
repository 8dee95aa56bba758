"""Counts of collectives and bytes, kept per rank by every communicator."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class CommStats:
    calls: Counter = field(default_factory=Counter)  # kind -> number of collectives
    volume: Counter = field(default_factory=Counter)  # kind -> bytes, ZeRO-paper unit (collectives.volume_bytes)
    sent: Counter = field(default_factory=Counter)  # kind -> bytes this rank sends with ring algorithms

    def record(self, kind: str, volume: int, world: int) -> None:
        self.calls[kind] += 1
        self.volume[kind] += volume
        # ring: each rank sends (N-1)/N of the volume
        self.sent[kind] += volume * (world - 1) // world if world > 1 else 0

    def record_p2p(self, kind: str, nbytes: int) -> None:
        """A send (its bytes leave this rank) or a receive (they arrive)."""
        self.calls[kind] += 1
        self.volume[kind] += nbytes
        if kind == "send":
            self.sent[kind] += nbytes

    def reset(self) -> None:
        self.calls.clear()
        self.volume.clear()
        self.sent.clear()

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {"calls": dict(self.calls), "volume": dict(self.volume), "sent": dict(self.sent)}
