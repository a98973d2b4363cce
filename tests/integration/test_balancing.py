"""Balancing and per-deployment settings end to end: `fastgw serve` in front of several built-in mocks on loopback
(MockThread), each counting the requests it served. One mock is made slow with its defaults (delay_ms: the answer's
head; first_token_delay_ms: a stream's first event)."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson
import pytest

from tests.integration.conftest import MockThread

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Say hello"}]}


@pytest.fixture
def mocks():
    made = []

    def make(**defaults) -> MockThread:
        m = MockThread(**defaults)
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop()


def config(*deployments: tuple[MockThread, str], model: str = "", name: str = "m") -> str:
    """A [[models]] entry named `name` with a deployment per (mock, extra TOML lines)."""
    return f'[[models]]\nname = "{name}"\n{model}\n' + "".join(
        f'[[models.deployments]]\nurl = "{m.url}"\n{extra}\n' for m, extra in deployments)


def send(gw, n: int, threads: int = 1, body: dict = CHAT, headers: dict | None = None) -> list[httpx.Response]:
    """n chat requests over `threads` keep-alive connections at once; the responses, body read."""
    def run(count):
        with httpx.Client(base_url=gw.base, timeout=30) as c:
            return [c.post("/v1/chat/completions", json=body, headers=headers or {}) for _ in range(count)]

    per = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        return [r for rs in pool.map(run, per) for r in rs]


def served(*ms: MockThread) -> list[int]:
    return [m.stats.requests for m in ms]


def test_round_robin_shares_follow_the_weights_across_workers(mocks, start_gateway):
    a, b, c = mocks(), mocks(), mocks()
    gw = start_gateway(config((a, "weight = 3"), (b, "weight = 2"), (c, "weight = 1")), workers=2)
    rs = send(gw, 1200, threads=6)
    assert all(r.status_code == 200 for r in rs)
    shares = [n / 1200 for n in served(a, b, c)]
    # Each worker is exact over whole cycles of 6; the two workers' leftovers can shift a few requests only.
    assert shares == pytest.approx([3 / 6, 2 / 6, 1 / 6], abs=0.01)


def test_least_in_flight_moves_traffic_away_from_a_slow_deployment(mocks, start_gateway):
    fast, slow = mocks(), mocks(delay_ms=300)
    gw = start_gateway(config((fast, ""), (slow, ""), model='balancing = "least-in-flight"'))
    rs = send(gw, 300, threads=8)
    assert all(r.status_code == 200 for r in rs)
    assert served(fast, slow)[1] / 300 < 0.2            # round robin would give it half (measured: ~7 %)


def test_lowest_latency_moves_streams_away_from_a_slow_first_token(mocks, start_gateway):
    fast, slow = mocks(), mocks(first_token_delay_ms=150)
    gw = start_gateway(config((fast, ""), (slow, ""), model='balancing = "lowest-latency"'))
    n = 120
    with httpx.Client(base_url=gw.base, timeout=30) as c:
        for _ in range(n):
            r = c.post("/v1/chat/completions", json={**CHAT, "stream": True})
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    # It is measured first (never measured = tried), then only by the exploration picks (1 in 20).
    assert served(fast, slow)[1] <= 2 + n // 20


def test_sticky_by_user_keeps_each_user_on_one_deployment(mocks, start_gateway):
    ms = [mocks(), mocks(), mocks()]
    gw = start_gateway(config(*[(m, "") for m in ms], model='balancing = "sticky"\nsticky_key = "user"'),
                       workers=2)
    homes = {}
    for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
        before = served(*ms)
        send(gw, 12, threads=3, body={**CHAT, "user": user})    # several connections: both workers
        grew = [i for i, (x, y) in enumerate(zip(before, served(*ms))) if y > x]
        assert len(grew) == 1, f"{user} was served by {grew}"
        homes[user] = grew[0]
    assert len(set(homes.values())) > 1                  # users spread over the deployments


def test_a_deployments_headers_reach_the_upstream_instead_of_the_clients(mocks, start_gateway):
    m = mocks()
    gw = start_gateway(config((m, 'headers = { x-team = "search", OpenAI-Organization = "org-1" }')))
    [r] = send(gw, 1, headers={"x-mock-echo-headers": "1", "x-team": "client-value"})
    seen = orjson.loads(r.json()["choices"][0]["message"]["content"])
    seen = {k.lower(): v for k, v in seen.items()}
    assert seen["x-team"] == "search" and seen["openai-organization"] == "org-1"


def test_a_deployments_first_byte_timeout_cuts_it_while_another_waits(mocks, start_gateway):
    slow = mocks(delay_ms=3500)
    gw = start_gateway(config((slow, "timeouts = { first_byte = 1 }"), name="cut") + "\n" +
                       config((slow, ""), name="patient"))

    def timed(model):
        t = time.monotonic()
        [r] = send(gw, 1, body={**CHAT, "model": model})
        return r, time.monotonic() - t

    with ThreadPoolExecutor(2) as pool:
        (cut, t_cut), (patient, t_patient) = pool.map(timed, ["cut", "patient"])
    assert cut.status_code == 504 and cut.json()["error"]["code"] == "upstream_timeout"
    assert t_cut < 2.8                                   # 1 s, checked by the once-a-second sweeper
    assert patient.status_code == 200 and t_patient >= 3.4


def test_max_concurrent_fails_over_to_the_next_tier(mocks, start_gateway):
    limited, backup = mocks(delay_ms=800), mocks()
    gw = start_gateway(config((limited, "max_concurrent = 2"), (backup, "priority = 2")))
    rs = send(gw, 6, threads=6)
    assert all(r.status_code == 200 for r in rs)
    assert served(limited, backup) == [2, 4]
    send(gw, 3)                                          # one at a time: tier 1 has room again
    assert served(limited, backup) == [5, 4]


def test_max_concurrent_without_a_queue_answers_503_and_with_one_serialises(mocks, start_gateway):
    m = mocks(delay_ms=500)
    gw = start_gateway(config((m, "max_concurrent = 1"), name="no-queue") + "\n" +
                       config((m, "max_concurrent = 1"), name="queued", model="max_queue = 2\nqueue_timeout = 5"))
    rs = send(gw, 2, threads=2, body={**CHAT, "model": "no-queue"})
    assert sorted(r.status_code for r in rs) == [200, 503]
    busy = next(r for r in rs if r.status_code == 503)
    assert busy.json()["error"]["code"] == "deployments_busy" and busy.headers["retry-after"] == "1"

    t = time.monotonic()
    rs = send(gw, 3, threads=3, body={**CHAT, "model": "queued"})
    assert [r.status_code for r in rs] == [200, 200, 200]
    assert time.monotonic() - t >= 1.4                   # one at a time: 3 x 0.5 s
