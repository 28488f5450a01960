"""A machine without internet, for the Python processes a test starts with this folder first on PYTHONPATH (Python
imports `sitecustomize` at start-up): every connection or name lookup beyond loopback fails at once, as it does
offline, so a test can run `python train.py` exactly as a user types it and never reach, or wait for, a real host."""

import socket

LOCAL = ("localhost", "127.", "::1", "0.0.0.0")


def _offline(host) -> OSError:
    return OSError(101, f"Network is unreachable (tests/no_internet blocks {host})")


def _is_local(host) -> bool:
    return isinstance(host, str) and host.startswith(LOCAL)


_getaddrinfo = socket.getaddrinfo
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name is not None and not _is_local(name):
        raise socket.gaierror(socket.EAI_NONAME, f"Name or service not known (tests/no_internet blocks {host})")
    return _getaddrinfo(host, *args, **kwargs)


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
        raise _offline(address[0])
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
        return 101  # ENETUNREACH
    return _connect_ex(self, address)


socket.getaddrinfo = getaddrinfo
socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
