"""The semantic cache's embeddings client (fastgw/cache/embedder.py) against the built-in mock on a real socket:
vectors as the mock makes them, kept-alive connections reused (and a closed one replaced), and every failure a
None, never an exception."""
import asyncio
import io
import socket

import numpy as np
import pytest

from fastgw.cache.embedder import Embedder
from fastgw.devtools.mock import start_mock
from fastgw.devtools.mock.openai import EMBEDDING_DIM, _embedding, _words
from fastgw.observability.logs import Logger
from fastgw.routing.router import Deployment


class Errors:
    def __init__(self):
        self.seen = []

    def upstream_error(self, upstream, kind):
        self.seen.append((upstream, kind))


def embedder(url, loop, timeout=2.0, retry_interval=0.0, model=""):
    errors = Errors()
    e = Embedder("emb", [Deployment(url, model, "")], timeout, retry_interval, loop, Logger(io.StringIO()), errors)
    return e, errors


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_vectors_and_connection_reuse():
    async def go():
        loop = asyncio.get_running_loop()
        mock = await start_mock("127.0.0.1", 0)
        e, errors = embedder(f"http://127.0.0.1:{mock.port}/v1", loop, model="text-embedding-3-small")
        v = await e.embed("What is the capital of France?")
        want = np.array(_embedding(_words("What is the capital of France?"), EMBEDDING_DIM, "float"), np.float32)
        assert v.dtype == np.float32 and np.allclose(v, want, atol=1e-6)
        await e.embed("Tell me a joke")
        assert mock.mock_stats.connections_total == 1            # kept alive, reused
        for _, writer in e.idle[e.deployments[0]]:               # the upstream closes it while idle
            writer.close()
        await asyncio.sleep(0)
        assert await e.embed("again") is not None                 # a new connection, no failure
        assert errors.seen == []
        e.close()
        mock.close()
    run(go())


def test_failures_are_none_and_pause_lookups():
    async def go():
        loop = asyncio.get_running_loop()
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            e, errors = embedder(f"http://127.0.0.1:{closed.getsockname()[1]}/v1", loop, retry_interval=60)
            assert await e.embed("x") is None
            assert errors.seen == [("cache-embeddings", "connect")]
            assert await e.embed("x") is None and len(errors.seen) == 1     # paused: not even tried
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            e, errors = embedder(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", loop, timeout=0.05)
            assert await e.embed("x") is None and errors.seen == [("cache-embeddings", "timeout")]
        mock = await start_mock("127.0.0.1", 0)
        url = f"http://127.0.0.1:{mock.port}/v1"
        e2, errors2 = embedder(url.replace("/v1", "/nowhere"), loop)
        assert await e2.embed("x") is None and errors2.seen[0][1].startswith("http_")
        mock.close()
    run(go())


@pytest.mark.parametrize("answer", [b"not json", b'{"data": []}', b'{"data": [{"embedding": "!!"}]}',
                                    b'{"data": [{"embedding": [1, "a"]}]}', b'{"data": [{"embedding": []}]}',
                                    b'{"data": [{"embedding": [NaN]}]}'])
def test_malformed_answers_are_none(answer):
    async def go():
        async def serve(reader, writer):
            await reader.read(65536)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        e, errors = embedder(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", asyncio.get_running_loop())
        assert await e.embed("x") is None and errors.seen == [("cache-embeddings", "protocol")]
        server.close()
    run(go())
