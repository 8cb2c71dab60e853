"""Read a PyTorch checkpoint (pytorch_model.bin) into numpy arrays without torch and safely.

A file written by torch.save is a pickle: a small program for Python's pickle machine that
rebuilds the saved objects. Loading an untrusted pickle with the plain `pickle` module can run
any function (os.system, say), so this reader only lets the pickle reach a short list of
harmless names that a state dict needs, and raises UnsafeCheckpointError for anything else,
before it is called.

Two layouts exist, and both are read here:

* zip format (torch >= 1.6, the default since 2020): a zip archive holding `<root>/data.pkl`
  (the pickled state dict) and one file `<root>/data/<key>` per storage with its raw bytes.
* legacy format (older torch; Hugging Face files uploaded before 2020 may still use it):
  five pickles one after another (magic number, protocol version, system info, the state dict,
  the list of storage keys), then for each key an 8-byte element count and the raw bytes.

Source for both layouts: torch/serialization.py in pytorch/pytorch (`_save`, `_legacy_save`,
`_load`, `_legacy_load`).

Inside the pickle each tensor is a call
`torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks)`
where `storage` comes from a persistent id ('storage', StorageClass, key, location, numel).
Offsets and strides count elements, not bytes.

Usage:

    from torchbin import load_pytorch_bin
    weights = load_pytorch_bin("pytorch_model.bin")   # dict[str, numpy.ndarray]

Or from the shell, to list what a checkpoint holds:

    .venv/bin/python torchbin.py path/to/pytorch_model.bin
"""

import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

import flags
from flags import UserError

# torch/serialization.py: MAGIC_NUMBER and PROTOCOL_VERSION open every legacy-format file,
# each pickled with protocol 2. Comparing the first bytes recognises the format without
# unpickling anything from a file that may be something else entirely.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_MAGIC_PICKLE = pickle.dumps(LEGACY_MAGIC_NUMBER, protocol=2)
LEGACY_PROTOCOL_VERSION = 1001

# Storage class name -> numpy dtype of one element as stored on disk (little-endian).
# bfloat16 has no numpy dtype: it is read as raw 16-bit words and widened to float32 later.
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


# Both are the project's one user error (flags.UserError), so a command line prints either as
# one `error:` line. They stay two classes because a caller must be able to tell a refused
# pickle (a file that tried to run code: possibly an attack) from a merely damaged one; the
# tests do, to prove the payload was stopped by the allow-list and not by some parse error.
class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """The checkpoint's pickle asks for a function or class that is not on the allow-list."""


class CheckpointFormatError(UserError, ValueError):
    """The file is not a PyTorch checkpoint, or it is damaged."""


class StorageType:
    """Stands in for a torch.<X>Storage class: the pickle only uses it to name the dtype."""

    def __init__(self, name):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class Storage:
    """One storage: a flat run of `numel` elements that one or more tensors view.

    The pickle is read before the bytes (in the legacy format the bytes come after it), so
    `elements` is filled in afterwards.
    """

    def __init__(self, storage_type, key, numel):
        self.storage_type = storage_type
        self.key = key
        self.numel = numel
        self.elements = None


class TensorRecipe:
    """What _rebuild_tensor_v2 describes: `size`/`stride` elements into a storage from `offset`."""

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, Storage):
            raise CheckpointFormatError(f"tensor built from {type(storage).__name__}, not storage")
        self.storage = storage
        self.offset = int(offset)
        self.size = tuple(int(n) for n in size)
        self.stride = tuple(int(s) for s in stride)
        if len(self.size) != len(self.stride):
            raise CheckpointFormatError(f"tensor size {size} and stride {stride} differ in length")
        if self.offset < 0 or min(self.size + self.stride, default=0) < 0:
            raise CheckpointFormatError(f"negative offset, size or stride in tensor {size}")

    def to_numpy(self):
        elements = self.storage.elements
        if 0 in self.size:
            array = np.zeros(self.size, dtype=elements.dtype)
        else:
            # as_strided does no bounds checking, so a hostile file could otherwise make us read
            # memory outside the storage. The last element is at offset + sum((n - 1) * stride).
            last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
            if last >= len(elements):
                raise CheckpointFormatError(
                    f"tensor with offset {self.offset}, size {self.size}, stride {self.stride} "
                    f"reaches element {last}, but its storage has only {len(elements)}"
                )
            view = np.lib.stride_tricks.as_strided(
                elements[self.offset :],
                shape=self.size,
                strides=tuple(s * elements.itemsize for s in self.stride),
                writeable=False,
            )
            # The copy gives a normal C-ordered array that owns its memory.
            array = np.array(view, copy=True)
        if self.storage.storage_type.name == "BFloat16Storage":
            # bfloat16 is the top half of a float32, so shifting the bits up is an exact upcast.
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


def rebuild_tensor_v2(storage, storage_offset, size, stride, *unused):
    """Stands in for torch._utils._rebuild_tensor_v2.

    The trailing arguments (requires_grad, backward hooks, metadata) do not matter for weights.
    """
    return TensorRecipe(storage, storage_offset, size, stride)


def rebuild_tensor(storage, storage_offset, size, stride):
    """Stands in for torch._utils._rebuild_tensor, which torch before 1.0 wrote instead."""
    return TensorRecipe(storage, storage_offset, size, stride)


def rebuild_parameter(data, requires_grad, backward_hooks):
    """torch._utils._rebuild_parameter wraps a tensor in nn.Parameter; we keep just the tensor."""
    return data


# (module, name) -> what the pickle gets instead. Everything a state dict saved by torch.save
# asks for, found by reading such files with `python -m pickletools`. Nothing else is allowed.
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
}
for _storage_name in STORAGE_DTYPES:
    ALLOWED_GLOBALS[("torch", _storage_name)] = StorageType(_storage_name)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ALLOWED_GLOBALS and records the storages it meets.

    See "Restricting Globals" in the Python pickle documentation for why overriding
    find_class is the way to control what a pickle may call.
    """

    def __init__(self, file):
        super().__init__(file)
        self.storages = {}

    def load(self):
        try:
            return super().load()
        except (UnsafeCheckpointError, CheckpointFormatError):
            raise
        # What a truncated or garbled pickle raises, or a call to an allowed name with the
        # wrong arguments; report those as a damaged file rather than a Python traceback.
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError) as error:
            raise CheckpointFormatError(f"damaged pickle in checkpoint: {error}") from None

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"checkpoint refers to {module}.{name}, which a weights file does not need; "
                "refusing to load it"
            ) from None

    def persistent_load(self, pid):
        # Zip format: ('storage', type, key, location, numel).
        # Legacy format adds a sixth item, view_metadata, which is None unless the file comes
        # from a torch old enough to pickle slices of storages.
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise CheckpointFormatError(f"unexpected persistent id {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(storage_type, StorageType):
            raise CheckpointFormatError(f"storage of unknown type {storage_type!r}")
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointFormatError(f"storage {key} has invalid element count {numel!r}")
        if len(pid) == 6 and pid[5] is not None:
            raise CheckpointFormatError(f"storage {key} is a storage view; not supported")
        if key not in self.storages:
            self.storages[key] = Storage(storage_type, key, numel)
        return self.storages[key]


def elements_from_bytes(data, storage, where):
    """Interpret raw bytes as the storage's elements, checking the length first."""
    expected = storage.numel * storage.storage_type.dtype.itemsize
    if len(data) != expected:
        raise CheckpointFormatError(
            f"{where}: storage holds {len(data)} bytes, but {storage.numel} elements of "
            f"{storage.storage_type.name} need {expected}"
        )
    return np.frombuffer(data, dtype=storage.storage_type.dtype)


def load_zip_format(archive):
    """Unpickle <root>/data.pkl and fill each storage from <root>/data/<key>."""
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise CheckpointFormatError(f"zip archive has {len(pickles)} data.pkl files, expected 1")
    root = pickles[0][: -len("data.pkl")]
    byteorder_file = root + "byteorder"
    # Older zip checkpoints have no byteorder record; they were written little-endian.
    if byteorder_file in archive.namelist():
        byteorder = archive.read(byteorder_file).decode("ascii", "replace").strip()
        if byteorder != "little":
            raise CheckpointFormatError(f"checkpoint byte order is {byteorder!r}, not 'little'")

    with archive.open(pickles[0]) as pickle_file:
        unpickler = RestrictedUnpickler(pickle_file)
        state = unpickler.load()
    for key, storage in unpickler.storages.items():
        name = f"{root}data/{key}"
        try:
            data = archive.read(name)
        except KeyError:
            raise CheckpointFormatError(f"storage file {name} is missing") from None
        storage.elements = elements_from_bytes(data, storage, name)
    return state


def load_legacy_format(file):
    """Read the legacy layout from just after the magic number pickle."""
    protocol = RestrictedUnpickler(file).load()
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise CheckpointFormatError(f"legacy checkpoint protocol {protocol!r}, expected 1001")
    system_info = RestrictedUnpickler(file).load()
    if not isinstance(system_info, dict) or not system_info.get("little_endian", False):
        raise CheckpointFormatError("legacy checkpoint was not written on a little-endian machine")
    unpickler = RestrictedUnpickler(file)
    state = unpickler.load()
    keys = RestrictedUnpickler(file).load()
    if not isinstance(keys, list) or set(keys) != set(unpickler.storages):
        raise CheckpointFormatError("legacy checkpoint's storage key list does not match its data")
    for key in keys:
        storage = unpickler.storages[key]
        header = file.read(8)
        if len(header) != 8:
            raise CheckpointFormatError(f"legacy checkpoint ends before storage {key}")
        (stored_numel,) = struct.unpack("<q", header)
        if stored_numel != storage.numel:
            raise CheckpointFormatError(
                f"storage {key} has {stored_numel} elements on disk, {storage.numel} in the pickle"
            )
        data = file.read(storage.numel * storage.storage_type.dtype.itemsize)
        storage.elements = elements_from_bytes(data, storage, f"storage {key}")
    return state


def load_pytorch_bin(path):
    """Load a state dict saved by torch.save; returns {name: numpy array} in the file's order.

    float16/float32/float64 and integer tensors keep their dtype; bfloat16 becomes float32.
    Raises UnsafeCheckpointError if the pickle names anything outside ALLOWED_GLOBALS and
    CheckpointFormatError (a ValueError) if the file is not a readable PyTorch checkpoint.
    """
    with open(path, "rb") as file:
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                state = load_zip_format(archive)
        else:
            file.seek(0)
            if file.read(len(LEGACY_MAGIC_PICKLE)) != LEGACY_MAGIC_PICKLE:
                raise CheckpointFormatError(
                    f"{path} is not a PyTorch checkpoint (neither zip nor legacy format)"
                )
            state = load_legacy_format(file)

    if not isinstance(state, dict):
        raise CheckpointFormatError(
            f"{path} holds a {type(state).__name__}, not a state dict of tensors"
        )
    weights = {}
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, TensorRecipe):
            raise CheckpointFormatError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor"
            )
        weights[name] = value.to_numpy()
    return weights


def main(argv=None) -> int:
    """List a checkpoint's tensors; every way it ends is flags.run's (a file that is not a
    readable checkpoint: one `error:` line and exit status 2)."""
    return flags.run(command, argv)


def command(argv=None) -> int:
    parser = flags.Parser(description="List the tensors of a PyTorch checkpoint, read safely.")
    parser.add_argument("path", type=Path, help="a pytorch_model.bin (zip or legacy format)")
    args = parser.parse_args(argv)
    try:
        weights = load_pytorch_bin(args.path)
    except OSError as error:
        raise UserError(f"cannot read {args.path}: {error.strerror or error}") from None
    for name, array in weights.items():
        print(f"{name:40s} {array.dtype!s:8s} {array.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
