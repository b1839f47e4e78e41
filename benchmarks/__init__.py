"""One module per benchmark; each registers itself in `harness.registry.benchmarks`."""
