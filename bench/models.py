"""Random-weight models with real architectures' shapes, built offline from a config and cached on disk."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("kvserve.bench")

CACHE_DIR = Path(os.environ.get("KVSERVE_BENCH_MODELS", Path.home() / ".cache" / "kvserve" / "bench-models"))
BUILD_VERSION = 2  # bump when the recipe below changes so cached folders are rebuilt


@dataclass(frozen=True)
class ModelShape:
    name: str
    model_type: str
    description: str
    sizes: dict = field(default_factory=dict)

    def config_kwargs(self) -> dict:
        # std 1.5/sqrt(hidden): logits spread enough for unique greedy picks, activations stay in fp16 range
        base = dict(max_position_embeddings=8192, initializer_range=1.5 / self.sizes["hidden_size"] ** 0.5,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
        return base | self.sizes


def _llama(hidden, layers, heads, kv_heads, inter, vocab, **extra) -> dict:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab, **extra)


SHAPES: dict[str, ModelShape] = {s.name: s for s in [
    ModelShape("tiny", "llama", "Llama architecture, hidden 64, 2 layers, 4 heads, 2 kv heads, "
               "intermediate 128, vocab 512 (development only)", _llama(64, 2, 4, 2, 128, 512)),
    ModelShape("llama-256x6", "llama", "Llama architecture, hidden 256, 6 layers, 4 heads, 2 kv heads, intermediate "
               "1024, vocab 32000, untied (issue 14's CPU benchmark model: its lm_head dominates a batch-1 step)",
               _llama(256, 6, 4, 2, 1024, 32000)),
    ModelShape("llama-small", "llama", "Llama architecture at SmolLM-135M width with 4 layers: hidden 576, "
               "4 layers, 9 heads, 3 kv heads, intermediate 1536, vocab 49152, untied (71M parameters, 57M of "
               "them embeddings and head)", _llama(576, 4, 9, 3, 1536, 49152)),
    ModelShape("smollm-135m", "llama", "SmolLM-135M shape (Llama): hidden 576, 30 layers, 9 heads, 3 kv heads, "
               "intermediate 1536, vocab 49152, tied embeddings",
               _llama(576, 30, 9, 3, 1536, 49152, tie_word_embeddings=True)),
    ModelShape("qwen2.5-0.5b", "qwen2", "Qwen2.5-0.5B shape (Qwen2): hidden 896, 24 layers, 14 heads, 2 kv heads, "
               "intermediate 4864, vocab 151936, tied embeddings",
               _llama(896, 24, 14, 2, 4864, 151936, tie_word_embeddings=True)),
    ModelShape("llama-3.2-1b", "llama", "Llama-3.2-1B shape: hidden 2048, 16 layers, 32 heads, 8 kv heads, "
               "intermediate 8192, vocab 128256, tied embeddings",
               _llama(2048, 16, 32, 8, 8192, 128256, tie_word_embeddings=True, rope_theta=500000.0)),
]}


def describe(name: str) -> str:
    return SHAPES[name].description if name in SHAPES else f"local model folder {name}"


def build_tokenizer():
    """A byte-level tokenizer: one token per UTF-8 byte, ids 0-2 special, no merges, a tiny chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return fast


def model_path(name: str, dtype: str = "float32") -> Path:
    """Return a folder with config, random weights and a byte tokenizer for a named shape (built once)."""
    if name not in SHAPES:
        if Path(name).is_dir():
            return Path(name)
        raise SystemExit(f"unknown model shape {name!r}; choose one of {', '.join(SHAPES)} or a local model folder")
    path = CACHE_DIR / f"{name}-{dtype}"
    stamp = path / "kvserve-bench.json"
    want = {"version": BUILD_VERSION, "shape": name, "config": SHAPES[name].config_kwargs()}
    if stamp.exists() and {k: v for k, v in json.loads(stamp.read_text()).items() if k in want} == want:
        return path
    _build(SHAPES[name], path, dtype)
    stamp.write_text(json.dumps(want | {"description": SHAPES[name].description}))
    return path


def model_and_vocab(name: str, dtype: str = "float32") -> tuple[Path, int]:
    """model_path() and the model's vocabulary size (what random prompts are drawn from)."""
    from transformers import AutoConfig
    path = model_path(name, dtype)
    return path, AutoConfig.from_pretrained(path).vocab_size


def _build(shape: ModelShape, path: Path, dtype: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    log.info("building random-weight model %s in %s (once)", shape.name, path)
    torch.manual_seed(0)
    tok = build_tokenizer()
    cfg = AutoConfig.for_model(shape.model_type, **shape.config_kwargs())
    cfg.dtype = dtype
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
        _favour_printable(model, cfg, tok)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    tok.save_pretrained(path)


def printable_ids(tok) -> list[int]:
    """Token ids of the printable ASCII bytes in the byte-level tokenizer."""
    return [tok.convert_tokens_to_ids(t) for t in (tok.tokenize(chr(b))[0] for b in range(32, 127))]


def _favour_printable(model, cfg, tok) -> None:
    """Make greedy decoding emit printable ASCII only, never EOS.

    Streaming servers then send one decodable character per token (ids without a tokenizer entry, or lone
    UTF-8 continuation bytes, would be held back), and output lengths are exact even on servers that ignore
    `ignore_eos`. Untied heads: other rows are zeroed (logit 0 < the best printable logit). Tied heads keep
    their input embeddings: printable rows are scaled up instead and EOS's row is zeroed.
    """
    import torch
    w = model.get_output_embeddings().weight
    keep = torch.tensor(printable_ids(tok))
    if cfg.tie_word_embeddings:
        w[keep] *= 10
        w[cfg.eos_token_id].zero_()
    else:
        mask = torch.ones(w.shape[0], dtype=torch.bool)
        mask[keep] = False
        w[mask] = 0


def num_parameters(path: Path) -> int:
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(path)
    h, n, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * cfg.intermediate_size
    return n * per_layer + v * h * (1 if cfg.tie_word_embeddings else 2)
