"""
The state store: what must become shareable across processes and machines
(connection counts per client address and per consumer, the rate buckets a
consumer's connections share, the failure lockout, tickets, revocations,
the session list), behind one interface (L{IStateStore}, L{StateStore}).

L{MemoryStore} keeps it all in this process, as txwssec always did; a
second backend (Redis) implements the same interface and passes the same
contract tests (tests/test_store.py).
"""

from txwssec.store.interface import CountView, IStateStore, StateStore
from txwssec.store.memory import MemoryStore

__all__ = ["CountView", "IStateStore", "MemoryStore", "StateStore"]
