"""bench/grammar_masks.py, llguidance only, on a tiny trained vocabulary (1000 tokens): every request
the simulated batch finishes is valid for its grammar, and the batch fill and the per-row fill give
the same tokens."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

pytest.importorskip("llguidance")

from kvserve.bench import grammar_masks as gm  # noqa: E402


def conforms(value, schema) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bpe"))


def test_finished_requests_are_valid(cache_dir):
    res = gm.run(vocab_size=1000, batch=16, steps=300, engines=("llguidance",), corpus_mb=2,
                 cache_dir=cache_dir, log=lambda _: None)
    assert res["vocab"] == 1000 and res["tokenizer"]["regular_tokens"] == 1000 - len(gm.SPECIAL_TOKENS)
    assert [r for r in res["compile"] if "error" in r] == []
    assert {(d["engine"], d["mode"]) for d in res["decode"]} == {("llguidance", "batch"), ("llguidance", "seq")}
    batch, seq = res["outputs"]["batch"], res["outputs"]["seq"]
    assert batch == seq                      # same seed and same masks: the same tokens
    assert {name for name, _, _ in batch} == {name for name, _, _ in gm.GRAMMARS}   # every grammar finished
    for name, kind, text in batch:
        if kind == "json":
            assert conforms(json.loads(text), gm.SCHEMAS[name]), (name, text)
        else:
            assert re.fullmatch(gm.REGEXES[name], text), (name, text)
    for d in res["decode"]:
        assert d["finished"] == len(batch) and d["invalid"] == 0 and d["masks_differ"] == 0
        assert 0 < d["mask"]["median_ms"] <= d["mask"]["max_ms"]
        assert d["mean_allowed"] == d["mean_allowed_by_all"]
    assert {r["method"] for r in res["apply"]} == {"torch (unpack + masked_fill_)"}


def test_apply_bitmask_matches_the_bits():
    bitmask = torch.tensor([[0b1011, -1], [0, -(1 << 31)]], dtype=torch.int32)   # bit 31 is the sign bit
    for vocab, row1 in ((64, [63]), (40, [])):                                    # 40: the mask's tail is cut
        logits = torch.zeros(2, vocab)
        gm.apply_bitmask(logits, bitmask)
        allowed = [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]
        assert allowed == [[0, 1, 3] + list(range(32, vocab)), row1]


def test_cli_writes_json_and_skips_missing_engines(cache_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    gm.main(["--vocab", "1000", "--steps", "20", "--corpus-mb", "2", "--cache-dir", cache_dir,
             "--engines", "llguidance", "--json", str(out)])
    text = capsys.readouterr().out
    assert "per step, batch of 16" in text and "llguidance" in text
    data = json.loads(out.read_text())
    assert data["results"][0]["tokenizer"]["cached"] is True
    present, absent = gm.available_engines(["llguidance", "surely_not_a_grammar_engine"])
    assert present == ["llguidance"] and list(absent) == ["surely_not_a_grammar_engine"]
