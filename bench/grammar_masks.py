"""Structured outputs: what a grammar engine costs per decode step, llguidance against xgrammar.

For each engine installed (llguidance always; xgrammar when it imports) and each vocabulary size:

* compile: per grammar (JSON schemas typical of structured-output traffic and one regex), the time
  from schema to a matcher the first time, again (xgrammar: its compiler cache; llguidance has none,
  it compiles again), a fresh matcher from the cached one (llguidance: ``deep_copy`` of a template;
  xgrammar: ``GrammarMatcher(compiled)``) and the first mask of a fresh matcher;
* decode: ``--batch`` requests decoded together for ``--steps`` steps, by all the engines in
  lock-step on the same tokens, so that they are timed in the same parser states. Each step every
  engine builds the token bitmask of the whole batch (timed: "mask"); each row then takes a random
  token that every engine's mask allows (seeded; EOS whenever it is allowed, a whitespace-only token
  at 1/20 the odds of the rest) and each engine's matchers advance with it (timed: "advance", which
  includes replacing the matcher of a request that just took EOS). Two runs, same seed: ``batch``
  (one call for the batch: llguidance ``fill_next_token_bitmask_par`` on an ``LLExecutor`` and
  ``consume_token_par``; xgrammar ``BatchGrammarMatcher``) and ``seq`` (a call per row:
  ``fill_next_token_bitmask`` and ``consume_token`` / ``accept_token``);
* apply: setting the disallowed logits of a [batch, V] float32 CPU tensor to -inf from the last
  step's bitmask, with plain torch ops (no torch.compile), and with xgrammar's own CPU kernel when
  present. torch runs on one thread throughout.

The tokenizer is a byte-level BPE trained here, offline, on the Python standard library's .py files
(cached under ~/.cache/kvserve/bpe), so no model is downloaded. Where the corpus cannot give the
asked vocabulary (about 120k regular tokens at most), reserved special tokens fill the rest, as
Llama 3's do. (llguidance never allows a special token; xgrammar does not detect these as special and
allows their text inside JSON strings.)

Runs as ``python -m kvserve.bench.grammar_masks`` or as a plain script (``python
bench/grammar_masks.py``): it imports only the standard library, torch, tokenizers, transformers
and the engines, so it runs in a separate virtual environment that has xgrammar.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import sysconfig
import time

import torch

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|pad|>", "<|im_start|>", "<|im_end|>"]
# the JSON layout of both engines: compact, one space after ',' and ':' (kvserve's own choice);
# "flexible" is each engine's default, any run of whitespace between tokens
SEPARATORS = (", ", ": ")

SCHEMAS = {
    "profile": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "role": {"enum": ["admin", "editor", "viewer"]},
            "email": {"type": "string", "pattern": "^[a-z0-9._]{1,20}@[a-z0-9]{1,12}\\.(com|org|net)$"},
            "active": {"type": "boolean"},
        },
        "required": ["name", "age", "role", "email", "active"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
            "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
            "items": {
                "type": "array", "minItems": 1, "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "maxLength": 12},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                        "price_cents": {"type": "integer", "minimum": 0, "maximum": 1000000},
                    },
                    "required": ["sku", "quantity", "price_cents"],
                    "additionalProperties": False,
                },
            },
            "note": {"type": "string", "maxLength": 60},
        },
        "required": ["order_id", "status", "items"],
        "additionalProperties": False,
    },
    "tool_call": {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": "get_weather"},
                    "arguments": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "maxLength": 30},
                            "unit": {"enum": ["celsius", "fahrenheit"]},
                        },
                        "required": ["city", "unit"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {
                    "name": {"const": "search"},
                    "arguments": {
                        "type": "object",
                        "properties": {
                            "query": {"type": "string", "maxLength": 50},
                            "top_k": {"type": "integer", "minimum": 1, "maximum": 20},
                        },
                        "required": ["query"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            },
        ],
    },
    "classify": {
        "type": "object",
        "properties": {
            "label": {"enum": ["positive", "negative", "neutral", "mixed"]},
            "score": {"type": "integer", "minimum": 0, "maximum": 100},
            "keywords": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 3},
        },
        "required": ["label", "score", "keywords"],
        "additionalProperties": False,
    },
}
REGEXES = {"timestamp": r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun) [0-9]{4}-[0-9]{2}-[0-9]{2}"
                        r"T[0-9]{2}:[0-9]{2}(:[0-9]{2})?Z"}
# (name, kind, value); a batch row r decodes GRAMMARS[r % len(GRAMMARS)]
GRAMMARS = [(n, "json", s) for n, s in SCHEMAS.items()] + [(n, "regex", r) for n, r in REGEXES.items()]


# --- tokenizer ---------------------------------------------------------------------------------

def _corpus(max_bytes: int):
    """The standard library's .py files (not site-packages), in a fixed order, up to max_bytes."""
    root = sysconfig.get_paths()["stdlib"]
    total = 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    text = f.read().decode("utf-8", "replace")
                total += len(text)
                yield text
                if total >= max_bytes:
                    return


def build_tokenizer(vocab_size: int, corpus_mb: int = 32, cache_dir: str | None = None):
    """A byte-level BPE tokenizer of exactly vocab_size entries, as transformers' fast tokenizer.
    Trained once (seconds) and cached as a tokenizers JSON file. Returns (tokenizer, info)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "kvserve", "bpe")
    path = os.path.join(cache_dir, f"bytelevel-bpe-v{vocab_size}-c{corpus_mb}mb-py{sys.version_info[0]}"
                                   f"{sys.version_info[1]}.json")
    info = {"path": path, "cached": os.path.exists(path), "train_s": 0.0}
    if info["cached"]:
        tok = Tokenizer.from_file(path)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        t0 = time.perf_counter()
        tok.train_from_iterator(_corpus(corpus_mb << 20), trainer)
        info["train_s"] = time.perf_counter() - t0
        short = vocab_size - tok.get_vocab_size()
        if short > 0:
            tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(short)])
        os.makedirs(cache_dir, exist_ok=True)
        tok.save(path + ".tmp")
        os.replace(path + ".tmp", path)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token="<|pad|>")
    info["vocab"] = len(hf)
    info["regular_tokens"] = len(hf) - len(tok.get_added_tokens_decoder())
    return hf, info


# --- engines -----------------------------------------------------------------------------------

class LLGuidance:
    name = "llguidance"

    def __init__(self, hf_tokenizer, vocab: int, threads: int, whitespace: str):
        import llguidance
        import llguidance.hf
        import llguidance.torch
        self.ll, self.llt = llguidance, llguidance.torch
        self.version = _dist_version("llguidance")
        t0 = time.perf_counter()
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab)
        self.tokenizer_init_s = time.perf_counter() - t0
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.options = ({"whitespace_flexible": False, "item_separator": SEPARATORS[0],
                         "key_separator": SEPARATORS[1]} if whitespace == "compact" else {})

    def grammar(self, kind, value):
        if kind == "regex":
            return self.ll.LLMatcher.grammar_from_regex(value)
        return self.ll.LLMatcher.grammar_from_json_schema(value, overrides=self.options)

    def compile(self, kind, value):
        m = self.ll.LLMatcher(self.tokenizer, self.grammar(kind, value), log_level=0)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def compile_again(self, kind, value):   # llguidance keeps no cache: the grammar is built again
        return self.compile(kind, value)

    def matcher(self, template):
        return template.deep_copy()

    def fill(self, matchers, bitmask, mode):
        if mode == "batch":
            rows = [(m, i) for i, m in enumerate(matchers)]
            self.llt.fill_next_token_bitmask_par(self.executor, rows, bitmask)
        else:
            for i, m in enumerate(matchers):
                self.llt.fill_next_token_bitmask(m, bitmask, i)

    def advance(self, matchers, tokens, mode):
        if mode == "batch":
            return self.llt.consume_token_par(self.executor, list(zip(matchers, tokens)))
        return [m.consume_token(t) for m, t in zip(matchers, tokens)]

    def finished(self, m):
        return m.is_stopped()

    def error(self, m):
        return m.get_error()


class XGrammar:
    name = "xgrammar"

    def __init__(self, hf_tokenizer, vocab: int, threads: int, whitespace: str):
        import xgrammar
        self.xgr = xgrammar
        self.version = _dist_version("xgrammar")
        t0 = time.perf_counter()
        info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab)
        self.tokenizer_init_s = time.perf_counter() - t0
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=threads)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)
        self.json_options = ({"any_whitespace": False, "separators": SEPARATORS} if whitespace == "compact"
                             else {})

    def compile(self, kind, value):
        if kind == "regex":
            return self.compiler.compile_regex(value)
        return self.compiler.compile_json_schema(json.dumps(value), **self.json_options)

    compile_again = compile   # a hit in the compiler's cache

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers, bitmask, mode):
        if mode == "batch":
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)
        else:
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(bitmask, i)

    def advance(self, matchers, tokens, mode):
        if mode == "batch":
            return self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)
        return [m.accept_token(t) for m, t in zip(matchers, tokens)]

    def finished(self, m):
        return m.is_terminated()

    def error(self, m):
        return "token not accepted"


ENGINES = {"llguidance": LLGuidance, "xgrammar": XGrammar}
MODES = ("batch", "seq")   # one call for the whole batch, or one call per row


def _dist_version(name):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def available_engines(names):
    """The engines of names that import here, and {name: why not} for the others."""
    present, absent = [], {}
    for name in names:
        try:
            __import__(name)
            present.append(name)
        except ImportError as exc:
            absent[name] = str(exc)
    return present, absent


# --- the measurements --------------------------------------------------------------------------

_SHIFTS = torch.arange(32, dtype=torch.int32)


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, ceil(V/32)] int32 bitmask -> [B, V] bool, True where the token is allowed."""
    return ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).view(bitmask.shape[0], -1)[:, :vocab].bool()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Plain torch: disallowed logits -> -inf, in place."""
    logits.masked_fill_(~unpack(bitmask, logits.shape[1]), float("-inf"))


def _ms(xs):
    xs = sorted(xs)
    return {"median_ms": statistics.median(xs) * 1e3, "p90_ms": xs[int(0.9 * (len(xs) - 1))] * 1e3,
            "max_ms": xs[-1] * 1e3, "mean_ms": statistics.fmean(xs) * 1e3}


def measure_compile(engine, vocab):
    """Per grammar: compile times, the first mask and how many tokens it allows. Returns
    (rows, templates {name: template}); a grammar that fails has an "error" and no template."""
    rows, templates = [], {}
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    for name, kind, value in GRAMMARS:
        row = {"engine": engine.name, "grammar": name, "kind": kind}
        try:
            t0 = time.perf_counter()
            first = engine.compile(kind, value)
            t1 = time.perf_counter()
            template = engine.compile_again(kind, value)
            t2 = time.perf_counter()
            fresh = engine.matcher(template)
            t3 = time.perf_counter()
            engine.fill([engine.matcher(first)], bitmask, "seq")
            t4 = time.perf_counter()
        except Exception as exc:  # noqa: BLE001 - a grammar an engine cannot compile is a result
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            continue
        del fresh
        row.update(first_ms=(t1 - t0) * 1e3, again_ms=(t2 - t1) * 1e3, matcher_ms=(t3 - t2) * 1e3,
                   first_mask_ms=(t4 - t3) * 1e3, allowed_at_start=int(unpack(bitmask, vocab).sum()))
        rows.append(row)
        templates[name] = template
    return rows, templates


def decode_batch(engines, mode, templates, hf_tokenizer, vocab, batch, steps, seed, whitespace):
    """Decode batch rows for steps steps with every engine in lock-step, as described in the module
    docstring: each step each engine fills its own bitmask (timed), each row takes a token all the
    masks allow, and every engine's matchers advance with it (timed). templates: {engine name:
    {grammar: template}}; whitespace: [V] bool, the whitespace-only tokens. Returns the stats of each
    engine, every finished output (grammar, kind, text) and the last step's bitmask."""
    grammars = [g for g in GRAMMARS if all(g[0] in templates[e.name] for e in engines)]
    kinds = [grammars[r % len(grammars)][:2] for r in range(batch)]
    eos = hf_tokenizer.eos_token_id
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    matchers = {e.name: [e.matcher(templates[e.name][name]) for name, _ in kinds] for e in engines}
    bitmasks = {e.name: torch.full((batch, (vocab + 31) // 32), -1, dtype=torch.int32) for e in engines}
    mask_s, advance_s, allowed = ({e.name: [] for e in engines} for _ in range(3))
    outputs = [[] for _ in range(batch)]
    finished, differ, both = [], 0, []
    for _ in range(steps):
        oks = []
        for e in engines:
            t0 = time.perf_counter()
            e.fill(matchers[e.name], bitmasks[e.name], mode)
            mask_s[e.name].append(time.perf_counter() - t0)
            oks.append(unpack(bitmasks[e.name], vocab))
            allowed[e.name] += oks[-1].sum(1).tolist()
        ok = oks[0]
        for other in oks[1:]:
            differ += int((ok != other).any(1).sum())
            ok = ok & other
        both += ok.sum(1).tolist()
        tokens = []
        for r in range(batch):
            ids = ok[r].nonzero().flatten()
            if len(ids) == 0:
                raise RuntimeError(f"{mode}: row {r} ({kinds[r][0]}): no token allowed by every engine")
            if ok[r, eos]:
                tokens.append(eos)
                continue
            non_ws = ids[~whitespace[ids]]
            pool = non_ws if len(non_ws) and rng.random() < 0.95 else ids
            tokens.append(int(pool[torch.randint(len(pool), (1,), generator=gen)]))
        done = [r for r, tok in enumerate(tokens) if tok == eos]
        for e in engines:
            ms = matchers[e.name]
            t0 = time.perf_counter()
            accepted = e.advance(ms, tokens, mode)
            ended = [ms[r] for r in done]
            for r in done:
                ms[r] = e.matcher(templates[e.name][kinds[r][0]])
            advance_s[e.name].append(time.perf_counter() - t0)
            for r, (tok, ok_r) in enumerate(zip(tokens, accepted)):
                if not ok_r:
                    raise RuntimeError(f"{e.name}/{mode}: row {r} ({kinds[r][0]}) refused allowed token {tok}: "
                                       f"{e.error(ms[r])}")
            if not all(e.finished(m) for m in ended):
                raise RuntimeError(f"{e.name}/{mode}: a matcher is not finished after EOS")
        for r, tok in enumerate(tokens):
            if tok == eos:
                finished.append((*kinds[r], outputs[r]))
                outputs[r] = []
            else:
                outputs[r].append(tok)
    texts = [(name, kind, hf_tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=False))
             for name, kind, ids in finished]
    stats = [{"engine": e.name, "mode": mode, "mask": _ms(mask_s[e.name]), "advance": _ms(advance_s[e.name]),
              "mean_allowed": statistics.fmean(allowed[e.name]), "mean_allowed_by_all": statistics.fmean(both),
              "finished": len(texts), "masks_differ": differ / (steps * batch)} for e in engines]
    return stats, texts, bitmasks[engines[-1].name]


def valid(name, kind, text) -> bool:
    """A finished output is well-formed: JSON that parses (strictly: no raw control characters in
    strings), or text the whole regex matches. (Schema conformance is checked in the tests.)"""
    if kind == "regex":
        return re.fullmatch(REGEXES[name], text) is not None
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def whitespace_tokens(hf_tokenizer, vocab) -> torch.Tensor:
    """[V] bool: the tokens whose text is whitespace only."""
    decode = hf_tokenizer.backend_tokenizer.decoder.decode
    pieces = hf_tokenizer.convert_ids_to_tokens(list(range(vocab)))
    return torch.tensor([bool(t) and not decode([t]).strip() for t in pieces])


def measure_apply(batch, vocab, bitmask, engines, repeats=50):
    """Median ms to mask [batch, V] float32 logits on CPU: plain torch, and xgrammar's CPU kernel."""
    logits = torch.randn(batch, vocab)
    ways = {"torch (unpack + masked_fill_)": lambda x: apply_bitmask(x, bitmask)}
    if "xgrammar" in engines:
        import xgrammar
        ways["xgrammar cpu kernel"] = lambda x: xgrammar.apply_token_bitmask_inplace(x, bitmask)
    rows = []
    for name, fn in ways.items():
        times = []
        for _ in range(repeats + 3):
            x = logits.clone()
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
        rows.append({"method": name, "median_ms": statistics.median(times[3:]) * 1e3,
                     "allowed": int(torch.isfinite(x).sum())})
    return rows


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model = fields.get("Model name", "").strip()
        if model:
            return f"{model} ({fields.get('CPU(s)', '?').strip()} CPUs, {platform.machine()})"
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def run(vocab_size=32000, batch=16, steps=200, engines=("llguidance", "xgrammar"), threads=None,
        whitespace="compact", seed=0, corpus_mb=32, cache_dir=None, log=print):
    """All the measurements at one vocabulary size. Returns a dict; its "outputs" hold every
    finished text per engine and mode: [(grammar name, "json" | "regex", text)]."""
    threads = threads or os.cpu_count() or 1
    # torch runs on one thread: its OpenMP workers spin after each op, and on a small or shared machine
    # they take the CPUs from the engines' threads (and each parallel op waits on a descheduled one);
    # a serving engine masks and samples on the accelerator
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(vocab_size, batch, steps, engines, threads, whitespace, seed, corpus_mb, cache_dir, log)
    finally:
        torch.set_num_threads(torch_threads)


def _run(vocab_size, batch, steps, engines, threads, whitespace, seed, corpus_mb, cache_dir, log):
    present, absent = available_engines(engines)
    for name, why in absent.items():
        log(f"{name} is not installed here ({why}): skipped")
    hf, tok_info = build_tokenizer(vocab_size, corpus_mb, cache_dir)
    vocab = len(hf)
    whitespace_ids = whitespace_tokens(hf, vocab)
    result = {"load_before": os.getloadavg()[0], "vocab": vocab, "batch": batch, "steps": steps,
              "threads": threads, "torch_threads": 1, "whitespace": whitespace,
              "seed": seed, "tokenizer": tok_info, "absent": absent, "engines": {}, "compile": [],
              "decode": [], "apply": [], "outputs": {}}
    live, templates = [], {}
    for name in present:
        engine = ENGINES[name](hf, vocab, threads, whitespace)
        result["engines"][name] = {"version": engine.version,
                                   "tokenizer_init_ms": engine.tokenizer_init_s * 1e3}
        rows, templates[name] = measure_compile(engine, vocab)
        result["compile"] += [dict(r, vocab=vocab) for r in rows]
        for r in rows:
            if "error" in r:
                log(f"{name}: {r['grammar']} does not compile: {r['error']}")
        if templates[name]:
            live.append(engine)
    if live:
        for mode in MODES:
            log(f"vocab {vocab}: {' + '.join(e.name for e in live)} in lock-step, {mode} calls, "
                f"{batch} rows x {steps} steps")
            stats, texts, last_mask = decode_batch(live, mode, templates, hf, vocab, batch, steps, seed,
                                                   whitespace_ids)
            invalid = sum(not valid(*t) for t in texts)
            result["decode"] += [dict(st, vocab=vocab, invalid=invalid) for st in stats]
            result["outputs"][mode] = texts
        result["apply"] = [dict(r, vocab=vocab) for r in measure_apply(batch, vocab, last_mask, present)]
    result["load_after"] = os.getloadavg()[0]
    return result


# --- report ------------------------------------------------------------------------------------

def table(rows, columns):
    """Rows of dicts as a text table; columns: [(header, key or callable, format)]."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        cells.append([fmt.format(key(r) if callable(key) else r.get(key, "")) if
                      (callable(key) or key in r) else "" for _, key, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells)


def report(results, cpu):
    print(f"\nCPU: {cpu}; torch {torch.__version__} on 1 thread")
    for res in results:
        engines = ", ".join(f"{n} {e['version']} (tokenizer {e['tokenizer_init_ms']:.0f} ms)"
                            for n, e in res["engines"].items())
        t = res["tokenizer"]
        print(f"\n== vocab {res['vocab']} ({t['regular_tokens']} regular tokens), batch {res['batch']}, "
              f"{res['steps']} steps, {res['threads']} threads, {res['whitespace']} JSON whitespace; "
              f"{engines}; 1-min load average {res['load_before']:.2f} before, {res['load_after']:.2f} after")
        print("\ncompile, per grammar (ms)")
        print(table(res["compile"], [
            ("engine", "engine", "{}"), ("grammar", "grammar", "{}"), ("first", "first_ms", "{:.1f}"),
            ("again", "again_ms", "{:.2f}"), ("matcher", "matcher_ms", "{:.3f}"),
            ("1st mask", "first_mask_ms", "{:.2f}"), ("allowed@0", "allowed_at_start", "{}"),
            ("error", lambda r: r.get("error", "")[:60], "{}")]))
        print(f"\nper step, batch of {res['batch']} (ms)")
        print(table(res["decode"], [
            ("engine", "engine", "{}"), ("mode", "mode", "{}"),
            ("mask p50", lambda r: r["mask"]["median_ms"], "{:.3f}"),
            ("mask p90", lambda r: r["mask"]["p90_ms"], "{:.3f}"),
            ("mask max", lambda r: r["mask"]["max_ms"], "{:.3f}"),
            ("advance p50", lambda r: r["advance"]["median_ms"], "{:.3f}"),
            ("advance p90", lambda r: r["advance"]["p90_ms"], "{:.3f}"),
            ("advance max", lambda r: r["advance"]["max_ms"], "{:.3f}"),
            ("mean allowed", "mean_allowed", "{:.0f}"), ("finished", "finished", "{}"),
            ("invalid", "invalid", "{}")]))
        differ = res["decode"][0]["masks_differ"] if len(res["engines"]) > 1 and res["decode"] else None
        if differ is not None:
            print(f"the engines' masks differ on {differ:.1%} of row-steps; each row takes a token both allow "
                  f"(on average {res['decode'][0]['mean_allowed_by_all']:.0f})")
        if res["apply"]:
            print(f"\napply a mask to [{res['batch']}, {res['vocab']}] float32 logits on CPU (median ms)")
            print(table(res["apply"], [("method", "method", "{}"), ("ms", "median_ms", "{:.3f}")]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--steps", type=int, default=200, help="decode steps per engine and mode")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000],
                   help="vocabulary size(s), e.g. 32000 128000")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--threads", type=int, default=None, help="engine worker threads (default: all CPUs)")
    p.add_argument("--whitespace", choices=["compact", "flexible"], default="compact",
                   help="JSON layout: compact (', ' and ': ', no other whitespace) or each engine's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-mb", type=int, default=32, help="tokenizer training text, MiB of stdlib source")
    p.add_argument("--cache-dir", default=None, help="where trained tokenizers are kept")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    cpu = cpu_model()
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    results = [run(v, args.batch, args.steps, args.engines, args.threads, args.whitespace, args.seed,
                   args.corpus_mb, args.cache_dir, log) for v in args.vocab]
    report(results, cpu)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
