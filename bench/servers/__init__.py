"""Peer echo servers for bench/bench.py (each runs as its own process)."""
