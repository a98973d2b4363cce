"""fastgw.runtime.listener: one readiness event accepts every pending connection (uvloop's own server accepts
one per loop iteration, which starved bursts of new clients for seconds under load)."""
import asyncio
import socket

import uvloop

from fastgw.runtime.listener import Listener, listen_socket


class Echo(asyncio.Protocol):
    made = 0

    def connection_made(self, transport):
        Echo.made += 1
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data.upper())


def test_one_readiness_event_accepts_every_pending_connection():
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    Echo.made = 0
    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    listener = Listener(loop, sock, Echo)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]   # all in the accept queue
    try:
        listener._accept()                         # what one readable event runs
        assert listener.accepted == 300
        loop.run_until_complete(asyncio.sleep(0.05))
        assert Echo.made == 300
        clients[123].sendall(b"ping")              # each one is a working transport with its protocol
        loop.run_until_complete(asyncio.sleep(0.05))
        clients[123].settimeout(5)
        assert clients[123].recv(16) == b"PING"
        listener._accept()                         # nothing pending: returns at once
        assert listener.accepted == 300
    finally:
        for c in clients:
            c.close()
        listener.close()
        loop.close()


def test_close_stops_accepting():
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    listener = Listener(loop, sock, Echo)
    listener.start()
    c = socket.create_connection(("127.0.0.1", port))
    loop.run_until_complete(asyncio.sleep(0.05))
    assert listener.accepted == 1
    listener.close()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        refused = False
    except OSError:
        refused = True
    assert refused and sock.fileno() == -1
    c.close()
    loop.close()
