"""Experts (judges) for self-training; each registers itself in `harness.registry.experts`."""
