"""Pricing of the pass-through endpoints through the running gateway: the openai SDK generating images and
speech and moderating text, against the built-in mock, with a budget policy on; the access log's cost_usd and
tokens, the metrics, and a budget refusing an image it cannot afford."""
from __future__ import annotations

import openai
import pytest

from fastgw.policies.auth.policy import hash_key
from fastgw.tokens.exact import count_text
from tests.integration.conftest import model_config, wait_for
from tests.integration.test_policies_e2e import KEYS, metric, sdk

BUDGET = """
policy = "budget"
backend = "local"
[[budgets]]
consumer = "alice"
usd = 1.0
period = "day"
[[budgets]]
consumer = "bob"
usd = 0.1
period = "day"
"""


@pytest.fixture
def gw(tmp_path, mock, start_gateway):
    d = tmp_path / "policies"
    d.mkdir()
    (d / "10-auth.toml").write_text('policy = "key-auth"\n' + "".join(
        f'[[consumers]]\nname = "{name}"\nkeys = ["{hash_key(key)}"]\n' for name, key in KEYS.items()))
    (d / "30-budget.toml").write_text(BUDGET)
    # "*": every model goes to the mock, which answers the images, audio and moderations endpoints.
    return start_gateway(model_config(mock.url, extra=f'policies_dir = "{d}"\n', name="*"))


def lines_for(g, path: str) -> list[dict]:
    return [line for line in g.access_lines() if line["path"] == path]


def test_images_speech_and_moderations_are_priced_in_the_access_log(gw):
    c = sdk(gw)
    img = c.images.generate(model="dall-e-3", prompt="a white siamese cat", size="1024x1792", quality="hd")
    assert len(img.data) == 1
    gpt = c.images.generate(model="gpt-image-1", prompt="a lighthouse at dusk", quality="low", size="1024x1024", n=2)
    u = gpt.usage
    assert u is not None and len(gpt.data) == 2
    gpt_cost = (u.input_tokens_details.text_tokens * 5.0 + u.input_tokens_details.image_tokens * 10.0
                + u.output_tokens * 40.0) / 1e6
    text = "Today is a wonderful day to build something people love! " * 10
    speech = c.audio.speech.create(model="tts-1-hd", voice="alloy", input=text)
    assert len(speech.content) > 0                                       # audio bytes, relayed as they came
    moderated = "I want to hug them all, every single one of them."
    mod = c.moderations.create(model="omni-moderation-latest", input=moderated)
    assert mod.results

    wait_for(lambda: len(gw.access_lines()) == 4, what="the four requests in the access log")
    [d3] = lines_for(gw, "/v1/images/generations")[:1]
    assert d3["model"] == "dall-e-3" and d3["status"] == 200 and d3["cost_usd"] == pytest.approx(0.12)
    gi = lines_for(gw, "/v1/images/generations")[1]
    assert gi["model"] == "gpt-image-1" and gi["cost_usd"] == pytest.approx(gpt_cost, abs=1e-9)
    assert gi["prompt_tokens"] == u.input_tokens and gi["completion_tokens"] == u.output_tokens
    [sp] = lines_for(gw, "/v1/audio/speech")
    assert sp["status"] == 200 and sp["cost_usd"] == pytest.approx(len(text) * 30.0 / 1e6, abs=1e-9)
    [md] = lines_for(gw, "/v1/moderations")
    assert md["cost_usd"] == 0.0 and md["prompt_tokens"] == count_text(moderated, "o200k_base")

    total = 0.12 + gpt_cost + len(text) * 30.0 / 1e6
    wait_for(lambda: metric(gw, "fastgw_cost_usd_total", consumer="alice") == pytest.approx(total, abs=1e-6),
             what="alice's cost in the metrics")


def test_a_budget_refuses_an_image_it_cannot_afford(gw):
    bob = sdk(gw, "bob")
    small = bob.images.generate(model="dall-e-2", prompt="a cat", size="256x256", n=2)     # $0.032 of $0.10
    assert len(small.data) == 2
    with pytest.raises(openai.RateLimitError) as e:
        bob.images.generate(model="dall-e-3", prompt="a cat", size="1792x1024", quality="hd")  # $0.12 > $0.10
    assert e.value.body["code"] == "insufficient_quota"
    with pytest.raises(openai.RateLimitError) as e:
        bob.images.generate(model="dall-e-2", prompt="a cat", size="1024x1024", n=4)      # $0.08 > $0.068 left
    assert e.value.body["code"] == "insufficient_quota" and "$0.0320 used" in e.value.body["message"]
    assert bob.images.generate(model="dall-e-2", prompt="a cat", size="1024x1024", n=3).data   # $0.06 fits
    wait_for(lambda: len(gw.access_lines()) == 4, what="the four requests in the access log")
    costs = [(line["status"], line["cost_usd"]) for line in gw.access_lines()]
    assert costs == [(200, pytest.approx(0.032)), (429, 0.0), (429, 0.0), (200, pytest.approx(0.06))]
    assert KEYS["bob"] not in gw.out_path.read_text()
