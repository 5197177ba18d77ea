"""The offline API as a user scripts it: LLM() with no model, every token's logprob in the result,
LLM.chat through the chat template."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(demo_model_dir, monkeypatch_module):
    monkeypatch_module.setenv("KVSERVE_DEMO_DIR", demo_model_dir)
    return LLM(device="cpu", num_kv_blocks=64, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_llm_without_a_model_runs_the_demo_model(llm, demo_model_dir):
    assert llm.engine.cfg.model == demo_model_dir


def test_every_generated_token_carries_its_logprob_equal_to_transformers(llm, demo_model_dir):
    """One entry per generated token (not only the last step's), each the log-softmax of the model's
    logits at that position, as transformers' own forward pass computes it."""
    prompts = ["The quick brown fox jumps", "a"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    for out in outs:
        assert [t.id for t in out.new_tokens] == out.token_ids and len(out.token_ids) == 12
        assert out.new_text == out.text == "".join(t.text for t in out.new_tokens)
        ids = torch.tensor([out.prompt_token_ids + out.token_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
        n = len(out.prompt_token_ids)
        expected = [logprobs[n - 1 + i, tok].item() for i, tok in enumerate(out.token_ids)]
        assert [t.logprob for t in out.new_tokens] == pytest.approx(expected, abs=1e-3)


def test_chat_renders_the_template_and_takes_one_or_many_conversations(llm):
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = llm.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    one = llm.chat(conversation, greedy)
    assert len(one) == 1 and one[0].prompt_token_ids == ids
    assert one[0].token_ids == llm.generate([ids], greedy)[0].token_ids
    many = llm.chat([conversation, [{"role": "user", "content": "Another"}]], greedy)
    assert len(many) == 2 and many[0].token_ids == one[0].token_ids
    with pytest.raises(ValueError, match="2 prompts but 1"):
        llm.generate(["a", "b"], [greedy])


def test_top_logprobs_are_the_most_likely_tokens_under_the_unprocessed_distribution(llm, demo_model_dir):
    """top_logprobs=k: at each generated position the k most likely tokens with their log-softmax
    values, before temperature, penalties or bias change anything (also when sampling)."""
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, top_logprobs=5),
              SamplingParams(max_tokens=6, temperature=1.3, top_k=7, repetition_penalty=1.5, seed=3, ignore_eos=True,
                             top_logprobs=20),
              SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)]
    outs = llm.generate(["Once upon", "Once upon", "Once upon"], params)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    for out, p in zip(outs, params):
        if not p.top_logprobs:
            assert all(t.top is None for t in out.new_tokens)
            continue
        ids = torch.tensor([out.prompt_token_ids + out.token_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
        n = len(out.prompt_token_ids)
        for i, token in enumerate(out.new_tokens):
            values, top_ids = logprobs[n - 1 + i].topk(p.top_logprobs)
            assert len(token.top) == p.top_logprobs
            assert [v for _, v in token.top] == pytest.approx(values.tolist(), abs=1e-3)
            assert {t for t, _ in token.top} == set(top_ids.tolist()) or values[-1] - values[-2] < 1e-4
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(top_logprobs=21)


def test_token_bytes_are_exact_even_for_pieces_of_a_character(llm):
    text = "héllo wörld 😀"
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    pieces = [llm.engine.token_bytes(i) for i in ids]
    assert b"".join(pieces).decode() == text and any(len(p) == 1 and p[0] >= 0x80 for p in pieces)
    assert llm.engine.token_bytes(10**9) == b""


def test_token_bytes_of_a_sentencepiece_vocabulary():
    from kvserve.detokenizer import TokenBytes

    class SentencePieceLike:
        vocab = ["<unk>", "\u2581Hello", "<0xE2>", "<0x82>", "<0xAC>", "world"]

        def __len__(self):
            return len(self.vocab)

        def convert_ids_to_tokens(self, i):
            return self.vocab[i]

    tb = TokenBytes(SentencePieceLike())
    assert tb(1) == b" Hello" and b"".join(tb(i) for i in (2, 3, 4)).decode() == "€" and tb(5) == b"world"


@pytest.mark.parametrize("budget,blocks,seqs", [(512, 64, 256), (7, 64, 256), (16, 8, 256), (512, 64, 6)],
                         ids=["one-chunk", "chunked", "preempted", "logit-budget"])
def test_prompt_logprobs_equal_transformers(demo_model_dir, budget, blocks, seqs):
    """prompt_logprobs=k: every prompt token's logprob (the first has none) and the k most likely
    tokens at its position, equal to transformers' forward pass; also when the prompt is prefilled in
    chunks, when preemption makes it recompute, and when the step's budget of kept logits rows
    (half of min(max_num_batched_tokens, max_num_seqs)) chunks it. A prefix-cache hit never hides
    positions."""
    llm = LLM(demo_model_dir, device="cpu", num_kv_blocks=blocks, block_size=8, max_num_batched_tokens=budget,
              max_num_seqs=seqs)
    assert llm.engine.scheduler.prompt_logit_budget == max(1, min(budget, seqs) // 2)
    steps = []
    run = llm.engine.runner.execute
    llm.engine.runner.execute = lambda step: steps.append(
        sum(step.num_tokens[r] for r in step.prompt_logprob_rows)) or run(step)
    prompts = ["The quick brown fox jumps over the lazy dog", "The quick brown fox jumps over the lazy cat"]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=3)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))    # cached: must not be hit
    outs = llm.generate(prompts, [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), params])
    assert outs[0].prompt_logprobs is None
    out = outs[1]      # admitted second: the one preempted when the two outgrow 8 blocks
    assert (llm.engine.stats().num_preemptions > 0) == (blocks == 8)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    ids = out.prompt_token_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    for p in range(1, len(ids)):
        value, top = out.prompt_logprobs[p]
        assert value == pytest.approx(logprobs[p - 1, ids[p]].item(), abs=1e-3)
        assert [v for _, v in top] == pytest.approx(logprobs[p - 1].topk(3).values.tolist(), abs=1e-3)
    assert out.num_cached_tokens == 0
    assert max(steps) <= llm.engine.scheduler.prompt_logit_budget and sum(steps) >= len(ids) - 1
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


def test_processed_logprobs_are_those_of_the_distribution_sampled_from(demo_model_dir):
    """logprobs_mode="processed": temperature and logit_bias are in the reported values; top-k leaves
    the other tokens at -inf; the default stays the model's raw distribution."""
    llm = LLM(demo_model_dir, num_kv_blocks=32, logprobs_mode="processed")
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    bias = {65: 5.0}
    cases = [SamplingParams(max_tokens=6, temperature=0.5, seed=3, ignore_eos=True, top_logprobs=3),
             SamplingParams(max_tokens=6, temperature=0, logit_bias=bias, ignore_eos=True)]
    for params, out in zip(cases, llm.generate(["The quick brown fox", "abc"], cases)):
        with torch.no_grad():
            logits = model(torch.tensor([out.prompt_token_ids + out.token_ids])).logits[0].float()
        n = len(out.prompt_token_ids)
        rows = logits[n - 1:n - 1 + len(out.token_ids)]
        if params.logit_bias:
            rows[:, 65] += 5.0
        expected = torch.log_softmax(rows / params.temperature if params.temperature else rows, -1)
        got = [t.logprob for t in out.new_tokens]
        assert got == pytest.approx([expected[i, t].item() for i, t in enumerate(out.token_ids)], abs=1e-3)
    top_k = llm.generate(["xyz"], SamplingParams(max_tokens=3, temperature=1.0, top_k=2, seed=1, top_logprobs=4))[0]
    for token in top_k.new_tokens:
        values = [lp for _, lp in token.top]
        assert values[2] == values[3] == float("-inf")     # outside the top 2: impossible as drawn
        assert sum(math.exp(v) for v in values[:2]) == pytest.approx(1.0, abs=1e-4)
