"""
L{txwssec.collector}: the cycle collector tuned for a server. It changes
the whole process's collector, so it runs in a child Python.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from processes import repo_env

CHILD = """
import gc, json
from txwssec.collector import tune_collector

class Cycle:
    pass

before = gc.get_threshold()
frozen = tune_collector(1234)
after_tuning = gc.get_threshold()
# A cycle made after the freeze is still collected.
cycle = Cycle()
cycle.self = cycle
del cycle
collected = gc.collect()
print(json.dumps({
    "before": before,
    "after": after_tuning,
    "frozen": frozen,
    "freeze_count": gc.get_freeze_count(),
    "collected": collected,
}))
"""


def test_tune_collector_freezes_and_sets_the_young_threshold() -> None:
    output = subprocess.run(
        [sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        check=True,
        env=repo_env(),
        timeout=60,
    ).stdout
    result = json.loads(output)
    assert result["before"] == [700, 10, 10]
    assert result["after"] == [1234, 10, 10]
    assert result["frozen"] > 1000  # at least the imported modules' objects
    assert result["freeze_count"] == result["frozen"]
    assert result["collected"] >= 1


def test_tune_collector_refuses_a_zero_threshold() -> None:
    from txwssec.collector import tune_collector

    with pytest.raises(ValueError, match="at least 1"):
        tune_collector(0)
