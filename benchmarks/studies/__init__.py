"""Design studies: one-off questions answered once (their answers and commands are in docs/benchmarks.md)."""
