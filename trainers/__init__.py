"""One module per trainer; each registers itself in `harness.registry.trainers`."""
