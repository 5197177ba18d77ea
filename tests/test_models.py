"""The tiny offline test models and the kvserve demo model."""
from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvserve.demo import DEMO_NOTE, build_byte_tokenizer, ensure_demo_model
from models import ARCHITECTURES, build_tiny_model

PROMPTS = ["Hello, my name is", "The quick brown fox", "1 2 3 4", "你好世界 🙂"]
UTF8_SAMPLE = "héllo wörld 你好 🙂"


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def _longest_run(ids):
    best = run = 1
    for a, b in zip(ids, ids[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    return best


def _assert_not_degenerate(model, tok, new_tokens=40):
    outs = []
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        gen = out[0, enc.input_ids.shape[1]:].tolist()
        assert len(gen) == new_tokens
        assert len(set(gen)) >= 12, f"greedy output too repetitive for {prompt!r}: {gen}"
        assert _longest_run(gen) <= 10, f"long constant run for {prompt!r}: {gen}"
        outs.append(tuple(gen))
    assert len(set(outs)) == len(outs), "different prompts gave identical continuations"
    # Logits are not flat: the top-2 gap is usually clearly non-zero.
    ids = torch.tensor([list(outs[0]) + list(outs[1])])
    with torch.no_grad():
        logits = model(ids).logits[0]
    top2 = logits.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    assert gap.median().item() > 0.1, f"top-2 logit gaps too small: {gap}"
    assert (gap < 1e-3).float().mean().item() < 0.2


def test_tiny_model_loads_and_is_not_degenerate(tiny_arch, tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    cfg = model.config
    assert cfg.model_type == tiny_arch
    assert model.dtype == torch.float32
    assert cfg.num_hidden_layers == 2
    assert cfg.vocab_size % 64 == 0 and cfg.vocab_size > len(tok) >= 256 + 5
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("</s>")
    assert os.path.isfile(os.path.join(tiny_model_dir, "model.safetensors"))
    assert os.path.isfile(os.path.join(tiny_model_dir, "generation_config.json"))
    if tiny_arch != "gpt2":  # GPT-2 has no grouped-query attention
        assert cfg.num_key_value_heads < cfg.num_attention_heads
    _assert_not_degenerate(model, tok)


def test_tiny_architecture_specifics(tiny_model_factory):
    from transformers import AutoConfig

    mistral = AutoConfig.from_pretrained(tiny_model_factory("mistral"))
    assert mistral.sliding_window == 24

    gemma_dir = tiny_model_factory("gemma2")
    gemma, _ = _load(gemma_dir)
    g = gemma.config
    assert g.attn_logit_softcapping and g.final_logit_softcapping
    assert g.sliding_window == 24
    assert set(g.layer_types) == {"sliding_attention", "full_attention"}
    assert not g.tie_word_embeddings
    emb, head = gemma.get_input_embeddings().weight, gemma.get_output_embeddings().weight
    assert emb.data_ptr() != head.data_ptr() and not torch.equal(emb, head)
    # Norm weights were perturbed away from their init (zeros for Gemma's 1+w norms).
    assert gemma.model.norm.weight.abs().sum().item() > 0


def test_tiny_model_build_is_deterministic(tmp_path):
    a = build_tiny_model("llama", tmp_path / "a")
    b = build_tiny_model("llama", tmp_path / "b")
    with open(os.path.join(a, "model.safetensors"), "rb") as fa, open(os.path.join(b, "model.safetensors"), "rb") as fb:
        assert fa.read() == fb.read()


def test_architectures_listed():
    assert set(ARCHITECTURES) >= {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gpt2", "phi3"}


# --- demo model -----------------------------------------------------------------------------

def test_demo_model(demo_model_dir):
    with open(os.path.join(demo_model_dir, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    assert raw["kvserve_demo"] is True
    assert raw["kvserve_note"] == DEMO_NOTE
    size = sum(os.path.getsize(os.path.join(demo_model_dir, n)) for n in os.listdir(demo_model_dir))
    assert size < 5 * 2**20

    model, tok = _load(demo_model_dir)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.kvserve_demo is True
    assert cfg.max_position_embeddings == 2048
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.vocab_size % 64 == 0 and cfg.vocab_size > len(tok)
    eos = model.generation_config.eos_token_id
    assert tok.eos_token_id in (eos if isinstance(eos, list) else [eos])
    assert tok.chat_template
    _assert_not_degenerate(model, tok)


def test_demo_model_idempotent_and_deterministic(demo_model_dir, tmp_path):
    weights = os.path.join(demo_model_dir, "model.safetensors")
    mtime = os.stat(weights).st_mtime_ns
    assert ensure_demo_model(demo_model_dir) == demo_model_dir
    assert os.stat(weights).st_mtime_ns == mtime  # not rewritten
    other = ensure_demo_model(str(tmp_path / "again"))
    with open(weights, "rb") as fa, open(os.path.join(other, "model.safetensors"), "rb") as fb:
        assert fa.read() == fb.read()


def test_demo_model_env_default(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSERVE_DEMO_DIR", str(tmp_path / "env-demo"))
    assert ensure_demo_model() == str(tmp_path / "env-demo")
    assert os.path.isfile(tmp_path / "env-demo" / "config.json")


def test_demo_model_concurrent_creation(tmp_path):
    target = str(tmp_path / "raced")
    results, errors = [], []

    def worker():
        try:
            results.append(ensure_demo_model(target))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [target] * 3
    assert sorted(os.listdir(tmp_path)) == ["raced"]  # no temp folders left behind
    _load(target)


# --- tokenizer ------------------------------------------------------------------------------

def test_demo_tokenizer_utf8_round_trip(demo_model_dir):
    from transformers import AutoTokenizer

    for tok in (build_byte_tokenizer(), AutoTokenizer.from_pretrained(demo_model_dir)):
        ids = tok.encode(UTF8_SAMPLE, add_special_tokens=False)
        assert len(ids) == len(UTF8_SAMPLE.encode("utf-8"))  # one token per byte
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == UTF8_SAMPLE
        assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
        assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
        for special in ("<|im_start|>", "<|im_end|>"):
            sid = tok.convert_tokens_to_ids(special)
            assert tok.encode(special, add_special_tokens=False) == [sid]


_BYTE_TOK = None


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_byte_tokenizer_round_trips_any_text(text):
    global _BYTE_TOK
    if _BYTE_TOK is None:
        _BYTE_TOK = build_byte_tokenizer()
    ids = _BYTE_TOK.encode(text, add_special_tokens=False)
    assert _BYTE_TOK.decode(ids) == text


def test_demo_chat_template(demo_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 🙂"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nhéllo 🙂<|im_end|>\n<|im_start|>assistant\n")
    no_gen = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_gen + "<|im_start|>assistant\n" == text
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tok.decode(ids) == text
