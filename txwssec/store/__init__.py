"""
The state store: what must become shareable across processes and machines
(connection counts per client address and per consumer, the rate buckets a
consumer's connections share, the failure lockout, tickets, revocations,
the session list), behind one interface (L{IStateStore}, L{StateStore}).

L{MemoryStore} keeps it all in this process, as txwssec always did;
L{txwssec.store.redis.RedisStore} shares it through Redis (C{[state]
backend = "redis"}, L{txwssec.store.settings}). That module is not imported
here: txredisapi is optional, and importing it installs the global reactor.
"""

from txwssec.store.interface import CountView, IStateStore, StateStore
from txwssec.store.memory import MemoryStore

__all__ = ["CountView", "IStateStore", "MemoryStore", "StateStore"]
