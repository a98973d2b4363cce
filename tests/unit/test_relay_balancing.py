"""The relay's side of balancing, driven through stand-in transports (no sockets): the per-attempt bookkeeping
the strategies read (in flight, time to first byte), a deployment's own headers and timeouts, and max_concurrent
with its queue."""
import asyncio
import os
import tempfile

import pytest
import uvloop

from fastgw.observability.accesslog import AccessLog
from fastgw.observability.logs import Logger
from fastgw.observability.metrics import Stats
from fastgw.proxy.client import ClientConnection, monotonic
from fastgw.proxy.gateway import Gateway
from fastgw.proxy.upstream import Pool, UpstreamConnection
from fastgw.runtime import config
from tests.unit.test_client_relay import Transport, chat, json_response, sse_response


class Rig:
    """A gateway whose one model ("*") has the deployments given as TOML, and stand-in transports."""

    def __init__(self, deployments: list[str], model: str = "", upstream: str = ""):
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.dir = tempfile.mkdtemp()
        text = f"[upstream]\n{upstream}\n[[models]]\nname = \"*\"\n{model}\n" + "".join(
            f"[[models.deployments]]\nurl = \"http://10.0.0.{i + 1}:8000/v1\"\n{extra}\n"
            for i, extra in enumerate(deployments))
        cfg = config.parse(text)
        self.access = AccessLog(os.path.join(self.dir, "access.log"))
        self.gw = Gateway(self.loop, cfg, log=Logger(open(os.devnull, "w")), stats=Stats(self.dir, "0"),
                          access_log=self.access, run_dir=self.dir, worker_id="0", mock_url=None)
        self.route = self.gw.router.wildcard
        self.deployments = self.route.deployments

    def upstream(self, index=0):
        """A new idle upstream connection in deployment `index`'s pool."""
        d = self.deployments[index]
        pool = d.pool = d.pool or self.gw.pools.get(d)
        up = UpstreamConnection(pool)
        up.connection_made(Transport())
        pool.release(up)
        return up

    def client(self):
        c = ClientConnection(self.gw)
        c.connection_made(Transport())
        return c

    def spin(self, n=5):
        for _ in range(n):
            self.loop.run_until_complete(asyncio.sleep(0))

    def close(self):
        self.access.close()
        self.loop.close()


@pytest.fixture
def rig():
    made = []

    def make(*a, **kw):
        r = Rig(*a, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


# -- bookkeeping --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status,measured", [(200, True), (400, True), (429, False), (500, False), (503, False)])
def test_an_answer_is_in_flight_until_it_ends_and_only_answers_count_as_latency(rig, status, measured):
    r = rig([""])
    d = r.deployments[0]
    up = r.upstream()
    c = r.client()
    c.data_received(chat())
    assert d.in_flight == 1 and d.samples == 0
    up.data_received(json_response(status=status))
    assert c.transport.take().startswith(b"HTTP/1.1 %d" % status)
    assert d.in_flight == 0
    assert d.samples == (1 if measured else 0)         # a fast failure must not look like a fast deployment


def test_a_streams_latency_is_its_first_event_not_its_head(rig):
    r = rig([""])
    d = r.deployments[0]
    up = r.upstream()
    c = r.client()
    c.data_received(chat(stream=True))
    head, rest = sse_response(2).split(b"\r\n\r\n", 1)
    up.data_received(head + b"\r\n\r\n")
    assert d.samples == 0 and d.in_flight == 1
    up.data_received(rest)
    assert d.samples == 1 and d.in_flight == 0


@pytest.mark.parametrize("how", ["client leaves", "upstream resets", "upstream times out"])
def test_an_attempt_that_ends_badly_leaves_nothing_in_flight(rig, how):
    r = rig([""])
    d = r.deployments[0]
    up = r.upstream()
    c = r.client()
    c.data_received(chat(stream=True))
    assert d.in_flight == 1
    if how == "client leaves":
        c.connection_lost(None)
    elif how == "upstream resets":
        up.data_received(sse_response(3)[:120])
        up.connection_lost(None)
    else:
        c.check_deadline(monotonic() + 200)
    assert d.in_flight == 0


def test_a_refused_connection_ends_its_attempt_before_the_next_deployment_starts(rig):
    class Refusing(Pool):
        async def open_one(self, timeout=0.0):
            raise ConnectionRefusedError()

    r = rig(["", ""])
    first, second = r.deployments
    first.pool = Refusing(r.loop, first, 4, 1.0)
    up = r.upstream(1)
    c = r.client()
    c.data_received(chat())
    r.spin()
    assert (first.in_flight, second.in_flight) == (0, 1)
    up.data_received(json_response())
    assert (first.in_flight, second.in_flight) == (0, 0)


# -- headers and timeouts of a deployment -----------------------------------------------------------------------

def test_a_deployments_headers_go_upstream_and_replace_the_clients(rig):
    r = rig(['headers = { x-team = "search", OpenAI-Organization = "org-1" }'])
    up = r.upstream()
    c = r.client()
    req = chat().replace(b"host: gw\r\n", b"host: gw\r\nX-Team: mine\r\nuser-agent: t\r\n")
    c.data_received(req)
    sent = up.transport.take().lower()
    assert sent.count(b"x-team:") == 1 and b"x-team: search\r\n" in sent and b"mine" not in sent
    assert b"openai-organization: org-1\r\n" in sent and b"user-agent: t\r\n" in sent


def test_a_deployments_first_byte_timeout_replaces_the_upstream_sections(rig):
    r = rig(["timeouts = { first_byte = 2 }", ""], upstream="first_byte_timeout = 60")
    own, plain = r.deployments
    clients = []
    for i in range(2):                                  # round robin: own, then plain
        r.upstream(i)
        c = r.client()
        c.data_received(chat())
        clients.append(c)
    t = monotonic()
    for c in clients:
        c.check_deadline(t + 3)
    out_own, out_plain = (c.transport.take() for c in clients)
    assert out_own.startswith(b"HTTP/1.1 504") and b"upstream_timeout" in out_own
    assert out_plain == b""                             # still within [upstream]'s 60 s
    clients[1].check_deadline(t + 61)
    assert clients[1].transport.take().startswith(b"HTTP/1.1 504")


def test_the_next_request_on_a_connection_does_not_inherit_the_previous_deployments_timeouts(rig):
    r = rig(["timeouts = { first_byte = 2 }", ""], upstream="first_byte_timeout = 60")
    up_own, up_plain = r.upstream(0), r.upstream(1)
    c = r.client()
    c.data_received(chat(rid="a"))                      # on the deployment with its own timeout
    up_own.data_received(json_response())
    c.transport.take()
    c.data_received(chat(rid="b"))                      # round robin: the plain one
    assert b"x-request-id: b" in up_plain.transport.take()
    c.check_deadline(monotonic() + 3)
    assert c.transport.take() == b""


def test_a_deployments_stream_gap_and_total_timeouts_cut_its_stream(rig):
    r = rig(["timeouts = { stream_gap = 1, total = 30 }"], upstream="stream_gap_timeout = 60")
    up = r.upstream()
    c = r.client()
    c.data_received(chat(stream=True))
    up.data_received(sse_response(3)[:150])             # the head and a first event, then nothing
    assert c.transport.take().startswith(b"HTTP/1.1 200")
    assert not c.transport.closed
    c.check_deadline(monotonic() + 1.5)
    assert c.transport.closed                           # a broken stream, not a clean end
    assert up.transport.aborted


def test_a_deployments_connect_timeout_reaches_its_pool(rig):
    seen = []

    class Recording(Pool):
        async def open_one(self, timeout=0.0):
            seen.append(timeout)
            raise ConnectionRefusedError()

    r = rig(["timeouts = { connect = 0.7 }", ""])
    for d in r.deployments:
        d.pool = Recording(r.loop, d, 4, 5.0)
    c = r.client()
    c.data_received(chat())
    r.spin()
    assert seen == [0.7, 0.0]                           # its own, then the other's pool default (5 s)


# -- max_concurrent, failover and the queue ---------------------------------------------------------------------

def test_a_full_deployment_fails_over_to_the_next_tier(rig):
    r = rig(["max_concurrent = 1", "priority = 2"])
    first, second = r.deployments
    up1, up2 = r.upstream(0), r.upstream(1)
    c1, c2 = r.client(), r.client()
    c1.data_received(chat(rid="one"))
    c2.data_received(chat(rid="two"))
    assert b"x-request-id: one" in up1.transport.take() and b"x-request-id: two" in up2.transport.take()
    assert (first.in_flight, second.in_flight) == (1, 1)


def test_without_a_queue_a_request_finding_every_deployment_full_gets_503_at_once(rig):
    r = rig(["max_concurrent = 1"])
    r.upstream()
    c1, c2 = r.client(), r.client()
    c1.data_received(chat(rid="one"))
    c2.data_received(chat(rid="two"))
    out = c2.transport.take()
    assert out.startswith(b"HTTP/1.1 503") and b'"code":"deployments_busy"' in out and b"retry-after: 1" in out


def test_queued_requests_go_when_a_slot_frees_and_a_full_queue_answers_503(rig):
    r = rig(["max_concurrent = 1"], model="max_queue = 1\nqueue_timeout = 5")
    d = r.deployments[0]
    up = r.upstream()
    c1, c2, c3 = r.client(), r.client(), r.client()
    c1.data_received(chat(rid="one"))
    c2.data_received(chat(rid="two"))
    assert c2.transport.take() == b"" and r.route.queued == 1
    c3.data_received(chat(rid="three"))
    assert c3.transport.take().startswith(b"HTTP/1.1 503")           # max_queue = 1 waits already
    assert b"x-request-id: one" in up.transport.take()
    up.data_received(json_response(b"for-one"))                       # its slot goes to "two" at once
    assert b"for-one" in c1.transport.take()
    assert b"x-request-id: two" in up.transport.take() and r.route.queued == 0 and d.in_flight == 1
    up.data_received(json_response(b"for-two"))
    assert b"for-two" in c2.transport.take() and d.in_flight == 0


def test_a_queued_request_gets_503_after_queue_timeout_and_a_client_that_leaves_frees_its_place(rig):
    r = rig(["max_concurrent = 1"], model="max_queue = 2\nqueue_timeout = 3")
    r.upstream()
    c1, c2, c3 = r.client(), r.client(), r.client()
    c1.data_received(chat(rid="one"))
    c2.data_received(chat(rid="two"))
    c3.data_received(chat(rid="three"))
    assert r.route.queued == 2
    c3.connection_lost(None)
    assert r.route.queued == 1
    c2.check_deadline(monotonic() + 2)
    assert c2.transport.take() == b""                                 # within queue_timeout
    c2.check_deadline(monotonic() + 3.5)
    out = c2.transport.take()
    assert out.startswith(b"HTTP/1.1 503") and b"deployments_busy" in out and b"waited 3 s" in out
    assert r.route.queued == 0
