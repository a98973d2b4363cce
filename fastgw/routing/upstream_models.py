"""Fetch the model list of one deployment's upstream: GET every page of it, in its provider's format, with the
deployment's host and key headers. Runs on the worker's loop, never on a request's path: the model catalog
(catalog.py) calls it in the background.

One connection per page, closed after it (a list is fetched once a minute at most, so a pooled connection would
save nothing), with the deployment's TLS settings, connect timeout and header lines (host, key, its own
headers); the response is read by the gateway's own HTTP parser.
"""
from __future__ import annotations

import asyncio

from fastgw.errors import GatewayError
from fastgw.protocol import http as H

PAGE_SIZE = 1000                 # the most Anthropic and Gemini give per page
MAX_PAGES = 20                   # 20,000 models: beyond that an upstream is looping, not listing
MAX_BODY = 8 * 1024 * 1024


async def fetch_models(d, page_size: int = PAGE_SIZE) -> list[dict]:
    """The models deployment `d`'s upstream lists, as OpenAI model objects, every page in order. Raises OSError
    (cannot connect), ssl.SSLError, or GatewayError (502: an error status, a malformed or oversized answer)."""
    provider = d.provider
    cursor = ""
    models = []
    for _ in range(MAX_PAGES):
        body = await http_get(d, provider.models_target(d.base_path, cursor, page_size))
        page, cursor = provider.models_page(body)
        models += page
        if not cursor:
            break
    return models


async def http_get(d, target: str) -> bytes:
    """The body of a 200 answer to GET `target` on deployment `d`'s upstream."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(d.host, d.port, ssl=d.ssl, server_hostname=d.server_hostname), d.connect_timeout)
    done = False
    try:
        writer.write(b"GET " + target.encode() + b" HTTP/1.1\r\n" + d.header_lines
                     + b"accept: application/json\r\nconnection: close\r\n\r\n")
        p = H.ResponseParser()
        p.start(False)
        parts = []
        size = 0
        while True:
            ev = p.next_event()
            if ev == H.NEED_DATA:
                data = await reader.read(65536)
                if data:
                    p.feed(data)
                else:
                    p.feed_eof()
            elif ev == H.BODY:
                part = p.take_body()
                size += len(part)
                if size > MAX_BODY:
                    raise _failed(f"a model list larger than {MAX_BODY} bytes", "upstream_malformed")
                parts.append(part)
            elif ev == H.END:
                break
            elif ev == H.ERROR:
                raise _failed(p.error_message, "upstream_malformed")
        if p.status != 200:
            raise _failed(f"status {p.status} to GET {target.partition('?')[0]}", "upstream_error")
        done = True
        return b"".join(parts)
    finally:
        if done:
            writer.close()
        else:                    # timed out, cancelled or failed: drop the connection, do not wait on it
            writer.transport.abort()


def _failed(what: str, code: str) -> GatewayError:
    return GatewayError(502, f"Model list: {what}.", type="upstream_error", code=code)
