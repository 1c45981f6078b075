"""LocalTritonServer's port picking: three distinct ports even when the OS hands a just-released port out
again (the clean-clone CI once failed with gRPC and metrics on the same port)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from m4r_export.serve import local


class _ReusingSockets:
    """socket.socket stand-in: bind(port 0) gives the lowest port not bound right now, as an OS may."""

    def __init__(self) -> None:
        self.bound: set[int] = set()

    def __call__(self, *_args: Any) -> _ReusingSockets.Sock:
        return self.Sock(self)

    class Sock:
        def __init__(self, owner: _ReusingSockets) -> None:
            self.owner, self.port = owner, 0

        def __enter__(self) -> _ReusingSockets.Sock:
            return self

        def __exit__(self, *_exc: Any) -> None:
            self.owner.bound.discard(self.port)

        def bind(self, address: tuple[str, int]) -> None:
            assert address == ("127.0.0.1", 0)
            self.port = min(p for p in range(40000, 40010) if p not in self.owner.bound)
            self.owner.bound.add(self.port)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)


def test_free_ports_are_distinct_when_released_ports_are_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local.socket, "socket", _ReusingSockets())
    assert local._free_ports(3) == [40000, 40001, 40002]


def test_free_ports_on_the_real_stack() -> None:
    ports = local._free_ports(3)
    assert len(set(ports)) == 3
    for port in ports:  # released: each can be bound again
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
