"""Files a run reads that it did not write (issue 14, items 3, 11 and 12): CIFAR-10
batch pickles, image files, other runs' folders.  Each is written here in its real
on-disk format, then damaged or crafted as an attacker or an unlucky disk would."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from trainer_core_plugins.datasets import cifar10
from test_datasets import write_cifar, write_image_tree
from trainer_core import UsageError
from trainer_core.cli import make_cli


def invoke(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(make_cli(), [str(a) for a in args])
    return result.exit_code, result.output


def one_line_error(code: int, output: str, *fragments: str | Path) -> str:
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for fragment in fragments:
        assert str(fragment) in lines[0], output
    return lines[0]


# -- CIFAR-10 batches ---------------------------------------------------------------------


def _int(n: int) -> bytes:
    """A pickle int opcode as Python 2's cPickle chose it."""
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    return b"J" + struct.pack("<i", n)


def _str(data: bytes) -> bytes:
    """A Python 2 ``str`` (SHORT_BINSTRING / BINSTRING): bytes under ``encoding='bytes'``."""
    return (b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<I", len(data))) + data


def python2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch file as the CIFAR-10 archive holds it: written by Python 2's cPickle
    (protocol 2) from numpy of its day, byte-string keys, the array through
    ``numpy.core.multiarray._reconstruct``, ``numpy.dtype('u1', 0, 1)`` and
    ``ndarray.__setstate__`` with the pixels as one raw string."""
    rows, cols = data.shape
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _int(0) + b"\x85" + _str(b"b") + b"\x87R"
             + b"(" + _int(1) + _int(rows) + _int(cols) + b"\x86"
             + b"cnumpy\ndtype\n" + _str(b"u1") + _int(0) + _int(1) + b"\x87R"
             + b"(" + _int(3) + _str(b"|") + b"NNN" + _int(-1) + _int(-1) + _int(0) + b"tb"
             + b"\x89" + _str(data.tobytes()) + b"tb")
    listed = b"](" + b"".join(_int(x) for x in labels) + b"e"
    return (b"\x80\x02}(" + _str(b"data") + array + _str(b"labels") + listed
            + _str(b"batch_label") + _str(b"testing batch 1 of 1") + b"u.")


def test_python2_batch_helper_is_what_numpy_reads() -> None:
    """The hand-written Python 2 format is real: numpy's own unpickling reads it back."""
    data = np.random.default_rng(1).integers(0, 256, (3, 3072), dtype=np.uint8)
    loaded = pickle.loads(python2_batch(data, [1, 2, 3]), encoding="bytes")
    assert np.array_equal(loaded[b"data"], data) and loaded[b"data"].dtype == np.uint8
    assert loaded[b"labels"] == [1, 2, 3] and loaded[b"batch_label"] == b"testing batch 1 of 1"


@pytest.mark.parametrize("fmt", ["python2", "protocol-2", "protocol-4", "protocol-5", "str-keys"])
def test_cifar10_reads_real_batch_formats(tmp_path: Path, fmt: str) -> None:
    """What numpy writes (each protocol) and what Python 2 wrote is what our stand-ins accept."""
    data = np.random.default_rng(2).integers(0, 256, (5, 3072), dtype=np.uint8)
    labels = [0, 9, 3, 3, 7]
    path = tmp_path / "batch"
    if fmt == "python2":
        path.write_bytes(python2_batch(data, labels))
    elif fmt == "str-keys":
        path.write_bytes(pickle.dumps({"data": data, "labels": labels}, protocol=4))
    else:
        protocol = int(fmt.split("-")[1])
        path.write_bytes(pickle.dumps({b"data": data, b"labels": labels, b"filenames": [b"a.png"] * 5}, protocol=protocol))
    split = cifar10.read_batch(path)
    assert np.array_equal(split.inputs.numpy(), data.reshape(5, 3, 32, 32))
    assert split.targets.tolist() == labels


def _object_labels_batch(count: int = 8) -> bytes:
    """A batch whose 'labels' is an object array built over raw bytes: numpy pickles an
    object array with its items as a list and a dtype flag saying so; with the flag
    cleared numpy takes 8 raw bytes per item as pointers (SIGSEGV when read)."""
    data = pickle.dumps({b"data": np.zeros((count, 3072), np.uint8), b"labels": np.empty(count, dtype=object)}, protocol=2)
    flags = data.index(b"K?t")  # the object dtype's state ends with its flags (63): make them 0
    data = data[:flags] + b"K\x00t" + data[flags + 3:]
    items = data.index(b"]q", flags)  # the list of None items, up to the TUPLE closing the array's state
    end = data.index(b"t", items)
    return data[:items] + b"C" + bytes([8 * count]) + b"\x41" * 8 * count + data[end:]


def _cifar_folder(tmp_path: Path) -> Path:
    write_cifar(tmp_path / "data")
    return tmp_path / "data" / cifar10.FOLDER


def test_object_array_batch_is_refused_not_a_crash(tmp_path: Path) -> None:
    """The real program in its own process: a crash would be a negative return code."""
    batch = _cifar_folder(tmp_path) / "test_batch"
    batch.write_bytes(_object_labels_batch())
    done = subprocess.run([sys.executable, "-m", "trainer_core", "run", "--dataset", "cifar10", "--data-root",
                           str(tmp_path / "data"), "--epochs", "1", "-q", "--run-dir", str(tmp_path / "run")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    one_line_error(2, done.stdout + done.stderr, batch, "refusing an array of dtype 'O8'")
    assert not (tmp_path / "run").exists()


BAD_BATCHES = {
    "labels-out-of-range": ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}, "has labels outside 0..9"),
    "negative-label": ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [-1, 0]}, "has labels outside 0..9"),
    "huge-label": ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2**70]}, "has labels outside 0..9"),
    "labels-not-a-list": ({b"data": np.zeros((2, 3072), np.uint8), b"labels": 5}, "its 'labels' is int"),
    "labels-of-text": ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, "not a list of whole numbers"),
    "label-count": ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "2 images but 1 labels"),
    "data-wrong-width": ({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}, "has shape (2, 100), not N x 3072"),
    "data-float": ({b"data": np.zeros((2, 3072), np.float32), b"labels": [1, 2]}, "refusing an array of dtype 'f4'"),
    "data-a-list": ({b"data": [1, 2], b"labels": [1, 2]}, "its 'data' is list"),
    "not-a-dict": ([1, 2, 3], "it holds list, not a dict"),
}


@pytest.mark.parametrize("kind", sorted(BAD_BATCHES))
def test_odd_batch_values_are_one_line_errors_naming_the_file(tmp_path: Path, kind: str) -> None:
    batch = _cifar_folder(tmp_path) / "data_batch_2"
    value, message = BAD_BATCHES[kind]
    batch.write_bytes(pickle.dumps(value, protocol=2))
    code, output = invoke("run", "--dataset", "cifar10", "--data-root", tmp_path / "data", "--epochs", "1", "-q",
                          "--run-dir", tmp_path / "run")
    one_line_error(code, output, batch, message)
    assert not (tmp_path / "run").exists()


CRAFTED = {
    # An array declaring 2**40 rows over 3072 bytes: refused before anything that size is made.
    "huge-declared-shape": (lambda: pickle.dumps({b"data": _ArrayBytes((2**40, 3072), bytes(3072)),
                                                  b"labels": [1]}, protocol=2),
                            "declares 1099511627776 x 3072 bytes but holds 3072"),
    "huge-int-rows": (lambda: pickle.dumps({b"data": _ArrayBytes((10**5000, 3072), bytes(3072)), b"labels": [1]},
                                           protocol=2),
                      "declares (int too large to show) x 3072 bytes but holds 3072"),
    "changes-a-global": (lambda: b"\x80\x02cnumpy\ndtype\nN}X\x05\x00\x00\x00_callNs\x86b.",
                         "a pickle that changes a global"),
    "unknown-codec": (lambda: b"\x80\x02}(C\x04datac_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00nope\x86Ru.",
                      "is damaged or not a CIFAR-10 batch (UnpicklingError: bytes written in a way"),
    "other-global": (lambda: b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueR.", "refusing to load os.system"),
    "memo-bomb": (lambda: _memo_bomb(), "more bytes than the file holds"),
    "truncated-length": (lambda: b"\x80\x02}(C\x04dataB\xff\xff\xff\x7fabc", "is damaged or not a CIFAR-10 batch"),
}


class _ArrayBytes:
    """Pickles as numpy pickles a uint8 array, but with any declared shape over any bytes."""

    def __init__(self, shape: tuple[int, ...], raw: bytes) -> None:
        self.shape, self.raw = shape, raw

    def __reduce__(self):  # type: ignore[no-untyped-def]
        template = np.zeros((1, 1), np.uint8)
        function, args, state = template.__reduce__()
        return function, args, (state[0], self.shape, state[2], state[3], self.raw)


def _memo_bomb() -> bytes:
    """One 1 MiB string turned into bytes 64 times by ``_codecs.encode`` (64 MiB from a 1 MiB file)."""
    text = b"X" + struct.pack("<I", 2**20) + b"a" * 2**20 + b"q\x01"
    call = b"c_codecs\nencode\nq\x02h\x01X\x06\x00\x00\x00latin1\x86R"
    more = b"h\x02h\x01X\x06\x00\x00\x00latin1\x86R" * 63
    return b"\x80\x02}(C\x04data" + text + b"0" + b"](" + call + more + b"eC\x06labels]u."


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_batches_are_one_line_errors_naming_the_file(tmp_path: Path, kind: str) -> None:
    batch = _cifar_folder(tmp_path) / "data_batch_4"
    make, message = CRAFTED[kind]
    batch.write_bytes(make())
    code, output = invoke("run", "--dataset", "cifar10", "--data-root", tmp_path / "data", "--epochs", "1", "-q",
                          "--run-dir", tmp_path / "run")
    one_line_error(code, output, batch, message)


def test_meta_file_with_odd_names(tmp_path: Path) -> None:
    folder = _cifar_folder(tmp_path)
    (folder / cifar10.META_FILE).write_bytes(pickle.dumps({b"label_names": [b"\xff"] * 9 + [3]}, protocol=2))
    with pytest.raises(UsageError, match=f"{cifar10.META_FILE} has no list of 10 'label_names'"):
        cifar10.load(tmp_path / "data")
    (folder / cifar10.META_FILE).write_bytes(pickle.dumps({b"label_names": [b"\xe9t\xe9"] * 10}, protocol=2))
    assert cifar10.load(tmp_path / "data").classes[0] == "\xe9t\xe9"  # Python 2 text: latin-1, never a crash


# -- images ---------------------------------------------------------------------------------


def bomb_png(side: int = 30000) -> bytes:
    """A valid 1-bit grayscale PNG of ``side x side`` black pixels: ~110 KB on disk, a
    header PIL refuses to decode (more than twice its pixel limit)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compress = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the row's bits
    pixels = b"".join(compress.compress(row) for _ in range(side)) + compress.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(bomb_png())
    with pytest.raises(Image.DecompressionBombError):  # what PIL makes of it
        Image.open(path)
    return path


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "loader-process"])
def test_decompression_bomb_is_an_unreadable_image(tmp_path: Path, bomb: Path, workers: int) -> None:
    data = tmp_path / "data"
    write_image_tree(data, per_class=2, size=(20, 20))
    target = data / "val" / "bees" / "1.png"
    target.write_bytes(bomb.read_bytes())
    code, output = invoke("run", "--dataset", "imagefolder", "--data-root", data, "-o", "dataset.image_size=16",
                          "--model", "mlp", "--epochs", "1", "-q", "--num-workers", str(workers),
                          "--run-dir", tmp_path / "run")
    one_line_error(code, output, f"cannot read {target} (ImageTooLarge: Image size (900000000 pixels) exceeds limit",
                   "replace or remove it")


def test_decompression_bomb_given_to_predict(tmp_path: Path, bomb: Path) -> None:
    data = tmp_path / "data"
    write_image_tree(data, per_class=2, size=(20, 20))
    code, output = invoke("run", "--dataset", "imagefolder", "--data-root", data, "-o", "dataset.image_size=16",
                          "--model", "mlp", "--epochs", "1", "-q", "--num-workers", "0", "--plugins", "checkpoint",
                          "--run-dir", tmp_path / "run")
    assert code == 0, output
    code, output = invoke("predict", "--checkpoint", tmp_path / "run", bomb)
    one_line_error(code, output, f"{bomb} is not an image file that can be read: Image size (900000000 pixels)")


# -- trainer runs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``runs/first`` and ``runs/second``: two finished one-epoch runs, as the program writes them."""
    runs = tmp_path_factory.mktemp("runs") / "runs"
    for name in ("first", "second"):
        code, output = invoke("run", "--dataset", "fake", "--epochs", "2", "-q", "--run-dir", runs / name)
        assert code == 0, output
    return runs


DAMAGE = {
    "metrics-not-utf8": ("metrics.jsonl", lambda b: b.replace(b'"epoch"', b'"\xff\xfepoch"', 1),
                         "metrics.jsonl is not UTF-8 text (line 1)"),
    "summary-not-utf8": ("summary.json", lambda b: b[:20] + b"\xc3\x28" + b[20:], "summary.json is not UTF-8 text"),
    "summary-bad-json": ("summary.json", lambda b: b[: len(b) // 2], "summary.json is not JSON"),
    "summary-a-list": ("summary.json", lambda b: b"[1, 2]\n", "summary.json is not a JSON object"),
    "config-not-utf8": ("config.toml", lambda b: b"\xff" + b, "config.toml is not UTF-8 text"),
    "config-bad-toml": ("config.toml", lambda b: b + b"epochs = [\n", "config.toml is not valid TOML"),
    "metrics-bad-line": ("metrics.jsonl", lambda b: b"{not json\n" + b, "metrics.jsonl line 1 is not a JSON object"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_runs_lists_the_others_and_marks_a_damaged_run_unreadable(two_runs: Path, tmp_path: Path, kind: str) -> None:
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(two_runs, runs)
    name, damage, problem = DAMAGE[kind]
    path = runs / "second" / name
    path.write_bytes(damage(path.read_bytes()))

    result = CliRunner().invoke(make_cli(), ["runs", str(runs), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["first"]["status"] == "completed" and rows["first"]["problem"] is None
    assert rows["first"]["best"] is not None and rows["first"]["epochs"] == 2
    assert rows["second"]["status"] == "unreadable" and problem in rows["second"]["problem"]

    result = CliRunner().invoke(make_cli(), ["runs", str(runs)])
    assert result.exit_code == 0, result.output
    table = result.stdout.splitlines()
    assert table[0].startswith("name") and len(table) == 3
    assert next(line for line in table if line.startswith("first")).endswith("completed")
    assert next(line for line in table if line.startswith("second")).endswith("unreadable")
    assert result.stderr.strip() == f"second: unreadable: {rows['second']['problem']}"


def test_runs_survives_odd_values_in_a_summary(two_runs: Path, tmp_path: Path) -> None:
    """Values a JSON file can hold that no run writes: listed, not a crash."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(two_runs, runs)
    summary = runs / "second" / "summary.json"
    summary.write_text(json.dumps({"status": "completed", "duration_s": float("inf"), "started": "0001-01-01T00:00:00+14:00",
                                   "headline": 5}))
    metrics = runs / "second" / "metrics.jsonl"
    metrics.write_text('{"epoch": 1, "step": 1, "val/acc": 1' + "0" * 400 + "}\n")
    result = CliRunner().invoke(make_cli(), ["runs", str(runs)])
    assert result.exit_code == 0, result.output
    second = next(line for line in result.stdout.splitlines() if line.startswith("second"))
    assert second.split()[-2:] == ["-", "completed"]
