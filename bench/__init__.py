"""Benchmarks against real peers; they print tables and never run in CI."""
