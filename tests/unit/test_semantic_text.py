"""What the semantic cache embeds of a request (fastgw/cache/semantic_text.py) and what else must match."""
import pytest

from fastgw.cache.semantic_text import params_digest, prompt_text

CHAT = "/v1/chat/completions"


def test_chat_messages_text_parts_and_tool_calls():
    req = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Capital"}, {"type": "text", "text": "of France?"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q":1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Paris"}]}
    assert prompt_text(req, CHAT) == ('system: Be brief.\nuser: Capital\nof France?\n'
                                      'assistant:  [lookup({"q":1})]\ntool: Paris')


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}}]}],
    [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "input_audio", "input_audio": {}}]}],
    [{"role": "user", "content": 5}], [], "hi", None, [None],
])
def test_chat_with_anything_but_text_is_not_looked_up(messages):
    assert prompt_text({"messages": messages}, CHAT) is None


def test_completions_and_responses():
    assert prompt_text({"prompt": "Once upon"}, "/v1/completions") == "Once upon"
    assert prompt_text({"prompt": ["a", "b"]}, "/v1/completions") == "a\nb"
    assert prompt_text({"prompt": [1, 2, 3]}, "/v1/completions") is None        # token ids
    assert prompt_text({"input": "Hi", "instructions": "Be kind"}, "/v1/responses") == "instructions: Be kind\nuser: Hi"
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
             {"type": "function_call", "name": "w", "arguments": "{}"},
             {"type": "function_call_output", "output": "sunny"}]
    assert prompt_text({"input": items}, "/v1/responses") == "user: Weather?\ncall: w({})\nresult: sunny"
    assert prompt_text({"input": [{"type": "input_image"}]}, "/v1/responses") is None
    assert prompt_text({"input": "x"}, "/v1/embeddings") is None                 # never by similarity


def test_params_digest_ignores_the_prompt_and_what_never_changes_the_answer():
    base = {"model": "m", "messages": [{"role": "user", "content": "a"}], "max_tokens": 5, "temperature": 0}
    same = dict(base, messages=[{"role": "user", "content": "b"}], user="u", stream=True, model="other")
    assert params_digest(base, CHAT) == params_digest(same, CHAT)
    assert params_digest(base, CHAT) == params_digest(dict(reversed(list(base.items()))), CHAT)   # key order
    for change in ({"max_tokens": 6}, {"temperature": 0.5}, {"tools": [{"type": "function"}]},
                   {"response_format": {"type": "json_object"}}):
        assert params_digest(dict(base, **change), CHAT) != params_digest(base, CHAT)
    # completions: `prompt` is the text, `messages` would be a parameter
    assert params_digest({"prompt": "a"}, "/v1/completions") == params_digest({"prompt": "b"}, "/v1/completions")
