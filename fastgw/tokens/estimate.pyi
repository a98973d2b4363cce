"""Type stub of the compiled token estimator (fastgw/tokens/estimate.pyx)."""

TOKENS_PER_MESSAGE: int
TOKENS_PER_NAME: int
TOKENS_REPLY_PRIMING: int

def estimate_text_tokens(b: bytes | str, encoding: str = "o200k_base") -> int: ...
def estimate_chat_tokens(body: bytes, encoding: str = "o200k_base") -> int: ...
