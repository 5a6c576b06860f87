"""
Python's cycle collector, tuned for a server that holds many connections.

CPython frees most objects by reference counting; its cycle collector runs
as objects are allocated. The young generation is collected every 700 net
allocations, and a full collection runs when the old generation has grown
by a quarter since the last one. A server holding 10,000 connections keeps
about 350,000 collector-tracked objects alive (Autobahn's and Twisted's
per-connection state, txwssec's timers and buckets): each full collection
visits all of them, 160-380 ms on one core during which no frame is read,
no close is sent and no timer fires. Under churn (a burst of sessions
expiring, a wave of reconnections) the young collections, and with them the
full ones, come often.

L{tune_collector} does what long-running Python servers commonly do after
start-up: one full collection, then C{gc.freeze()} of what survives (modules,
classes, the configuration, the factory: alive as long as the process, so
never worth visiting again), and a young-generation threshold of 50,000
allocations instead of 700. Full collections become rarer (they still run,
with CPython's own rule, and still free every cycle); young ones cost a few
milliseconds each. txwssec's own connections hold no reference cycle (see
L{txwssec._cycles}), so they never wait for a collection to be freed.

C{twistd wssec} applies it when the service starts (C{[server]
gc_young_threshold}, 0 leaves the collector as Python set it).
"""

from __future__ import annotations

import gc

#: The young-generation threshold C{twistd wssec} uses by default.
DEFAULT_YOUNG_THRESHOLD = 50_000


def tune_collector(young_threshold: int = DEFAULT_YOUNG_THRESHOLD) -> int:
    """
    Collect, freeze the survivors, and collect the young generation every
    C{young_threshold} net allocations (the middle and old generations keep
    their thresholds).

    Call it once, when the application has started (its modules imported,
    its configuration loaded): what is alive then is never scanned again,
    so anything meant to be freed later must not be alive yet.

    @return: the number of objects frozen.
    """
    if young_threshold < 1:
        raise ValueError("young_threshold must be at least 1")
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)
    return gc.get_freeze_count()
