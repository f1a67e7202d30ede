"""CIFAR-10 from its standard python-pickle batches, held in memory as uint8.

The files are those of ``cifar-10-python.tar.gz`` extracted: a folder
``cifar-10-batches-py`` with ``data_batch_1`` ... ``data_batch_5``,
``test_batch`` and ``batches.meta``.  ``--data-root`` may be that folder or
the folder that holds it (torchvision's ``root``).  The pickles are read with
an unpickler of our own that rebuilds only what a batch holds (dicts, lists,
numbers, strings) and builds the ``uint8`` image array itself from the file's
raw bytes, after checking its shape: numpy's own reconstruction never runs on
the file, so a crafted one can neither run code nor build an array over
arbitrary memory.
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer_core_plugins.datasets.downloads import torchvision_download
from trainer_core import DataBundle, TensorSplit, UsageError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
VAL_FILE = "test_batch"
META_FILE = "batches.meta"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_BYTES = 3 * 32 * 32
HOW_TO_GET = ("download and extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz there, "
              "or run again with -o dataset.download=true")


def load(data_root: Path | None = None, download: bool = False) -> DataBundle:
    """CIFAR-10, ``3 x 32 x 32``: 50,000 training and 10,000 validation (test) images,
    normalised with mean and std 0.5 per channel as in the seed program.

    :param data_root: ``cifar-10-batches-py`` or the folder holding it (default: ``./data``).
    :param download: fetch the archive with torchvision's downloader (needs a network).
    """
    root = data_root if data_root is not None else Path("data")
    folder = find_folder(root)
    if folder is None and download:
        folder = _download(root)
    if folder is None:
        names = ", ".join((*TRAIN_FILES, VAL_FILE))
        raise UsageError(f"cifar10 data not found: expected {names} in {root / FOLDER} (or in {root}); {HOW_TO_GET}, "
                         f"or point --data-root at the folder that holds them")
    train = [read_batch(folder / name) for name in TRAIN_FILES]
    classes = read_classes(folder / META_FILE)
    return DataBundle(
        train=TensorSplit(torch.cat([b.inputs for b in train]), torch.cat([b.targets for b in train])),
        val=read_batch(folder / VAL_FILE),
        classes=classes,
        input_shape=(3, 32, 32),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


def find_folder(root: Path) -> Path | None:
    """The folder holding all six batch files: ``root/cifar-10-batches-py`` or ``root`` itself."""
    for folder in (root / FOLDER, root):
        if all((folder / name).is_file() for name in (*TRAIN_FILES, VAL_FILE)):
            return folder
    return None


class _Array:
    """A numpy array as a batch file describes it (shape, dtype, order, raw
    bytes), recorded and checked; :meth:`to_numpy` builds the array itself, a
    ``uint8`` view of the bytes.  Stands in for numpy's own reconstruction,
    which would build any array a file asks for (object arrays over raw bytes:
    pointers)."""

    __slots__ = ("shape", "fortran", "raw")

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None
        self.fortran = False
        self.raw: bytes | bytearray = b""

    def __setstate__(self, state: Any) -> None:  # numpy's ndarray.__setstate__, for uint8 only
        if self.shape is not None:
            raise pickle.UnpicklingError("an array set twice")
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]  # (version, shape, dtype, is_fortran, data)
        if not (isinstance(state, tuple) and len(state) == 4):
            raise pickle.UnpicklingError("an array state that numpy does not write")
        shape, dtype, fortran, raw = state
        self._set(shape, dtype, fortran, raw)

    def _set(self, shape: Any, dtype: Any, fortran: Any, raw: Any) -> None:
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise pickle.UnpicklingError(f"an array of shape {_short(shape)}")
        if not isinstance(dtype, _UInt8):
            raise pickle.UnpicklingError("an array whose dtype is not uint8")
        if not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError(f"array data given as {type(raw).__name__}, not bytes (only object arrays do that)")
        if type(fortran) not in (bool, int):
            raise pickle.UnpicklingError("an array order that numpy does not write")
        self.shape, self.fortran, self.raw = shape, bool(fortran), raw

    def to_numpy(self) -> np.ndarray | None:
        """The ``uint8`` array, or None when the bytes do not fill the declared shape."""
        if self.shape is None or len(self.raw) != math.prod(self.shape):
            return None
        return np.frombuffer(self.raw, dtype=np.uint8).reshape(self.shape, order="F" if self.fortran else "C")


class _UInt8:
    """``numpy.dtype('u1')`` as a batch file asks for it: the only dtype accepted."""

    __slots__ = ("set",)

    def __init__(self) -> None:
        self.set = False

    def __setstate__(self, state: Any) -> None:  # (version, byte order, subarray, names, fields, ...)
        if self.set:
            raise pickle.UnpicklingError("a dtype set twice")
        fields = state[1:5] if isinstance(state, tuple) and state and type(state[0]) is int else state
        if not (isinstance(fields, tuple) and len(fields) >= 4 and fields[0] in ("|", b"|")
                and fields[1:4] == (None, None, None)):
            raise pickle.UnpicklingError(f"a uint8 dtype with the state {_short(state)}")
        self.set = True


class _Global:
    """A name a batch file may use (``numpy.dtype``...) as our own function: the
    file can call it, and change nothing on it."""

    __slots__ = ("_call",)

    def __init__(self, call: Any) -> None:
        object.__setattr__(self, "_call", call)

    def __call__(self, *args: Any) -> Any:
        if self._call is None:
            raise pickle.UnpicklingError("numpy.ndarray called: numpy does not write that")
        return self._call(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError("a pickle that changes a global")


class _BatchUnpickler(pickle.Unpickler):
    """Rebuilds what a CIFAR-10 batch holds: dicts, lists, ints, strings, bytes,
    and ``uint8`` arrays through our own stand-ins (:class:`_Array`); every
    other global, and any other dtype, is refused.

    The stand-ins are fresh objects of this one load that the file can call
    but not change.  The bytes ``_codecs.encode`` may make (how Python 3 writes
    bytes at protocol 2) are bounded by the file's size: a file cannot
    multiply one string in memory."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")
        self._budget = len(data)
        self._ndarray = _Global(None)  # only an argument of _reconstruct
        reconstruct, frombuffer = _Global(self._reconstruct), _Global(self._frombuffer)
        self._globals: dict[tuple[str, str], _Global] = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy.core.numeric", "_frombuffer"): frombuffer,  # (protocol 5)
            ("numpy._core.numeric", "_frombuffer"): frombuffer,
            ("numpy", "ndarray"): self._ndarray,
            ("numpy", "dtype"): _Global(self._dtype),
            ("_codecs", "encode"): _Global(self._encode),
        }

    def find_class(self, module: str, name: str) -> Any:
        found = self._globals.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only uint8 arrays, "
                                         f"lists, numbers and strings")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id: a CIFAR batch has none")

    def _reconstruct(self, cls: Any, shape: Any, typecode: Any) -> _Array:
        if cls is not self._ndarray or shape != (0,) or typecode not in (b"b", "b"):
            raise pickle.UnpicklingError("an array reconstruction that numpy does not write")
        return _Array()

    def _frombuffer(self, raw: Any, dtype: Any, shape: Any, order: Any) -> _Array:
        if order not in ("C", "F"):
            raise pickle.UnpicklingError("an array order that numpy does not write")
        array = _Array()
        array._set(shape, dtype, order == "F", raw)
        return array

    def _dtype(self, typestr: Any, align: Any = False, copy: Any = False) -> _UInt8:
        if typestr not in ("u1", b"u1", "|u1", b"|u1"):
            shown = typestr.decode("latin1") if isinstance(typestr, bytes) else typestr
            raise pickle.UnpicklingError(f"refusing an array of dtype {_short(shown)}: CIFAR batches hold uint8 data")
        return _UInt8()

    def _encode(self, text: Any, encoding: Any = "utf-8") -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError("bytes written in a way Python does not write them")
        self._budget -= len(text)
        if self._budget < 0:
            raise pickle.UnpicklingError("more bytes than the file holds")
        return text.encode("latin1")


def _short(value: Any, limit: int = 60) -> str:
    try:
        shown = repr(value)
    except ValueError:  # an int of more digits than Python prints
        return f"({type(value).__name__} too large to show)"
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _unpickle(path: Path) -> Any:
    try:
        data = path.read_bytes()
        return _BatchUnpickler(data).load()
    except Exception as exc:  # whatever a damaged or crafted file makes the unpickler raise
        detail = " ".join(str(exc).split())[:200]
        raise UsageError(f"{path} is damaged or not a CIFAR-10 batch ({type(exc).__name__}: {detail}); "
                         f"extract cifar-10-python.tar.gz again") from None


def _entries(path: Path, loaded: Any) -> dict[str, Any]:
    """A batch file's dict with its keys as text (Python 2 wrote them as byte strings)."""
    if not isinstance(loaded, dict):
        raise UsageError(f"{path} is not a CIFAR-10 batch: it holds {type(loaded).__name__}, not a dict; "
                         f"extract cifar-10-python.tar.gz again")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in loaded.items()}


def read_batch(path: Path) -> TensorSplit:
    """One batch file: ``data`` (``N x 3072`` uint8, channel-major) and ``labels`` (N ints in 0..9)."""
    batch = _entries(path, _unpickle(path))
    data, labels = batch.get("data"), batch.get("labels")
    again = "extract cifar-10-python.tar.gz again"
    if not isinstance(data, _Array):
        raise UsageError(f"{path} is not a CIFAR-10 batch: its 'data' is {_kind(data)}, not an N x {IMAGE_BYTES} "
                         f"uint8 array; {again}")
    shape = data.shape
    if shape is None or len(shape) != 2 or shape[1] != IMAGE_BYTES:
        raise UsageError(f"{path} is not a CIFAR-10 batch: its 'data' has shape {_short(shape)}, not "
                         f"N x {IMAGE_BYTES}; {again}")
    array = data.to_numpy()
    if array is None:
        raise UsageError(f"{path} is damaged: its 'data' declares {_short(shape[0])} x {IMAGE_BYTES} bytes but holds "
                         f"{len(data.raw)}; {again}")
    if not isinstance(labels, list) or not all(type(label) is int for label in labels):
        raise UsageError(f"{path} is not a CIFAR-10 batch: its 'labels' is {_kind(labels)}, not a list of whole "
                         f"numbers; {again}")
    if len(labels) != len(array):
        raise UsageError(f"{path} is not a CIFAR-10 batch: {len(array)} images but {len(labels)} labels; {again}")
    if not all(0 <= label < len(CLASSES) for label in labels):
        raise UsageError(f"{path} has labels outside 0..{len(CLASSES) - 1}; {again}")
    targets = torch.tensor(labels, dtype=torch.int64)
    return TensorSplit(torch.from_numpy(array.reshape(-1, 3, 32, 32).copy()), targets)


def _kind(value: Any) -> str:
    if value is None:
        return "missing"
    if isinstance(value, _Array):
        return "an array"
    return "a numpy name" if isinstance(value, (_Global, _UInt8)) else type(value).__name__


def read_classes(path: Path) -> list[str]:
    """Class names from ``batches.meta`` when present (the standard ones otherwise)."""
    if not path.is_file():
        return list(CLASSES)
    names = _entries(path, _unpickle(path)).get("label_names")
    if not (isinstance(names, list) and len(names) == len(CLASSES) and all(isinstance(n, (bytes, str)) for n in names)):
        raise UsageError(f"{path} has no list of {len(CLASSES)} 'label_names'; extract cifar-10-python.tar.gz again")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def _download(root: Path) -> Path:
    torchvision_download("CIFAR10", root, "cifar10", "download and extract "
                         "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz there by hand")
    folder = find_folder(root)
    if folder is None:
        raise UsageError(f"cifar10: the download finished but {root / FOLDER} does not hold the six batch files")
    return folder
