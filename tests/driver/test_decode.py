"""Token-by-token decoding of a Hugging Face Llama with `model.forward` compiled by memopt
(bench/decode.py measures the same at bench sizes): the tokens are eager's, no graph is
compiled after the second decode step, and the KV cache is read unrepeated and updated
in place, never copied."""

from __future__ import annotations

import json

import pytest
import torch

from memopt.backends.runtime.tape import Tape

from real_models import decoding_llama, generate

pytest.importorskip("transformers")

NEW_TOKENS = 12


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize(
    "cache, graphs, attention",
    [("static", 2, "auto"), ("dynamic", 3, "aten"), ("dynamic", 3, "memopt")],
)
def test_decoding_gives_eagers_tokens_without_recompiling(
    cache, graphs, attention, tmp_path, monkeypatch
):
    """A prefill graph and a decode graph (the dynamic cache's first decode compiles for
    its sizes, the second recompiles with dynamic ones); then no graph at all, however
    long the run. Decode steps replay a tape of their launches (runtime/tape.py) with
    eager's tokens: the dynamic cache's graph too, its nodes of the cache's length (the
    concatenations and the attention, or the one call the attention pass makes of them
    where memopt's decode attention runs) called through Python within it."""
    replayed = []
    call = Tape.__call__

    def counted(self, args):
        outputs = call(self, args)
        replayed.append(outputs is not None)
        return outputs

    monkeypatch.setattr(Tape, "__call__", counted)
    model = decoding_llama()
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    want = generate(model, prompt, cache, NEW_TOKENS)
    longer = generate(model, prompt, cache, 3 * NEW_TOKENS)
    torch._dynamo.reset()
    options = {"report_dir": str(tmp_path), "cpu_attention": attention}
    model.forward = torch.compile(model.forward, backend="memopt", options=options)
    before = _graphs()
    assert torch.equal(generate(model, prompt, cache, NEW_TOKENS), want)
    assert _graphs() - before == graphs
    assert torch.equal(generate(model, prompt, cache, 3 * NEW_TOKENS), longer)
    assert _graphs() - before == graphs
    done = sum(replayed)
    assert done >= 2 * NEW_TOKENS
    decode = json.loads((tmp_path / f"inference.{graphs - 1}.json").read_text())
    codes = [d["code"] for p in decode["ledger"] for d in p["decisions"] if d["applied"]]
    text = decode["graph_text"]
    # The cache is never repeated per query head: with the static cache (and its mask)
    # Hugging Face repeats it and the attention pass undoes that; with the dynamic cache
    # it hands SDPA the unrepeated heads itself.
    assert ("attention.grouped_kv" in codes) == (cache == "static")
    assert "aten.expand" not in text and "aten.clone" not in text
    if cache == "static":  # keys and values written into the cache in place, not copied
        assert text.count("aten.index_put_.default") == 2 and "aten.copy_" not in text
    else:  # Hugging Face concatenates; the attention writes the concatenations, or not
        appended = attention == "memopt"
        assert ("attention.appended_kv" in codes) == appended
        assert ("aten.cat.default" in text) == (not appended)


@pytest.mark.parametrize("weights", [None, "int4"])
def test_a_static_cache_made_anew_keeps_the_decode_steps_tape(monkeypatch, weights):
    """Each `generate()` makes its static cache anew, in other memory: the decode graph's
    tape moves onto it (runtime/tape.py, `Tape._rebind`) rather than being captured again,
    and the tokens stay the program's (eager's, for float32 weights), sequence after
    sequence; with int4 weights too (the tape then also holds the narrow weights). With
    float32 weights on memopt's GEMVs the logits are written into each replay's own memory
    (the tape's patches), which moves with the tape."""
    model = decoding_llama()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128, (1, 9), generator=g) for _ in range(4)]
    options = {"pass_options": {"precision": {"weights": weights, "group_size": 32}}}
    options = options if weights else {"cpu_gemv": "memopt"}
    torch._dynamo.reset()
    if weights:  # the program's tokens: the same compile without tapes
        monkeypatch.setattr("memopt.backends.runtime.executor.REPLAY", False)
        forward = model.forward
        model.forward = torch.compile(forward, backend="memopt", options=options)
        wants = [generate(model, p, "static", NEW_TOKENS) for p in prompts]
        model.forward = forward
        monkeypatch.setattr("memopt.backends.runtime.executor.REPLAY", True)
        torch._dynamo.reset()
    else:
        wants = [generate(model, p, "static", NEW_TOKENS) for p in prompts]
    captures, tapes = [], set()
    capture, call = Tape.capture.__func__, Tape.__call__

    def counted_capture(cls, *args):
        made = capture(cls, *args)
        captures.append(made[0])
        return made

    def seen(self, args):
        tapes.add(self)
        return call(self, args)

    monkeypatch.setattr(Tape, "capture", classmethod(counted_capture))
    monkeypatch.setattr(Tape, "__call__", seen)
    model.forward = torch.compile(model.forward, backend="memopt", options=options)
    for prompt, want in zip(prompts, wants):
        assert torch.equal(generate(model, prompt, "static", NEW_TOKENS), want)
    (tape,) = tapes
    # one tape made (the prefill graph's capture makes none: its calls are few launches)
    assert sum(isinstance(c, Tape) for c in captures) == 1
    assert tape.rebinds == len(prompts) - 1
    assert bool(tape._patches) == (weights is None)


@pytest.mark.slow
def test_a_narrow_decode_step_replays_launches_only(monkeypatch):
    """int4 weights, static cache: the decode step's tape holds launches only, the narrow
    embedding's lookup among them (no Python call a step), and replays the program's
    tokens."""
    tapes = []
    call = Tape.__call__

    def recorded(self, args):
        outputs = call(self, args)
        if outputs is not None and self not in tapes:
            tapes.append(self)
        return outputs

    monkeypatch.setattr(Tape, "__call__", recorded)
    model = decoding_llama()
    prompt = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    options = {"pass_options": {"precision": {"weights": "int4", "group_size": 32}}}
    model.forward = torch.compile(model.forward, backend="memopt", options=options)
    replayed = generate(model, prompt, "static", NEW_TOKENS)
    assert tapes and all(t.python_calls == 0 for t in tapes)
    monkeypatch.setattr("memopt.backends.runtime.executor.REPLAY", False)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward.__wrapped__, backend="memopt", options=options)
    assert torch.equal(generate(model, prompt, "static", NEW_TOKENS), replayed)
