"""Tiny random-weight models of real architectures, built offline for tests.

``build_tiny_model(arch, path)`` saves a float32 model (safetensors), the kvserve
byte-level tokenizer (``kvserve.demo.build_byte_tokenizer``) and a
``generation_config.json`` into ``path`` and returns it.  Everything is
deterministic (fixed seed per architecture) and nothing is downloaded.

Random models with the default init (std 0.02) have almost flat logits, so greedy
decoding ties and degenerates into one repeated token.  To get varied, stable
greedy outputs the init std is raised (``initializer_range``) and all norm weights
are perturbed; Gemma2's embeddings are untied.
"""
from __future__ import annotations

import os

import torch

from kvserve.demo import build_byte_tokenizer

# Shared small sizes. vocab_size and the special token ids are filled in from the tokenizer.
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    initializer_range=0.3,
    tie_word_embeddings=False,
)

# arch name -> kwargs for AutoConfig.for_model(model_type, **kwargs) (model_type == arch name).
ARCHITECTURES: dict[str, dict] = {
    "llama": dict(_COMMON),
    "qwen2": dict(_COMMON),                      # q/k/v projections carry biases
    "qwen3": dict(_COMMON, head_dim=16),         # per-head q_norm / k_norm
    # Sliding window smaller than typical test sequences, so the window matters.
    "mistral": dict(_COMMON, head_dim=16, sliding_window=24),
    # Layer 0 slides (window 24), layer 1 is global; attention and final logit soft-capping on.
    "gemma2": dict(
        _COMMON,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=24,
        layer_types=["sliding_attention", "full_attention"],
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=False,               # tied + random -> one token forever
    ),
    # GPT-2: learned absolute positions, LayerNorm with bias, fused c_attn, no GQA (MHA only).
    "gpt2": dict(
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=128,
        n_positions=1024,
        initializer_range=0.3,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
    ),
    # Phi-3: fused qkv_proj and gate_up_proj.
    "phi3": dict(_COMMON, original_max_position_embeddings=2048, resid_pdrop=0.0, embd_pdrop=0.0),
}

# Std of the Gaussian noise added to every norm weight (and 1/3 of it to norm biases).
NORM_NOISE = 0.3
SEED = 20243


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def make_config(arch: str, tokenizer=None):
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    tokenizer = tokenizer or build_byte_tokenizer()
    kwargs = dict(ARCHITECTURES[arch])
    kwargs.update(
        vocab_size=_round_up(len(tokenizer), 64),   # ids >= len(tokenizer) have no token
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = AutoConfig.for_model(arch, **kwargs)
    config.dtype = torch.float32
    return config


def _perturb_norms(model, generator: torch.Generator) -> None:
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            cls = type(module).__name__.lower()
            if "norm" not in cls and not mod_name.split(".")[-1].startswith("ln_"):
                continue
            w = getattr(module, "weight", None)
            if isinstance(w, torch.nn.Parameter):
                w.add_(torch.randn(w.shape, generator=generator) * NORM_NOISE)
            b = getattr(module, "bias", None)
            if isinstance(b, torch.nn.Parameter):
                b.add_(torch.randn(b.shape, generator=generator) * NORM_NOISE / 3)


def build_tiny_model(arch: str, path) -> str:
    """Build the tiny ``arch`` model into folder ``path`` (created) and return it as a str."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = os.fspath(path)
    tokenizer = build_byte_tokenizer()
    config = make_config(arch, tokenizer)
    seed = SEED + sorted(ARCHITECTURES).index(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _perturb_norms(model, torch.Generator().manual_seed(seed + 1))
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


__all__ = ["ARCHITECTURES", "build_tiny_model", "make_config", "NORM_NOISE"]
