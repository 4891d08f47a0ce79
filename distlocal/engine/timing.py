"""
Where a Ray stage's idle time went: waiting for the stage before it to finish the slide (starved), or moving the
finished activation to it (Ray's serialization, the copy, the deserialization before the step runs).

Each stage actor reports, per slide, when its step started, how long it had been idle before (wait_s) and when its
activation was ready to send (sent_at). Both parts of the wait were booked as wait_s, so a pipeline bound by
serialization looked starved.
"""

from __future__ import annotations

import itertools

__all__ = ["split_transfer"]


def split_transfer(row: list[dict]) -> list[dict]:
    """
    One slide's per-stage metrics with stage i+1's wait_s split into wait_s (stage i still working) and transfer_s
    (stage i's activation ready, not yet in stage i+1's step). Clocks of different nodes may differ by milliseconds:
    each part stays within [0, the whole wait].

    >>> split_transfer([{"sent_at": 10.0}, {"started_at": 13.0, "wait_s": 5.0}])[1]
    {'started_at': 13.0, 'wait_s': 2.0, 'transfer_s': 3.0}
    """
    for before, stage in itertools.pairwise(row):
        if "sent_at" not in before or "started_at" not in stage:
            continue
        waited = stage["wait_s"]
        idle_since = stage["started_at"] - waited
        transfer = min(max(stage["started_at"] - max(before["sent_at"], idle_since), 0.0), waited)
        stage["wait_s"], stage["transfer_s"] = waited - transfer, transfer
    return row
