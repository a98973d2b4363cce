"""Tool-call answers, shared by the mock's wire formats: the arguments of a call, built from the tool's JSON
schema so that a client validating them against it accepts them, how a stream cuts them into fragments, and
call ids. Which tool a request gets is each format's own rule (its tool and tool_choice shapes differ).
"""
from __future__ import annotations

import itertools

import orjson

ARGUMENT_FRAGMENT = 8  # characters of the arguments' JSON per streamed fragment

_ids = itertools.count(1)


def example_arguments(schema) -> dict:
    """Arguments for a tool whose parameters are the JSON schema `schema` (an object schema): each required
    property with an example value (strings "mock", numbers 1, booleans true, the first of an enum)."""
    if not isinstance(schema, dict):
        return {}
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        properties = {}
    required = schema.get("required")
    if not isinstance(required, list):
        return {}
    return {name: example_value(properties.get(name)) for name in required if isinstance(name, str)}


def example_value(schema):
    """An example value of the JSON schema `schema`. Gemini writes its types in capitals ("STRING"), so the
    type is read case-insensitively; a list of types takes the first that is not "null"."""
    if not isinstance(schema, dict):
        return "mock"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for alternatives in ("anyOf", "oneOf"):
        options = schema.get(alternatives)
        if isinstance(options, list) and options:
            return example_value(options[0])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if isinstance(k, str) and k.lower() != "null"), "null")
    if not isinstance(kind, str):
        kind = "object" if "properties" in schema else "string"
    kind = kind.lower()
    if kind in ("number", "integer"):
        return 1
    if kind == "boolean":
        return True
    if kind == "object":
        return example_arguments(schema)
    if kind == "array":
        return []
    if kind == "null":
        return None
    return "mock"


def arguments_json(arguments: dict) -> str:
    return orjson.dumps(arguments).decode()


def fragments(text: str) -> list[str]:
    """`text` cut into the pieces a stream sends, ARGUMENT_FRAGMENT characters each (one piece at least)."""
    return [text[i:i + ARGUMENT_FRAGMENT] for i in range(0, len(text), ARGUMENT_FRAGMENT)] or [""]


def call_id(prefix: str) -> str:
    """A new id for a tool call, unique in this process: e.g. "toolu_mock0000000000000001"."""
    return f"{prefix}mock{next(_ids):016x}"
