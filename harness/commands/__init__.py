"""One module per `medvqa` command; `harness.cli` discovers them. Keep top-level imports light."""
