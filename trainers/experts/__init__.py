"""Experts (judges) for self-training; each registers itself in `medvqa.registry.experts`."""
