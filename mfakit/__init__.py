"""mfakit: convert Hugging Face MHA/GQA checkpoints into Multi-matrix Factorization Attention (MFA / MFA-KR).

The stages are subpackages: `mfakit.convert` (`convert`, `ConvertOptions`), `mfakit.finetune` (`finetune`,
`FinetuneOptions`) and `mfakit.eval` (`perplexity`, `kv_report`, `compare`). Importing mfakit registers the MFA
classes with transformers' Auto classes.
"""

from mfakit._version import __version__
from mfakit.model import MFAAttention, MFAConfig, MFAForCausalLM

__all__ = ["MFAAttention", "MFAConfig", "MFAForCausalLM", "__version__"]
