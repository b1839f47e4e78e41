"""One module per trainer; each registers itself in `medvqa.registry.trainers`."""
