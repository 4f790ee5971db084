"""The tracker's warning and error types."""

from __future__ import annotations

__all__ = ["SalienceWarning", "TrackerStateError"]


class SalienceWarning(UserWarning):
    """Something the tracker could not observe or had to drop."""


class TrackerStateError(RuntimeError):
    """The tracker was used out of order (no reading yet, detached) or given an incompatible state."""
