"""GET /v1/models on a client connection (stand-in transport) while the catalog's first refresh is running: the
listing waits at most the first wait, requests pipelined behind it are answered after it in order, and a client
that leaves meanwhile gets nothing written."""
import asyncio
import os
import tempfile

import orjson
import pytest
import uvloop

from fastgw.devtools.mock import start_mock
from fastgw.observability.accesslog import AccessLog
from fastgw.observability.logs import Logger
from fastgw.observability.metrics import Stats
from fastgw.proxy.client import ClientConnection
from fastgw.proxy.gateway import Gateway
from fastgw.routing import catalog as catalog_module
from fastgw.runtime import config
from tests.unit.test_client_relay import Transport


@pytest.fixture
def gw(monkeypatch):
    monkeypatch.setattr(catalog_module, "FIRST_WAIT", 0.3)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    slow = loop.run_until_complete(start_mock("127.0.0.1", 0, delay_ms=700))
    d = tempfile.mkdtemp()
    cfg = config.parse(f'[[models]]\nname = "mine"\n[[models.deployments]]\nurl = "http://127.0.0.1:1/v1"\n'
                       f'[[models]]\nname = "*"\n[[models.deployments]]\nurl = "http://127.0.0.1:{slow.port}/v1"\n')
    access = AccessLog(os.path.join(d, "access.log"))
    gw = Gateway(loop, cfg, log=Logger(open(os.devnull, "w")), stats=Stats(d, "0"), access_log=access, run_dir=d,
                 worker_id="0", mock_url=None)
    yield gw
    gw.close()
    while slow.mock_stats.active_requests:            # the mock answers what it was sent, though nobody reads it
        loop.run_until_complete(asyncio.sleep(0.05))
    slow.close()
    access.close()
    loop.close()


def get(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nhost: gw\r\n\r\n"


def connect(gw) -> ClientConnection:
    c = ClientConnection(gw)
    c.connection_made(Transport())
    return c


def test_a_pipelined_request_waits_behind_the_listing_and_both_answer_in_order(gw):
    c = connect(gw)
    c.data_received(get(b"/v1/models") + get(b"/healthz"))
    assert c.transport.take() == b""                   # the first refresh is running: the listing waits
    gw.loop.run_until_complete(asyncio.sleep(0.4))
    out = c.transport.take()
    models, health = out.split(b"HTTP/1.1 ")[1:]
    assert models.startswith(b"200") and health.startswith(b"200") and b'{"status":"ok"}' in health
    listing = orjson.loads(models.split(b"\r\n\r\n", 1)[1])
    assert [m["id"] for m in listing["data"]] == ["mine"]   # the slow upstream's list is not in yet
    c.data_received(get(b"/v1/models"))                # later listings answer at once
    assert c.transport.take().startswith(b"HTTP/1.1 200")


def test_a_client_that_leaves_while_the_listing_waits_gets_nothing(gw):
    c = connect(gw)
    c.data_received(get(b"/v1/models"))
    ex = c.ex
    c.connection_lost(None)
    gw.loop.run_until_complete(asyncio.sleep(0.4))     # the catalog wakes its waiters: nobody to answer
    assert c.transport.take() == b"" and c.ex is None and ex.status == 499
