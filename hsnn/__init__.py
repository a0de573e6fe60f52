"""HSNN, the model package every service shares: config, features (I2IF), monn, lti, model, training, index,
serving, weights and metrics. It imports no Kafka, Redis, HTTP or Prometheus (tests/test_layers.py)."""
