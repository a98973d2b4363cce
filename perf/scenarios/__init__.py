"""The named benchmark scenarios, all in one place.

A scenario is what the load goes through (`via`: nothing, nginx, or fastgw) and what it sends (`payload`).
Gateway scenarios are judged against references measured in the same run: `direct` of the same payload (the
mock's ceiling: gateway RPS / direct RPS) and `nginx` of the same payload (the compiled-proxy yardstick:
fastgw CPU per request / nginx CPU per request). The driver adds those references automatically.
"""
import os
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "configs")
WRK_SCRIPT = os.path.join(HERE, "wrk.lua")


@dataclass(frozen=True)
class Payload:
    body: str          # request body file POSTed by wrk
    stream: bool       # sets `x-mock-stream: 1` so a body-blind mock (nginx) replies with SSE
    path: str = "/v1/chat/completions"
    headers: tuple = ()       # extra request headers ((name, value), ...): the built-in mock's x-mock-* knobs
    mock: str | None = None   # the mock this payload needs whatever the run's --mock ("fastgw": it can pace)
    # The reply lasts long enough that wrk's end cuts replies in flight: count requests as stream equivalents
    # (bytes received / bytes of one whole reply), or the CPU of the cut streams would inflate CPU per stream.
    # Exact to a few bytes per event: a proxy re-chunks what it reads together (within ~3%).
    long: bool = False


def _paced(gap_ms, *extra):
    """A chat stream as providers send it: one SSE event per write, `gap_ms` apart (the built-in mock's
    x-mock-paced), 100 content events like the `stream` payload's, then finish (+ usage) and [DONE]."""
    return Payload(os.path.join(HERE, "stream_request.json"), stream=True, mock="fastgw", long=True,
                   headers=(("x-mock-paced", "1"), ("x-mock-chunk-delay-ms", str(gap_ms)), ("x-mock-chunks", "100"),
                            *extra))


PAYLOADS = {
    # the seed's load: non-streaming chat, ~1,000 prompt tokens (969 o200k tokens, 4.9 KB of English prose)
    "chat": Payload(os.path.join(HERE, "chat_request.json"), stream=False),
    # the same request with "stream": true; the mocks answer 100 content chunks + usage chunk + [DONE]
    "stream": Payload(os.path.join(HERE, "stream_request.json"), stream=True),
    # the same without stream_options: with token accounting on, the gateway adds include_usage and strips
    # the usage chunk from the client's stream
    "stream-no-usage": Payload(os.path.join(HERE, "stream_request_no_usage.json"), stream=True),
    # paced streams (built-in mock): back to back, for the CPU per stream; with usage (include_usage) or not
    # (then the gateway counts completion tokens itself, event by event); 20 ms apart, for the latency added;
    # 50 ms apart on 2,000 connections, for many long streams open on one worker
    "paced-stream": _paced(0),
    "paced-stream-no-usage": _paced(0, ("x-mock-no-usage", "1")),
    "paced-stream-20ms": _paced(20),
    "paced-streams-2000": _paced(50),
    # the chat payload answered by the built-in mock, which also speaks Anthropic's format (translate-anthropic)
    "chat-builtin": Payload(os.path.join(HERE, "chat_request.json"), stream=False, mock="fastgw"),
}


@dataclass(frozen=True)
class Scenario:
    name: str
    via: str                     # "direct" | "nginx" | "fastgw"
    payload: str                 # key of PAYLOADS
    what: str                    # one line for the results table
    config: str | None = None    # fastgw TOML template under perf/configs/ (None: `serve --upstream`)
    api_key: str | None = None   # bearer key wrk sends
    unavailable: str | None = None  # why it cannot run yet
    base: str | None = None      # the fastgw scenario this one adds features to (its cost is judged against it)
    connections: int | None = None  # wrk connections, whatever the run's --connections (2,000 open streams)

    @property
    def is_gateway(self):
        return self.via != "direct"


def _policies_unavailable():
    path = os.path.join(CONFIGS, "policies.toml")
    return None if os.path.exists(path) else "waits for the policy format (perf/configs/policies.toml)"


def _paced_scenarios():
    """Each paced payload through nothing, nginx and fastgw (named `direct-P`, `nginx-P`, `P`)."""
    kinds = {
        "paced-stream": ("100 events, one per write, no gap, with a usage chunk", None, None),
        "paced-stream-no-usage": ("100 events, one per write, no gap, no usage", None, None),
        "paced-stream-20ms": ("100 events 20 ms apart (2 s a stream), with usage", None, None),
        # fastgw's default cap of 1,024 connections per upstream would queue half the streams
        "paced-streams-2000": ("2,000 open streams: 100 events 50 ms apart (5 s a stream)", 2000, "streams.toml"),
    }
    for payload, (what, connections, config) in kinds.items():
        yield Scenario(f"direct-{payload}", "direct", payload, f"wrk straight at the built-in mock: {what}",
                       connections=connections)
        yield Scenario(f"nginx-{payload}", "nginx", payload, f"nginx relaying {what}", connections=connections)
        yield Scenario(payload, "fastgw", payload, f"fastgw relaying {what}", connections=connections,
                       config=config)


SCENARIOS = {s.name: s for s in [
    Scenario("direct", "direct", "chat", "wrk straight at the mock: the ceiling"),
    Scenario("direct-stream", "direct", "stream", "wrk straight at the mock, SSE reply: the ceiling"),
    Scenario("nginx", "nginx", "chat", "nginx proxy_pass, keep-alive upstream: the yardstick"),
    Scenario("nginx-stream", "nginx", "stream", "nginx relaying the 100-chunk SSE reply"),
    Scenario("proxy", "fastgw", "chat",
             "fastgw, non-streaming chat (the seed's test), access log to a file + metrics on, no policies"),
    Scenario("stream", "fastgw", "stream", "fastgw relaying the 100-chunk SSE reply, access log + metrics on"),
    Scenario("policies", "fastgw", "chat",
             "fastgw with key auth + token rate limit + metrics + access log",
             config="policies.toml", api_key="sk-perf-0001", unavailable=_policies_unavailable(), base="proxy"),
    Scenario("stream-policies", "fastgw", "stream-no-usage",
             "fastgw relaying the 100-chunk SSE reply with key auth + token rate limit (include_usage forced "
             "and the usage chunk stripped) + metrics + access log",
             config="policies.toml", api_key="sk-perf-0001", unavailable=_policies_unavailable(), base="stream"),
    Scenario("proxy-builtin", "fastgw", "chat-builtin",
             "fastgw as in `proxy`, the built-in mock upstream (the base of translate-anthropic)"),
    Scenario("translate-anthropic", "fastgw", "chat-builtin",
             "fastgw as in `proxy-builtin` with an Anthropic deployment: chat translated to Messages and back",
             config="anthropic.toml", base="proxy-builtin"),
    Scenario("translate-anthropic-stream", "fastgw", "paced-stream",
             "fastgw as in `paced-stream` with an Anthropic deployment: its event stream translated to chat "
             "chunks, event by event", config="anthropic.toml", base="paced-stream"),
    Scenario("routing", "fastgw", "chat",
             "fastgw as in `proxy` with the model on 3 deployments, retries and a breaker configured, all healthy",
             config="routing.toml", base="proxy"),
    Scenario("failover", "fastgw", "chat",
             "fastgw as in `routing` with one of the 3 deployments refusing connections (breaker, retries)",
             config="failover.toml", base="proxy"),
    Scenario("cache-hit", "fastgw", "chat",
             "fastgw answering every request but the first from its response cache (memory store), as in proxy",
             config="cache.toml", base="proxy"),
    *_paced_scenarios(),
]}

DEFAULT = ["direct", "nginx", "proxy", "stream", "policies", "stream-policies"]
PACED = ["paced-stream", "paced-stream-no-usage", "paced-stream-20ms", "paced-streams-2000"]
TRANSLATE = ["translate-anthropic", "translate-anthropic-stream"]


def reference(scenario, via):
    """The scenario that `scenario` is compared with: same payload, through `via` ("direct" or "nginx")."""
    for s in SCENARIOS.values():
        if s.via == via and s.payload == scenario.payload:
            return s
    return None


def with_references(names):
    """The requested scenarios plus their direct/nginx references and bases, references first, order kept
    (a base runs right before the scenarios built on it, so each repeat compares neighbours in time)."""
    wanted = [SCENARIOS[n] for n in names]
    for s in list(wanted):
        if s.base and SCENARIOS[s.base] not in wanted:
            wanted.insert(wanted.index(s), SCENARIOS[s.base])
    refs = []
    for s in wanted:
        for via in ("direct", "nginx"):
            r = reference(s, via)
            if r is not None and r.via != s.via and r not in refs and r not in wanted:
                if via == "nginx" and s.via != "fastgw":
                    continue
                refs.append(r)
    order = {"direct": 0, "nginx": 1, "fastgw": 2}
    return sorted(refs + wanted, key=lambda s: order[s.via])
