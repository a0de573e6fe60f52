"""trainer: consumes impressions from Kafka and trains HSNN online (see the pipeline issue)."""
