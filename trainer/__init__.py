"""trainer: consumes impressions (and the item catalogue) from Kafka and trains HSNN online (docs/trainer.md)."""

from trainer.metrics import TrainerMetrics
from trainer.service import OnlineTrainer
from trainer.settings import TrainerSettings

__all__ = ["OnlineTrainer", "TrainerMetrics", "TrainerSettings"]
