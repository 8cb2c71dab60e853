"""Tests for torchbin.py, the torch-free and pickle-safe reader of pytorch_model.bin files.

Run from the repository root:

    .venv/bin/python -m pytest tests/test_torchbin.py

The fixtures come from tests/make_fixtures.py (which needs torch); these tests need only numpy.
"""

import json
import os
import pickle
import shlex
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

# torchbin.py lives in the repository root, which plain `pytest` does not put on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchbin
from torchbin import (
    CheckpointFormatError,
    Storage,
    StorageType,
    TensorRecipe,
    UnsafeCheckpointError,
    load_pytorch_bin,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_GPT2 = FIXTURES / "tiny-gpt2"

# Safetensors dtype names -> numpy dtypes (https://github.com/huggingface/safetensors, format).
SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "U8": "u1"}


def read_safetensors(path):
    """Minimal safetensors reader: 8-byte little-endian header size, JSON header, then data."""
    data = Path(path).read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    body = data[8 + header_size :]
    metadata = header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        flat = np.frombuffer(body[start:end], dtype=SAFETENSORS_DTYPES[info["dtype"]])
        tensors[name] = flat.reshape(info["shape"])
    return metadata, tensors


def official_gpt2_keys(n_layer):
    """Key names of openai-community/gpt2's checkpoint, in the order its state dict has them."""
    keys = ["wte.weight", "wpe.weight"]
    for layer in range(n_layer):
        for part in [
            "ln_1.weight",
            "ln_1.bias",
            "attn.bias",
            "attn.c_attn.weight",
            "attn.c_attn.bias",
            "attn.c_proj.weight",
            "attn.c_proj.bias",
            "ln_2.weight",
            "ln_2.bias",
            "mlp.c_fc.weight",
            "mlp.c_fc.bias",
            "mlp.c_proj.weight",
            "mlp.c_proj.bias",
        ]:
            keys.append(f"h.{layer}.{part}")
    return keys + ["ln_f.weight", "ln_f.bias"]


def test_tiny_gpt2_bin_matches_safetensors_exactly():
    weights = load_pytorch_bin(TINY_GPT2 / "pytorch_model.bin")
    metadata, expected = read_safetensors(TINY_GPT2 / "model.safetensors")
    assert metadata == {"format": "pt"}
    assert list(weights) == official_gpt2_keys(n_layer=2)
    assert set(expected) == set(weights)
    for name, array in weights.items():
        assert array.dtype == np.float32, name
        assert array.shape == expected[name].shape, name
        np.testing.assert_array_equal(array, expected[name], err_msg=name)


def test_tiny_gpt2_has_official_shapes():
    weights = load_pytorch_bin(TINY_GPT2 / "pytorch_model.bin")
    assert weights["wte.weight"].shape == (50257, 16)
    assert weights["wpe.weight"].shape == (128, 16)
    # Conv1D stores (in_features, out_features), the transpose of nn.Linear.
    assert weights["h.0.attn.c_attn.weight"].shape == (16, 48)
    assert weights["h.1.mlp.c_fc.weight"].shape == (16, 64)
    assert weights["h.1.mlp.c_proj.weight"].shape == (64, 16)
    mask = weights["h.1.attn.bias"]
    assert mask.shape == (1, 1, 128, 128)
    np.testing.assert_array_equal(mask[0, 0], np.tril(np.ones((128, 128), dtype=np.float32)))
    # The random init is not the default near-zero one, so wrong weights change the outputs.
    assert 0.25 < weights["wte.weight"].std() < 0.35
    assert np.abs(weights["ln_f.bias"]).max() > 0.01


def test_safetensors_reader_agrees_with_library():
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    _, ours = read_safetensors(TINY_GPT2 / "model.safetensors")
    theirs = safetensors_numpy.load_file(str(TINY_GPT2 / "model.safetensors"))
    assert set(ours) == set(theirs)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


@pytest.mark.parametrize("file_name", ["strided.bin", "strided-legacy.bin"])
def test_strided_and_typed_tensors(file_name):
    weights = load_pytorch_bin(FIXTURES / file_name)
    expected = np.load(FIXTURES / "strided-expected.npz")
    assert list(weights) == list(expected.files)
    for name in expected.files:
        want = expected[name]
        assert weights[name].dtype == want.dtype, name
        assert weights[name].shape == want.shape, name
        np.testing.assert_array_equal(weights[name], want, err_msg=name)


def test_strided_fixture_really_is_strided():
    """Guards the test above: the transposed tensor must differ from a plain reshape."""
    expected = np.load(FIXTURES / "strided-expected.npz")
    plain = expected["plain"]
    assert plain.shape == (5, 7)
    np.testing.assert_array_equal(expected["transposed"], plain.T)
    assert not np.array_equal(expected["transposed"], plain.reshape(7, 5))
    np.testing.assert_array_equal(expected["row_view"], plain[3])
    np.testing.assert_array_equal(expected["column_view"], plain[:, 2])


def test_returned_arrays_are_independent_copies():
    weights = load_pytorch_bin(FIXTURES / "strided.bin")
    before = weights["transposed"].copy()
    weights["plain"][:] = 0
    np.testing.assert_array_equal(weights["transposed"], before)


class RunShellCommand:
    """Pickles as a call to os.system, the classic malicious-checkpoint payload."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def malicious_pickle(marker, protocol):
    payload = RunShellCommand(f"touch {shlex.quote(str(marker))}")
    return pickle.dumps({"wte.weight": payload}, protocol=protocol)


def write_zip_checkpoint(path, data_pkl, storages=None):
    """A zip in torch.save's layout: archive/data.pkl plus archive/data/<key> files."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")


def test_payload_runs_under_plain_pickle(tmp_path):
    """Proves the payload below is live, so the refusal tests can fail."""
    marker = tmp_path / "ran"
    pickle.loads(malicious_pickle(marker, protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_zip_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "ran"
    checkpoint = tmp_path / "evil.bin"
    write_zip_checkpoint(checkpoint, malicious_pickle(marker, protocol))
    system_name = f"{os.system.__module__}.system"
    with pytest.raises(UnsafeCheckpointError, match=system_name.replace(".", r"\.")):
        load_pytorch_bin(checkpoint)
    assert not marker.exists()


def test_malicious_legacy_file_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    checkpoint = tmp_path / "evil-legacy.bin"
    checkpoint.write_bytes(
        torchbin.LEGACY_MAGIC_PICKLE
        + pickle.dumps(torchbin.LEGACY_PROTOCOL_VERSION, protocol=2)
        + pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
        + malicious_pickle(marker, protocol=2)
    )
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_pytorch_bin(checkpoint)
    assert not marker.exists()


def test_unknown_torch_name_is_refused(tmp_path):
    # Hand-written protocol 2 pickle: GLOBAL 'torch load', EMPTY_TUPLE, REDUCE, STOP.
    checkpoint = tmp_path / "torch-load.bin"
    write_zip_checkpoint(checkpoint, b"\x80\x02ctorch\nload\n)R.")
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.load"):
        load_pytorch_bin(checkpoint)


@pytest.mark.parametrize(
    "content",
    [b"", b"just some text\n", b'{"not": "a checkpoint"}', pickle.dumps({"a": 1}, protocol=2)],
)
def test_non_checkpoint_raises_value_error(tmp_path, content):
    path = tmp_path / "not-a-checkpoint.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_pytorch_bin(path)


def test_zip_without_data_pkl_raises(tmp_path):
    path = tmp_path / "plain.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointFormatError, match="0 data.pkl"):
        load_pytorch_bin(path)


def test_pickle_that_is_not_a_state_dict_raises(tmp_path):
    path = tmp_path / "list.bin"
    write_zip_checkpoint(path, pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(CheckpointFormatError, match="not a state dict"):
        load_pytorch_bin(path)


def test_truncated_storage_in_zip_raises(tmp_path):
    damaged = tmp_path / "damaged.bin"
    source = zipfile.ZipFile(FIXTURES / "strided.bin")
    with source, zipfile.ZipFile(damaged, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("/data/0"):
                data = data[:-4]
            target.writestr(name, data)
    with pytest.raises(CheckpointFormatError, match="bytes"):
        load_pytorch_bin(damaged)


def test_truncated_pickle_raises(tmp_path):
    with zipfile.ZipFile(FIXTURES / "strided.bin") as source:
        data_pkl = next(name for name in source.namelist() if name.endswith("/data.pkl"))
        truncated = source.read(data_pkl)[:100]
    path = tmp_path / "truncated-pickle.bin"
    write_zip_checkpoint(path, truncated)
    with pytest.raises(CheckpointFormatError, match="damaged pickle"):
        load_pytorch_bin(path)


def test_truncated_legacy_file_raises(tmp_path):
    damaged = tmp_path / "damaged-legacy.bin"
    damaged.write_bytes((FIXTURES / "strided-legacy.bin").read_bytes()[:-10])
    with pytest.raises(CheckpointFormatError):
        load_pytorch_bin(damaged)


def test_stride_past_end_of_storage_is_refused():
    storage = Storage(StorageType("FloatStorage"), key="0", numel=4)
    storage.elements = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(TensorRecipe(storage, 1, (3,), (1,)).to_numpy(), [1, 2, 3])
    np.testing.assert_array_equal(TensorRecipe(storage, 0, (2,), (3,)).to_numpy(), [0, 3])
    with pytest.raises(CheckpointFormatError, match="reaches element 4"):
        TensorRecipe(storage, 0, (3,), (2,)).to_numpy()
    with pytest.raises(CheckpointFormatError, match="negative"):
        TensorRecipe(storage, 0, (2,), (-1,))


def test_bfloat16_upcast_is_exact():
    storage = Storage(StorageType("BFloat16Storage"), key="0", numel=3)
    # bfloat16 bit patterns of 1.0, -2.5 and the smallest normal number 2**-126.
    storage.elements = np.array([0x3F80, 0xC020, 0x0080], dtype="<u2")
    array = TensorRecipe(storage, 0, (3,), (1,)).to_numpy()
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, np.array([1.0, -2.5, 2.0**-126], dtype=np.float32))


def test_command_line_reports_one_line_error(tmp_path, capsys):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"junk")
    assert torchbin.main([str(path)]) == 2
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert len(error_lines) == 1
    assert error_lines[0].startswith("error: ") and "not a PyTorch checkpoint" in error_lines[0]


def test_command_line_refuses_a_malicious_file_in_one_line_with_status_2(tmp_path, capsys):
    # the refusal is the project's one user error: one line, exit status 2, and nothing ran
    marker = tmp_path / "ran"
    checkpoint = tmp_path / "evil.bin"
    write_zip_checkpoint(checkpoint, malicious_pickle(marker, protocol=2))
    assert torchbin.main([str(checkpoint)]) == 2
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith("error: ")
    assert "system" in error_lines[0]
    assert not marker.exists()


def test_command_line_names_a_missing_file(tmp_path, capsys):
    missing = tmp_path / "nowhere.bin"
    assert torchbin.main([str(missing)]) == 2
    error_lines = capsys.readouterr().err.strip().splitlines()
    assert len(error_lines) == 1 and str(missing) in error_lines[0]
