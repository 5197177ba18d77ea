"""OutputProcessor and RequestOutput: what a caller reads from each update stays what it was when the
update was made (the cumulative fields are built lazily, not copied per token), deltas add up to
the final output, stop strings cut at the same place however the text arrives, and merging
updates (a reader that fell behind, LLM.generate) gives the same output. No model: core outputs
are made up here, the tokenizer is the demo byte-level one."""
from __future__ import annotations

import random

import pytest

from kvserve.demo import build_byte_tokenizer
from kvserve.engine import CoreOutput, OutputProcessor
from kvserve.outputs import RequestOutput, TokenInfo
from kvserve.scheduler.sampling_params import SamplingParams

TEXT = "Hello wörld, 你好! the end. STOP here and then more text after it."


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def drive(tok, ids: list[int], **params) -> list[RequestOutput]:
    """Every update of one request that produces `ids` (the last one ends it by length)."""
    proc = OutputProcessor(tok)
    proc.add("r", [1, 2, 3], SamplingParams(max_tokens=len(ids), **params), 0.0)
    updates = []
    for i, token in enumerate(ids):
        reason = "length" if i == len(ids) - 1 else None
        results, _ = proc.process([CoreOutput("r", token, -0.5, reason, None, 0, 0.0)], float(i))
        updates += results
        if results and results[-1].finished:
            break
    return updates


def test_each_update_keeps_its_own_cumulative_text_and_ids(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    updates = drive(tok, ids)
    assert updates[-1].finished and updates[-1].text == TEXT and updates[-1].token_ids == ids
    text = ""
    for n, out in enumerate(updates, 1):   # read after the whole request ran: nothing moved under them
        text += out.new_text
        assert out.token_ids == ids[:n]
        assert out.num_output_tokens == n
        assert out.text == text
        assert [t.id for t in out.new_tokens] == [ids[n - 1]]


@pytest.mark.parametrize("stops,include", [(["STOP"], False), (["STOP"], True), (["ld, 你", "end."], False),
                                           (["never"], False), (["!", "STOP"], True)])
def test_stop_strings_cut_where_the_whole_text_says(tok, stops, include):
    ids = tok.encode(TEXT, add_special_tokens=False)
    updates = drive(tok, ids, stop=stops, include_stop_str_in_output=include)
    final = updates[-1]
    hits = [(TEXT.find(s), s) for s in stops if s in TEXT]
    if hits:
        at, stop = min(hits)
        want = TEXT[:at + len(stop)] if include else TEXT[:at]
        assert (final.finish_reason, final.stop_reason) == ("stop", stop)
    else:
        want = TEXT
        assert final.finish_reason == "length"
    assert final.text == want
    assert "".join(out.new_text for out in updates) == want
    hold = max(len(s) for s in stops) - 1
    for out in updates[:-1]:     # a running update never released text a stop string could still start in
        assert want.startswith(out.text)
        assert len(out.text) <= max(0, len(tok.decode(out.token_ids)) - hold)


def test_merging_updates_gives_the_final_output_and_leaves_the_newer_one_alone(tok):
    rng = random.Random(0)
    ids = tok.encode(TEXT * 3, add_special_tokens=False)
    updates = drive(tok, ids, stop=["then more"])
    merged = updates[0]
    pos = 1
    while pos < len(updates):     # merge runs of random length, as a reader k steps behind would
        k = rng.randint(1, 5)
        batch = updates[pos:pos + k]
        before = [(u.new_text, list(u.new_tokens)) for u in batch]
        for u in batch:
            merged.merge(u)
        assert [(u.new_text, list(u.new_tokens)) for u in batch] == before
        pos += k
    final = updates[-1]
    assert merged.finished and merged.finish_reason == final.finish_reason == "stop"
    assert merged.new_text == merged.text == final.text
    assert [t.id for t in merged.new_tokens] == merged.token_ids == final.token_ids


def test_an_output_built_by_hand_behaves_like_a_plain_record():
    out = RequestOutput("r", [1], [TokenInfo(5, "a", 0.0, False)], "a", "a", [5])
    other = RequestOutput("r", [1], [TokenInfo(6, "b", 0.0, False)], "b", "ab", [5, 6], finished=True)
    out.merge(other)
    assert (out.new_text, out.text, out.token_ids, out.num_output_tokens, out.finished) == ("ab", "ab", [5, 6], 2, True)
    out.text, out.token_ids = "x", [9]
    assert (out.text, out.token_ids, out.num_output_tokens) == ("x", [9], 1)
    assert "request_id='r'" in repr(out)
    same = RequestOutput("r", [1], [TokenInfo(5, "a", 0.0, False), TokenInfo(6, "b", 0.0, False)], "ab", "x", [9],
                         finished=True)
    assert out == same and out != RequestOutput("r", [1], [], "ab", "x", [9], finished=True)
