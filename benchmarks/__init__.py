"""Benchmarks of amalab against TRL: `python -m benchmarks` (see benchmarks/README.md)."""
