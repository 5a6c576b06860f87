"""
Benchmarks and stress tests for txwssec (see bench/README.rst).

A package so that C{twistd wssec} can load L{bench.stress_app} as a route's
C{app} when the repository root is on C{PYTHONPATH}.
"""
