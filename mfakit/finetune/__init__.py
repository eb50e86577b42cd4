"""The finetune stage: distillation of a converted model from its source, one process or many (torchrun)."""

from mfakit.finetune.train import FinetuneError, FinetuneOptions, FinetuneSummary, finetune

__all__ = ["FinetuneError", "FinetuneOptions", "FinetuneSummary", "finetune"]
