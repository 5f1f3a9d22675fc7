"""Usage metering: one record per session, and reports per key and period.

Periods are calendar days or months in UTC, named ``2026-11-24`` or ``2026-11``;
the same ids name the audio-minutes quota periods.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

Period = Literal["day", "month"]


def period_id(period: Period, at: float | None = None) -> str:
    """The UTC day (``YYYY-MM-DD``) or month (``YYYY-MM``) containing ``at``."""
    stamp = time.gmtime(time.time() if at is None else at)
    return time.strftime("%Y-%m-%d" if period == "day" else "%Y-%m", stamp)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What one session used (written when the session ends)."""

    key_id: str
    key_name: str
    session_id: str
    provider: str
    model: str
    audio_seconds: float
    started_at: float
    ended_at: float
    close_reason: str


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Sessions and audio of one key in one period."""

    key_id: str
    key_name: str
    period: str
    sessions: int
    audio_seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["audio_seconds"] = round(self.audio_seconds, 3)
        out["audio_minutes"] = round(self.audio_seconds / 60, 3)
        return out


def format_report(rows: list[UsageRow]) -> str:
    """A plain table for the terminal."""
    lines = [f"{'key':<24} {'period':<10} {'sessions':>8} {'audio_min':>10}"]
    for row in rows:
        lines.append(
            f"{row.key_name[:24]:<24} {row.period:<10} {row.sessions:>8} "
            f"{row.audio_seconds / 60:>10.2f}"
        )
    return "\n".join(lines)
