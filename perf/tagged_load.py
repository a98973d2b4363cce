"""Tagged requests, and the judge that every answer carries its own tag and no other (issue 13 item 3).

Each request gets a tag unique in the run (`iso-<6 hex>-<n>`) in four places: the `x-request-id` header (the
gateway keeps a plain client id, returns it in the answer's head and forwards it upstream), an
`x-isolation-tag` header, the model name (a `"*"` route passes any name through and the mock names the model in
its answer) and the prompt. With `x-mock-echo-headers` the built-in mock answers with the request headers it
received as the content (a stream's content cut into its events). So a complete answer proves which upstream
request it came from, and any answer (complete, an error, or a stream broken off by a fault) holding another
request's tag was misdelivered.

Faults are x-mock-* headers on a fraction of the requests (FAULTS); each has the outcome the client must see.
`pipelined` sends batches of requests on one raw connection (keep-alive and pipelining) and reads the answers
in order; `abort_mid_stream` and `abort_before_head` are clients that leave. Used by
tests/integration/test_isolation.py and perf/soak.py.
"""
from __future__ import annotations

import asyncio
import os
import random
import re
from collections import Counter

import orjson

TAG_RE = re.compile(rb"iso-[0-9a-f]{6}-[0-9]+")
TAG_HEADER = "x-isolation-tag"
_WHOLE_TAG_RE = re.compile(rb'(?:x-request-id: |"model":")(iso-[0-9a-f]{6}-[0-9]+)[\r"]')

# Outcomes: what a client saw.
OK = "ok"              # a complete 200 carrying its tag
ERROR = "error"        # a complete answer with the fault's error status
BROKEN = "broken"      # the connection closed mid-answer (a fault broke the response off)
LOST = "lost"          # never answered: an earlier answer on the same connection was broken off
ABORTED = "aborted"    # the client left on purpose
# Problems: each fails the isolation test.
MISDELIVERED = "misdelivered"   # another request's tag in the answer
UNTAGGED = "untagged"           # an answer without its own tag where it must be
UNEXPECTED = "unexpected"       # an outcome the fault does not explain
CORRUPT = "corrupt"             # an answer that does not parse (bytes of another response, say)
UNANSWERED = "unanswered"       # the connection closed before the answer, with no fault to explain it
TIMEOUT = "timeout"             # no answer in time


class Fault:
    """x-mock-* headers and the outcome (and status) the client must see."""

    __slots__ = ("name", "headers", "streams_only", "expect", "status")

    def __init__(self, name: str, headers: tuple, expect: str = OK, status: int = 200, streams_only: bool = False):
        self.name, self.headers, self.expect, self.status, self.streams_only = (
            name, headers, expect, status, streams_only)


FAULTS = {f.name: f for f in (
    Fault("none", ()),
    Fault("delay", (("x-mock-delay-ms", "15"),)),                          # answers finish out of order
    Fault("paced", (("x-mock-chunk-delay-ms", "2"),), streams_only=True),  # events interleave across streams
    Fault("close", (("x-mock-close", "1"),)),                              # the upstream closes after answering
    Fault("status500", (("x-mock-status", "500"),), ERROR, 500),
    Fault("reset", (("x-mock-reset-after", "3"),), BROKEN, streams_only=True),  # aborted after 3 events
    # For clients that leave (the soak): a stream open for a second, an answer that starts after 300 ms.
    Fault("slow", (("x-mock-chunk-delay-ms", "200"),), streams_only=True),
    Fault("late", (("x-mock-delay-ms", "300"),)),
)}
# How often each fault is picked (the rest of a stream-only fault's share goes to "none" for non-streams).
FAULT_WEIGHTS = {"none": 55, "delay": 10, "paced": 8, "close": 9, "status500": 9, "reset": 9}


class Job:
    """One tagged request: its tag, whether it streams, its fault."""

    __slots__ = ("tag", "stream", "fault")

    def __init__(self, tag: str, stream: bool, fault: str):
        self.tag, self.stream, self.fault = tag, stream, fault

    def headers(self) -> dict:
        h = {"x-request-id": self.tag, TAG_HEADER: self.tag, "x-mock-echo-headers": "1", "x-mock-chunks": "6"}
        h.update(FAULTS[self.fault].headers)
        return h

    def body(self) -> bytes:
        return orjson.dumps({"model": self.tag, "stream": self.stream,
                             "messages": [{"role": "user", "content": f"Say hello to {self.tag}."}]})

    def raw(self, host: str = "gateway") -> bytes:
        """The request as HTTP/1.1 bytes, keep-alive."""
        body = self.body()
        fields = "".join(f"{k}: {v}\r\n" for k, v in self.headers().items())
        return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                f"{fields}content-length: {len(body)}\r\n\r\n").encode() + body


class Jobs:
    """Tagged jobs for one run: tags unique to it, streams and faults drawn from a seeded generator."""

    def __init__(self, seed: int | None = None, stream_share: float = 0.4, fault_share: float = 1.0,
                 fault_weights: dict = FAULT_WEIGHTS):
        self.rng = random.Random(seed)
        self.run = os.urandom(3).hex()
        self.n = 0
        self.stream_share = stream_share
        names = ["none"] + [n for n in fault_weights if n != "none"]
        weights = [fault_weights.get(n, 0) for n in names]
        if fault_share < 1.0:   # fewer faults: the rest of the weight goes to "none"
            total = sum(weights)
            weights = [w * fault_share for w in weights]
            weights[0] += total - sum(weights)
        self.names, self.weights = names, weights

    def next(self, stream: bool | None = None, fault: str | None = None) -> Job:
        self.n += 1
        if stream is None:
            stream = self.rng.random() < self.stream_share
        if fault is None:
            fault = self.rng.choices(self.names, self.weights)[0]
            if FAULTS[fault].streams_only and not stream:
                fault = "none"
        return Job(f"iso-{self.run}-{self.n}", stream, fault)


# -- answers ----------------------------------------------------------------------------------------------

class Answer:
    """What a client got: status (None if no head), header fields (lower-case names), the body (de-chunked),
    and whether it was complete."""

    __slots__ = ("status", "headers", "body", "complete")

    def __init__(self, status, headers: dict, body: bytes, complete: bool):
        self.status, self.headers, self.body, self.complete = status, headers, body, complete

    def is_stream(self) -> bool:
        return "text/event-stream" in self.headers.get("content-type", "")


class Corrupt(Exception):
    """Bytes that are not an HTTP/1.1 answer where one should start."""


def _parse_head(head: bytes):
    lines = head.split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
        raise Corrupt(f"not a status line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return int(status_line[1]), headers


async def read_answer(reader: asyncio.StreamReader) -> Answer | None:
    """One answer off a raw connection (Content-Length, chunked, or until close); None when the connection
    closed before any byte of it. A connection that closes mid-answer gives an incomplete Answer. Raises
    Corrupt when the bytes are not an answer."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        status, headers = _parse_head(e.partial) if b"\r\n" in e.partial else (None, {})
        return Answer(status, headers, b"", False)
    status, headers = _parse_head(head[:-4])
    if status < 200:                    # 100 Continue: the answer follows
        return await read_answer(reader)
    parts = []
    try:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = await reader.readuntil(b"\r\n")
                try:
                    size = int(line.split(b";")[0], 16)
                except ValueError:
                    raise Corrupt(f"bad chunk size line {line[:40]!r}") from None
                data = await reader.readexactly(size + 2)
                if data[-2:] != b"\r\n":
                    raise Corrupt("a chunk not followed by CRLF")
                if size == 0:
                    break
                parts.append(data[:-2])
        elif "content-length" in headers:
            parts.append(await reader.readexactly(int(headers["content-length"])))
        else:
            parts.append(await reader.read())
            return Answer(status, headers, b"".join(parts), True)
    except asyncio.IncompleteReadError as e:
        parts.append(e.partial)
        return Answer(status, headers, b"".join(parts), False)
    except (ConnectionError, OSError):
        return Answer(status, headers, b"".join(parts), False)
    return Answer(status, headers, b"".join(parts), True)


def events_of(body: bytes):
    """(complete events' data payloads, the incomplete tail) of an SSE body."""
    blocks = body.replace(b"\r\n", b"\n").split(b"\n\n")
    data = []
    for block in blocks[:-1]:
        payload = b"\n".join(line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:"))
        if payload:
            data.append(payload)
    return data, blocks[-1]


def _read_content(a: Answer):
    """(content, the model names the answer gives, what could not be parsed or None)."""
    if a.is_stream():
        payloads, _tail = events_of(a.body)   # an incomplete last event (a broken-off stream) is not read
        content, models = [], set()
        for p in payloads:
            if p == b"[DONE]":
                continue
            try:
                chunk = orjson.loads(p)
            except orjson.JSONDecodeError:
                return "".join(content), models, f"an event that is not JSON: {p[:80]!r}"
            if "model" in chunk:
                models.add(chunk["model"])
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    content.append(piece)
        return "".join(content), models, None
    if not a.body:
        return "", set(), None
    try:
        obj = orjson.loads(a.body)
    except orjson.JSONDecodeError:
        return "", set(), None if not a.complete else f"a body that is not JSON: {a.body[:80]!r}"
    if not isinstance(obj, dict):
        return "", set(), f"a body that is not a JSON object: {a.body[:80]!r}"
    models = {obj["model"]} if "model" in obj else set()
    try:
        content = obj["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        content = ""
    return content, models, None


def judge(job: Job, a: Answer | None, after_break: bool = False) -> tuple[str, str | None, str]:
    """(outcome, problem or None, detail) of the answer `a` to `job`. `after_break`: an earlier answer on the
    same connection was broken off, so no answer is the expected LOST."""
    tag = job.tag
    if a is None:
        if after_break:
            return LOST, None, ""
        return LOST, UNANSWERED, f"{tag}: the connection closed before its answer"
    content, models, bad = _read_content(a)
    # Every tag anywhere: the head, the body (a stream's body only through its parsed events: its content is
    # cut into pieces, which may cut a tag), the joined content, the model names.
    seen = b"\n".join(f"{k}: {v}".encode("latin-1") for k, v in a.headers.items())
    if not a.is_stream():
        seen += b"\n" + a.body
    seen += b"\n" + content.encode() + b"\n" + "\n".join(map(str, models)).encode()
    foreign = set(TAG_RE.findall(seen)) - {tag.encode()}
    outcome = OK if a.complete and a.status == 200 else ERROR if a.complete else BROKEN
    if foreign:
        return outcome, MISDELIVERED, f"{tag} ({job.fault}) got {sorted(t.decode() for t in foreign)[:3]}"
    if bad is not None:
        return outcome, CORRUPT, f"{tag} ({job.fault}): {bad}"
    fault = FAULTS[job.fault]
    if outcome != fault.expect or (outcome == ERROR and a.status != fault.status):
        return outcome, UNEXPECTED, f"{tag} ({job.fault}): {outcome} with status {a.status}"
    if a.status is not None and a.headers.get("x-request-id") != tag:
        return outcome, UNTAGGED, f"{tag}: head x-request-id {a.headers.get('x-request-id')!r}"
    if outcome == OK:
        try:
            echoed = orjson.loads(content)
        except orjson.JSONDecodeError:
            return outcome, UNTAGGED, f"{tag}: the content is not the echoed headers: {content[:80]!r}"
        if echoed.get("x-request-id") != tag or echoed.get(TAG_HEADER) != tag or models != {tag}:
            return outcome, UNTAGGED, f"{tag}: echoed {echoed.get(TAG_HEADER)!r}, models {sorted(models)}"
    return outcome, None, ""


# -- clients ---------------------------------------------------------------------------------------------

class Tally:
    """Outcomes and problems of a run; the first examples of each problem are kept."""

    def __init__(self):
        self.outcomes = Counter()    # (fault, outcome)
        self.problems = Counter()
        self.examples: dict[str, list] = {}
        self.streams = self.plain = 0
        self.pipelined = 0           # answers that were read behind another request on the same connection

    def add(self, job: Job, verdict: tuple, behind: bool = False) -> None:
        outcome, problem, detail = verdict
        self.outcomes[(job.fault, outcome)] += 1
        if outcome != LOST and outcome != ABORTED:
            if job.stream:
                self.streams += 1
            else:
                self.plain += 1
            self.pipelined += behind
        if problem is not None:
            self.problems[problem] += 1
            ex = self.examples.setdefault(problem, [])
            if len(ex) < 5:
                ex.append(detail)

    def answered(self) -> int:
        return sum(n for (_, outcome), n in self.outcomes.items() if outcome != LOST and outcome != ABORTED)

    def merge(self, other: "Tally") -> None:
        self.outcomes.update(other.outcomes)
        self.problems.update(other.problems)
        for k, v in other.examples.items():
            self.examples.setdefault(k, []).extend(v[: 5 - len(self.examples.get(k, []))])
        self.streams += other.streams
        self.plain += other.plain
        self.pipelined += other.pipelined

    def summary(self) -> dict:
        return {"answered": self.answered(), "streams": self.streams, "non_streams": self.plain,
                "pipelined": self.pipelined,
                "outcomes": {f"{f}/{o}": n for (f, o), n in sorted(self.outcomes.items())},
                "problems": dict(self.problems), "examples": self.examples}


async def pipelined(host: str, port: int, batches, tally: Tally, timeout: float = 30.0, pace=None) -> None:
    """One keep-alive connection: each batch of jobs (from the iterable `batches`, taken one at a time) is
    written at once (pipelined), then its answers are read in order. After an answer broken off the rest of its
    batch are LOST, and no further batch is taken. `pace(n)`, if given, is awaited before n requests go out."""
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    try:
        for batch in batches:
            if pace is not None:
                await pace(len(batch))
            writer.write(b"".join(job.raw() for job in batch))
            broken = False
            for i, job in enumerate(batch):
                if broken:
                    tally.add(job, judge(job, None, after_break=True))
                    continue
                try:
                    a = await asyncio.wait_for(read_answer(reader), timeout)
                except asyncio.TimeoutError:
                    tally.add(job, (LOST, TIMEOUT, f"{job.tag} ({job.fault}): no answer in {timeout:g} s"))
                    return
                except Corrupt as exc:
                    tally.add(job, (LOST, CORRUPT, f"{job.tag} ({job.fault}): {exc}"))
                    return
                tally.add(job, judge(job, a), behind=i > 0)
                broken = a is None or not a.complete or a.headers.get("connection", "").lower() == "close"
            if broken:
                return
    finally:
        writer.transport.abort()


async def abort_mid_stream(host: str, port: int, job: Job, tally: Tally, timeout: float = 30.0) -> None:
    """A client that leaves after its stream's first event (the job should be a paced stream)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(job.raw())
        got = b""
        while b"data:" not in got:
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                break
            got += data
        # Whole tags only (the content's pieces may cut one): the head's request id, each event's model.
        found = set(_WHOLE_TAG_RE.findall(got)) - {job.tag.encode()}
        tally.add(job, (ABORTED, MISDELIVERED if found else None, f"{job.tag} got {sorted(found)[:3]}"))
    finally:
        writer.transport.abort()


async def abort_before_head(host: str, port: int, job: Job, tally: Tally, wait: float = 0.02) -> None:
    """A client that leaves while the upstream is still thinking (the job should be delayed upstream)."""
    _, writer = await asyncio.open_connection(host, port)
    writer.write(job.raw())
    await asyncio.sleep(wait)
    writer.transport.abort()
    tally.add(job, (ABORTED, None, ""))
