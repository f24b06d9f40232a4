"""The decode step compiled ahead of time (nanoseek/model/ahead.py): the same numbers as the model's cached forward,
for any batch, cache and weights; the built library reused; where it does not apply, torch.compile's step."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanoseek.model.ahead as ahead_module
import nanoseek.model.generate as generate_module
from nanoseek import ModelConfig, Transformer
from nanoseek.model.ahead import AheadOfTimeDecodeStep, ahead_of_time_step
from nanoseek.model.attention import KVCache
from nanoseek.model.generate import autocast_copy, decode_next, generate, prefill

# the shape tests/test_generate.py decodes compiled too, so one build serves both files
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True, seq_len=48)

pytestmark = pytest.mark.slow  # the first build of a library takes tens of seconds


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(CFG).double().eval()


def filled_cache(model, prompts, slots, rows=None):
    """A cache of ``rows`` rows (default: one per prompt) with the left-padded prompts prefilled in its first rows;
    returns (cache viewing those rows, the whole cache)."""
    longest = max(len(p) for p in prompts)
    whole = KVCache(model.cfg, rows or len(prompts), slots, dtype=torch.float64)
    part = KVCache(model.cfg, len(prompts), longest, dtype=torch.float64)
    seq = torch.zeros(len(prompts), longest, dtype=torch.long)
    pad = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        seq[i, longest - len(p) :], pad[i, longest - len(p) :] = torch.tensor(p), True
    prefill(model, part, seq, pad)
    n = len(prompts)
    whole.k[:, :n, :, :longest], whole.v[:, :n, :, :longest], whole.valid[:n, :longest] = part.k, part.v, part.valid
    view = KVCache(model.cfg, 1, 1)
    view.k, view.v, view.valid = whole.k[:, :n], whole.v[:, :n], whole.valid[:n]
    view.max_len, view.pos, view.offset = slots, longest, 0
    return view, whole


@torch.no_grad()
def test_the_ahead_of_time_step_equals_the_cached_forward(model):
    """Step by step from left-padded prompts, over a cache that views the first rows of a larger buffer (a server's
    running batch), then over a whole cache of another batch size: the same logits as the model's forward with a
    KVCache and the cache filled the same way, to 1e-6 in float64: the rotary tables are float32 by design, and the
    generated code's vectorised cos and sin round them differently from eager's (as torch.compile's do)."""
    assert ahead_of_time_step(model) is not None
    for prompts, rows in (([[5, 9, 2], [7, 1, 1, 3, 8, 6, 2]], 4), ([[4], [3, 3], [8, 1, 6], [2, 2, 2, 2]], None)):
        ahead, _ = filled_cache(model, prompts, 30, rows)
        eager, _ = filled_cache(model, prompts, 30)
        tokens = torch.tensor([p[-1] for p in prompts])
        for _ in range(9):
            got = decode_next(model, ahead, tokens, compile=True)
            want = decode_next(model, eager, tokens)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            tokens = want.argmax(-1)
        assert ahead.pos == eager.pos
        for a, b in ((ahead.k, eager.k), (ahead.v, eager.v)):
            torch.testing.assert_close(a[:, :, :, : eager.pos], b[:, :, :, : eager.pos], rtol=0, atol=1e-6)


@torch.no_grad()
def test_one_filled_slot_and_a_cache_that_is_no_buffers_prefix(model):
    """Two cases off the usual path: a one-token prompt (one filled slot at the first step) through generate, and a
    cache whose tensors view a buffer from its third slot on (not a prefix, so the library gets copies and the new
    slot is written back): the same tokens and logits as eager decoding."""
    runs = [generate(model, [[4]], 6, temperature=0.0, compile=c) for c in (False, True)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    torch.testing.assert_close(runs[0].logprobs, runs[1].logprobs, rtol=0, atol=1e-6)
    shifted = KVCache(model.cfg, 2, 24, dtype=torch.float64)
    ahead, _ = filled_cache(model, [[5, 9, 2], [7, 1]], 22)
    eager, _ = filled_cache(model, [[5, 9, 2], [7, 1]], 22)
    shifted.k[:, :, :, 2:], shifted.v[:, :, :, 2:], shifted.valid[:, 2:] = ahead.k, ahead.v, ahead.valid
    ahead.k, ahead.v, ahead.valid = shifted.k[:, :, :, 2:], shifted.v[:, :, :, 2:], shifted.valid[:, 2:]
    tokens = torch.tensor([3, 4])
    for _ in range(4):
        got, want = decode_next(model, ahead, tokens, compile=True), decode_next(model, eager, tokens)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        tokens = want.argmax(-1)
    torch.testing.assert_close(shifted.k[:, :, :, 2 : 2 + eager.pos], eager.k[:, :, :, : eager.pos], rtol=0, atol=1e-6)


@torch.no_grad()
def test_the_ahead_of_time_step_sees_updated_and_replaced_weights(model):
    """The parameters are inputs of the library, read at every call: an in-place update (an optimiser step) and a
    replaced parameter (``module.weight = Parameter(...)``) both change the next step's logits as they change the
    forward's."""
    m = copy.deepcopy(model)
    tokens = torch.tensor([3, 4])
    replacement = torch.nn.Parameter(torch.randn(32, 32, dtype=torch.float64))
    for change in (
        lambda: m.blocks[0].ffn.fn.down.weight.mul_(1.5),
        lambda: setattr(m.blocks[1].attn.fn.proj, "weight", replacement),
    ):
        change()
        ahead, _ = filled_cache(m, [[5, 9, 2], [7, 1]], 20)
        eager, _ = filled_cache(m, [[5, 9, 2], [7, 1]], 20)
        torch.testing.assert_close(
            decode_next(m, ahead, tokens, compile=True), decode_next(m, eager, tokens), rtol=0, atol=1e-6
        )


def test_the_library_is_built_once_and_written_whole(model, monkeypatch):
    """A second step of the same model (another process would do the same) finds the built library by its key and
    loads it without exporting the step again; a model of another shape has another key; no half-written file is
    left in the folder."""
    first = ahead_of_time_step(model)
    built = os.path.getmtime(first.path)

    def no_export(*args):
        raise AssertionError("exported again although the library for this key was built")

    with monkeypatch.context() as patch:
        patch.setattr(ahead_module, "_export", no_export)
        again = AheadOfTimeDecodeStep(model)
        assert again.path == first.path and os.path.getmtime(again.path) == built
        wider = Transformer(ModelConfig(**{**CFG.__dict__, "ffn_hidden": 96})).double().eval()
        with pytest.raises(AssertionError, match="exported again"):
            AheadOfTimeDecodeStep(wider)  # not in the folder: it would have to be exported and built
    assert not [f for f in os.listdir(first.path.parent) if f.startswith(".building-")]


@torch.no_grad()
def test_a_cache_of_another_dtype_is_an_error_not_a_misread(model):
    """Inductor's input checks are on: a float32 cache given to a float64 model's library is refused."""
    step = ahead_of_time_step(model)
    cache = KVCache(model.cfg, 1, 8, dtype=torch.float32)
    cache.pos = 3
    with pytest.raises(RuntimeError, match="dtype"):
        step(torch.tensor([1]), cache, torch.tensor(3))


@torch.no_grad()
def test_under_autocast_the_step_is_exported_inside_it():
    """A GRPO run samples with a bf16 copy of its float32 policy under bf16 autocast: the copy's step gets a library
    of its own, exported inside the autocast — bf16 logits, as eager decoding's under the same autocast, equal to
    them within two of bf16's steps at their size (eager and generated kernels round their products differently)."""
    torch.manual_seed(1)
    sampler = autocast_copy(Transformer(CFG).eval(), torch.bfloat16)
    seq = torch.tensor([[0, 0, 0, 0, 5, 9, 2], [7, 1, 1, 3, 8, 6, 2]])
    ahead, eager = KVCache(CFG, 2, 16), KVCache(CFG, 2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step = ahead_of_time_step(sampler)
        assert step is not None and step.dtype == torch.float32
        for cache in (ahead, eager):
            prefill(sampler, cache, seq, seq != 0)
        tokens = torch.tensor([2, 2])
        for _ in range(6):
            got, want = decode_next(sampler, ahead, tokens, compile=True), decode_next(sampler, eager, tokens)
            assert got.dtype == want.dtype == torch.bfloat16
            torch.testing.assert_close(got, want, rtol=0, atol=2 * 2**-8 * want.abs().max().item())
            tokens = want.argmax(-1)
    assert ahead.pos == eager.pos
    torch.testing.assert_close(ahead.k[:, :, :, : ahead.pos], eager.k[:, :, :, : eager.pos], rtol=0.02, atol=0.02)


def test_where_it_does_not_apply_torch_compile_serves(model, monkeypatch):
    """For MoE models (not exportable whole, with either dispatch) and once the model's dtype changed, there is no
    ahead-of-time step; with ``generate.AHEAD_OF_TIME`` off, decode_next does not ask for one."""
    for dispatch in ("grouped", "loop"):
        extra = dict(ffn="moe", n_routed_experts=4, top_k=2, moe_dispatch=dispatch)
        moe = Transformer(ModelConfig(**{**CFG.__dict__, **extra}))
        assert not moe.exportable and ahead_of_time_step(moe) is None
    m = copy.deepcopy(model)
    assert ahead_of_time_step(m) is not None
    m.float()
    assert ahead_of_time_step(m) is None
    asked = []
    monkeypatch.setattr(generate_module, "ahead_of_time_step", lambda m: asked.append(m))
    monkeypatch.setattr(generate_module, "AHEAD_OF_TIME", False)
    cache, _ = filled_cache(model, [[1, 2]], 8)
    with torch.no_grad():
        decode_next(model, cache, torch.tensor([3]), compile=True)
    assert not asked


def test_the_key_hashes_all_the_nanoseek_code_the_model_can_run_and_no_other():
    """The libraries' key hashes nanoseek/model and the top-level modules it imports: every nanoseek module that
    importing the model, its generator and this step loads (in a fresh interpreter) is among them, and no hashed file
    names other nanoseek code (a lazy import inside a function would not show in the import); the training, RL and
    serving code is not hashed, so an edit there builds nothing anew."""
    files = set(ahead_module._model_source_files())
    assert all(f.exists() for f in files)
    script = "import sys, nanoseek.model.generate, nanoseek.model.ahead; print('\\n'.join(m.__file__ for n, m in "
    script += "sys.modules.items() if n.split('.')[0] == 'nanoseek' and getattr(m, '__file__', None)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = {Path(line).resolve() for line in done.stdout.split()}
    assert len(loaded) > 5 and loaded <= files, sorted(map(str, loaded - files))
    package = ahead_module._PACKAGE
    others = {p.name for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()} - {"model"}
    others |= {p.stem for p in package.glob("*.py") if p not in files}
    assert {"rl", "train", "serve", "cli"} <= others
    names = "|".join(sorted(others))
    pattern = re.compile(rf"\bnanoseek\.({names})\b|from nanoseek import ({names})\b")
    for f in files:
        found = pattern.search(f.read_text())
        assert found is None, f"{f} refers to {found.group()}: hash that code too (ahead._model_source_files)"
    assert package / "model" / "transformer.py" in files and package / "rl" / "grpo.py" not in files
    # a model class defined anywhere else (here: this file) has its own file hashed too

    class Mine(Transformer):
        pass

    assert ahead_module._class_file(Transformer(CFG)) is None
    assert Path(ahead_module._class_file(Mine(CFG))) == Path(__file__).resolve()
