"""Token counts: `estimate` (compiled, a few µs per request) and `exact` (tiktoken on offline, hash-checked data)."""
