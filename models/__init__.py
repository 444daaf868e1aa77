"""ember.models: the decoder transformer, converters (HF safetensors, GGUF, PEFT, bitsandbytes NF4),
tokenizer and generation."""

from ember.models.config import ModelConfig, RopeScaling
from ember.models.transformer import KVCache, Transformer

__all__ = ["KVCache", "ModelConfig", "RopeScaling", "Transformer"]
