"""The seed corpus, made from the existing tests: `python -m tests.fuzz seeds`.

The tests each target's harness is built on are run once with this module as a pytest plugin. It wraps the
functions those tests call (the test helpers that parse, the twins, the translations) and writes every input
they are given, in the harness's input format, to build/fuzz/seeds-raw/<target>/. libFuzzer's merge then keeps
the inputs that add coverage in the instrumented build: those become tests/fuzz/corpus/<target>/. Files named
regress-* (the findings, kept as regression cases) are never removed.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson

OUT_ENV = "FASTGW_FUZZ_SEEDS_OUT"
# The test files whose cases seed the targets (their hypothesis examples included).
TEST_FILES = ["tests/core/test_http_request.py", "tests/core/test_http_response.py", "tests/core/test_sse.py",
              "tests/core/test_jsonpeek.py", "tests/unit/test_translated_stream.py",
              "tests/unit/test_wire_anthropic_chat.py", "tests/unit/test_wire_gemini_chat.py",
              "tests/unit/test_wire_messages_front.py"]
PER_TARGET = 3000       # raw inputs kept per target before the merge (the first ones, deduplicated)


def _status(status) -> bytes:
    from tests.fuzz.targets.wire_response import STATUSES

    return bytes([STATUSES.index(status)]) if status in STATUSES else b"\x00"


def _json(obj) -> bytes:
    return orjson.dumps(obj)


def _joined(chunks, *args, **kwargs) -> bytes:
    return b"".join(chunks)


def _first(value, *args, **kwargs) -> bytes:
    return bytes(value)


# target -> [(module, function, input of the harness from the call's arguments)]
RECORDED = {
    "http_request": [("tests.core.test_http_request", "ours_requests", _joined)],
    "http_response": [("tests.core.test_http_response", "ours_response", _joined)],
    "sse_relay": [("tests.core.test_sse", "twin", _first)],
    "translated_stream": [("tests.unit.test_translated_stream", "run", _first)],
    "jsonpeek": [("fastgw.protocol.jsonpeek", "peek_request", _first),
                 ("fastgw.protocol.jsonpeek", "peek_usage", _first)],
    "wire_request": [
        ("fastgw.providers.wire.anthropic_chat", "chat_request_to_messages", lambda body, *a: b"\0" + _json(body)),
        ("fastgw.providers.wire.gemini_chat", "chat_request_to_gemini", lambda body, *a: b"\1" + _json(body)),
        ("fastgw.providers.wire.messages_front", "messages_request_to_chat", lambda body, *a: b"\2" + _json(body)),
        ("fastgw.providers.wire.messages_front", "count_tokens_local", lambda body, *a: b"\3" + _json(body))],
    "wire_response": [
        ("fastgw.providers.wire.anthropic_chat", "messages_response_to_chat",
         lambda resp, *a: b"\0\0" + _json(resp)),
        ("fastgw.providers.wire.gemini_chat", "gemini_response_to_chat", lambda resp, *a: b"\1\0" + _json(resp)),
        ("fastgw.providers.wire.messages_front", "chat_response_to_message",
         lambda resp, *a: b"\2\0" + _json(resp)),
        ("fastgw.providers.wire.anthropic_chat", "messages_error_to_chat",
         lambda status, body: b"\3" + _status(status) + body),
        ("fastgw.providers.wire.gemini_chat", "gemini_error_to_chat",
         lambda status, body: b"\4" + _status(status) + body),
        ("fastgw.providers.wire.messages_front", "chat_error_to_messages",
         lambda status, body: b"\5" + _status(status) + body)],
}
# Stream translators: the events one instance is given, written back as the stream body they came from.
STREAMS = {  # class -> selector of wire_stream (by its constructor's include_usage where it has one)
    ("fastgw.providers.wire.anthropic_chat", "MessagesToChatStream"):
        lambda model, include_usage: 0 if include_usage else 1,
    ("fastgw.providers.wire.anthropic_chat", "MessagesUsageReader"): lambda: 2,
    ("fastgw.providers.wire.gemini_chat", "GeminiToChatStream"): lambda model, include_usage: 3 if include_usage else 4,
    ("fastgw.providers.wire.messages_front", "ChatToMessagesStream"): lambda model: 5,
}


# Recorded wire samples (tests/data/wire, perf/mocks) that seed a target as they are, after a prefix.
_W = "tests/data/wire/"
FILES = {
    "sse_relay": [(_W + "*/stream*.txt", b""), (_W + "*/sdk_stream*.txt", b""), ("perf/mocks/bodies/*.sse", b"")],
    "translated_stream": [(_W + "*/stream*.txt", b""), (_W + "*/sdk_stream*.txt", b"")],
    "wire_stream": [(_W + "anthropic/*stream*.txt", b"\0"), (_W + "anthropic/*stream*.txt", b"\2"),
                    (_W + "gemini/*stream*.txt", b"\3"), (_W + "messages_front/stream*.txt", b"\5"),
                    (_W + "azure/stream*.txt", b"\5"), ("perf/mocks/bodies/*.sse", b"\5")],
    "wire_response": [(_W + "anthropic/response_*.json", b"\0\0"), (_W + "anthropic/message_*.json", b"\0\0"),
                      (_W + "gemini/response_*.json", b"\1\0"), (_W + "gemini/generate_*.json", b"\1\0"),
                      ("perf/mocks/bodies/chat.json", b"\2\0"), (_W + "anthropic/error_*.json", b"\3\x0b"),
                      (_W + "gemini/error_*.json", b"\4\x01"), (_W + "anthropic/response_*.json", b"\6\0"),
                      (_W + "anthropic/response_*.json", b"\7\0"), (_W + "gemini/response_*.json", b"\x08\0"),
                      ("perf/mocks/bodies/chat.json", b"\x09\0")],
    "wire_request": [("perf/scenarios/*request*.json", b"\0"), ("perf/scenarios/*request*.json", b"\1")],
    "jsonpeek": [("perf/scenarios/*.json", b""), ("perf/mocks/bodies/*.json", b"")],
}


class _Sink:
    def __init__(self, root: Path):
        self.root = root
        self.count: dict[str, int] = {}

    def write(self, target: str, data: bytes) -> None:
        if self.count.get(target, 0) >= PER_TARGET:
            return
        folder = self.root / target
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / hashlib.sha1(data).hexdigest()
        if not path.exists():
            path.write_bytes(data)
            self.count[target] = self.count.get(target, 0) + 1


def _replace(module_name: str, name: str, new) -> None:
    """Put `new` in place of module.name, and wherever a loaded module imported that object by name."""
    old = getattr(sys.modules[module_name], name)
    for module in list(sys.modules.values()):
        if getattr(module, name, None) is old:
            setattr(module, name, new)


def pytest_collection_finish(session):
    """(The plugin hook) every test module is imported now: wrap what they call."""
    sink = _Sink(Path(os.environ[OUT_ENV]))
    for target, hooks in RECORDED.items():
        for module_name, name, to_input in hooks:
            __import__(module_name)
            _replace(module_name, name, _recorder(sink, target, getattr(sys.modules[module_name], name), to_input))
    for (module_name, name), selector in STREAMS.items():
        __import__(module_name)
        _replace(module_name, name, _stream_recorder(sink, getattr(sys.modules[module_name], name), selector))


def _recorder(sink, target, function, to_input):
    def wrapper(*args, **kwargs):
        try:
            sink.write(target, to_input(*args, **kwargs))
        except Exception:
            pass        # an argument that is not the harness's input (a test of bad types): not a seed
        return function(*args, **kwargs)
    return wrapper


def _stream_recorder(sink, cls, selector):
    class Recording(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._seed = bytes([selector(*args, **kwargs)])

        def event(self, name, data):
            self._seed += (b"event: " + name.encode() + b"\n" if name is not None else b"") + \
                b"data: " + data.replace(b"\n", b"\ndata: ") + b"\n\n"
            return super().event(name, data)

        def finish(self):
            sink.write("wire_stream", self._seed)
            return super().finish()

    Recording.__name__ = cls.__name__
    return Recording


def write_all() -> None:
    from tests.fuzz import TARGETS, native
    from tests.fuzz.__main__ import OUT, minimize

    raw = OUT / "seeds-raw"
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)
    env = dict(os.environ, **{OUT_ENV: str(raw)})
    print("seeds: running the tests that hold the cases", flush=True)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "tests.fuzz.seeds", "-p", "no:cacheprovider",
                    *TEST_FILES], cwd=native.ROOT, env=env, check=True)
    sink = _Sink(raw)
    for target, sources in FILES.items():
        for pattern, prefix in sources:
            for path in sorted(native.ROOT.glob(pattern)):
                sink.write(target, prefix + path.read_bytes())
    build_dir = native.build()
    for target in TARGETS:
        count = minimize(target, [raw / target] if (raw / target).exists() else [], build_dir)
        print(f"seeds: {target}: {count} inputs (and the regress-* files)")
