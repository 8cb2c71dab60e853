"""Regenerate the committed test fixtures: a tiny random GPT-2 saved in OpenAI's official layout.

The real GPT-2 checkpoints are hundreds of megabytes, so the tests prove that loading works on a
tiny random GPT-2 instead. Hugging Face `transformers` builds the model and computes reference
logits and greedy continuations; the files are written with exactly the key names, shapes and
dtypes of the official `openai-community/gpt2` checkpoint files.

Only this script needs torch, transformers, safetensors and tiktoken. The fixtures it writes are
committed, so the tests themselves run without any of those packages.

Run it from the repository root:

    .venv/bin/python tests/make_fixtures.py

It writes (see tests/fixtures/README.md for what each file holds):

    tests/fixtures/tiny-gpt2/config.json
    tests/fixtures/tiny-gpt2/model.safetensors
    tests/fixtures/tiny-gpt2/pytorch_model.bin
    tests/fixtures/tiny-gpt2-reference.npz
    tests/fixtures/tiny-gpt2-attention.npz
    tests/fixtures/tiny-gpt2-trained/config.json, model.safetensors
    tests/fixtures/tiny-gpt2-trained-perplexity.npz   (alone: tests/make_fixtures.py perplexity)
    tests/fixtures/tiny-gpt2-trained-causes.npz   (alone: tests/make_fixtures.py causes)
    tests/fixtures/tiny-gpt2-hooks.npz            (alone: tests/make_fixtures.py hooks)
    tests/fixtures/tiny-gpt2-narrow/config.json, model.safetensors   (with the next one)
    tests/fixtures/tiny-gpt2-patching.npz         (alone: tests/make_fixtures.py patching)
    tests/fixtures/tiny-gpt2-finetune.npz         (alone: tests/make_fixtures.py finetune)
    tests/fixtures/torch-transformer.npz          (alone: tests/make_fixtures.py families)
    tests/fixtures/strided.bin
    tests/fixtures/strided-legacy.bin
    tests/fixtures/strided-expected.npz

Everything is seeded, so tensor values and reference numbers come out the same on every run.
The two .bin files still differ byte-wise between runs, because torch.save writes a random
serialization id (zip format) or memory addresses as storage keys (legacy format).
"""

import collections
import os
from pathlib import Path

import numpy as np
import safetensors.torch
import tiktoken
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

SEED = 1234
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODEL_DIR = FIXTURES / "tiny-gpt2"
END_OF_TEXT = 50256
GREEDY_NEW_TOKENS = 20
# Logits at these many vocabulary columns are kept for every position (see reference_logits).
SAMPLED_COLUMNS = 256
# A greedy step whose best two logits are closer than this could flip under float32 rounding
# differences between implementations, which would make the fixture flaky.
MIN_GREEDY_MARGIN = 1e-3


def make_config(n_positions=128, n_embd=16, n_layer=2, n_head=2):
    # n_ctx and architectures are not needed by transformers, but the official gpt2 config.json
    # has them, and a loader may read n_ctx.
    return GPT2Config(
        architectures=["GPT2LMHeadModel"],
        n_ctx=n_positions,
        vocab_size=50257,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        # The eager attention path is the plain softmax(QK^T)V that a from-scratch model mirrors.
        attn_implementation="eager",
    )


def randomize_weights(model):
    """Replace the default init (std 0.02) with a larger one so the logits are far from uniform.

    With std 0.02 every logit is almost zero and any two inputs give nearly the same greedy
    continuation, so a broken loader could still pass. Nonzero biases and LayerNorm gains that
    are not exactly one make sure every parameter actually influences the output. Std 0.3 (rather
    than 0.2) gives logits with a std of about 1.2 and keeps every greedy step's best two logits
    more than MIN_GREEDY_MARGIN apart.
    """
    generator = torch.Generator().manual_seed(SEED)

    def normal(shape, std):
        return torch.randn(shape, generator=generator) * std

    with torch.no_grad():
        # named_parameters() lists the tied lm_head/wte matrix only once.
        for name, param in model.named_parameters():
            is_layer_norm = ".ln_" in name or name.startswith("transformer.ln_f")
            if is_layer_norm and name.endswith(".weight"):
                param.copy_(1.0 + normal(param.shape, 0.1))
            elif name.endswith(".bias"):
                param.copy_(normal(param.shape, 0.1))
            else:
                param.copy_(normal(param.shape, 0.3))


def make_model():
    model = GPT2LMHeadModel(make_config())
    randomize_weights(model)
    model.eval()
    return model


def official_state_dict(model):
    """The state dict exactly as openai-community/gpt2 stores it.

    The official files use the GPT2Model names (no "transformer." prefix), leave out
    lm_head.weight because it is tied to wte.weight, and carry the causal-mask buffer
    h.N.attn.bias (float32 lower-triangular ones, shape (1, 1, n_positions, n_positions)) right
    after h.N.ln_1.bias. Current transformers no longer has that buffer, so it is added here.
    They do not carry h.N.attn.masked_bias: transformers 2.9-4.x reported it as "newly
    initialized" when loading gpt2 (huggingface/transformers#6780), and the key list printed in
    huggingface/transformers#26173 has no such key.
    """
    n_positions = model.config.n_positions
    causal_mask = torch.tril(torch.ones(n_positions, n_positions))
    causal_mask = causal_mask.view(1, 1, n_positions, n_positions)
    hf_state = model.transformer.state_dict()
    state = collections.OrderedDict()
    for key, value in hf_state.items():
        state[key] = value.detach().clone().contiguous()
        if key.endswith(".ln_1.bias"):
            layer = key.split(".")[1]
            state[f"h.{layer}.attn.bias"] = causal_mask.clone()
    # module.state_dict() attaches per-module version info; torch.save pickles it along, so a
    # loader must cope with it.
    state._metadata = hf_state._metadata
    return state


def save_model_files(model, folder=MODEL_DIR, pytorch_bin=True):
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(folder / "config.json")
    state = official_state_dict(model)
    safetensors.torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    if pytorch_bin:
        torch.save(state, folder / "pytorch_model.bin")
    return state


def check_saved_weights(model, state):
    """Load the written safetensors back into a fresh HF model and compare outputs."""
    reloaded = GPT2LMHeadModel(make_config())
    on_disk = safetensors.torch.load_file(MODEL_DIR / "model.safetensors")
    weights = {k: v for k, v in on_disk.items() if not k.endswith(".attn.bias")}
    missing, unexpected = reloaded.transformer.load_state_dict(weights, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    reloaded.eval()
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    bin_state = torch.load(MODEL_DIR / "pytorch_model.bin", weights_only=True)
    assert list(bin_state) == list(state)
    for key in state:
        assert torch.equal(bin_state[key], on_disk[key]), key


def forward_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float()


def reference_logits(model, encoder):
    """Reference logits for several inputs, trimmed to fit the fixture size budget.

    Full logits are 50257 floats (201 KB) per position, so keeping them all is too large.
    For every position we keep: the logsumexp over the whole vocabulary (checks the whole
    row in one number), the argmax, and the logits at a fixed sample of vocabulary columns.
    Full rows are kept only for the last position of a few cases.
    """
    rng = np.random.default_rng(SEED)
    vocab = model.config.vocab_size
    cases = {
        "len1": [[int(rng.integers(vocab))]],
        "len5": [encoder.encode("Hello, my dog is")],
        "len17": [rng.integers(vocab, size=17).tolist()],
        "len128": [rng.integers(vocab, size=128).tolist()],
        "batch2": rng.integers(vocab, size=(2, 9)).tolist(),
    }
    full_last_row_cases = ["len5", "len128", "batch2"]
    all_logits = {name: forward_logits(model, ids) for name, ids in cases.items()}

    columns = set(rng.choice(vocab, size=SAMPLED_COLUMNS, replace=False).tolist())
    # The extreme ids and every argmax make off-by-one errors in the vocab axis visible.
    columns.update([0, 1, vocab - 2, vocab - 1])
    for logits in all_logits.values():
        columns.update(logits.argmax(dim=-1).flatten().tolist())
    columns = np.array(sorted(columns), dtype=np.int64)

    out = {"case_names": np.array(list(cases)), "vocab_columns": columns}
    for name, ids in cases.items():
        logits = all_logits[name]
        out[f"{name}_ids"] = np.array(ids, dtype=np.int64)
        out[f"{name}_logsumexp"] = torch.logsumexp(logits.double(), dim=-1).float().numpy()
        out[f"{name}_argmax"] = logits.argmax(dim=-1).numpy().astype(np.int64)
        out[f"{name}_column_logits"] = logits[:, :, torch.from_numpy(columns)].numpy()
        if name in full_last_row_cases:
            out[f"{name}_last_logits"] = logits[:, -1, :].numpy()
    return out


def greedy_by_hand(model, prompt, steps):
    """Greedy decoding with a full forward pass per step; returns tokens and the smallest margin."""
    tokens = list(prompt)
    smallest_margin = float("inf")
    for _ in range(steps):
        last = forward_logits(model, [tokens])[0, -1]
        top2 = torch.topk(last, 2).values
        smallest_margin = min(smallest_margin, float(top2[0] - top2[1]))
        tokens.append(int(last.argmax()))
    return tokens[len(prompt) :], smallest_margin


def greedy_continuations(model, encoder):
    prompt_texts = ["<|endoftext|>", "Hello, my dog is", "The quick brown fox"]
    out = {
        "greedy_prompt_texts": np.array(prompt_texts),
        "greedy_new_tokens": np.array(GREEDY_NEW_TOKENS),
    }
    for index, text in enumerate(prompt_texts):
        prompt = encoder.encode(text, allowed_special={"<|endoftext|>"})
        ids = torch.tensor([prompt], dtype=torch.long)
        with torch.no_grad():
            generated = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=GREEDY_NEW_TOKENS,
                min_new_tokens=GREEDY_NEW_TOKENS,
                pad_token_id=END_OF_TEXT,
                eos_token_id=None,
            )
        new_tokens = generated[0, len(prompt) :].tolist()
        assert len(new_tokens) == GREEDY_NEW_TOKENS, len(new_tokens)
        by_hand, margin = greedy_by_hand(model, prompt, GREEDY_NEW_TOKENS)
        assert by_hand == new_tokens, (by_hand, new_tokens)
        assert margin > MIN_GREEDY_MARGIN, f"prompt {text!r}: greedy margin {margin} too small"
        out[f"greedy{index}_prompt"] = np.array(prompt, dtype=np.int64)
        out[f"greedy{index}_output"] = np.array(new_tokens, dtype=np.int64)
        out[f"greedy{index}_output_text"] = np.array(encoder.decode(new_tokens))
        out[f"greedy{index}_min_margin"] = np.array(margin, dtype=np.float32)
    return out


def attention_reference(model, reference):
    """Every layer's and head's attention probabilities, as transformers' eager attention computes
    them (output_attentions=True), for three of the logit cases: (B, n_layer, n_head, T, T)."""
    out = {}
    for name in ("len17", "batch2", "len128"):
        ids = torch.tensor(reference[f"{name}_ids"], dtype=torch.long)
        with torch.no_grad():
            result = model(ids, output_attentions=True)
        out[f"{name}_ids"] = reference[f"{name}_ids"]
        out[f"{name}_attention"] = torch.stack(result.attentions, dim=1).float().numpy()
        out[f"{name}_logits_sum"] = result.logits.double().sum(-1).float().numpy()
    return out


# A model whose loss depends on its context, for perplexity: a random one scores every token
# alike, so a window that lost its context would not show. Trained on tinyshakespeare's first
# 900,000 characters; the perplexity texts come from after them.
TRAINED_DIR = FIXTURES / "tiny-gpt2-trained"
TRAINED_CTX = 64
SHAKESPEARE = FIXTURES.parents[2] / "shared" / "data" / "tinyshakespeare.txt"
PERPLEXITY_CASES = {  # name: (first character, end character, stride)
    "long_stride16": (1_000_000, 1_004_000, 16),  # about 1,300 tokens: dozens of windows
    "long_stride48": (1_000_000, 1_004_000, 48),
    "long_stride32": (1_000_000, 1_004_000, TRAINED_CTX // 2),  # the default: half the context
    # stride = context: windows without overlap (GPT-2's stride 1024). The text ends 10 characters
    # earlier, because 1,281 tokens leave a last window of one token, whose loss the guide's loop
    # takes over no label at all: nan, and nan * 0 tokens makes the whole perplexity nan.
    "long_nooverlap": (1_000_000, 1_003_990, TRAINED_CTX),
    "short": (1_010_000, 1_010_120, 16),  # fewer tokens than one window
}


def train_fixture_model(encoder):
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(make_config(TRAINED_CTX))
    ids = torch.tensor(encoder.encode(SHAKESPEARE.read_text()[:900_000]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(400):
        starts = torch.randint(0, len(ids) - TRAINED_CTX, (16,), generator=generator)
        x = torch.stack([ids[s : s + TRAINED_CTX] for s in starts.tolist()])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def guide_perplexity(model, ids, stride):
    """The loop of Hugging Face's perplexity guide ("Perplexity of fixed-length models",
    docs/source/en/perplexity.md in transformers), on one text: windows input_ids[begin:end]
    with end = min(begin + max_length, seq_len), every label but the last end - prev_end set to
    -100, the model's own loss (it shifts the labels left by one), weighted by the valid labels
    minus one. Besides its average nll and token count, it returns each scored token's loss,
    read from the same logits, and that token's index in ids."""
    input_all = torch.tensor([ids], dtype=torch.long)
    max_length, seq_len = model.config.n_positions, input_all.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    token_losses, targets = [], []
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = input_all[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss
        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size  # the internal label shift
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        # the per-token losses the model's loss averaged: position p predicts label p + 1
        logp = torch.log_softmax(outputs.logits[0].double(), -1)
        for p, label in enumerate(target_ids[0, 1:].tolist()):
            if label != -100:
                token_losses.append(-float(logp[p, label]))
                targets.append(begin_loc + p + 1)
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    avg_nll = nll_sum / n_tokens  # average negative log-likelihood per token
    return float(avg_nll), n_tokens, np.array(token_losses), np.array(targets, dtype=np.int64)


def perplexity_reference(model, encoder):
    out = {"case_names": np.array(list(PERPLEXITY_CASES))}
    text = SHAKESPEARE.read_text()
    for name, (first, end, stride) in PERPLEXITY_CASES.items():
        ids = encoder.encode(text[first:end])
        nll, guide_tokens, token_losses, targets = guide_perplexity(model, ids, stride)
        assert np.isfinite(nll), name
        out[f"{name}_chars"] = np.array([first, end])
        out[f"{name}_stride"] = np.array(stride)
        out[f"{name}_ids"] = np.array(ids, dtype=np.int64)
        out[f"{name}_targets"] = targets  # the index in ids of each scored token, in order
        out[f"{name}_token_nll"] = token_losses.astype(np.float32)  # each scored token's loss
        out[f"{name}_nll"] = np.array(nll)  # the guide's avg_nll
        out[f"{name}_guide_tokens"] = np.array(guide_tokens)  # the guide's n_tokens
        out[f"{name}_tokens"] = np.array(len(token_losses))  # the tokens scored
    # The context must matter, or the windows would not be tested: the second token of a window
    # without overlap (one token of context) must score differently with stride 16's context.
    wide = dict(zip(out["long_stride16_targets"].tolist(), out["long_stride16_token_nll"]))
    narrow = dict(zip(out["long_nooverlap_targets"].tolist(), out["long_nooverlap_token_nll"]))
    opening = range(TRAINED_CTX + 1, len(out["long_nooverlap_ids"]), TRAINED_CTX)
    shift = np.mean([abs(wide[t] - narrow[t]) for t in opening])
    assert shift > 0.05, shift
    return out


# The text whose head ablations and logit lens the tests compare, token for token
CAUSES_TEXT = "ROMEO: Is the day so young? The day is young, and so am I, my lord."
# --mean-from's other text: each head's mean output over all of its positions replaces the head
CAUSES_REFERENCE = "JULIET: O Romeo, Romeo! wherefore art thou Romeo?"


def causes_reference(encoder):
    """Head ablation and the logit lens of the trained fixture, as Hugging Face computes them.

    transformers 5 has no head_mask: a hook on each layer's attn.c_proj rewrites the columns of
    the knocked-out head in c_proj's input (the heads side by side), with zeros or with their
    mean over the positions. The lens reads hidden_states[i] through ln_f and the tied lm_head;
    GPT2Model applies ln_f to the last hidden state itself, so that one goes to lm_head alone."""
    model = GPT2LMHeadModel.from_pretrained(TRAINED_DIR).eval()
    ids = encoder.encode(CAUSES_TEXT)
    x, y = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])
    n_layer, n_head = model.config.n_layer, model.config.n_head
    hs = model.config.n_embd // n_head
    knocked, mean = set(), False

    def hook(layer):
        def rewrite(module, args):
            (h,) = args
            h = h.clone()
            for lay, head in knocked:
                if lay == layer:
                    cols = slice(head * hs, (head + 1) * hs)
                    if mean == "causal":  # the running mean of positions 0..t
                        T = h.shape[1]
                        h[..., cols] = h[..., cols].cumsum(1) / torch.arange(1, T + 1)[:, None]
                    elif mean == "reference":  # the other text's mean over all its positions
                        h[..., cols] = reference[layer][cols]
                    else:
                        h[..., cols] = h[..., cols].mean(1, keepdim=True) if mean else 0.0
            return (h,)
        return rewrite

    reference = {}  # layer -> c_proj's input averaged over the reference text's positions

    def keep(layer):
        def hook(module, args):  # returns None: a pre-hook that returns a value replaces args
            reference[layer] = args[0][0].mean(0)
        return hook

    handles = [block.attn.c_proj.register_forward_pre_hook(keep(layer))
               for layer, block in enumerate(model.transformer.h)]
    with torch.no_grad():
        model(torch.tensor([encoder.encode(CAUSES_REFERENCE)]))
    for handle in handles:
        handle.remove()
    for layer, block in enumerate(model.transformer.h):
        block.attn.c_proj.register_forward_pre_hook(hook(layer))

    def loss():
        with torch.no_grad():
            logits = model(x).logits[0].double()
        return float(torch.nn.functional.cross_entropy(logits, y))

    out = {"ids": np.array(ids, dtype=np.int64), "base_loss": np.array(loss())}
    for kind in ("zero", "mean", "causal", "reference"):
        mean = {"zero": False, "mean": True, "causal": "causal", "reference": "reference"}[kind]
        delta = np.zeros((n_layer, n_head))
        for layer in range(n_layer):
            for head in range(n_head):
                knocked = {(layer, head)}
                delta[layer, head] = loss() - out["base_loss"]
        out[f"{kind}_loss_delta"] = delta
    mean, knocked = False, {(0, 1), (1, 0)}
    out["zero_0.1_1.0_loss"] = np.array(loss())
    T = len(ids)
    # the lens of the plain pass, and of the pass with head 0.1 zeroed ("ablated_" keys)
    for tag, heads in (("", set()), ("ablated_", {(0, 1)})):
        knocked = heads  # what the c_proj hooks read
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            readings = [model.lm_head(model.transformer.ln_f(h)) for h in hidden[:-1]]
            readings.append(model.lm_head(hidden[-1]))
        probs = torch.stack(readings)[:, 0].double().softmax(-1).numpy()  # (L + 1, T, V)
        out[f"{tag}next_token_prob"] = probs[:, np.arange(T - 1), ids[1:]]  # (L + 1, T - 1)
        out[f"{tag}top_ids"] = np.argsort(-probs, axis=-1, kind="stable")[:, :, :5]
        out[f"{tag}top_probs"] = np.take_along_axis(probs, out[f"{tag}top_ids"], -1)
    knocked = set()
    return out


# The replacements the hook tests make through both models' hooks, by hook point: each changes
# one activation as a formula both sides can write (tests/test_hooks.py has the same list)
HOOK_REPLACEMENTS = ("blocks.0.hook_resid_pre", "blocks.1.attn.hook_z",
                     "blocks.0.attn.hook_pattern", "blocks.1.hook_mlp_out", "blocks.0.attn.hook_v",
                     "ln_final.hook_scale", "blocks.1.attn.hook_q", "hook_pos_embed")


def hooks_reference(encoder):
    """Every hook point of the two GPT-2 fixtures (the trained one, and the random one whose
    biases and LayerNorms are not 0 and 1) on CAUSES_TEXT, read by forward hooks on Hugging
    Face's modules, and the logits (at the columns `cols`) after each of HOOK_REPLACEMENTS made
    through the same kind of hook. A LayerNorm's scale, which no module returns, is computed
    from the input Hugging Face's LayerNorm gets: sqrt(biased variance + eps)."""
    ids = encoder.encode(CAUSES_TEXT)
    rng = np.random.default_rng(SEED)
    cols = np.unique(np.concatenate([ids, rng.choice(50257, 400, replace=False)]))
    out = {"ids": np.array(ids, dtype=np.int64), "cols": cols}
    for tag, folder in (("trained", TRAINED_DIR), ("random", MODEL_DIR)):
        model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
        out.update({f"{tag}.{k}": v for k, v in hook_readings(model, ids, cols).items()})
    return out


def hook_readings(model, ids, cols) -> dict:
    """hooks_reference for one model: name -> activation, "logits", "replaced.NAME"."""
    c = model.config
    H, hs, T, C = c.n_head, c.n_embd // c.n_head, len(ids), c.n_embd
    seen, replace = {}, set()

    def keep(name, value):
        seen[name] = value.detach().double().numpy().copy()

    def scale_of(h, eps):
        return (h.var(-1, unbiased=False, keepdim=True) + eps).sqrt()

    def on_input(name, module, fn=None):
        def hook(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if name in replace and fn is not None:
                h = fn(h)
            keep(name, h)
            if name.endswith("hook_input"):  # a LayerNorm's input: its scale
                keep(name.replace("hook_input", "hook_scale"), scale_of(h, mod.eps))
            return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
        module.register_forward_pre_hook(hook, with_kwargs=True)

    def on_output(name, module, fn=None):
        def hook(mod, args, output):
            y = output[0] if isinstance(output, tuple) else output
            if name in replace and fn is not None:
                y = fn(y)
            keep(name, y)
            return (y, *output[1:]) if isinstance(output, tuple) else y
        module.register_forward_hook(hook)

    def uniform_causal(p):
        return torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None] + 0 * p

    def z_head_1_from_2(h):
        z = h.reshape(1, T, H, hs).clone()
        z[:, 2:, 1] = 0.0
        return z.reshape(1, T, H * hs)

    def qkv(layer):
        def hook(mod, args, y):
            y = y.clone()
            if f"blocks.{layer}.attn.hook_v" in replace:
                y[..., 2 * C :] *= 2
            if f"blocks.{layer}.attn.hook_q" in replace:
                y[..., :C] *= 3
            for i, part in enumerate("qkv"):
                keep(f"blocks.{layer}.attn.hook_{part}",
                     y[..., i * C : (i + 1) * C].reshape(1, T, H, hs))
            return y
        return hook

    def ln_f_scaled(mod, args, output):
        (h,) = args
        if "ln_final.hook_scale" in replace:
            mean = h.mean(-1, keepdim=True)
            output = (h - mean) / (2 * scale_of(h, mod.eps)) * mod.weight + mod.bias
        return output

    t = model.transformer
    on_output("hook_embed", t.wte)
    on_output("hook_pos_embed", t.wpe, lambda p: p * 0)
    for layer, block in enumerate(t.h):
        # the path that applies attn_dropout (identity in eval) to the probabilities, so a hook
        # there reads and replaces them; in float32 the same softmax(q kᵀ / √d + mask)
        block.attn.reorder_and_upcast_attn = True
        on_input(f"blocks.{layer}.hook_resid_pre", block, lambda h: h * 0.5 + 0.25)
        on_input(f"blocks.{layer}.ln1.hook_input", block.ln_1)
        block.attn.c_attn.register_forward_hook(qkv(layer))
        on_output(f"blocks.{layer}.attn.hook_pattern", block.attn.attn_dropout, uniform_causal)
        on_input(f"blocks.{layer}.attn.hook_z", block.attn.c_proj, z_head_1_from_2)
        on_output(f"blocks.{layer}.hook_attn_out", block.attn)
        on_input(f"blocks.{layer}.hook_resid_mid", block.ln_2)
        on_input(f"blocks.{layer}.ln2.hook_input", block.ln_2)
        on_output(f"blocks.{layer}.hook_mlp_out", block.mlp, lambda y: -y)
        on_output(f"blocks.{layer}.hook_resid_post", block)
    on_input("ln_final.hook_input", t.ln_f)
    t.ln_f.register_forward_hook(ln_f_scaled)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = {"logits": model(x).logits[0].double().numpy()[:, cols]}
    for name, value in seen.items():
        if "hook_input" not in name:
            value = value.reshape(1, T, H, hs) if name.endswith(("_q", "_k", "_v", "_z")) else value
            out[name] = value[0] if name == "hook_pos_embed" else value  # (T, C), as ours
    for name in HOOK_REPLACEMENTS:
        replace.clear()
        replace.add(name)
        with torch.no_grad():
            out[f"replaced.{name}"] = model(x).logits[0].double().numpy()[:, cols]
    return out


# A third GPT-2 of another shape, random like tiny-gpt2 (biases and LayerNorm parameters far from
# 0 and 1): 3 layers of 3 heads of 4 dimensions, context 32. Code that mixes up the layer, head
# or head-size axes can pass on the other two fixtures' 2 x 2 x 8, not on this one.
NARROW_DIR = FIXTURES / "tiny-gpt2-narrow"
NARROW_SHAPE = dict(n_positions=32, n_embd=12, n_layer=3, n_head=3)


def save_narrow_model():
    """Build, save and check the narrow fixture: its files must load back into Hugging Face's
    GPT2LMHeadModel and give bit for bit the logits of the model that wrote them."""
    model = GPT2LMHeadModel(make_config(**NARROW_SHAPE))
    randomize_weights(model)
    model.eval()
    save_model_files(model, NARROW_DIR, pytorch_bin=False)
    reloaded = GPT2LMHeadModel.from_pretrained(NARROW_DIR, attn_implementation="eager").eval()
    ids = torch.arange(0, 50257, 1571)[None, :32]  # 32 ids across the vocabulary: the context
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


# The indirect-object text of Wang et al. (2022), a clean and a corrupted run that differ in one
# token, and the logit difference between the two names that the patching experiments measure
PATCH_CLEAN = "When John and Mary went to the store, Mary gave a drink to"
PATCH_CORRUPT = "When John and Mary went to the store, John gave a drink to"
PATCH_ANSWER, PATCH_WRONG = " John", " Mary"


def patching_reference(encoder):
    """Activation patching, attribution patching and direct logit attribution on the trained and
    the narrow fixture, by Hugging Face's model and hooks on its modules (patching_readings)."""
    clean, corrupt = encoder.encode(PATCH_CLEAN), encoder.encode(PATCH_CORRUPT)
    assert len(clean) == len(corrupt), (clean, corrupt)
    answer, wrong = encoder.encode(PATCH_ANSWER), encoder.encode(PATCH_WRONG)
    assert len(answer) == 1 and len(wrong) == 1, (answer, wrong)
    out = {
        "clean_ids": np.array(clean, dtype=np.int64),
        "corrupt_ids": np.array(corrupt, dtype=np.int64),
        "answer": np.array(answer[0], dtype=np.int64),
        "wrong": np.array(wrong[0], dtype=np.int64),
    }
    for tag, folder in (("trained", TRAINED_DIR), ("narrow", NARROW_DIR)):
        model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
        readings = patching_readings(model, clean, corrupt, answer[0], wrong[0])
        out.update({f"{tag}.{k}": v for k, v in readings.items()})
    return out


def patching_readings(model, clean, corrupt, answer, wrong) -> dict:
    """patching_reference for one model. Every activation goes through one function, `site`,
    called by a hook at its place: it writes in the patch when there is one for that place, and
    keeps the activation (with its gradient retained when the run records one).

    The places, as (kind, layer): "resid_pre" the block's input (a forward pre-hook on the
    block), "attn_out" and "mlp_out" the outputs of attn (the first of its tuple) and mlp, "z"
    c_proj's input, the heads' outputs side by side (1, T, n_head * hs); and, read for the direct
    logit attribution only, ("embed", 0), ("pos_embed", 0) and ("final", 0), ln_f's input."""
    c = model.config
    L, H, hs, T = c.n_layer, c.n_head, c.n_embd // c.n_head, len(clean)
    seen = {}  # (kind, layer) -> the activation (1, T, width) of the latest run
    patch = None  # or (kind, layer, positions, columns, source): write source there

    def site(kind, layer, value):
        if patch is not None and patch[:2] == (kind, layer):
            _, _, positions, columns, source = patch
            value = value.clone()
            value[0, positions, columns] = source[0, positions, columns]
        if value.requires_grad:  # the run with autograd, for the attribution
            value.retain_grad()
        seen[kind, layer] = value
        return value

    def block_input(layer):
        # transformers 5.25 passes a block its hidden states as the first positional argument;
        # read them from the keywords too in case a version passes them by name
        def hook(mod, args, kwargs):
            if args:
                return (site("resid_pre", layer, args[0]), *args[1:]), kwargs
            h = site("resid_pre", layer, kwargs["hidden_states"])
            return args, {**kwargs, "hidden_states": h}
        return hook

    def first_input(kind, layer):
        return lambda mod, args: (site(kind, layer, args[0]), *args[1:])

    def output(kind, layer):
        def hook(mod, args, y):
            if isinstance(y, tuple):  # attn returns (output, attention weights)
                return (site(kind, layer, y[0]), *y[1:])
            return site(kind, layer, y)
        return hook

    t = model.transformer
    t.wte.register_forward_hook(output("embed", 0))
    t.wpe.register_forward_hook(output("pos_embed", 0))
    for layer, block in enumerate(t.h):
        block.register_forward_pre_hook(block_input(layer), with_kwargs=True)
        block.attn.register_forward_hook(output("attn_out", layer))
        block.attn.c_proj.register_forward_pre_hook(first_input("z", layer))
        block.mlp.register_forward_hook(output("mlp_out", layer))
    t.ln_f.register_forward_pre_hook(first_input("final", 0))

    def logit_diff(logits):  # the metric, in float64
        return logits[0, -1, answer].double() - logits[0, -1, wrong].double()

    def patched(place=None):
        """The corrupt run's logit difference with the patch `place` from the clean run."""
        nonlocal patch
        patch = None if place is None else (*place, acts[place[:2]])
        with torch.no_grad():
            diff = float(logit_diff(model(torch.tensor([corrupt])).logits))
        patch = None
        return diff

    with torch.no_grad():
        clean_diff = float(logit_diff(model(torch.tensor([clean])).logits))
    acts = {place: value.detach().clone() for place, value in seen.items()}  # the clean run's
    out = {"clean_logit_diff": np.array(clean_diff), "corrupt_logit_diff": np.array(patched())}

    # Activation patching: one clean activation in the corrupt run, at one place per cell.
    everything = slice(None)
    for kind in ("resid_pre", "attn_out", "mlp_out"):  # one position, all of the features
        out[kind] = np.array([[patched((kind, layer, p, everything)) for p in range(T)]
                              for layer in range(L)])
    head = [slice(h * hs, (h + 1) * hs) for h in range(H)]  # head h's columns of z
    out["z"] = np.array([[patched(("z", layer, everything, head[h])) for h in range(H)]
                         for layer in range(L)])  # one head at every position
    out["z_pos_heads"] = np.array([[L - 1, 0], [0, H - 1]], dtype=np.int64)
    out["z_pos"] = np.array([[patched(("z", layer, p, head[h])) for p in range(T)]
                             for layer, h in out["z_pos_heads"]])  # one head at one position

    # Attribution patching (Nanda 2023): the first-order Taylor estimate of every cell above,
    # (clean - corrupt) times the gradient of the corrupt run's logit difference, summed over
    # the features; from one clean run (acts), one corrupt run and one backward pass.
    with torch.enable_grad():
        logit_diff(model(torch.tensor([corrupt])).logits).backward()
    model.zero_grad(set_to_none=True)

    def attribution(kind, layer):  # (T, width) in float64
        value = seen[kind, layer]
        change = acts[kind, layer][0].double() - value.detach()[0].double()
        return change * value.grad[0].double()

    for kind in ("resid_pre", "attn_out", "mlp_out"):
        out[f"attr.{kind}"] = np.array([attribution(kind, layer).sum(-1).numpy()
                                        for layer in range(L)])
    out["attr.z"] = np.array([attribution("z", layer).reshape(T, H, hs).sum((0, 2)).numpy()
                              for layer in range(L)])

    # Direct logit attribution of the clean run, with ln_f's scale frozen at its value there
    # (TransformerLens's convention): a component c at the last position adds
    # ((c - mean(c)) / scale) . (ln_f.weight * (W_U[answer] - W_U[wrong])). The sum of all of
    # them is the logit difference, exactly: pre-LN GPT-2's last residual is their sum.
    w_u = t.wte.weight.detach().double()  # the tied unembedding's rows
    d = w_u[answer] - w_u[wrong]
    x_final = acts["final", 0][0, -1].double()
    scale = (x_final.var(unbiased=False) + t.ln_f.eps).sqrt()
    direction = t.ln_f.weight.detach().double() * d

    def dla(vector):
        vector = vector.double()
        return float((vector - vector.mean()) / scale @ direction)

    out["dla.embed"] = np.array(dla(acts["embed", 0][0, -1]))
    out["dla.pos_embed"] = np.array(dla(acts["pos_embed", 0][0, -1]))
    # head h alone through c_proj, whose Conv1D weight is (in, out): z_h @ W[h's rows], no bias
    out["dla.heads"] = np.array([[
        dla(acts["z", layer][0, -1, head[h]] @ block.attn.c_proj.weight.detach()[head[h]])
        for h in range(H)] for layer, block in enumerate(t.h)])
    out["dla.mlp"] = np.array([dla(acts["mlp_out", layer][0, -1]) for layer in range(L)])
    out["dla.biases"] = np.array(sum(dla(block.attn.c_proj.bias.detach()) for block in t.h)
                                 + float(t.ln_f.bias.detach().double() @ d))
    out["dla.logit_diff"] = np.array(clean_diff)
    total = (out["dla.embed"] + out["dla.pos_embed"] + out["dla.heads"].sum()
             + out["dla.mlp"].sum() + out["dla.biases"])
    assert abs(total - clean_diff) < 1e-4, (total, clean_diff)

    # Positions before the first differing token see the same tokens in both runs: patching
    # there changes nothing and its estimate is 0. Patching layer 0's input at the differing
    # token makes the whole corrupt input the clean one, so it gives the clean difference.
    first = next(p for p in range(T) if clean[p] != corrupt[p])
    for kind in ("resid_pre", "attn_out", "mlp_out"):
        assert np.allclose(out[kind][:, :first], out["corrupt_logit_diff"], rtol=0, atol=1e-6)
        assert np.allclose(out[f"attr.{kind}"][:, :first], 0.0, rtol=0, atol=1e-6)
    assert np.allclose(out["z_pos"][:, :first], out["corrupt_logit_diff"], rtol=0, atol=1e-6)
    assert abs(out["resid_pre"][0, first] - clean_diff) < 1e-5
    return out


def strided_tensors():
    """Tensors whose storage layout is not one plain contiguous block, plus every dtype we read."""
    generator = torch.Generator().manual_seed(SEED)
    base = torch.randn(5, 7, generator=generator)
    cube = torch.randn(2, 3, 4, generator=generator)
    shared = torch.arange(24, dtype=torch.float32)
    tensors = collections.OrderedDict()
    tensors["plain"] = base
    tensors["transposed"] = base.t()
    tensors["row_view"] = base[3]
    tensors["column_view"] = base[:, 2]
    tensors["permuted"] = cube.permute(2, 0, 1)
    tensors["expanded"] = torch.tensor([1.5, -2.5, 4.0]).view(3, 1).expand(3, 4)
    tensors["shared_a"] = shared[2:10].view(2, 4)
    tensors["shared_b"] = shared.view(4, 6)[1:, ::2]
    tensors["float16"] = torch.randn(3, 2, generator=generator).half().t()
    tensors["bfloat16"] = torch.randn(3, 2, generator=generator).bfloat16().t()
    tensors["int64"] = torch.tensor([[-(2**40), 7], [3, 2**50]], dtype=torch.int64)
    tensors["int32"] = torch.tensor([-5, 0, 2**30], dtype=torch.int32)
    tensors["uint8"] = torch.tensor([0, 1, 254, 255], dtype=torch.uint8)
    tensors["bool"] = torch.tensor([[True, False, True]])
    tensors["scalar"] = torch.tensor(-1e4)
    tensors["empty"] = torch.zeros(0, 3)
    return tensors


def save_strided_fixtures():
    tensors = strided_tensors()
    torch.save(tensors, FIXTURES / "strided.bin")
    torch.save(tensors, FIXTURES / "strided-legacy.bin", _use_new_zipfile_serialization=False)
    # bfloat16 has no numpy dtype; the reader returns it upcast to float32, which is exact.
    expected = {}
    for name, tensor in tensors.items():
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        expected[name] = tensor.contiguous().numpy()
    np.savez(FIXTURES / "strided-expected.npz", **expected)


# The other two families (transformer.py's encoder and decoder blocks, families.py's
# EncoderDecoder), checked against PyTorch's own modules with random weights: small sizes, a
# padded source, no dropout, and GPT-2's tanh GELU as the activation so that the MLPs match.
FAMILIES = dict(vocab=12, d_model=16, nhead=4, layers=2, src_len=7, tgt_len=5, pad_id=0)


def families_reference():
    """torch.nn.TransformerEncoderLayer, TransformerDecoderLayer and Transformer, post-LN and
    pre-LN (norm_first): their weights under PyTorch's names, inputs, and outputs."""
    f = FAMILIES
    C, S, T = f["d_model"], f["src_len"], f["tgt_len"]
    torch.manual_seed(SEED)
    gelu = lambda x: torch.nn.functional.gelu(x, approximate="tanh")
    layer_args = dict(d_model=C, nhead=f["nhead"], dim_feedforward=4 * C, dropout=0.0,
                      activation=gelu, batch_first=True)
    src = torch.randint(1, f["vocab"], (2, S))
    src[1, 4:] = f["pad_id"]  # the second source is 4 tokens long, then padding
    tgt = torch.randint(1, f["vocab"], (2, T))
    pad = src == f["pad_id"]  # True where PyTorch must not attend
    causal = torch.nn.Transformer.generate_square_subsequent_mask(T)
    out = {"src": src.numpy(), "tgt": tgt.numpy()}
    for norm in ("post", "pre"):
        first = norm == "pre"
        enc = torch.nn.TransformerEncoderLayer(**layer_args, norm_first=first).eval()
        dec = torch.nn.TransformerDecoderLayer(**layer_args, norm_first=first).eval()
        whole = torch.nn.Transformer(**layer_args, norm_first=first, num_encoder_layers=f["layers"],
                                     num_decoder_layers=f["layers"]).eval()
        if not first:  # the 2017 post-LN stacks end in a LayerNorm already: no extra one
            whole.encoder.norm, whole.decoder.norm = None, None
        # embeddings shared by source, target and output, as in Vaswani et al. (section 3.4)
        wte, wpe = torch.randn(f["vocab"], C) * 0.5, torch.randn(S, C) * 0.1
        x, memory = torch.randn(2, S, C), torch.randn(2, S, C)
        y = torch.randn(2, T, C)
        with torch.no_grad():
            out[f"{norm}/encoder_layer/out"] = enc(x, src_key_padding_mask=pad).numpy()
            out[f"{norm}/decoder_layer/out"] = dec(y, memory, tgt_mask=causal,
                                                   memory_key_padding_mask=pad).numpy()
            hidden = whole(wte[src] + wpe[:S], wte[tgt] + wpe[:T], tgt_mask=causal,
                           src_key_padding_mask=pad, memory_key_padding_mask=pad)
            out[f"{norm}/transformer/logits"] = (hidden @ wte.T).numpy()
        for key, value in (("x", x), ("memory", memory), ("y", y)):
            out[f"{norm}/{key}"] = value.numpy()
        modules = (("encoder_layer", enc), ("decoder_layer", dec), ("transformer", whole))
        for name, module in modules:
            for key, value in module.state_dict().items():
                out[f"{norm}/{name}/{key}"] = value.numpy()
        out[f"{norm}/transformer/wte"], out[f"{norm}/transformer/wpe"] = wte.numpy(), wpe.numpy()
    return out


# Fine-tuning the trained fixture (tests/test_finetune.py): its step under PyTorch's AdamW
FINETUNE_STEPS, FINETUNE_BATCH, FINETUNE_BLOCK = 20, 4, 32
FINETUNE_LR, FINETUNE_WARMUP, FINETUNE_DECAY, FINETUNE_BETAS = 1e-3, 5, 0.1, (0.9, 0.95)


def finetune_lr(step: int) -> float:
    """Linear warmup to FINETUNE_LR, then cosine decay to a tenth of it (GPT-3's schedule, as
    nanoGPT's get_lr writes it), for steps 0 .. FINETUNE_STEPS - 1."""
    if step < FINETUNE_WARMUP:
        return FINETUNE_LR * (step + 1) / FINETUNE_WARMUP
    progress = (step - FINETUNE_WARMUP) / (FINETUNE_STEPS - FINETUNE_WARMUP)
    return FINETUNE_LR * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))


def finetune_reference(encoder):
    """20 steps of fine-tuning the trained fixture on fixed batches of text it was not trained on
    (tinyshakespeare after its first 900,000 characters), by Hugging Face's GPT2LMHeadModel and
    torch.optim.AdamW: weight decay on matrices and embeddings only, the gradient's global norm
    clipped to 1 (clip_grad_norm_), the learning rate of finetune_lr. Eval mode: no dropout, as
    tinygpt has none. Keeps the batches, each step's loss and gradient norm, the text whose tail
    the task holds out, and the settings."""
    text = SHAKESPEARE.read_text()[900_000:906_000]
    ids = np.array(encoder.encode_ordinary(text), dtype=np.int64)
    rng = np.random.default_rng(SEED)
    T = FINETUNE_BLOCK
    starts = rng.integers(0, len(ids) - T - 1, (FINETUNE_STEPS, FINETUNE_BATCH))
    batches = np.stack([[ids[s : s + T + 1] for s in row] for row in starts])  # (steps, B, T + 1)
    model = GPT2LMHeadModel.from_pretrained(TRAINED_DIR).eval()
    params = list(model.parameters())  # the tied lm_head is wte, listed once
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2],
                              "weight_decay": FINETUNE_DECAY},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=FINETUNE_LR, betas=FINETUNE_BETAS, eps=1e-8)
    losses, norms = [], []
    for step, batch in enumerate(torch.tensor(batches)):
        for group in opt.param_groups:
            group["lr"] = finetune_lr(step)
        logits = model(batch[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        opt.step()
        losses.append(loss.item())
    return {"batches": batches.astype(np.int32), "losses": np.array(losses),
            "grad_norms": np.array(norms), "text": np.array(text),
            "lr": np.array(FINETUNE_LR), "warmup": np.array(FINETUNE_WARMUP),
            "weight_decay": np.array(FINETUNE_DECAY), "betas": np.array(FINETUNE_BETAS)}


def main():
    FIXTURES.mkdir(parents=True, exist_ok=True)
    # The shared tokenizer cache lets tiktoken work without network access.
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", "/work/shared/tiktoken")
    encoder = tiktoken.get_encoding("r50k_base")
    model = make_model()
    state = save_model_files(model)
    check_saved_weights(model, state)
    reference = reference_logits(model, encoder)
    reference.update(greedy_continuations(model, encoder))
    np.savez_compressed(FIXTURES / "tiny-gpt2-reference.npz", **reference)
    attention = attention_reference(model, reference)
    np.savez_compressed(FIXTURES / "tiny-gpt2-attention.npz", **attention)
    trained = train_fixture_model(encoder)
    save_model_files(trained, TRAINED_DIR, pytorch_bin=False)
    perplexity = perplexity_reference(trained, encoder)
    np.savez(FIXTURES / "tiny-gpt2-trained-perplexity.npz", **perplexity)
    save_strided_fixtures()
    np.savez(FIXTURES / "tiny-gpt2-trained-causes.npz", **causes_reference(encoder))
    np.savez_compressed(FIXTURES / "tiny-gpt2-hooks.npz", **hooks_reference(encoder))
    save_narrow_model()
    np.savez(FIXTURES / "tiny-gpt2-patching.npz", **patching_reference(encoder))
    np.savez_compressed(FIXTURES / "tiny-gpt2-finetune.npz", **finetune_reference(encoder))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    for path in sorted(FIXTURES.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:>10,d}  {path.relative_to(FIXTURES.parent.parent)}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["families"]:  # only the encoder / encoder-decoder references
        np.savez(FIXTURES / "torch-transformer.npz", **families_reference())
    elif sys.argv[1:] == ["perplexity"]:  # only the perplexity reference, from the committed
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", "/work/shared/tiktoken")  # trained fixture
        trained = GPT2LMHeadModel.from_pretrained(TRAINED_DIR).eval()
        reference = perplexity_reference(trained, tiktoken.get_encoding("r50k_base"))
        np.savez(FIXTURES / "tiny-gpt2-trained-perplexity.npz", **reference)
    elif sys.argv[1:] == ["hooks"]:  # only the hook points' references, from the committed
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", "/work/shared/tiktoken")  # fixtures
        reference = hooks_reference(tiktoken.get_encoding("r50k_base"))
        np.savez_compressed(FIXTURES / "tiny-gpt2-hooks.npz", **reference)
    elif sys.argv[1:] == ["patching"]:  # only the patching references (and the narrow model,
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", "/work/shared/tiktoken")  # when missing)
        if not (NARROW_DIR / "model.safetensors").exists():
            save_narrow_model()
        reference = patching_reference(tiktoken.get_encoding("r50k_base"))
        np.savez(FIXTURES / "tiny-gpt2-patching.npz", **reference)
        for key, value in reference.items():
            print(f"{key:28s} {value.shape}")
    elif sys.argv[1:] == ["causes"]:  # only the ablation and lens references, from the committed
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", "/work/shared/tiktoken")  # trained fixture
        reference = causes_reference(tiktoken.get_encoding("r50k_base"))
        np.savez(FIXTURES / "tiny-gpt2-trained-causes.npz", **reference)
    elif sys.argv[1:] == ["finetune"]:  # only the fine-tuning reference, from the committed
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", "/work/shared/tiktoken")  # trained fixture
        reference = finetune_reference(tiktoken.get_encoding("r50k_base"))
        np.savez_compressed(FIXTURES / "tiny-gpt2-finetune.npz", **reference)
        for key in ("losses", "grad_norms"):
            print(key, np.round(reference[key], 4))
    else:
        main()
