"""Real-data loaders that turn public data sets into the core feature tensors."""
