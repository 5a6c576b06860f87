"""
Operations: what an operator scripts against (docs/operations.rst).
The admin API (L{AdminResource}, L{admin_site}), the
Prometheus metrics (L{Metrics}) and the JSON log (L{JSONEventObserver},
L{JSONFormatter}), and their configuration (C{[admin]}, C{[log]}).

With the Python API::

    factory = SecureServerFactory(policy)
    metrics = Metrics(factory)
    site = admin_site(factory, metrics.registry, token_digest("s3cret..."))
    reactor.listenTCP(9900, site, interface="127.0.0.1")

C{twistd wssec} does the same from C{[admin]} and C{[log]} (see L{install}).
"""

from __future__ import annotations

from typing import Any

from txwssec.observers import TextLogObserver
from txwssec.ops.admin import AdminResource, AdminSite, admin_site, token_digest
from txwssec.ops.jsonlog import JSONEventObserver, JSONFormatter, jsonFileLogObserver, log_observer
from txwssec.ops.metrics import Metrics
from txwssec.ops.settings import AdminSettings, LogSettings


def use_json_log(factory: Any) -> JSONEventObserver:
    """
    Log C{factory}'s events as JSON events (L{JSONEventObserver}) in place
    of its text lines.
    """
    factory.events.observers[:] = [
        observer
        for observer in factory.events.observers
        if not isinstance(observer, TextLogObserver)
    ]
    observer = JSONEventObserver()
    factory.events.add(observer)
    return observer


def admin_for(factory: Any, settings: AdminSettings) -> AdminSite:
    """The admin site of C{factory} for C{[admin]}, with its metrics."""
    metrics = Metrics(factory)
    return admin_site(factory, metrics.registry, settings.token_digest)


__all__ = [
    "AdminResource",
    "AdminSettings",
    "AdminSite",
    "JSONEventObserver",
    "JSONFormatter",
    "LogSettings",
    "Metrics",
    "admin_for",
    "admin_site",
    "jsonFileLogObserver",
    "log_observer",
    "token_digest",
    "use_json_log",
]
