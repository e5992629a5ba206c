"""Maintained timings: the benchmarks docs/benchmarks.md keeps current (a GPU session reruns them)."""
