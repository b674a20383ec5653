"""Decayed service per user, for the fair policy (CFS's vruntime, with a half-life): tokens a
user was given keep counting after their jobs end, and fade so that old usage is forgiven."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

HALF_LIFE_S = 60.0   # a user's past service halves every minute


@dataclass
class Usage:
    half_life: float = HALF_LIFE_S
    served: dict[str, float] = field(default_factory=dict)
    last: float = field(default_factory=time.monotonic)

    def decay(self, now: float | None = None) -> dict[str, float]:
        """Age every user's usage to now; return the table (users near zero are dropped)."""
        now = time.monotonic() if now is None else now
        factor = 0.5 ** ((now - self.last) / self.half_life)
        self.last = now
        self.served = {u: v * factor for u, v in self.served.items() if v * factor > 1e-3}
        return self.served

    def charge(self, user: str, tokens: int) -> None:
        self.served[user] = self.served.get(user, 0.0) + tokens
