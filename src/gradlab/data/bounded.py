"""Reading a file from elsewhere without trusting it: regular files only, at most a known number of bytes, and
archives unpacked only inside their folder.

    open_regular(path)                 # a FIFO, a device or a socket: UserError at once, never a hang
    read_bytes(path, 1 << 20, "tail")  # the last MiB of a 50 MB text; the rest is never read
    extract_tar(archive, folder)       # tarfile's "data" filter: no ../, absolute or linked-out members
"""

import os
import stat
import tarfile
from typing import BinaryIO

from gradlab.errors import UserError


def open_regular(path: str) -> BinaryIO:
    """`path` opened for reading in binary, if it is a regular file (symlinks to one are fine).

    O_NONBLOCK: opening a FIFO for reading otherwise waits for a writer, forever; the type is checked on the
    opened descriptor (fstat), so the file cannot be swapped between the check and the read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise UserError(f"Cannot read {path}: {err.strerror or err}.") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a regular file")
        raise UserError(f"{path} is {kind}, not a regular file: only regular files are read.")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path: str, limit: int, keep: str = "head") -> bytes:
    """At most `limit` bytes of the regular file `path`: its first ones (`keep="head"`) or its last ones ("tail")."""
    with open_regular(path) as f:
        if keep == "tail":
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - limit))
        return f.read(limit)


def extract_tar(archive: str, folder: str) -> None:
    """Unpack `archive` into `folder` with tarfile's "data" filter (Python >= 3.11.4): members that would land
    outside `folder` (`../`, absolute paths, links pointing out), devices and set-uid bits are refused."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
    except tarfile.FilterError as err:
        raise UserError(f"{archive}: refused to extract it, a member would land outside {folder} or is not a "
                        f"plain file or folder ({err}). Nothing outside {folder} was written; delete the archive "
                        "and what it left there, and get it again from its source.") from None
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"{archive}: not a readable archive ({err}). Delete it and download it again.") from None
