"""The MFA / MFA-KR model: config, attention and causal LM, registered with transformers' Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from mfakit.model.modeling_mfa import MFAAttention, MFAConfig, MFAForCausalLM

AutoConfig.register(MFAConfig.model_type, MFAConfig, exist_ok=True)
AutoModelForCausalLM.register(MFAConfig, MFAForCausalLM, exist_ok=True)

__all__ = ["MFAAttention", "MFAConfig", "MFAForCausalLM"]
