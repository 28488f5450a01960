"""Checks of IDX files (the MNIST format) before torchvision reads them, so a bad file gets a clear message.

IDX layout: 2 zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, then each
dimension as a big-endian uint32, then the data. torchvision reads a bad file with an assert or a
reshape error that names neither the file nor the fix.
"""

import os
import struct

from gradlab.errors import UserError

UBYTE = 0x08


def read_header(path: str, ndim: int) -> tuple[int, ...]:
    """The dimensions of an unsigned-byte IDX file with `ndim` dimensions; UserError when it is not one."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4 + 4 * ndim)
    except OSError as err:
        raise UserError(f"Cannot read {path}: {err.strerror}.") from None
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
                        f"({expected} bytes in all) but the file has {size}.")
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
    with open(labels, "rb") as f:
        f.seek(8)  # 4 bytes of magic + one uint32 dimension
        top = max(f.read(), default=0)
    if top >= num_classes:
        raise UserError(f"{labels} contains label {top}, but this dataset has {num_classes} classes "
                        f"(0..{num_classes - 1}).")


def _product(dims: tuple[int, ...]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out
