"""The eval stage: perplexity, KV-cache accounting and comparison tables, on loaded models."""

from mfakit.eval.compare import compare
from mfakit.eval.kv import KVReport, kv_report
from mfakit.eval.ppl import PerplexityResult, evaluation_ids, perplexity

__all__ = ["KVReport", "PerplexityResult", "compare", "evaluation_ids", "kv_report", "perplexity"]
