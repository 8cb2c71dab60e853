"""Hook points against Hugging Face: every activation a tool reads, and every replacement a tool
makes, must be the one Hugging Face's GPT-2 computes at the same place.

The references come from forward hooks on Hugging Face's modules (tests/make_fixtures.py,
hooks_reference), on the two GPT-2 fixtures: the trained one, and the random one whose biases
and LayerNorm parameters are far from 0 and 1.
"""
import numpy as np
import pytest
from conftest import REPO, assert_near
from tinygrad import Tensor

import gpt
from families import EncoderDecoder
from transformer import Config, Transformer

FIXTURES = REPO / "tests" / "fixtures"
REF = np.load(FIXTURES / "tiny-gpt2-hooks.npz")
IDS = REF["ids"].astype(np.int32)
T = len(IDS)
CHECKPOINTS = {"trained": FIXTURES / "tiny-gpt2-trained" / "model.safetensors",
               "random": FIXTURES / "tiny-gpt2" / "model.safetensors"}


def per_layer(layer: int) -> list[str]:
    return [f"blocks.{layer}.{name}" for name in (
        "hook_resid_pre", "ln1.hook_scale", "attn.hook_q", "attn.hook_k", "attn.hook_v",
        "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "ln2.hook_scale",
        "hook_mlp_out", "hook_resid_post")]


# GPT-2's hook points, TransformerLens's names, in the order a pass reaches them
GPT2_HOOKS = ["hook_embed", "hook_pos_embed", *per_layer(0), *per_layer(1), "ln_final.hook_scale"]


def uniform_causal(p: Tensor) -> Tensor:
    table = np.tril(np.ones((T, T), np.float32)) / np.arange(1, T + 1, dtype=np.float32)[:, None]
    return Tensor(table).reshape(1, 1, T, T).expand(p.shape)


def z_head_1_from_2(z: Tensor) -> Tensor:  # (B, T, H, hs)
    keep = np.ones(z.shape, np.float32)
    keep[:, 2:, 1] = 0.0
    return z * Tensor(keep)


# The same replacements as tests/make_fixtures.py's HOOK_REPLACEMENTS, written for tinygrad
REPLACEMENTS = {
    "blocks.0.hook_resid_pre": lambda x: x * 0.5 + 0.25,
    "blocks.1.attn.hook_z": z_head_1_from_2,
    "blocks.0.attn.hook_pattern": uniform_causal,
    "blocks.1.hook_mlp_out": lambda y: -y,
    "blocks.0.attn.hook_v": lambda v: v * 2,
    "ln_final.hook_scale": lambda s: s * 2,
    "blocks.1.attn.hook_q": lambda q: q * 3,
    "hook_pos_embed": lambda p: p * 0,
}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def model(request):
    return request.param, gpt.load_gpt2("gpt2", CHECKPOINTS[request.param])


def test_gpt2_has_every_hook_point_by_transformer_lens_name(model):
    _, m = model
    assert sorted(m.hook_points()) == sorted(GPT2_HOOKS)


def test_every_hook_point_reads_what_hugging_face_computes(model):
    tag, m = model
    logits, cache = m.run_with_cache(Tensor(IDS[None]))
    assert list(cache) == GPT2_HOOKS  # every point, in the order the pass reached them
    for name, value in cache.items():
        assert_near(value.numpy(), REF[f"{tag}.{name}"], name)
    assert_near(logits.numpy()[0][:, REF["cols"]], REF[f"{tag}.logits"], "logits")


@pytest.mark.parametrize("name", list(REPLACEMENTS))
def test_a_replacement_changes_the_logits_as_in_hugging_face(model, name):
    tag, m = model
    plain = m(Tensor(IDS[None])).numpy()[0][:, REF["cols"]]
    got = m.run_with_hooks(Tensor(IDS[None]), {name: REPLACEMENTS[name]}).numpy()[0]
    assert_near(got[:, REF["cols"]], REF[f"{tag}.replaced.{name}"], f"replaced {name}")
    assert np.abs(got[:, REF["cols"]] - plain).max() > 1e-3, f"replacing {name} changed nothing"


def test_hooks_leave_the_model_as_it_was(model):
    # a pass after hooked ones is the plain pass, bit for bit, and no hook is left behind
    _, m = model
    ids = Tensor(IDS[None])
    before = m(ids).numpy()
    m.run_with_cache(ids)
    m.run_with_hooks(ids, {"blocks.0.hook_resid_pre": lambda x: x * 0})
    np.testing.assert_array_equal(m(ids).numpy(), before)
    assert all(not point.fns for point in m.hook_points().values())


def test_hooks_on_one_point_stack_in_order(model):
    _, m = model
    ids = Tensor(IDS[None])
    with m.hooks({"blocks.1.hook_mlp_out": lambda y: y * 3}):
        both = m.run_with_hooks(ids, {"blocks.1.hook_mlp_out": lambda y: y + 1}).numpy()
    once = m.run_with_hooks(ids, {"blocks.1.hook_mlp_out": lambda y: y * 3 + 1}).numpy()
    np.testing.assert_allclose(both, once, rtol=1e-6, atol=1e-6)


def test_an_unknown_or_unreached_hook_point_is_an_error(model):
    _, m = model
    near = "'blocks.7.hook_resid_pre' in this model .of its 27: blocks.1.hook_resid_pre"
    with pytest.raises(KeyError, match=near):
        m.run_with_hooks(Tensor(IDS[None]), {"blocks.7.hook_resid_pre": lambda x: x})
    # final_stream stops before the final LayerNorm: a hook there would silently do nothing
    with pytest.raises(ValueError, match="'ln_final.hook_scale' was not reached"):
        m.run_with_hooks(Tensor(IDS[None]), {"ln_final.hook_scale": lambda s: s},
                         forward=m.final_stream)
    assert all(not point.fns for point in m.hook_points().values())


def test_shared_layers_keep_a_hook_point_per_block():
    Tensor.manual_seed(4)
    m = Transformer(Config(vocab_size=11, n_ctx=8, n_layer=2, n_head=2, n_embd=8,
                           shared_layers=True))
    ids = Tensor(np.arange(8, dtype=np.int32)[None] % 11)
    _, cache = m.run_with_cache(ids, ["blocks.0.ln1.hook_scale", "blocks.1.ln1.hook_scale"])
    x0, x1 = (m.run_with_cache(ids, [f"blocks.{i}.hook_resid_pre"])[1].popitem()[1].numpy()
              for i in range(2))
    for i, x in enumerate((x0, x1)):  # each block's own LayerNorm input, scaled as NumPy says
        want = np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        np.testing.assert_allclose(cache[f"blocks.{i}.ln1.hook_scale"].numpy(), want, rtol=1e-5)
    assert np.abs(x0 - x1).max() > 1e-3


def test_encoder_decoder_hook_points_read_and_replace():
    Tensor.manual_seed(5)
    m = EncoderDecoder(Config(vocab_size=12, n_ctx=6, n_layer=2, n_head=2, n_embd=8, pad_id=0))
    points = m.hook_points()
    for name in ("encoder.blocks.1.attn.hook_pattern", "decoder.blocks.0.attn.hook_z",
                 "decoder.blocks.1.cross_attn.hook_pattern", "decoder.blocks.0.hook_cross_out",
                 "decoder.blocks.1.cross_attn.hook_k", "encoder.ln_final.hook_scale"):
        assert name in points, name
    rng = np.random.default_rng(6)
    src = [Tensor(rng.integers(1, 12, (2, 6), dtype=np.int32)) for _ in range(2)]
    tgt = Tensor(rng.integers(1, 12, (2, 6), dtype=np.int32))
    # what the encoder hands on is its last block's stream through its final LayerNorm
    _, cache = m.run_with_cache((src[0], tgt), ["encoder.blocks.1.hook_resid_post"])
    x = cache["encoder.blocks.1.hook_resid_post"].numpy()
    ln = m.encoder.ln_f
    want = ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
            * ln.weight.numpy() + ln.bias.numpy())
    np.testing.assert_allclose(m.encode(src[0])[0].numpy(), want, rtol=1e-5, atol=1e-5)
    # with cross-attention's output replaced by zeros the decoder no longer reads the source
    cut = {f"decoder.blocks.{i}.hook_cross_out": lambda y: y * 0 for i in range(2)}
    a, b = (m.run_with_hooks((s, tgt), cut).numpy() for s in src)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert np.abs(m(src[0], tgt).numpy() - m(src[1], tgt).numpy()).max() > 1e-3


def test_the_notebook_example_in_docs_runs(monkeypatch):
    # docs/lab.md's example as written, on a random GPT-2 of 124M's depth and heads (narrower)
    import re

    text = (REPO / "docs" / "lab.md").read_text()
    code = re.search(r"## Hook points.*?```python\n(.*?)```", text, re.S).group(1)
    Tensor.manual_seed(7)
    small = Transformer(Config(vocab_size=50257, n_ctx=64, n_layer=12, n_head=12, n_embd=48))
    monkeypatch.setattr(gpt, "load_gpt2", lambda *a, **k: small)
    scope = {}
    exec(code, scope)
    T = len(gpt.tokenizer().encode("When Mary and John went to the store, John gave a drink to"))
    assert scope["cache"]["blocks.9.attn.hook_pattern"].shape == (1, 12, T, T)
    ablated, plain = scope["ablated"].numpy(), scope["logits"].numpy()
    assert np.abs(ablated - plain).max() > 0  # knocking out 9.6 moved the logits
    with small.hooks({"blocks.9.attn.hook_z": scope["knock_out_head_6"]}):
        np.testing.assert_array_equal(small(scope["ids"]).numpy(), ablated)
