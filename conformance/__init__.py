"""
Autobahn conformance runs for txwssec: ``python -m conformance`` (see
README.rst in this folder).
"""
