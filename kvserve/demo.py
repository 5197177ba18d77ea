"""A tiny random-weight demo model, built offline.

``ensure_demo_model()`` writes (once) a small Llama-architecture causal LM with
RANDOM weights plus a byte-level tokenizer with a ChatML chat template, and
returns its folder.  It exists so that the server, the examples and the tests
can run without downloading anything.  Its outputs are gibberish by design.

``build_byte_tokenizer()`` returns the tokenizer on its own (the tests reuse it
for tiny models of other architectures).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid

DEMO_NOTE = "random weights, for demos and tests only"

# Bump when the saved model would change, so stale caches are rebuilt.
DEMO_VERSION = 1

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Sizes of the demo model (a Llama).
DEMO_MODEL_KWARGS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    initializer_range=0.3,
    tie_word_embeddings=False,
)
DEMO_SEED = 1234


def _byte_alphabet() -> list[str]:
    # The 256 printable symbols GPT-2 style byte-level BPE uses for the 256 byte values.
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def build_byte_tokenizer():
    """A ``PreTrainedTokenizerFast``: byte-level BPE over the 256 bytes, no merges.

    Ids 0..255 are the byte symbols; then ``<s>``, ``</s>``, ``<pad>``,
    ``<|im_start|>``, ``<|im_end|>`` (ids 256..260).  Any UTF-8 text round-trips
    exactly.  It has a ChatML ``chat_template``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = _byte_alphabet()
    assert len(alphabet) == 256
    vocab = {sym: i for i, sym in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def default_demo_dir() -> str:
    env = os.environ.get("KVSERVE_DEMO_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join(os.path.expanduser("~"), ".cache", "kvserve", "demo-model")


def _is_complete(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not (os.path.isfile(cfg) and os.path.isfile(os.path.join(path, "tokenizer.json"))
            and os.path.isfile(os.path.join(path, "model.safetensors"))):
        return False
    try:
        with open(cfg, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return bool(data.get("kvserve_demo")) and data.get("kvserve_demo_version") == DEMO_VERSION


def _write_demo_model(path: str) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_byte_tokenizer()
    vocab_size = _round_up(len(tokenizer), 64)
    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **DEMO_MODEL_KWARGS,
    )
    config.kvserve_demo = True
    config.kvserve_demo_version = DEMO_VERSION
    config.kvserve_note = DEMO_NOTE

    # Fixed seed, without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            # Perturb the RMSNorm weights (init is all ones) so the model is less uniform.
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(torch.randn_like(p) * 0.3)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, "README.md"), "w", encoding="utf-8") as f:
        f.write("# kvserve demo model\n\nTiny Llama-architecture causal LM with "
                f"{DEMO_NOTE}. Generated by kvserve.demo.ensure_demo_model(); outputs are gibberish.\n")


def ensure_demo_model(path: str | None = None) -> str:
    """Create the demo model in ``path`` if it is not there yet; return the folder.

    Default folder: ``$KVSERVE_DEMO_DIR`` or ``~/.cache/kvserve/demo-model``.
    Offline and idempotent; concurrent callers are safe (the model is written to a
    temporary sibling folder that is then renamed into place).
    """
    path = os.path.abspath(os.path.expanduser(path)) if path else default_demo_dir()
    if _is_complete(path):
        return path
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}-", dir=parent)
    try:
        _write_demo_model(tmp)
        if _is_complete(path):       # another process won the race meanwhile
            return path
        if os.path.isdir(path) and not _is_complete(path):
            # A stale or partial folder: move it aside, then put ours in place.
            stale = f"{path}.stale-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(path, stale)
            except OSError:
                stale = None
            if stale:
                shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, path)
        except OSError:
            # Target appeared (non-empty dir) because another process renamed theirs first.
            if not _is_complete(path):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


__all__ = ["ensure_demo_model", "build_byte_tokenizer", "default_demo_dir", "DEMO_NOTE", "CHAT_TEMPLATE"]
