"""What the benchmarks share, and tools only tests and benchmarks use (they are not part of the runtime package)."""
