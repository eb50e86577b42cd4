"""The convert stage: a source checkpoint in, an MFA / MFA-KR checkpoint out (`convert`), and GGUF import."""

from mfakit.convert.plan import PLAIN_METHOD, BudgetError, ConversionMethod, ConvertOptions
from mfakit.convert.recipe import ConvertSummary, convert

__all__ = ["PLAIN_METHOD", "BudgetError", "ConversionMethod", "ConvertOptions", "ConvertSummary", "convert"]
