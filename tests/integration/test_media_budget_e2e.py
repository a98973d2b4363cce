"""Pricing of the pass-through endpoints through the running gateway, with a budget policy on, the openai SDK as
the client and the built-in mock as the upstream: images generated (DALL-E per image, GPT Image by its usage),
image uploads (edits, variations), speech, moderations, transcriptions and translations (multipart uploads
priced by the answer's duration or tokens, or estimated from the upload's size for a text answer); the access
log's cost_usd and tokens, the metrics, and a budget refusing an image it cannot afford."""
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


def test_transcriptions_by_their_duration_tokens_or_upload_size(gw):
    # Multipart uploads streamed through the gateway: priced by the answer's duration (whisper-1, json and
    # verbose_json) or tokens (gpt-4o-transcribe); a text answer carries no duration, so it is charged an
    # estimate from the upload's size and counted in fastgw_estimated_costs_total.
    from fastgw.policies.budget.media import AUDIO_BYTES_PER_SECOND

    c = sdk(gw)
    audio = bytes(range(256)) * 1280                                     # 320 KiB: the mock hears 10 seconds
    j = c.audio.transcriptions.create(model="whisper-1", file=("a.mp3", audio), response_format="json")
    assert j.usage.seconds == 10
    v = c.audio.translations.create(model="whisper-1", file=("a.mp3", audio), response_format="verbose_json")
    assert v.duration == 10.0
    t = c.audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.mp3", audio), response_format="json")
    u = t.usage
    text = c.audio.transcriptions.create(model="whisper-1", file=("a.mp3", audio), response_format="text")
    assert isinstance(text, str) and text.startswith("Mock transcription")

    wait_for(lambda: len(gw.access_lines()) == 4, what="the four uploads in the access log")
    js, vj, tok, txt = gw.access_lines()
    assert all(line["status"] == 200 and line["bytes_in"] > len(audio) for line in (js, vj, tok, txt))
    assert js["cost_usd"] == pytest.approx(10 / 60 * 0.006, abs=1e-9)
    assert vj["path"] == "/v1/audio/translations" and vj["cost_usd"] == pytest.approx(10 / 60 * 0.006, abs=1e-9)
    d = u.input_token_details
    assert tok["cost_usd"] == pytest.approx((d.audio_tokens * 6.0 + d.text_tokens * 2.5 + u.output_tokens * 10.0)
                                            / 1e6, abs=1e-9)
    assert txt["cost_usd"] == pytest.approx(txt["bytes_in"] / AUDIO_BYTES_PER_SECOND / 60 * 0.006, abs=1e-9)
    wait_for(lambda: metric(gw, "fastgw_estimated_costs_total", model="whisper-1",
                            endpoint="/v1/audio/transcriptions") == 1, what="the estimated charge counted")


def test_image_uploads_priced_from_their_form_fields_and_usage(gw):
    from fastgw.devtools.mock.openai_media import png

    c = sdk(gw)
    picture = png(8, 8)
    edit = c.images.edit(model="gpt-image-1", image=("in.png", picture), prompt="add a hat", quality="medium",
                         size="1024x1024")
    u = edit.usage
    assert u.input_tokens_details.image_tokens > 0
    var = c.images.create_variation(model="dall-e-2", image=("in.png", picture), n=2, size="256x256")
    assert len(var.data) == 2
    wait_for(lambda: len(gw.access_lines()) == 2, what="the two uploads in the access log")
    ed, va = gw.access_lines()
    assert ed["path"] == "/v1/images/edits" and ed["cost_usd"] == pytest.approx(
        (u.input_tokens_details.text_tokens * 5.0 + u.input_tokens_details.image_tokens * 10.0
         + u.output_tokens * 40.0) / 1e6, abs=1e-9)
    assert va["path"] == "/v1/images/variations" and va["cost_usd"] == pytest.approx(2 * 0.016)
