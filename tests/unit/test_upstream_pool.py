"""fastgw.proxy.upstream.Pool against a real loopback server: at most max_connections, a first-come queue with
a timeout, connections handed over and reused rather than closed and opened again."""
import asyncio
import types

import pytest
import uvloop

from fastgw.proxy.upstream import Pool, PoolBusy


class Sink(asyncio.Protocol):
    def connection_made(self, transport):
        Server.conns.append(transport)


class Server:
    conns = []


@pytest.fixture
def loop_and_server():
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    Server.conns = []
    server = loop.run_until_complete(loop.create_server(Sink, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    target = types.SimpleNamespace(host="127.0.0.1", port=port, tls=False, ssl=None, server_hostname=None,
                                   name=f"127.0.0.1:{port}")
    yield loop, target
    server.close()
    loop.close()


def test_bounded_fifo_queue_hands_connections_over(loop_and_server):
    loop, target = loop_and_server
    pool = Pool(loop, target, 8, 5.0, 2, 5.0)

    async def scenario():
        a = await pool.connect()
        b = await pool.connect()
        assert pool.open == 2
        order = []

        async def wait(i):
            conn = await pool.connect()
            order.append(i)
            return conn

        waiters = [loop.create_task(wait(i)) for i in range(3)]
        await asyncio.sleep(0.05)
        assert order == [] and len(pool.waiters) == 3 and pool.open == 2     # nobody jumped the limit
        pool.release(a)                                   # handed to the first waiter, not kept idle
        await asyncio.sleep(0.01)
        assert order == [0] and waiters[0].result() is a and pool.idle == []
        b.abort()                                         # a closed one's slot goes to the next waiter
        await asyncio.sleep(0.05)
        assert order == [0, 1] and waiters[1].result() is not b and pool.open == 2
        pool.release(waiters[0].result())
        await asyncio.sleep(0.01)
        assert order == [0, 1, 2] and pool.queued == 3 and pool.connects == 3
        pool.release(waiters[1].result())
        pool.release(waiters[2].result())
        assert len(pool.idle) == 2 and pool.open == 2     # kept for reuse
        again = pool.acquire()
        assert again is not None and pool.open == 2

    loop.run_until_complete(scenario())
    assert len(Server.conns) == 3


def test_queue_timeout_is_pool_busy(loop_and_server):
    loop, target = loop_and_server
    pool = Pool(loop, target, 8, 5.0, 1, 0.05)

    async def scenario():
        await pool.connect()
        with pytest.raises(PoolBusy, match="all 1 connections"):
            await pool.connect()
        assert pool.open == 1 and pool.queue_wait >= 0.04

    loop.run_until_complete(scenario())


def test_a_failed_connect_frees_its_slot_for_the_next_waiter(loop_and_server):
    loop, target = loop_and_server
    dead = types.SimpleNamespace(**{**vars(target), "port": 1})      # nothing listens on port 1
    pool = Pool(loop, dead, 8, 5.0, 1, 5.0)

    async def scenario():
        first = loop.create_task(pool.connect())
        second = loop.create_task(pool.connect())
        for t in (first, second):
            with pytest.raises(OSError):
                await t
        assert pool.open == 0 and not pool.waiters

    loop.run_until_complete(scenario())
