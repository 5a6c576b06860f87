"""
One C{/metrics} for all the workers: the Prometheus texts that each worker
exposes, merged into one by adding up the samples that have the same name
and labels (counters, gauges such as the open connections, and each bucket,
sum and count of a histogram). A C{_created} sample (when a series began)
is the earliest of the workers'.

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
