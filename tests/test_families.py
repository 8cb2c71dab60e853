"""The other two families against PyTorch's own modules. transformer.py's encoder and decoder
blocks and families.py's EncoderDecoder are loaded with the random weights of
torch.nn.TransformerEncoderLayer, TransformerDecoderLayer and Transformer (the fixture
tests/fixtures/torch-transformer.npz, made by `python tests/make_fixtures.py families`) and must
give PyTorch's outputs within 1e-5, post-LN and pre-LN. Then what each family may see,
cross-attention's rows, cached decoding, and the classifier's pooling, against NumPy."""
import re
from pathlib import Path

import numpy as np
import pytest
from tinygrad import Tensor

from families import Classifier, EncoderDecoder, encoder_decoder_maps, translate
from transformer import Block, Config, Transformer, padding_mask

FIXTURE = np.load(Path(__file__).parent / "fixtures" / "torch-transformer.npz")
VOCAB, C, H, LAYERS, PAD = 12, 16, 4, 2, 0  # make_fixtures.FAMILIES
SRC, TGT = FIXTURE["src"], FIXTURE["tgt"]
TOL = 1e-5


def config(norm: str, **change) -> Config:
    return Config(vocab_size=VOCAB, n_ctx=SRC.shape[1], n_layer=LAYERS, n_head=H, n_embd=C,
                  prenorm=norm == "pre", pad_id=PAD, **change)


def torch_layer(prefix: str, cross: bool = False) -> dict[str, np.ndarray]:
    """One PyTorch layer's weights under transformer.py's names. PyTorch packs q, k and v in
    in_proj (3C, C), in the order of GPT-2's c_attn; its cross-attention's first C rows make q."""
    w = lambda key: FIXTURE[f"{prefix}{key}"]
    out = {"attn.c_attn.weight": w("self_attn.in_proj_weight"),
           "attn.c_attn.bias": w("self_attn.in_proj_bias"),
           "attn.c_proj.weight": w("self_attn.out_proj.weight"),
           "attn.c_proj.bias": w("self_attn.out_proj.bias"),
           "mlp.c_fc.weight": w("linear1.weight"), "mlp.c_fc.bias": w("linear1.bias"),
           "mlp.c_proj.weight": w("linear2.weight"), "mlp.c_proj.bias": w("linear2.bias")}
    norms = ("ln_1", "ln_cross_attn", "ln_2") if cross else ("ln_1", "ln_2")
    for i, name in enumerate(norms):
        for p in ("weight", "bias"):
            out[f"{name}.{p}"] = w(f"norm{i + 1}.{p}")
    if cross:
        in_w, in_b = w("multihead_attn.in_proj_weight"), w("multihead_attn.in_proj_bias")
        out.update({"crossattention.q_attn.weight": in_w[:C],
                    "crossattention.q_attn.bias": in_b[:C],
                    "crossattention.c_attn.weight": in_w[C:],
                    "crossattention.c_attn.bias": in_b[C:],
                    "crossattention.c_proj.weight": w("multihead_attn.out_proj.weight"),
                    "crossattention.c_proj.bias": w("multihead_attn.out_proj.bias")})
    return out


def load(obj, weights: dict[str, np.ndarray]):
    """Set obj's attributes by dotted name; every trainable tensor must be given exactly once."""
    from tinygrad.nn.state import get_state_dict

    state = {k: v for k, v in get_state_dict(obj).items() if v.is_param}
    assert set(weights) >= set(state), sorted(set(state) - set(weights))
    for key, value in weights.items():
        *path, last = key.split(".")
        target = obj
        for part in path:
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        setattr(target, last, Tensor(np.ascontiguousarray(value, dtype=np.float32)))


def torch_transformer(norm: str) -> EncoderDecoder:
    """EncoderDecoder with the fixture's torch.nn.Transformer weights and shared embeddings."""
    model = EncoderDecoder(config(norm, positions="learned"), init=False)
    prefix = f"{norm}/transformer/"
    weights = {}
    for side in ("encoder", "decoder"):
        for i in range(LAYERS):
            layer = torch_layer(f"{prefix}{side}.layers.{i}.", cross=side == "decoder")
            weights.update({f"{side}.h.{i}.{k}": v for k, v in layer.items()})
        if norm == "pre":  # PyTorch's encoder_norm and decoder_norm
            for p in ("weight", "bias"):
                weights[f"{side}.ln_f.{p}"] = FIXTURE[f"{prefix}{side}.norm.{p}"]
    rows = model.encoder.wte.weight.shape[0]  # the table is padded to 64 rows
    wte = np.zeros((rows, C), np.float32)
    wte[:VOCAB] = FIXTURE[f"{prefix}wte"]
    for side in ("encoder", "decoder"):  # one table each, shared: set once, seen twice
        weights[f"{side}.wte.weight"], weights[f"{side}.wpe.weight"] = wte, FIXTURE[f"{prefix}wpe"]
    load(model, weights)
    model.decoder.wte, model.decoder.wpe = model.encoder.wte, model.encoder.wpe
    return model


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_encoder_layer_matches_pytorch(norm):
    block = Block(config(norm, causal=False), init=False)
    load(block, torch_layer(f"{norm}/encoder_layer/"))
    pad = padding_mask(Tensor(SRC), PAD)
    got = block(Tensor(FIXTURE[f"{norm}/x"]), pad=pad).numpy()
    want = FIXTURE[f"{norm}/encoder_layer/out"]
    real = SRC != PAD  # PyTorch's outputs at padded positions are not part of its contract
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_decoder_layer_matches_pytorch(norm):
    block = Block(config(norm, cross=True), init=False)
    load(block, torch_layer(f"{norm}/decoder_layer/", cross=True))
    source = (Tensor(FIXTURE[f"{norm}/memory"]), padding_mask(Tensor(SRC), PAD))
    got = block(Tensor(FIXTURE[f"{norm}/y"]), source=source).numpy()
    np.testing.assert_allclose(got, FIXTURE[f"{norm}/decoder_layer/out"], atol=TOL, rtol=0)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_encoder_decoder_matches_pytorch(norm):
    model = torch_transformer(norm)
    got = model(Tensor(SRC), Tensor(TGT)).numpy()  # (B, T, vocab)
    np.testing.assert_allclose(got, FIXTURE[f"{norm}/transformer/logits"], atol=TOL, rtol=0)


def later_token_changes(model, idx: np.ndarray, position: int) -> np.ndarray:
    """Per position, the largest change of the output when token `position` is changed."""
    changed = idx.copy()
    changed[:, position] = (changed[:, position] + 1) % VOCAB or 1
    a, b = (model(Tensor(i.astype(np.int32))).numpy() for i in (idx, changed))
    return np.abs(a - b).reshape(len(idx), idx.shape[1], -1).max(-1).max(0)


def test_the_encoder_sees_the_future_and_the_decoder_does_not():
    Tensor.manual_seed(0)
    idx = np.array([[3, 5, 7, 2, 9, 4, 1]], np.int32)
    encoder = Transformer(config("pre", causal=False))
    decoder = Transformer(config("pre"))
    enc, dec = (later_token_changes(m, idx, 5) for m in (encoder, decoder))
    assert (enc[:5] > 1e-4).all()  # every earlier position felt token 5
    assert (dec[:5] == 0).all()  # not one bit changed before it
    assert dec[5] > 1e-4


def test_cross_attention_rows_sum_to_one_and_skip_padding():
    model = torch_transformer("pre")
    _, maps = encoder_decoder_maps(model, Tensor(SRC), Tensor(TGT))
    cross = maps["cross"].numpy()  # (B, L, H, T, S)
    assert cross.shape == (2, LAYERS, H, TGT.shape[1], SRC.shape[1])
    np.testing.assert_allclose(cross.sum(-1), 1.0, atol=1e-6)
    padded = SRC == PAD  # (B, S)
    assert padded.any()
    assert (cross.transpose(0, 4, 1, 2, 3)[padded] == 0).all()
    assert (maps["encoder"].numpy().transpose(0, 4, 1, 2, 3)[padded] == 0).all()
    decoder = maps["decoder"].numpy()  # (B, L, H, T, T): nothing above the diagonal
    assert (np.triu(np.ones((TGT.shape[1],) * 2), 1) * decoder == 0).all()


def test_cached_greedy_decoding_equals_uncached():
    model = torch_transformer("post")
    steps = 6
    calls = []  # the cross-attention's keys and values: once per layer for the whole decoding
    for block in model.decoder.h:
        attn = block.crossattention
        attn.keys_values = lambda memory, f=attn.keys_values: calls.append(1) or f(memory)
    cached = translate(model, SRC, bos=1, max_new_tokens=steps)
    assert len(calls) == LAYERS
    out = np.ones((len(SRC), 1), np.int32)
    for _ in range(steps):  # the whole target again at every step, no cache
        logits = model(Tensor(SRC), Tensor(out)).numpy()[:, -1]
        out = np.concatenate([out, logits.argmax(-1)[:, None].astype(np.int32)], axis=1)
    np.testing.assert_array_equal(cached, out[:, 1:])
    # a second source in the same model: the kept keys and values follow the source
    other = SRC[::-1].copy()
    first = model(Tensor(other), Tensor(np.ones((2, 1), np.int32))).numpy()[:, -1].argmax(-1)
    np.testing.assert_array_equal(translate(model, other, 1, 1)[:, 0], first)


@pytest.mark.parametrize("causal", [False, True])
def test_classifier_pools_real_tokens(causal):
    """The head reads the mean of the encoder's output over real tokens, or, causal, the last
    real token, written out in NumPy from the encoder's own output."""
    Tensor.manual_seed(1)
    model = Classifier(config("pre", causal=causal, n_classes=3))
    idx = SRC.astype(np.int32)
    x = model.encoder.encode(Tensor(idx)).numpy()  # (B, T, C)
    real = idx != PAD
    if causal:
        pooled = x[np.arange(len(idx)), real.sum(1) - 1]
    else:
        pooled = (x * real[..., None]).sum(1) / real.sum(1, keepdims=True)
    w, b = model.head.weight.numpy(), model.head.bias.numpy()
    np.testing.assert_allclose(model(Tensor(idx)).numpy(), pooled @ w.T + b, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The two tasks, end to end through the command line
# ---------------------------------------------------------------------------------------------


def cli(*args):
    from conftest import run_main

    from train import main

    return run_main(main, *args)


def result_fields(stdout: str) -> dict[str, str]:
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("result: "), stdout
    return dict(field.split("=", 1) for field in line.split()[1:])


@pytest.mark.parametrize("args, says", [
    (["--task", "classify", "--arch", "sideways"], "argument --arch: invalid choice"),
    (["--task", "reverse", "--arch", "decoder"], "--arch goes with --task classify"),
    (["--task", "translate", "--head-ablation"], "trains a EncoderDecoder"),
    (["--task", "classify", "--logit-lens"], "trains a Classifier"),
    (["--task", "translate", "--steps", "0"], "argument --steps"),
])
def test_the_new_flags_refuse_bad_input_in_one_line(tmp_path, args, says):
    r = cli(*args, "--out", tmp_path / "m")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_translate_learns_and_its_cross_attention_follows_the_alignment(tmp_path):
    """The default run reaches exact match >= 0.95 on held-out strings; --attention then names
    the heads whose strongest source position is the copied digit, and the saved maps show it:
    output position j of a reversal copies source position n - 1 - j."""
    out = tmp_path / "translate"
    r = cli("--task", "translate", "--out", out)
    assert r.returncode == 0, r.stderr
    fields = result_fields(r.stdout)
    assert float(fields["exact_match"]) >= 0.95 and float(fields["chance"]) < 1e-3
    r = cli("--task", "translate", "--out", out, "--attention", tmp_path / "att")
    assert r.returncode == 0, r.stderr
    after = r.stdout.split("alignment heads")[1]
    found = re.findall(r"L(\d)H(\d) ([0-9.]+)%", after)
    named = {(int(a), int(b)): float(c) / 100 for a, b, c in found}
    assert named and min(named.values()) >= 0.9
    # the printed shares, counted again here from the cross-attention of the held-out strings
    from tasks import Translate
    from train import load_checkpoint

    task, model = Translate(), load_checkpoint(out)[0]
    src = task.test
    n = (src != task.PAD).sum(1)  # (B,)
    tgt = task.targets(src)
    inputs = np.concatenate([np.full((len(src), 1), task.BOS), tgt[:, :-1]], 1).astype(np.int32)
    cross = encoder_decoder_maps(model, Tensor(src), Tensor(inputs))[1]["cross"].numpy()
    j = np.arange(inputs.shape[1])
    digit = j[None, :] < n[:, None]  # (B, T): positions that write a digit
    for (layer, head), share in named.items():
        strongest = cross[:, layer, head].argmax(-1)  # (B, T)
        hits = (strongest == n[:, None] - 1 - j[None, :])[digit]
        assert abs(hits.mean() - share) < 1e-3
    saved = np.load(tmp_path / "att" / "attention.npz")
    assert saved["cross"].shape[2:] == (len(saved["src"]) + 1, len(saved["src"]))
    assert (tmp_path / "att" / "attention.png").stat().st_size < 200_000


def test_classify_learns_palindromes_with_an_encoder(tmp_path):
    out = tmp_path / "classify"
    r = cli("--task", "classify", "--out", out)
    assert r.returncode == 0, r.stderr
    fields = result_fields(r.stdout)
    assert float(fields["accuracy"]) >= 0.95 and fields["chance"] == "0.5"
    r = cli("--task", "classify", "--out", out, "--sample")
    assert r.returncode == 0, r.stderr
    assert "palindrome" in r.stdout
    # --attention draws the encoder's heads: rows of 1, and weight above the diagonal (the future)
    r = cli("--task", "classify", "--out", out, "--attention", tmp_path / "att")
    assert r.returncode == 0, r.stderr
    att = np.load(tmp_path / "att" / "attention.npz")["attention"]  # (L, H, T, T)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
    assert np.triu(att, 1).sum(-1).sum(-1).min() > 0.01  # every head looks ahead somewhere
    assert (tmp_path / "att" / "heads.png").exists()
