"""
C{[server] workers}: one C{twistd wssec} on every core of a machine. The
process started by twistd becomes a supervisor (L{Supervisor}) of N worker
processes (L{WorkerRole}) that share each service listener with
C{SO_REUSEPORT} (L{txwssec.reuseport}). See docs/deployment.rst.
"""

from __future__ import annotations

from txwssec.workers.supervisor import Supervisor
from txwssec.workers.worker import WorkerRole

__all__ = ["Supervisor", "WorkerRole"]
