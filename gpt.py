"""GPT-2 with OpenAI's official weights, built from transformer.py's blocks, and a CLI that talks.

GPT-2 ("Language Models are Unsupervised Multitask Learners", Radford et al., 2019) is exactly
transformer.py's Transformer with learned positions, pre-LN blocks, a 1024-token context and the
50257-token byte-level BPE vocabulary. This file adds what the real model needs around it: the four
sizes, fetching the weights from the Hugging Face hub, mapping them onto the model, the tokenizer,
and streaming generation.

    python gpt.py -p "How can entropy be reversed?"
    python gpt.py --model gpt2-medium -n 100 -t 0.8 --top-p 0.9 -p "The meaning of life is"
    echo "Once upon a time" | python gpt.py --num-samples 3 --seed 1
    python gpt.py --beam 2 -p "Hello"   # faster decoding after a one-time kernel search
    python gpt.py --attention "The cat sat on the mat"   # every head's attention, in attention/
    python gpt.py --perplexity book.txt                  # how well GPT-2 predicts a text
"""
from __future__ import annotations

import codecs
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tinygrad import Device, Tensor, TinyJit

import flags
from flags import UserError
from generate import generate, padded_length
from runtime import exit_now, install, jit_at_once, on_device
from transformer import Config, Transformer

# (n_layer, n_head, n_embd) from the config.json of each openai-community model on the hub
SIZES = {
    "gpt2": (12, 12, 768),  # 124M parameters
    "gpt2-medium": (24, 16, 1024),  # 350M
    "gpt2-large": (36, 20, 1280),  # 774M
    "gpt2-xl": (48, 25, 1600),  # 1558M
}
EOT = 50256  # <|endoftext|>: separates documents in GPT-2's training data
WEIGHTS_DIR = Path(__file__).parent / "weights"


def gpt2_config(model: str) -> Config:
    if model not in SIZES:
        raise UserError(f"unknown model {model!r}; choose one of {', '.join(SIZES)}")
    n_layer, n_head, n_embd = SIZES[model]
    return Config(vocab_size=50257, n_ctx=1024, n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def config_from_hf(path: Path, fallback: Config) -> Config:
    """A checkpoint in a Hugging Face folder has its shape in config.json beside it."""
    if not path.exists():
        return fallback
    hf = json.loads(path.read_text())
    return replace(fallback, vocab_size=hf["vocab_size"], n_ctx=hf["n_positions"],
                   n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                   ln_eps=hf.get("layer_norm_epsilon", 1e-5))


# ---------------------------------------------------------------------------------------------
# Weights: where they come from and how they map onto the model
# ---------------------------------------------------------------------------------------------


def weights_url(model: str) -> str:
    """The hub's URL for the weights; HF_ENDPOINT picks a mirror, as huggingface_hub does."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/openai-community/{model}/resolve/main/model.safetensors"


def fetch_weights(model: str, weights_dir: Path) -> Path:
    """Path of the verified checkpoint, downloading it on first use (see download.py)."""
    from download import download

    dest = weights_dir / model / "model.safetensors"
    try:
        # on a terminal, a progress bar; in a pipe or a log, only the one-line outcome
        return download(weights_url(model), dest, progress=sys.stderr.isatty())
    except UserError as e:
        raise UserError(f"{e}. Fetch it when online (python gpt.py --model {model} --download), "
                        f"or pass a local checkpoint with --weights FILE") from None


# safetensors dtype names -> NumPy's; BF16 has no NumPy dtype and is widened to float32 on read
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                      "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as NumPy arrays over a memory map of it: nothing is read
    until a tensor is used. The format: an 8-byte little-endian header size, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the tensors' bytes."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    # copy-on-write ("c"): the arrays are writable, as OpenCL's copy to the device requires of
    # its source, and the file is never changed
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + size)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= len(data):
            raise ValueError(f"{name} lies outside the file")
        raw = data[begin:end]
        if info["dtype"] == "BF16":  # the upper half of a float32, exactly
            array = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = raw.view(SAFETENSORS_DTYPES[info["dtype"]])
        out[name] = array.reshape(info["shape"])
    return out


def read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file (memory-mapped, read lazily) or a PyTorch pytorch_model.bin,
    as NumPy arrays."""
    if not path.is_file():
        raise UserError(f"no such checkpoint file: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or path.suffix in (".bin", ".pt", ".pth"):
        from torchbin import load_pytorch_bin

        try:
            return load_pytorch_bin(path)
        except Exception as e:  # the loader's own errors already say what is wrong
            raise UserError(f"{path} is not a readable PyTorch checkpoint: {e}") from None
    try:
        return read_safetensors(path)
    except Exception:
        raise UserError(f"{path} is not a safetensors or PyTorch checkpoint") from None


# GPT-2 was written in TensorFlow, and its Conv1D layers store weights as (in, out);
# transformer.py's Linear stores (out, in) for faster decoding, so these four are transposed.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# Checkpoint tensors that hold no weights: GPT-2's causal-mask buffers (we build the mask), and the
# output head, which is the token embedding again (tied).
SKIPPED = (".attn.bias", ".attn.masked_bias")
TIED = "lm_head.weight"


def map_checkpoint(ckpt: dict[str, np.ndarray], model: Transformer) -> dict[str, np.ndarray]:
    """Checkpoint names -> model names, checked strictly: every model weight present with its
    shape, every checkpoint tensor used or deliberately skipped. transformer.py uses GPT-2's own
    names, so the table is short: a prefix to drop, four weights to transpose, buffers to skip."""
    wanted = model.parameters()
    mapped, unused = {}, []
    for key, t in ckpt.items():
        name = key.removeprefix("transformer.")  # present when saved from GPT2LMHeadModel
        if name in wanted:
            mapped[name] = t.T if name.endswith(CONV1D) else t
        elif not name.endswith(SKIPPED) and name != TIED:
            unused.append(key)
    missing = [k for k in wanted if k not in mapped]
    # the model pads its vocabulary with rows of zeros (see Transformer), which load_gpt2 adds
    fits = {"wte.weight": (model.config.vocab_size, model.config.n_embd)}
    bad_shape = [f"{k} {tuple(mapped[k].shape)} != {tuple(v.shape)}" for k, v in wanted.items()
                 if k in mapped and mapped[k].shape not in (v.shape, fits.get(k))]
    bad_dtype = [f"{k} {mapped[k].dtype}" for k in mapped
                 if not np.issubdtype(mapped[k].dtype, np.floating)]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
    if unused:
        problems.append(f"unexpected {', '.join(unused[:4])}" + (" ..." if len(unused) > 4 else ""))
    if bad_shape:
        problems.append(f"wrong shape {', '.join(bad_shape[:4])}")
    if bad_dtype:
        problems.append(f"not floating point {', '.join(bad_dtype[:4])}")
    if problems:
        raise UserError("checkpoint does not fit the model: " + "; ".join(problems))
    return mapped


def official_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """The model's weights in OpenAI's layout, as map_checkpoint reads them back: the four Conv1D
    weights transposed to (in, out), the vocabulary's padding rows dropped, no lm_head (tied)."""
    out = {}
    for name, t in model.parameters().items():
        array = t.float().numpy()
        if name == "wte.weight":
            array = array[: model.config.vocab_size]  # (vocab_size, n_embd): no padding rows
        out[name] = np.ascontiguousarray(array.T if name.endswith(CONV1D) else array)
    return out


def hf_config(config: Config) -> dict:
    """config.json for a GPT-2 of this shape, with the fields of openai-community/gpt2's own
    (transformers' GPT2Config reads these; the dropouts only matter when training there)."""
    if (config.positions, config.prenorm, config.mlp, config.layernorm, config.causal,
            config.residual, config.shared_layers, config.similarity) != (
            "learned", True, True, True, True, True, False, "scaled"):
        raise ValueError("only GPT-2's own architecture can be saved in its layout")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "activation_function": "gelu_new", "vocab_size": config.vocab_size,
            "n_positions": config.n_ctx, "n_ctx": config.n_ctx, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
            "layer_norm_epsilon": config.ln_eps, "bos_token_id": EOT, "eos_token_id": EOT,
            "attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1,
            "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
            "use_cache": True}


def write_safetensors(f, arrays: dict[str, np.ndarray], metadata: dict[str, str]):
    """arrays into the open file f in the format read_safetensors reads: an 8-byte header size,
    the JSON header (padded with spaces to a multiple of 8, as the safetensors library does),
    then the tensors' bytes in order."""
    names = {np.dtype(v).name: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": metadata}, 0
    for name, a in arrays.items():
        header[name] = {"dtype": names[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(len(text).to_bytes(8, "little") + text)
    for a in arrays.values():
        f.write(np.ascontiguousarray(a).tobytes())


def save_pretrained(model: Transformer, folder: Path) -> Path:
    """The model as Hugging Face saves a GPT2LMHeadModel: folder/model.safetensors (OpenAI's
    names and layout, metadata format "pt", which transformers asks of a safetensors file) and
    folder/config.json. Each file is written whole or not at all (flags.atomic_write); the
    weights first, so a folder never holds a config.json for weights that are not there."""
    config = hf_config(model.config)  # first: a model of another architecture is refused
    folder.mkdir(parents=True, exist_ok=True)
    arrays = official_tensors(model)
    flags.atomic_write(folder / "model.safetensors",
                       lambda f: write_safetensors(f, arrays, {"format": "pt"}))
    flags.atomic_write(folder / "config.json",
                       lambda f: f.write(json.dumps(config, indent=2).encode()))
    return folder


def shape_words(n_layer: int, n_embd: int, n_head: int | None = None) -> str:
    heads = f"{n_head} heads, " if n_head is not None else ""
    return f"{n_layer} layers, {heads}{n_embd} dims"


def check_named_model(model: str, config: Config, from_json: bool, ckpt: dict, path: Path):
    """A model the user named (--model) must be the checkpoint's: its shape as config.json
    beside it says, or else as its tensors say (the number of blocks, the embedding's width).
    Otherwise the checkpoint's own shape would silently win over the name."""
    n_layer, n_head, n_embd = SIZES[model]
    if from_json:
        found = (config.n_layer, config.n_head, config.n_embd)
        if found == (n_layer, n_head, n_embd):
            return
        theirs = f"{shape_words(found[0], found[2], found[1])}, from its config.json"
    else:
        names = [k.removeprefix("transformer.") for k in ckpt]
        blocks = {int(k.split(".")[1]) for k in names if k.startswith("h.")}
        wte = ckpt.get("wte.weight", ckpt.get("transformer.wte.weight"))
        if wte is None or wte.ndim != 2:
            return  # not GPT-2's layout at all: map_checkpoint names what is missing
        found = (max(blocks, default=-1) + 1, wte.shape[1])
        if found == (n_layer, n_embd):
            return
        theirs = f"{shape_words(*found)}, from its tensors"
    raise UserError(f"--model {model} ({shape_words(n_layer, n_embd, n_head)}) does not match "
                    f"{path} ({theirs}); leave out --model to use the checkpoint's own shape")


def load_gpt2(model: str = "gpt2", weights: Path | None = None, weights_dir: Path = WEIGHTS_DIR,
              half: bool = False, named: bool = False) -> Transformer:
    """Build GPT-2 and fill it with a checkpoint: `weights` if given, else the hub's, cached.
    The checkpoint's shape comes from the config.json beside it, if there is one, else from
    model; named=True (the user chose model) refuses a checkpoint of another shape."""
    config = gpt2_config(model)
    path = Path(weights) if weights is not None else fetch_weights(model, weights_dir)
    json_path = path.parent / "config.json"
    try:
        config = config_from_hf(json_path, config)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read {json_path}: {e}") from None
    ckpt = read_checkpoint(path)
    if named:
        check_named_model(model, config, json_path.exists(), ckpt, path)
    gpt = Transformer(config, init=False)
    dtype = np.float16 if half else np.float32
    params = gpt.parameters()
    arrays = map_checkpoint(ckpt, gpt)
    # The transposes, casts and the vocabulary's padding happen in NumPy, in the one pass that
    # fills the device buffer (on_device): as tinygrad kernels they were scheduled, and their code
    # generated, in every new process (what that cost: docs/speed.md, "Loading in NumPy").
    # Each weight is then a buffer in the model's layout: nothing is read from the file later.
    tensors = on_device(arrays, dtype, {name: params[name].shape for name in arrays})
    by_block: dict[str, list[Tensor]] = {}
    for name, t in tensors.items():
        loaded = params[name].replace(t)
        by_block.setdefault(name.split(".")[1] if name.startswith("h.") else "", []).append(loaded)
    # Off the CPU, one realize per block: one block's host copies at a time stay in memory
    for tensors in by_block.values():
        Tensor.realize(*tensors)
    return gpt


# ---------------------------------------------------------------------------------------------
# Text in, text out
# ---------------------------------------------------------------------------------------------


def tokenizer():
    """GPT-2's byte-level BPE. tiktoken's r50k_base is the same vocabulary and merges, fetched once
    and cached by tiktoken (TIKTOKEN_CACHE_DIR chooses where)."""
    import tiktoken

    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:
        # offline, tiktoken's download fails (requests' errors are OSErrors): name the fix
        why = f"not cached, and its download failed: {type(e).__name__}"
        if not isinstance(e, OSError):
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "unset: a temporary folder")
        raise UserError(f"cannot load GPT-2's tokenizer, tiktoken's r50k_base ({why}); set "
                        f"TIKTOKEN_CACHE_DIR (now {cache}) to a folder that holds it, or run "
                        f"once online") from None


def complete(gpt: Transformer, enc, prompt: str, max_new_tokens: int, temperature=0.0,
             top_k=None, top_p=None, seed=None, num_samples=1, ignore_eos=False,
             stream=None, log=None, beam=0) -> tuple[list[str], dict]:
    """Continue prompt num_samples times; return each continuation (without the prompt) and
    timings: the prefill (up to the first token), the JIT's warm-up step, and the decode
    steps after them, each in seconds.

    With stream (a binary file), the first sample's text is written as its tokens arrive. A token
    can end in the middle of a UTF-8 character, so bytes go through an incremental decoder that
    holds an incomplete character back until the next token completes it."""
    # "<|endoftext|>" typed in a prompt is the document separator, as in GPT-2's training data
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT]  # empty: a new document
    if len(ids) > gpt.config.n_ctx and log:
        log(f"note: the prompt has {len(ids)} tokens; the model sees only the last "
            f"{gpt.config.n_ctx}")
    prompt_ids = np.array([ids] * num_samples, dtype=np.int32)  # (B, T)
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(num_samples)]
    done = np.zeros(num_samples, dtype=bool)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    t0 = time.perf_counter()
    stamps = []  # when each step's tokens came out
    for tokens in generate(gpt, prompt_ids, max_new_tokens, temperature, top_k, top_p, rng, beam):
        stamps.append(time.perf_counter())
        flags.check_interrupt()  # a Ctrl-C that a finalizer swallowed ends the run here
        for b, tok in enumerate(tokens):
            if done[b]:
                continue
            if tok == EOT and not ignore_eos:
                done[b] = True
                continue
            out[b].append(int(tok))
            if b == 0 and stream is not None:
                stream.write(decoder.decode(enc.decode_single_token_bytes(int(tok))).encode())
                stream.flush()
        if done.all():
            break
    if stream is not None:
        stream.write(decoder.decode(b"", final=True).encode())
        stream.flush()
    t_end = time.perf_counter()
    # The first token comes out of the prefill. The decode step is captured by its first call
    # (step 1, the warm-up); from step 2 on it replays: decoding proper.
    stamps = stamps or [t_end]
    warm = stamps[min(1, len(stamps) - 1)]
    stats = {"prompt_tokens": len(ids), "new_tokens": max(len(o) for o in out),
             "prefill_s": stamps[0] - t0,
             "warmup_steps": min(len(stamps) - 1, 1), "warmup_s": warm - stamps[0],
             "decode_steps": max(len(stamps) - 2, 0), "decode_s": stamps[-1] - warm}
    return [enc.decode(o) for o in out], stats


# ---------------------------------------------------------------------------------------------
# Perplexity: how well the model predicts a text
# ---------------------------------------------------------------------------------------------


class Window(NamedTuple):
    begin: int  # the window's inputs are ids[begin:end]
    end: int
    first: int  # it scores ids[first:end], each predicted from the tokens before it
    weight: int  # what the guide's loop weighs the window's mean loss by


def windows(n_tokens: int, n_ctx: int, stride: int) -> list[Window]:
    """The sliding windows of Hugging Face's perplexity guide ("Perplexity of fixed-length
    models"), step for step. Windows ids[begin:end], end = min(begin + n_ctx, n_tokens), start
    stride tokens apart; each labels only its last end - prev_end tokens (the ones no earlier
    window reached), and the model's label shift drops its first position, which has nothing to
    predict it. So with overlap every token after the first is scored once, with at least
    n_ctx - stride tokens of context after the first window; without overlap (stride = n_ctx)
    the first token of every window is never scored.

    The guide averages each window's mean loss weighted by its valid labels minus one (the shift),
    which is the window's scored tokens only where nothing is masked (the first window, or no
    overlap); an overlapping window weighs one token less than it scores."""
    if not 1 <= stride <= n_ctx:
        raise UserError(f"--stride must be between 1 and the context, {n_ctx}; got {stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + n_ctx, n_tokens)
        valid = min(end - prev_end, end - begin)  # labels not set to -100
        out.append(Window(begin, end, max(begin + 1, prev_end), valid - 1))
        prev_end = end
        if end == n_tokens:
            break
    return out


def token_losses(gpt: Transformer, ids, stride: int, progress=None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score a text as the guide's loop does (see windows) -> (targets, losses, weights): the
    index in ids of every scored token, in order; -log p(that token | its window's earlier
    tokens), in nats; and the weight the guide's average gives it (its window's weight over the
    window's scored tokens). perplexity_nll averages them.

    Each window is padded on the right to a bucket length (see prefill_bucket), so the forward
    pass has a few shapes and TinyJit compiles each once. Attention is causal, so the padding
    after a window never reaches it."""
    ids = np.asarray(ids, dtype=np.int32)
    if len(ids) < 2:
        raise UserError(f"perplexity needs at least 2 tokens (the first has nothing to predict "
                        f"it), got {len(ids)}")
    n_ctx = gpt.config.n_ctx
    plan = windows(len(ids), n_ctx, stride)
    jits: dict[int, TinyJit] = {}

    def nll(x: Tensor, y: Tensor) -> Tensor:
        logp = gpt(x).log_softmax(-1)  # (1, bucket, vocab)
        return -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).realize()  # (1, bucket)

    targets, losses, weights = [], [], []
    for i, w in enumerate(plan):
        flags.check_interrupt()  # a Ctrl-C that a finalizer swallowed ends the run here
        n = w.end - w.begin
        if w.end > w.first:  # a last window of one token scores nothing (the guide's nan)
            size = padded_length(gpt, n - 1)  # position p predicts token begin + p + 1
            x, y = np.zeros((2, 1, size), dtype=np.int32)
            x[0, : n - 1], y[0, : n - 1] = ids[w.begin : w.end - 1], ids[w.begin + 1 : w.end]
            run = jits.setdefault(size, jit_at_once(nll))  # nll creates no buffer
            window = run(Tensor(x), Tensor(y)).numpy()[0, : n - 1].astype(np.float64)
            scored = window[w.first - w.begin - 1 :]
            targets.append(np.arange(w.first, w.end))
            losses.append(scored)
            weights.append(np.full(len(scored), w.weight / len(scored)))
        if progress:
            progress(i + 1, len(plan))
    return np.concatenate(targets), np.concatenate(losses), np.concatenate(weights)


def perplexity_nll(losses: np.ndarray, weights: np.ndarray) -> float:
    """The guide's average nll: sum over windows of mean loss x weight, over the weights' sum."""
    return float(np.sum(losses * weights) / np.sum(weights))


def progress_bar(label: str):
    """token_losses' progress(done, total) as flags.Progress's bar on stderr; None (silent)
    when stderr is not a terminal."""
    return flags.Progress(label, unit="windows").update if sys.stderr.isatty() else None


def perplexity_of_file(gpt: Transformer, enc, path: Path, stride: int) -> tuple[float, int]:
    """-> (the guide's average nats per token, tokens scored) for the text in path."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not text:
        raise UserError(f"{path} is empty: there is nothing to score")
    # "<|endoftext|>" in a text is the document separator, as in GPT-2's training data
    ids = enc.encode(text, allowed_special={"<|endoftext|>"})
    _, losses, weights = token_losses(gpt, ids, stride, progress_bar("perplexity"))
    return perplexity_nll(losses, weights), len(losses)


# ---------------------------------------------------------------------------------------------
# Attention: every head of GPT-2 on one text
# ---------------------------------------------------------------------------------------------


def token_labels(enc, ids) -> list[str]:
    """Each token's own text, made readable (heads.readable): a piece of a UTF-8 character, as
    GPT-2's byte-level BPE makes of an emoji or a CJK character, shows as its bytes, \\xe7\\x8c."""
    from heads import readable

    return [readable(enc.decode_single_token_bytes(int(i))) for i in ids]


def show_attention(gpt: Transformer, enc, text: str, out: Path, layer=None, head=None,
                   tokens=None, title="GPT-2", log=print, weights: Path | None = None):
    """Write every view of GPT-2's attention on text into out, and print the head scores.
    weights, the checkpoint file the model was loaded from, lets its induction scores be kept
    (heads.probe_induction): they are the same for every text."""
    import heads

    ids = enc.encode(text, allowed_special={"<|endoftext|>"})
    if not ids:
        raise UserError("--attention needs some text to look at")
    if len(ids) > gpt.config.n_ctx:
        raise UserError(f"the text has {len(ids)} tokens; the model sees at most "
                        f"{gpt.config.n_ctx}")
    try:
        key = None
        if weights is not None and weights.is_file():
            st = weights.stat()
            key = (f"{weights.resolve()}|{st.st_size}|{st.st_mtime_ns}|{Device.DEFAULT}|"
                   f"{gpt.wte.weight.dtype}")
        written, report = heads.inspect_model(gpt, np.array(ids), token_labels(enc, ids), out,
                                              title, tokens, layer, head, probe_key=key)
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    log(f"wrote {', '.join(str(p) for p in written)}")
    print(report)


def text_ids(enc, text: str, flag: str, n_ctx: int) -> np.ndarray:
    """The tokens of a text to look inside: at least two (one to predict), at most the context."""
    ids = enc.encode(text, allowed_special={"<|endoftext|>"})
    if len(ids) < 2:
        raise UserError(f"{flag} needs a text of at least 2 tokens (the next token of one is what "
                        f"is scored), got {len(ids)}")
    if len(ids) > n_ctx:
        raise UserError(f"the text has {len(ids)} tokens; the model sees at most {n_ctx}")
    return np.array(ids, dtype=np.int32)


def head_ablation(gpt: Transformer, enc, text: str, out: Path, heads_spec: str | None = None,
                  mean: str | None = None, mean_from: str | None = None, log=print):
    """Knock out each head alone (or the set in heads_spec together) and report what it costs
    the mean next-token loss on text: ablation.npz and ablation.png into out, a table on stdout.
    mean: a head is replaced by that mean of its output (heads.MEANS) instead of zeros; or
    mean_from: by its mean over every position of that other text."""
    import heads

    ids = text_ids(enc, text, "--head-ablation", gpt.config.n_ctx)
    if mean_from is not None:
        mean = heads.reference_mean(gpt, text_ids(enc, mean_from, "--mean-from",
                                                  gpt.config.n_ctx))
    # compiled once: every knock-out only rewrites the masks that the replay reads
    loss = TinyJit(lambda x, y: gpt(x).sparse_categorical_crossentropy(y).realize())
    score = lambda: float(loss(Tensor(ids[None, :-1]), Tensor(ids[None, 1:])).item())
    try:
        written, report, _, _ = heads.ablation_report(
            gpt, score, out, heads_spec, mean, "mean next-token loss", "loss",
            f"{len(ids)} tokens", saved={"ids": ids.astype(np.int64)})
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    if written:
        log(f"wrote {', '.join(str(p) for p in written)}")
    print(report)


def logit_lens(gpt: Transformer, enc, text: str, out: Path, tokens: str | None = None, log=print):
    """The logit lens on text: lens.npz and lens.png into out, a line per position on stdout."""
    import heads

    ids = text_ids(enc, text, "--logit-lens", gpt.config.n_ctx)
    labels = token_labels(enc, ids)
    decode = lambda i: enc.decode_single_token_bytes(int(i))  # bytes: heads.readable shows them
    try:
        window = heads.parse_window(tokens, len(ids))
        heads.writable_folder(out)
        lens = heads.logit_lens(gpt, ids)
        written = heads.write_lens(out, lens, labels, decode, "logit lens", window)
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    log(f"wrote {', '.join(str(p) for p in written)}")
    print(heads.lens_report(lens, labels, decode))


def one_token(enc, text: str, flag: str) -> int:
    """The id of text, which must be exactly one token of GPT-2's vocabulary."""
    ids = enc.encode(text, allowed_special={"<|endoftext|>"})
    if len(ids) != 1:
        pieces = " + ".join(repr(enc.decode([i])) for i in ids) or "no token"
        raise UserError(f"{flag} {text!r} must be one token; it is {pieces} (a leading space "
                        "is part of a word's token: ' Mary')")
    return ids[0]


def trace(gpt: Transformer, enc, clean: str, corrupt: str, answer: str, wrong: str, out: Path,
          heads_spec: str | None = None, threshold: float = 0.1, log=print):
    """Activation patching and attribution patching of clean into corrupt (patching.py):
    patching.npz, attribution.npz and a picture per grid into out, the grids on stdout."""
    import heads
    import patching

    clean_ids, corrupt_ids = (np.array(enc.encode(t, allowed_special={"<|endoftext|>"}),
                                       dtype=np.int32) for t in (clean, corrupt))
    a, w = one_token(enc, answer, "--answer"), one_token(enc, wrong, "--wrong")
    chosen = [] if heads_spec is None else heads.parse_heads(heads_spec, gpt.config.n_layer,
                                                              gpt.config.n_head)
    patching.check_pair(gpt, clean_ids, corrupt_ids)
    labels = token_labels(enc, corrupt_ids)
    try:
        heads.writable_folder(out)
        written, report, _ = patching.patch_and_write(gpt, clean_ids, corrupt_ids, a, w, labels,
                                                      out, f"{len(clean_ids)} tokens", chosen,
                                                      threshold)
    except OSError as e:
        raise UserError(str(e)) from None
    log(f"wrote {', '.join(str(p) for p in written)}")
    print(report)


def attribute(gpt: Transformer, enc, text: str, answer: str, wrong: str, out: Path, log=print):
    """Direct logit attribution of text's last position (patching.py): dla.npz and dla.png into
    out, the largest parts and their sum on stdout."""
    import heads
    import patching

    ids = np.array(enc.encode(text, allowed_special={"<|endoftext|>"}), dtype=np.int32)
    a, w = one_token(enc, answer, "--answer"), one_token(enc, wrong, "--wrong")
    if len(ids) > gpt.config.n_ctx:
        raise UserError(f"the text has {len(ids)} tokens; the model sees at most "
                        f"{gpt.config.n_ctx}")
    try:
        heads.writable_folder(out)
        parts = patching.direct_logit_attribution(gpt, ids, a, w)
        written = patching.write_dla(out, parts, f"{len(ids)} tokens: {answer!r} vs {wrong!r}")
    except OSError as e:
        raise UserError(str(e)) from None
    log(f"wrote {', '.join(str(p) for p in written)}")
    print(patching.dla_report(parts))


def main(argv=None) -> int:
    """The command line. Every way it ends is flags.run's: a user's mistake is one `error:` line
    and exit status 2, Ctrl-C one line and 130, a reader that closes the pipe early (`| head`)
    a quiet 0."""
    return flags.run(command, argv)


def parser() -> flags.Parser:
    ap = flags.Parser(description="Generate text with OpenAI's GPT-2 on tinygrad, or look "
                                  "inside it (attention, perplexity, ablation, logit lens).")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="the prompt (default: read stdin if it is not a tty)")
    src.add_argument("-f", "--file", type=Path, help="read the prompt from a file")
    src.add_argument("--attention", metavar="TEXT",
                     help="write every head's attention on TEXT into --out, print head scores")
    src.add_argument("--perplexity", type=Path, metavar="FILE",
                     help="score the text in FILE with sliding windows; print its perplexity")
    src.add_argument("--head-ablation", metavar="TEXT",
                     help="knock out each head alone: what it costs the loss on TEXT (--out)")
    src.add_argument("--logit-lens", metavar="TEXT",
                     help="read TEXT's residual stream after each block through the unembedding")
    src.add_argument("--patch", metavar="CLEAN",
                     help="patch each activation of the CLEAN text's run into --corrupt's, and "
                          "estimate it by attribution patching: --answer vs --wrong (--out)")
    src.add_argument("--dla", metavar="TEXT",
                     help="direct logit attribution: what each head, MLP and embedding writes "
                          "toward --answer against --wrong at TEXT's last position (--out)")
    src.add_argument("--serve", action="store_true",
                     help="the live workbench: a local web page and JSON API on the loaded model")
    ap.add_argument("--model", choices=SIZES, metavar="NAME",
                    help=f"GPT-2's size: {', '.join(SIZES)} (default: gpt2, or with --weights "
                         "the checkpoint's own shape; given, the checkpoint must have it)")
    ap.add_argument("-n", "--max-new-tokens", type=flags.natural, default=100, metavar="N",
                    help="tokens to generate")
    ap.add_argument("-t", "--temperature", type=flags.nonnegative, default=0.8, metavar="T",
                    help="sampling temperature; 0 = greedy")
    ap.add_argument("--top-k", type=flags.count, metavar="K",
                    help="sample among the K likeliest tokens only (default: all)")
    ap.add_argument("--top-p", type=flags.probability, metavar="P",
                    help="nucleus sampling: the likeliest tokens of total probability P, in "
                         "(0, 1] (default: all)")
    ap.add_argument("--seed", type=flags.natural,
                    help="make sampling reproducible (default: a fresh seed each run)")
    ap.add_argument("--num-samples", type=flags.count, default=1, metavar="N",
                    help="continuations of the prompt, generated as one batch")
    ap.add_argument("--ignore-eos", action="store_true", help="go on past <|endoftext|>")
    ap.add_argument("--weights", type=Path, metavar="FILE",
                    help="local model.safetensors or pytorch_model.bin, a config.json beside it "
                         "giving its shape (default: the hub's, for --model)")
    ap.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR, metavar="DIR",
                    help="where downloaded weights are kept")
    ap.add_argument("--download", action="store_true", help="only fetch the weights, then exit")
    ap.add_argument("--device", help="tinygrad backend: CPU, CPU:LLVM, CL, CUDA, METAL, ... "
                                     "(default: DEV, else the fastest here)")
    ap.add_argument("--half", action="store_true",
                    help="float16 weights (activations stay float32)")
    ap.add_argument("--timing", action="store_true", help="print prefill and decode speed")
    ap.add_argument("--beam", type=flags.natural, default=0, metavar="N",
                    help="search kernel variants for the decode step (tinygrad BEAM=N): faster "
                         "decoding after a one-time search of minutes, cached on disk; 0: none")
    ap.add_argument("--out", type=Path, default=Path("attention"), metavar="DIR",
                    help="folder for the files of --attention, --head-ablation, --logit-lens, "
                         "--patch and --dla")
    ap.add_argument("--layer", type=flags.natural,
                    help="with --attention and --head: also draw this one head large")
    ap.add_argument("--head", type=flags.natural,
                    help="with --attention and --layer: the head to draw large")
    ap.add_argument("--tokens", metavar="A:B",
                    help="show only tokens A to B of a long text (default: all)")
    ap.add_argument("--heads", metavar="L.H,...",
                    help="with --head-ablation: knock out these heads together, print one result")
    ap.add_argument("--corrupt", metavar="TEXT",
                    help="with --patch: the corrupted text, as many tokens as the clean one")
    ap.add_argument("--answer", metavar="TOKEN",
                    help="with --patch and --dla: the answer, text that is exactly one token")
    ap.add_argument("--wrong", metavar="TOKEN",
                    help="with --patch and --dla: the wrong answer, exactly one token")
    ap.add_argument("--threshold", type=flags.positive, default=0.1, metavar="X",
                    help="with --patch: name the cells where attribution patching is off by more "
                         "than X of the clean logit difference")
    ap.add_argument("--mean", nargs="?", const="causal", choices=["causal", "positions"],
                    help="with --head-ablation: replace a head by its mean, not 0: over the "
                         "positions so far (causal, the default), or over all of them (positions: "
                         "a position then sees a summary of later tokens)")
    ap.add_argument("--mean-from", metavar="TEXT",
                    help="with --head-ablation: replace a head by its mean output over every "
                         "position of TEXT, another text")
    ap.add_argument("--port", type=flags.port, metavar="N",
                    help="with --serve: the port (default: 8000 or the next free one; 0: any)")
    ap.add_argument("--host", metavar="ADDR",
                    help="with --serve: the address to listen on (default: 127.0.0.1, this "
                         "machine only)")
    ap.add_argument("--stride", type=flags.count, metavar="N",
                    help="with --perplexity: tokens between window starts (default: half the "
                         "context, 512 for GPT-2)")
    return ap


def command(argv=None) -> int:
    args = parser().parse_args(argv)

    def log(msg: str):
        print(msg, file=sys.stderr, flush=True)

    try:
        named = args.model is not None  # else the checkpoint's own shape, and gpt2's to fetch
        model = args.model or "gpt2"
        if args.download:
            log(f"weights at {fetch_weights(model, args.weights_dir)}")
            return 0
        try:
            install(args.device)
        except Exception as e:
            raise UserError(f"device {args.device or os.environ.get('DEV')!r} is not usable "
                            f"here: {e}") from None
        views = {"--layer": args.layer, "--head": args.head}
        for flag, value in views.items():
            if value is not None and args.attention is None:
                raise UserError(f"{flag} goes with --attention TEXT")
        if args.tokens is not None and args.attention is None and args.logit_lens is None:
            raise UserError("--tokens goes with --attention TEXT or --logit-lens TEXT")
        if args.stride is not None and args.perplexity is None:
            raise UserError("--stride goes with --perplexity FILE")
        if args.heads is not None and args.head_ablation is None and args.patch is None:
            raise UserError("--heads goes with --head-ablation TEXT or --patch CLEAN")
        for flag, value in (("--mean", args.mean), ("--mean-from", args.mean_from)):
            if value is not None and args.head_ablation is None:
                raise UserError(f"{flag} goes with --head-ablation TEXT")
        if args.mean is not None and args.mean_from is not None:
            raise UserError("--mean and --mean-from each choose the mean: give one")
        if args.corrupt is not None and args.patch is None:
            raise UserError("--corrupt goes with --patch CLEAN")
        for flag, value in (("--answer", args.answer), ("--wrong", args.wrong)):
            if value is not None and args.patch is None and args.dla is None:
                raise UserError(f"{flag} goes with --patch CLEAN or --dla TEXT")
            if value is None and (args.patch is not None or args.dla is not None):
                raise UserError(f"--patch and --dla need {flag} TOKEN")
        if args.patch is not None and args.corrupt is None:
            raise UserError("--patch CLEAN needs --corrupt TEXT")
        for flag, value in (("--port", args.port), ("--host", args.host)):
            if value is not None and not args.serve:
                raise UserError(f"{flag} goes with --serve")
        if args.serve:
            import serve

            enc = tokenizer()
            gpt = load_gpt2(model, args.weights, args.weights_dir, args.half, named)
            title = f"{model}{' (--half)' if args.half else ''}"
            if args.weights is not None:
                title = f"{args.weights.parent.name}/{args.weights.name}"
            bench = serve.Workbench(gpt, serve.gpt2_vocab(enc), title,
                                    "When Mary and John went to the store, John gave a drink to")
            serve.serve(bench, args.host or "127.0.0.1", args.port, log)
            return 0
        looks = (args.attention, args.perplexity, args.head_ablation, args.logit_lens,
                 args.patch, args.dla)
        if any(v is not None for v in looks):
            enc = tokenizer()
            gpt = load_gpt2(model, args.weights, args.weights_dir, args.half, named)
            if args.head_ablation is not None:
                head_ablation(gpt, enc, args.head_ablation, args.out, args.heads, args.mean,
                              args.mean_from, log)
            elif args.logit_lens is not None:
                logit_lens(gpt, enc, args.logit_lens, args.out, args.tokens, log)
            elif args.patch is not None:
                trace(gpt, enc, args.patch, args.corrupt, args.answer, args.wrong, args.out,
                      args.heads, args.threshold, log)
            elif args.dla is not None:
                attribute(gpt, enc, args.dla, args.answer, args.wrong, args.out, log)
            elif args.perplexity is not None:
                stride = gpt.config.n_ctx // 2 if args.stride is None else args.stride
                nll, n = perplexity_of_file(gpt, enc, args.perplexity, stride)
                print(f"perplexity={math.exp(nll):.4f} nll={nll:.6f} tokens={n}")
            else:
                title = f"{model}{' (--half)' if args.half else ''}"
                if args.weights is not None:
                    title = f"{args.weights.parent.name}/{args.weights.name}"
                weights = args.weights or args.weights_dir / model / "model.safetensors"
                show_attention(gpt, enc, args.attention, args.out, args.layer, args.head,
                               args.tokens, title, log, weights)
            return 0
        if args.prompt is not None:
            prompt = args.prompt
        elif args.file is not None:
            try:
                prompt = args.file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read prompt file {args.file}: {e}") from None
        else:
            prompt = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
        enc = tokenizer()
        if args.beam:
            log(f"note: --beam {args.beam} times kernel variants for the decode step; the first "
                "run of a model size on a device takes minutes, later runs reuse tinygrad's cache")
        gpt = load_gpt2(model, args.weights, args.weights_dir, args.half, named)
        out = sys.stdout.buffer
        stream_first = args.num_samples == 1
        out.write(prompt.encode())
        out.flush()
        texts, stats = complete(gpt, enc, prompt, args.max_new_tokens, args.temperature,
                                args.top_k, args.top_p, args.seed, args.num_samples,
                                args.ignore_eos, stream=out if stream_first else None, log=log,
                                beam=args.beam)
        if not stream_first:
            for i, text in enumerate(texts):
                if i:
                    out.write(f"\n\n----- sample {i + 1} of {len(texts)} -----\n\n".encode()
                              + prompt.encode())
                out.write(text.encode())
        out.write(b"\n")
        out.flush()
        if args.timing:
            st = stats
            log(f"prefill: {st['prompt_tokens']} tokens in {st['prefill_s']:.2f}s (the first "
                f"token); JIT warm-up: {st['warmup_steps']} step in {st['warmup_s']:.2f}s")
            log(f"decode: {st['decode_steps']} steps in {st['decode_s']:.2f}s "
                f"({st['decode_steps'] / max(st['decode_s'], 1e-9):.1f} tok/s)")
    except RuntimeError as e:
        if not args.half:
            raise
        # a backend where tinygrad cannot compile float16 kernels
        first_line = str(e).splitlines()[0][:120]
        raise UserError(f"--half failed on {Device.DEFAULT}: tinygrad could not compile a "
                        f"float16 kernel ({first_line}); run without --half") from None
    return 0


if __name__ == "__main__":
    exit_now(main())
