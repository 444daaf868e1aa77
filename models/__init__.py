"""ember.models: the decoder transformer, converters (HF safetensors, GGUF, PEFT, bitsandbytes NF4),
tokenizer and generation."""

from ember.models.config import ModelConfig, RopeScaling
from ember.models.generate import generate, generate_ids
from ember.models.gguf import import_gguf, load_gguf
from ember.models.gguf_export import save_gguf
from ember.models.hf import config_from_hf, config_to_hf
from ember.models.hf_backend import accelerate as accelerate_hf
from ember.models.hub import DEFAULT_MODEL, list_models, resolve_model
from ember.models.loading import load_pretrained, save_pretrained, save_state_dict
from ember.models.lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter
from ember.models.nf4 import Linear4bit, quantize_model_
from ember.models.prompt_tuning import (
    PromptTuningConfig,
    apply_prompt_tuning,
    load_prompt_adapter,
    save_prompt_adapter,
)
from ember.models.tokenizer import Tokenizer, load_tokenizer
from ember.models.transformer import KVCache, Transformer

__all__ = [
    "DEFAULT_MODEL",
    "import_gguf",
    "list_models",
    "load_gguf",
    "resolve_model",
    "KVCache",
    "Linear4bit",
    "LoRAConfig",
    "ModelConfig",
    "PromptTuningConfig",
    "RopeScaling",
    "Tokenizer",
    "Transformer",
    "accelerate_hf",
    "apply_lora",
    "apply_prompt_tuning",
    "config_from_hf",
    "config_to_hf",
    "generate",
    "generate_ids",
    "load_adapter",
    "load_prompt_adapter",
    "load_pretrained",
    "load_tokenizer",
    "merge_lora",
    "quantize_model_",
    "save_adapter",
    "save_gguf",
    "save_prompt_adapter",
    "save_pretrained",
    "save_state_dict",
]
