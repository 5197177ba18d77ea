"""bench/grammar_masks.py, llguidance only, on a tiny trained vocabulary (1000 tokens): every request
the simulated batch finishes is valid for its grammar, and the batch fill and the per-row fill give
the same tokens."""
from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("llguidance")

from kvserve.bench import grammar_masks as gm  # noqa: E402


def conforms(value, schema) -> bool:
    """Just the JSON-schema keywords the benchmark's schemas use."""
    if "anyOf" in schema:
        return any(conforms(value, s) for s in schema["anyOf"])
    if "const" in schema and value != schema["const"]:
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return (isinstance(value, dict) and set(schema.get("required", [])) <= set(value)
                and (schema.get("additionalProperties", True) or set(value) <= set(props))
                and all(conforms(v, props[k]) for k, v in value.items() if k in props))
    if kind == "array":
        return (isinstance(value, list)
                and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1 << 30)
                and all(conforms(v, schema["items"]) for v in value))
    if kind == "string":
        return (isinstance(value, str)
                and schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 1 << 30)
                and ("pattern" not in schema or re.search(schema["pattern"], value) is not None))
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)
                and schema.get("minimum", -1 << 63) <= value <= schema.get("maximum", 1 << 63))
    if kind == "boolean":
        return isinstance(value, bool)
    return kind is None


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
