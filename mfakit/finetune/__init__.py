"""Fine-tuning converted models: distillation from the source, one process or many (torchrun)."""

from mfakit.finetune.train import FinetuneConfig, FinetuneError, FinetuneSummary, finetune

__all__ = ["FinetuneConfig", "FinetuneError", "FinetuneSummary", "finetune"]
