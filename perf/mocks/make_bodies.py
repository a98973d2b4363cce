"""Write the canned bodies the benchmark mocks serve and the request bodies the load generator sends.

Run `python -m perf.mocks.make_bodies` after changing anything here; the outputs are committed so a run
never depends on this script, and so a reviewer can read exactly what goes over the wire:

  perf/mocks/bodies/chat.json        non-streaming chat completion (shape and usage of a real gpt-4o-mini reply)
  perf/mocks/bodies/stream.sse       100 content chunks + finish chunk + usage chunk + [DONE]
  perf/mocks/bodies/embeddings.json  one 256-dimension embedding
  perf/mocks/bodies/models.json      GET /v1/models
  perf/scenarios/chat_request.json   ~4.4 KB request, ~1,000 prompt tokens of English prose (the seed's load)
  perf/scenarios/stream_request.json the same request with "stream": true and include_usage
  perf/scenarios/stream_request_no_usage.json  "stream": true without include_usage (the gateway's token
                                     accounting then asks for it and hides that chunk from the client)
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
BODIES = os.path.join(HERE, "bodies")
SCENARIOS = os.path.join(os.path.dirname(HERE), "scenarios")

CREATED = 1732380000
MODEL = "gpt-4o-mini-2024-07-18"
FINGERPRINT = "fp_0ba0d124f1"
COMPLETION_ID = "chatcmpl-AXk3vQ9bZ2mR7tL1pN8sD4fH6jK0c"

SYSTEM = (
    "You are a careful research assistant for a maritime history museum. Answer in plain English, "
    "cite the passage you rely on, keep a neutral tone, and say so when the text does not support a claim."
)

# Plain English prose, so a token estimate from bytes sees what a real prompt looks like (~1,000 tokens).
PROSE = """\
Please read the following notes from our archive and write a short summary for the new gallery panel.

For most of recorded history, the coast was the most dangerous part of any voyage. A ship in open water \
could ride out a storm, but a ship near land in bad weather had very little room to make a mistake. The \
earliest lights were simple fires kept burning on hilltops by people who lived nearby, and their purpose was \
as much to mark a harbour entrance as to warn of rocks. The famous tower at Alexandria, finished in the third \
century before the common era, was a remarkable exception: a tall stone building with a fire at the top, \
admired by travellers for more than a thousand years until earthquakes finally brought it down.

After the fall of Rome, the practice of keeping lights became local and uneven. Monasteries, towns and \
merchant guilds maintained a few of them, often in return for a small charge on ships that entered the port. \
Where nobody was willing to pay, there was no light at all, and captains relied on their knowledge of the \
coast, on soundings taken with a weighted line, and on the colour of the sea bed that the line brought up.

The great age of building came with the growth of trade in the seventeenth and eighteenth centuries. Towers \
were put up on headlands and, far more difficult, on isolated rocks far from shore. The first attempts on \
the most exposed reefs were wooden structures, and several were swept away in their first winter along with \
the men who kept them. Engineers learned slowly, by trial and by loss. The solution that finally worked was \
a tower of interlocking granite blocks, shaped on land, numbered, and fitted together on the rock during the \
few calm hours of low tide that each month allowed. A single season might see only a few courses of stone \
laid, and a tower could take five or six years to complete.

The light itself changed just as much as the building. Candles and open coal fires gave way to oil lamps with \
hollow wicks, and then to lamps set at the focus of polished metal reflectors. The real advance came in the \
nineteenth century with the stepped glass lens, which gathered nearly all of the light from a single lamp and \
bent it into a narrow horizontal beam that could be seen more than twenty miles away. Lenses were graded by \
size into several orders; the largest stood taller than a man and weighed several tons, and they floated in \
a bath of mercury so that a small clockwork motor could turn them smoothly through the night.

Because many lights now stood along the same stretch of coast, each needed its own signature. Some flashed \
once every ten seconds, some twice every fifteen, some showed a fixed beam broken by a short eclipse, and \
some used coloured sectors to show a ship that it had strayed into danger. These patterns were printed in \
official lists and on charts, so that a navigator who saw a light on the horizon could count the seconds \
between flashes and know exactly which headland lay ahead.

The keepers lived a life of routine and isolation. They trimmed the wicks, polished the brass and the glass, \
wound the clockwork every few hours, kept a log of the weather and of passing ships, and in fog they sounded \
a horn or rang a bell for as long as it lasted, sometimes for days. On rock stations, three men usually \
shared the tower, working in turns, with relief boats that could be delayed for weeks by heavy seas. \
Families lived at the shore stations, where children were often taught at home and supplies arrived by cart.

Electric lamps, radio beacons and finally satellite navigation reduced the need for people on site. Through \
the second half of the twentieth century, one station after another was automated, and the last keepers \
left their towers. Many lights still burn today, now small and efficient, checked remotely and visited only \
for maintenance, while several of the old towers have become museums, holiday cottages or nesting sites \
for sea birds.

One more point from the archive deserves a line on the panel. Fog was feared more than darkness, because a \
beam that carried twenty miles on a clear night might vanish within a few hundred yards. Bells, guns, sirens \
and at last compressed air horns were tried in turn, each with its own code, and sailors learned to judge \
distance by how faint the sound seemed.

Please keep the summary under two hundred words, mention the change from fires to lenses, the problem of \
building on exposed rocks, and the daily life of the keepers, and end with one sentence about automation."""


def chat_request(stream, include_usage=True):
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": PROSE},
        ],
        "temperature": 0.2,
        "max_tokens": 400,
    }
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    # The OpenAI Python SDK sends compact JSON; so do we.
    return json.dumps(body, separators=(",", ":"))


REPLY = (
    "For most of history the coast, not the open sea, was where ships were lost. The first lights were fires on "
    "hilltops, and the tower at Alexandria was a rare exception that stood for a thousand years. After Rome, "
    "lights were kept locally by monasteries, towns and guilds, often paid for by harbour dues. Building on "
    "exposed rocks proved the hardest task: early wooden towers were swept away, and success came only with "
    "interlocking granite blocks laid during brief calm low tides. The light moved from candles and coal fires "
    "to oil lamps, mirrors and finally the stepped glass lens, which could be seen twenty miles out, and each "
    "light gained its own flash pattern so that navigators could tell them apart. Keepers trimmed wicks, "
    "polished lenses, wound the clockwork and sounded fog signals, often isolated for weeks on rock stations. "
    "Automation in the twentieth century ended that life, and many towers are now museums or nesting sites."
)

PROMPT_TOKENS = 1000  # replaced below by the exact o200k count when bpe_openai is available
COMPLETION_TOKENS = 187


def usage(prompt_tokens):
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": prompt_tokens + COMPLETION_TOKENS,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chat_response(prompt_tokens):
    body = {
        "id": COMPLETION_ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": REPLY, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage(prompt_tokens),
        "system_fingerprint": FINGERPRINT,
    }
    # OpenAI pretty-prints its JSON responses; keep that so the byte size is realistic (~1.5 KB).
    return json.dumps(body, indent=2) + "\n"


def sse_response(prompt_tokens, chunks=100):
    words = REPLY.split(" ")
    pieces = [(" " if i else "") + words[i % len(words)] for i in range(chunks)]

    def event(choices, usage_value):
        chunk = {
            "id": COMPLETION_ID,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            "usage": usage_value,
        }
        return "data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n"

    out = [event([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None},
                   "logprobs": None, "finish_reason": None}], None)]
    for piece in pieces[1:]:
        out.append(event([{"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}], None))
    out.append(event([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], None))
    out.append(event([], usage(prompt_tokens)))
    out.append("data: [DONE]\n\n")
    return "".join(out)


def embeddings_response():
    rng = random.Random(42)
    vector = [round(rng.uniform(-0.08, 0.08), 9) for _ in range(256)]
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": vector}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    return json.dumps(body, indent=2) + "\n"


def models_response():
    names = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
    body = {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": CREATED, "owned_by": "system"} for n in names],
    }
    return json.dumps(body, indent=2) + "\n"


def count_prompt_tokens():
    try:
        import bpe_openai
    except ImportError:
        return PROMPT_TOKENS
    enc = bpe_openai.get_encoding("o200k_base")
    # OpenAI's chat accounting: 3 tokens per message + role/content tokens + 3 for the reply primer.
    return sum(3 + len(enc.encode(role)) + len(enc.encode(text))
               for role, text in (("system", SYSTEM), ("user", PROSE))) + 3


def main():
    os.makedirs(BODIES, exist_ok=True)
    prompt_tokens = count_prompt_tokens()
    files = {
        os.path.join(BODIES, "chat.json"): chat_response(prompt_tokens),
        os.path.join(BODIES, "stream.sse"): sse_response(prompt_tokens),
        os.path.join(BODIES, "embeddings.json"): embeddings_response(),
        os.path.join(BODIES, "models.json"): models_response(),
        os.path.join(SCENARIOS, "chat_request.json"): chat_request(False),
        os.path.join(SCENARIOS, "stream_request.json"): chat_request(True),
        os.path.join(SCENARIOS, "stream_request_no_usage.json"): chat_request(True, include_usage=False),
    }
    for path, text in files.items():
        with open(path, "w") as f:
            f.write(text)
        print(f"{os.path.relpath(path)}: {len(text.encode())} bytes")
    print(f"prompt tokens (o200k_base): {prompt_tokens}")


if __name__ == "__main__":
    main()
