"""
One C{/metrics} for all the workers: the Prometheus texts that each worker
exposes, merged into one by adding up the samples that have the same name
and labels (counters, gauges such as the open connections, and each bucket,
sum and count of a histogram). A C{_created} sample (when a series began)
is the earliest of the workers'.

A worker that ends takes its counts with it, and a sum of the live workers
only would go down, which Prometheus reads as a counter reset. L{Scrapes}
keeps the last counter and histogram samples (C{_total}, C{_bucket},
C{_sum}, C{_count}) scraped from each worker process and, once the process
has ended, adds them to every later merge: each merged counter only grows.
Gauges (the open connections) are not carried over.

Why not C{prometheus_client}'s multiprocess mode: it keeps every metric in
files of a shared directory, written on every update, and cannot read the
live per-session traffic that L{txwssec.ops.metrics} reads at scrape time.
The workers' own registries stay as they are; the supervisor asks each at
scrape time (a few kilobytes over a UNIX socket, per worker).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

_Key = tuple[str, tuple[tuple[str, str], ...]]


class _Merged:
    """A registry collector that yields the merged families."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def merge(texts: Iterable[str]) -> list[Metric]:
    """The metric families of C{texts}, their samples added up."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[_Key, float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif sample.name.endswith("_created"):
                    samples[key] = min(samples[key], sample.value)
                else:
                    samples[key] += sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


def merged_text(texts: Iterable[str], *registries: CollectorRegistry) -> bytes:
    """
    The Prometheus text of C{texts} merged, followed by the metrics of
    C{registries} (the supervisor's own).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(merge(texts)))
    return generate_latest(registry) + b"".join(generate_latest(r) for r in registries)


#: The samples of a worker that ended that L{Scrapes} keeps adding.
CARRIED_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")
#: The metric types whose samples only grow.
CARRIED_TYPES = ("counter", "histogram", "summary")


def counters(text: str) -> str:
    """The counter and histogram samples of a Prometheus text (no gauges)."""
    registry = CollectorRegistry(auto_describe=False)
    kept = []
    for family in text_string_to_metric_families(text):
        if family.type not in CARRIED_TYPES:
            continue
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        for sample in family.samples:
            if sample.name.endswith(CARRIED_SUFFIXES):
                copy.add_sample(sample.name, sample.labels, sample.value)
        kept.append(copy)
    registry.register(_Merged(kept))
    return generate_latest(registry).decode("utf-8")


class Scrapes:
    """
    The workers' texts of each scrape, with the counts of the worker
    processes that ended (see the module docstring).
    """

    def __init__(self) -> None:
        #: Per worker slot: the pid and the counters of its last answer.
        self._last: dict[int, tuple[int, str]] = {}
        #: The counters of every worker process that ended, added up.
        self._ended = ""

    def texts(self, answers: Iterable[tuple[int, int | None, str | None]]) -> list[str]:
        """
        The texts to merge for one scrape: C{answers} are each worker's
        slot, its pid when asked (None: not running) and its text (None:
        no answer). A slot's earlier process, now ended, has its last
        counters kept; a running one that did not answer stands in with its
        last counters.
        """
        texts = []
        for index, pid, text in answers:
            last = self._last.get(index)
            if last is not None and last[0] != pid:
                del self._last[index]
                self._ended = counters(merged_text([self._ended, last[1]]).decode("utf-8"))
                last = None
            if text is not None and pid is not None:
                self._last[index] = (pid, counters(text))
                texts.append(text)
            elif last is not None:
                texts.append(last[1])
        if self._ended:
            texts.append(self._ended)
        return texts
