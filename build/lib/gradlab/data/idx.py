"""Checks of IDX files (the MNIST format) before torchvision reads them, so a bad file gets a clear message.

IDX layout: 2 zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, then each
dimension as a big-endian uint32, then the data. torchvision reads a bad file with an assert or a
reshape error that names neither the file nor the fix.

A path ending in `.gz` (the files as downloaded) is checked and read through gzip, on its decompressed bytes.
"""

import gzip
import os
import struct
import zlib

import numpy as np

from gradlab.errors import UserError

UBYTE = 0x08


def read_header(path: str, ndim: int) -> tuple[int, ...]:
    """The dimensions of an unsigned-byte IDX file with `ndim` dimensions; UserError when it is not one."""
    try:
        with _open(path) as f:
            head = f.read(4 + 4 * ndim)
            if _gz(path):  # its decompressed size is known only by decompressing it (which also finds damage)
                size = len(head) + sum(len(chunk) for chunk in iter(lambda: f.read(1 << 20), b""))
            else:
                size = os.path.getsize(path)
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"Cannot read {path}: {_reason(err)}.") from None
    return _check_header(path, head, size, ndim)


def read_idx(path: str, ndim: int) -> np.ndarray:
    """The data of an unsigned-byte IDX file with `ndim` dimensions, shaped by its header, e.g. (N, 28, 28)."""
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"Cannot read {path}: {_reason(err)}.") from None
    dims = _check_header(path, data[:4 + 4 * ndim], len(data), ndim)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()  # writable, for torch


def _check_header(path: str, head: bytes, size: int, ndim: int) -> tuple[int, ...]:
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] != UBYTE or head[3] != ndim:
        found = head[:4].hex(" ") or "an empty file"
        raise UserError(f"{path} is not an IDX file of {ndim}-D unsigned bytes: it starts with {found}, "
                        f"expected 00 00 08 {ndim:02x}. Is it still gzip-compressed, or another file renamed?")
    if len(head) < 4 + 4 * ndim:
        raise UserError(f"{path} is truncated: it ends inside its header ({size} bytes).")
    dims = struct.unpack(f">{ndim}I", head[4:])
    expected = 4 + 4 * ndim + _product(dims)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise UserError(f"{path} is {what}: its header promises {' x '.join(map(str, dims))} bytes of data "
                        f"({expected} bytes in all) but the file has {size}"
                        f"{' once decompressed' if _gz(path) else ''}.")
    return dims


def check_pair(images: str, labels: str, num_classes: int, image_size: tuple[int, int] = (28, 28)) -> None:
    """An image file (N, H, W) of `image_size` images and its label file (N,) that agree, labels in 0..num_classes-1."""
    n_images, *size = read_header(images, 3)
    if n_images == 0:  # torchvision cannot read an empty one (a ValueError about buffer offsets)
        raise UserError(f"{images} holds no images.")
    if tuple(size) != tuple(image_size):
        raise UserError(f"{images} holds {' x '.join(map(str, size))} images; this dataset's are "
                        f"{' x '.join(map(str, image_size))}.")
    n_labels = read_header(labels, 1)[0]
    if n_images != n_labels:
        raise UserError(f"{images} holds {n_images} images but {labels} holds {n_labels} labels; "
                        "the two files must come from the same release.")
    with _open(labels) as f:
        top = max(f.read()[8:], default=0)  # after 4 bytes of magic and one uint32 dimension
    if top >= num_classes:
        raise UserError(f"{labels} contains label {top}, but this dataset has {num_classes} classes "
                        f"(0..{num_classes - 1}).")


def _product(dims: tuple[int, ...]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def _gz(path: str) -> bool:
    return path.endswith(".gz")


def _open(path: str):
    return gzip.open(path, "rb") if _gz(path) else open(path, "rb")


def _reason(err: BaseException) -> str:
    if isinstance(err, (EOFError, zlib.error, gzip.BadGzipFile)):
        return f"it is not a complete gzip file ({err})"
    return getattr(err, "strerror", None) or str(err)
