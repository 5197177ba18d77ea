"""IncrementalDetokenizer: the direct Rust decode gives exactly the wrapper's deltas, and tokenizers
whose decode or _decode is overridden keep going through it. Tokenizers are built here, offline."""
from __future__ import annotations

import random

import pytest

from kvserve.demo import build_byte_tokenizer
from kvserve.detokenizer import IncrementalDetokenizer

TEXTS = ["Hello world", " the é!", "héllo wörld", "你好，世界", "🙂🚀 ok", "€ <|tool|> a", "\n\t  x"]


def sentencepiece_tokenizer():
    """A Llama-style tokenizer: Unigram over "▁" pieces with <0xNN> byte fallback, Strip decoder."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["▁", "▁Hello", "▁world", "▁the", "▁é", "llo", "H", "e", "l", "o", "w", "r", "d", "t", "h", "é",
              "▁a", "a", "!", ","]
    vocab = ([("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"<0x{b:02X}>", -10.0) for b in range(256)]
             + [(p, -2.0 if len(p) == 1 else -1.0) for p in pieces])
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>", "<unk>"])
    tok.add_tokens([AddedToken("<|tool|>", special=False, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_end|>"], clean_up_tokenization_spaces=False)


def saved_byte_tokenizer(tmp_path):
    """The demo byte-level tokenizer as a model folder loads it (AutoTokenizer)."""
    from transformers import AutoTokenizer

    build_byte_tokenizer().save_pretrained(tmp_path)
    return AutoTokenizer.from_pretrained(tmp_path)


KINDS = {"byte_level": lambda tmp_path: build_byte_tokenizer(), "byte_level_saved": saved_byte_tokenizer,
         "sentencepiece": lambda tmp_path: sentencepiece_tokenizer()}


def via_wrapper(tok):
    """The same tokenizer, its class overriding decode (so the detokenizer must call tok.decode)."""
    class ViaWrapper(type(tok)):
        calls = 0

        def decode(self, *args, **kwargs):
            ViaWrapper.calls += 1
            return super().decode(*args, **kwargs)

    tok.__class__ = ViaWrapper
    return tok


def random_ids(tok, rng: random.Random, n: int) -> list[int]:
    """Text (multi-byte characters split across tokens), random and special ids, unknown ids."""
    special = sorted(set(tok.all_special_ids))
    out: list[int] = []
    while len(out) < n:
        r = rng.random()
        if r < 0.4:
            out += tok.encode(rng.choice(TEXTS), add_special_tokens=False)
        elif r < 0.7:
            out.append(rng.randrange(len(tok)))
        elif r < 0.85:
            out.append(rng.choice(special))
        else:
            out.append(rng.choice([-1, len(tok), len(tok) + 7, 10**9]))
    return out[:n]


def run(det: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [det.add(i) for i in ids] + [det.flush()]


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("skip", [True, False])
def test_fast_path_matches_the_wrapper(kind, skip, tmp_path):
    fast_tok = KINDS[kind](tmp_path / "a")
    slow_tok = via_wrapper(KINDS[kind](tmp_path / "b"))
    assert IncrementalDetokenizer(fast_tok, [], skip).backend_decode is not None
    assert IncrementalDetokenizer(slow_tok, [], skip).backend_decode is None
    rng = random.Random(f"{kind}-{skip}")
    for _ in range(40):
        prompt, ids = random_ids(fast_tok, rng, rng.randrange(0, 12)), random_ids(fast_tok, rng, rng.randrange(1, 80))
        calls = type(slow_tok).calls
        fast = run(IncrementalDetokenizer(fast_tok, prompt, skip), ids)
        slow = run(IncrementalDetokenizer(slow_tok, prompt, skip), ids)
        assert fast == slow, (prompt, ids)
        assert type(slow_tok).calls > calls
    # Whole texts: the deltas add up to the text, no piece of a character is released early.
    for text in TEXTS:
        ids = fast_tok.encode(text, add_special_tokens=False)
        pieces = run(IncrementalDetokenizer(fast_tok, [], skip), ids)
        assert pieces == run(IncrementalDetokenizer(slow_tok, [], skip), ids)
        assert "".join(pieces) == fast_tok.decode(ids, skip_special_tokens=skip) and "\ufffd" not in "".join(pieces)


def test_overridden_decode_methods_are_used():
    base = type(build_byte_tokenizer())

    class Shouting(base):
        def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return super()._decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs).upper()

    tok = build_byte_tokenizer()
    tok.__class__ = Shouting
    det = IncrementalDetokenizer(tok, [], True)
    assert det.backend_decode is None
    assert "".join(run(det, tok.encode("héllo 你好", add_special_tokens=False))) == "HÉLLO 你好"

    # Overridden on the instance, or a backend that is not a tokenizers.Tokenizer: the wrapper too.
    tok = build_byte_tokenizer()
    tok.decode = lambda ids, **kwargs: "x" * len(ids)
    assert IncrementalDetokenizer(tok, [], True).backend_decode is None
    assert "".join(run(IncrementalDetokenizer(tok, [], True), [1, 2, 3])) == "xxx"

    class Proxy:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def decode(self, ids, skip_special_tokens=False):
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens) + "!" * len(ids)

    tok = build_byte_tokenizer()
    tok._tokenizer = Proxy(tok._tokenizer)
    det = IncrementalDetokenizer(tok, [], True)
    assert det.backend_decode is None and det.add(tok.encode("a", add_special_tokens=False)[0]) == "a!"


def test_duck_typed_tokenizer_keeps_its_decode():
    class Letters:
        def __len__(self):
            return 26

        def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
            assert clean_up_tokenization_spaces is False
            return "".join(chr(ord("a") + i) for i in ids)

    det = IncrementalDetokenizer(Letters(), [0, 1, 99], True)
    assert det.backend_decode is None
    assert run(det, [2, 30, 3]) == ["c", "", "d", ""]
