"""The isolation judge (perf/tagged_load.py) can fail: answers rendered by the mock's own renderers, read off raw
bytes by read_answer, judged for their own job and for another's."""
import asyncio

import orjson
import pytest

from fastgw.devtools.mock.openai import USAGE, render_chat
from fastgw.devtools.mock.wire import frame
from perf.tagged_load import (BROKEN, CORRUPT, ERROR, LOST, MISDELIVERED, OK, TAG_HEADER, UNANSWERED, UNEXPECTED,
                              UNTAGGED, Corrupt, Job, Jobs, judge, read_answer)


def echoed(tag: str, **extra) -> str:
    return orjson.dumps({"x-request-id": tag, TAG_HEADER: tag, "x-mock-echo-headers": "1", **extra}).decode()


def answer_bytes(tag: str, stream: bool, content: str | None = None, rid: str | None = None, pieces: int = 6,
                 model: str | None = None) -> bytes:
    """What the gateway sends for the mock's echo answer: chunked SSE, or JSON with a Content-Length."""
    canned = render_chat(model or tag, stream, pieces, USAGE, echoed(tag) if content is None else content)
    head = b"HTTP/1.1 200 OK\r\nx-request-id: %s\r\n" % (rid or tag).encode()
    if stream:
        return (head + b"content-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                + b"".join(canned.events_for(10, pieces)) + b"0\r\n\r\n")
    body = canned.body_for(10, 1)
    return head + b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body


def read(data: bytes, eof: bool = True):
    async def go():
        r = asyncio.StreamReader()
        r.feed_data(data)
        if eof:
            r.feed_eof()
        return await read_answer(r)

    return asyncio.run(go())


TAG, OTHER = "iso-abcdef-123", "iso-abcdef-12"     # OTHER is a prefix of TAG: a cut tag must not pass for it


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_answer_is_ok_for_its_own_job_and_misdelivered_for_another(stream):
    a = read(answer_bytes(TAG, stream))
    assert a.complete and a.status == 200
    assert judge(Job(TAG, stream, "none"), a) == (OK, None, "")
    outcome, problem, detail = judge(Job("iso-abcdef-7", stream, "none"), a)
    assert problem == MISDELIVERED and TAG in detail


def test_a_foreign_tag_cut_across_stream_events_is_found():
    # The echoed headers name OTHER; the head and the model name TAG: only the joined content shows OTHER.
    content = echoed(OTHER)
    raw = answer_bytes(TAG, True, content=content, pieces=len(content))   # one character per event
    assert OTHER.encode() not in raw.split(b"\r\n\r\n", 1)[1].replace(b"iso-abcdef-123", b"")
    outcome, problem, detail = judge(Job(TAG, True, "none"), read(raw))
    assert problem == MISDELIVERED and OTHER in detail


def test_an_answer_without_its_tag_in_the_content_or_the_model_is_untagged():
    assert judge(Job(TAG, False, "none"), read(answer_bytes(TAG, False, content="hello")))[1] == UNTAGGED
    a = read(answer_bytes(TAG, True, model="gpt-4o-mini"))
    assert judge(Job(TAG, True, "none"), a)[1] == UNTAGGED


def test_outcomes_the_fault_does_not_explain_are_problems():
    err = (b"HTTP/1.1 500 Internal Server Error\r\nx-request-id: %s\r\ncontent-type: application/json\r\n"
           b"content-length: 2\r\n\r\n{}" % TAG.encode())
    assert judge(Job(TAG, False, "status500"), read(err)) == (ERROR, None, "")
    assert judge(Job(TAG, False, "none"), read(err))[:2] == (ERROR, UNEXPECTED)
    cut = answer_bytes(TAG, True)[:-60]              # broken off mid-stream
    a = read(cut)
    assert not a.complete
    assert judge(Job(TAG, True, "reset"), a) == (BROKEN, None, "")
    assert judge(Job(TAG, True, "none"), a)[:2] == (BROKEN, UNEXPECTED)
    assert judge(Job(TAG, True, "reset"), read(answer_bytes(TAG, True)))[:2] == (OK, UNEXPECTED)


def test_no_answer_is_lost_only_behind_a_break_off():
    assert read(b"") is None
    assert judge(Job(TAG, False, "none"), None, after_break=True) == (LOST, None, "")
    assert judge(Job(TAG, False, "none"), None)[1] == UNANSWERED


def test_bytes_that_are_not_an_answer_are_corrupt():
    with pytest.raises(Corrupt):
        read(b'{"model": "iso-abcdef-1"}\r\n\r\n')
    bad_event = (b"HTTP/1.1 200 OK\r\nx-request-id: %s\r\ncontent-type: text/event-stream\r\n"
                 b"transfer-encoding: chunked\r\n\r\n" % TAG.encode() + frame(b"data: {not json\n\n") + b"0\r\n\r\n")
    assert judge(Job(TAG, True, "none"), read(bad_event))[1] == CORRUPT


def test_jobs_are_tagged_uniquely_and_faults_fit_the_request():
    jobs = Jobs(seed=1)
    made = [jobs.next() for _ in range(2000)]
    assert len({j.tag for j in made}) == 2000
    assert not any(j.fault in ("paced", "reset") and not j.stream for j in made)
    assert {j.fault for j in made} == {"none", "delay", "paced", "close", "status500", "reset"}
    raw = made[0].raw()
    assert raw.count(made[0].tag.encode()) == 4      # x-request-id, x-isolation-tag, the model, the prompt
    assert {j.fault for j in (Jobs(seed=2, fault_share=0).next() for _ in range(500))} == {"none"}
