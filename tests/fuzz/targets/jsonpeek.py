"""jsonpeek: fastgw.protocol.jsonpeek peek_request / peek_usage / splice on any body.

Oracle: orjson, with the checks of tests/core/test_jsonpeek.py (same validity verdict as orjson, same field
values, spans that hold the right JSON; peek_usage never crashes and agrees on valid bodies), on bytes and on
bytearray; the one documented difference is nesting deeper than NESTING_LIMIT. A valid request is also
rewritten as the OpenAI pass-through does (model spliced, stream_options.include_usage forced on a stream) and
must load as that edit of orjson's dict.
"""
import orjson

from fastgw.protocol.jsonpeek import NESTING_LIMIT, peek_request, splice
from tests.core.test_jsonpeek import check_request, check_usage, orjson_or_none

MODEL = b'"azure/gpt-4o"'
INCLUDE_USAGE = b'{"include_usage":true}'


def depth(value) -> int:
    """Containers nested in value (the value itself counts), without recursion."""
    most, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            most = max(most, d)
            todo.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return most


def one_input(data: bytes) -> None:
    d = orjson_or_none(data)
    if type(d) is dict and peek_request(data) is None:
        assert depth(d) > NESTING_LIMIT, data    # the documented difference, and the only one
        return
    check_request(data)
    check_request(bytearray(data))
    check_usage(data)
    check_usage(bytearray(data))
    if type(d) is dict:
        check_pass_through_edits(data, d)


def check_pass_through_edits(body: bytes, d: dict) -> None:
    """What fastgw/providers/openai.pyx request_body does to a body (a deployment model, include_usage)."""
    f = peek_request(body)
    edits = []
    if f.model_start >= 0:
        edits.append((f.model_start, f.model_end, MODEL))
        d["model"] = "azure/gpt-4o"
    if f.stream and not f.include_usage:
        if f.stream_options_start >= 0:
            edits.append((f.stream_options_start, f.stream_options_end, INCLUDE_USAGE))
        else:
            edits.append((f.object_end, f.object_end, b',"stream_options":' + INCLUDE_USAGE))
        d["stream_options"] = {"include_usage": True}
    out = splice(body, sorted(edits))
    assert orjson.loads(out) == d
    g = peek_request(out)
    assert g is not None and (g.stream, g.include_usage or not f.stream) == (f.stream, True)
