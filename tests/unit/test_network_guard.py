"""The root conftest forbids sockets in unit tests that are not marked `network`."""
from __future__ import annotations

import asyncio
import socket
import urllib.request

import pytest

from tests.conftest import NetworkAccessBlocked


def test_connect_is_blocked():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(NetworkAccessBlocked, match="unit tests may not open sockets"):
            s.connect(("127.0.0.1", 9))
        with pytest.raises(NetworkAccessBlocked):
            s.connect_ex(("127.0.0.1", 9))
        with pytest.raises(NetworkAccessBlocked):
            s.bind(("127.0.0.1", 0))
    finally:
        s.close()


def test_create_connection_and_urllib_are_blocked():
    with pytest.raises(NetworkAccessBlocked, match="test_create_connection_and_urllib_are_blocked"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    with pytest.raises(NetworkAccessBlocked):
        urllib.request.urlopen("http://127.0.0.1:9/", timeout=1)


def test_asyncio_open_connection_is_blocked():
    async def main():
        await asyncio.open_connection("127.0.0.1", 9)

    with pytest.raises(NetworkAccessBlocked):
        asyncio.run(main())


def test_event_loops_and_unix_socketpairs_still_work():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x")
        assert b.recv(1) == b"x"
    assert asyncio.run(asyncio.sleep(0, result=42)) == 42


@pytest.mark.network
def test_marked_unit_test_may_use_loopback():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    with srv, socket.create_connection(srv.getsockname(), timeout=5) as c:
        conn, _ = srv.accept()
        with conn:
            c.sendall(b"ok")
            assert conn.recv(2) == b"ok"


def test_unit_tests_are_not_auto_marked_network(request):
    from tests.conftest import _in_dir

    assert _in_dir(request.node, "unit")
    assert request.node.get_closest_marker("network") is None
