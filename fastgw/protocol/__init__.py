"""Sans-IO protocol parsing: HTTP/1.1 heads and bodies, SSE framing, JSON field reads, the PROXY header.

Nothing here touches a socket, the event loop or a policy; each compiled module has a plain reference its
tests compare it with (h11, orjson, a small Python twin)."""
