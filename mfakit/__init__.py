"""mfakit: convert Hugging Face MHA/GQA checkpoints into Multi-matrix Factorization Attention (MFA / MFA-KR)."""

__version__ = "0.1.0"

from mfakit.model import MFAAttention, MFAConfig, MFAForCausalLM  # noqa: E402  (registers the Auto classes)


def convert(*args, **kwargs):
    """See `mfakit.convert.convert.convert`."""
    from mfakit.convert.convert import convert as _convert

    return _convert(*args, **kwargs)


__all__ = ["MFAAttention", "MFAConfig", "MFAForCausalLM", "convert", "__version__"]
