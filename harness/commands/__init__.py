"""One module per `medvqa` command; `medvqa.cli` discovers them. Keep top-level imports light."""
