"""Type stub of the compiled SSE relay (fastgw/protocol/sse.pyx)."""

class SSERelay:
    strip_usage_chunk: bool
    collect_text: bool
    events: int
    done: bool
    usage_seen: bool
    usage_promised: bool
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    def __init__(self, strip_usage_chunk: bool = False, collect_text: bool = False) -> None: ...
    def feed(self, chunk: bytes) -> bytes: ...
    def finish(self) -> bytes: ...
    def text(self) -> str: ...
