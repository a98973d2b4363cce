"""GET /v1/models and /v1/models/{id} through `fastgw serve`, read with the openai SDK's client.models.list() and
retrieve(): the embedded default, --upstream, virtual names beside a wildcard of every provider format, upstreams
that are down or hang, and a consumer restricted by key-auth."""
from __future__ import annotations

import socket
import threading
import time

import openai
import pytest

from fastgw.devtools.mock import anthropic as mock_anthropic, gemini as mock_gemini, openai as mock_openai
from fastgw.policies.auth.policy import hash_key
from tests.conftest import free_port

MOCK_MODELS = list(mock_openai.MODELS)
CHAT = {"messages": [{"role": "user", "content": "Say hello"}]}


def client(gw, key="sk-unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base + "/v1", api_key=key, max_retries=0, timeout=20)


def ids(gw, key="sk-unused") -> list[str]:
    return [m.id for m in client(gw, key).models.list()]


def deployment(url: str, **fields) -> str:
    return f'[[models.deployments]]\nurl = "{url}"\n' + "".join(f'{k} = "{v}"\n' for k, v in fields.items())


def model(name: str, *deployments: str) -> str:
    return f'[[models]]\nname = "{name}"\n' + "".join(deployments)


def test_embedded_default_lists_the_mocks_models(start_gateway):
    gw = start_gateway()
    assert ids(gw) == MOCK_MODELS
    m = client(gw).models.retrieve("gpt-4o")
    assert (m.id, m.object, m.owned_by) == ("gpt-4o", "model", "fastgw-mock") and m.created > 0
    with pytest.raises(openai.NotFoundError) as e:
        client(gw).models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    listed = ids(gw)[-1]                                  # a listed model can be used
    assert client(gw).embeddings.create(model=listed, input="x").data


def test_upstream_flag_lists_the_upstreams_models(mock, start_gateway):
    gw = start_gateway(args=("--upstream", mock.url))
    assert ids(gw) == MOCK_MODELS
    assert client(gw).models.retrieve("o4-mini").owned_by == "fastgw-mock"


def test_virtual_names_first_then_the_wildcards_upstreams_of_every_format(mock, start_gateway):
    m = f"http://127.0.0.1:{mock.port}"
    cfg = (model("team-default", deployment(m + "/v1", model="gpt-4o-mini"))
           + model("gpt-4o", deployment(m + "/v1"))
           + model("*", deployment(m + "/v1"), deployment(m, provider="anthropic", key_env="ANT_KEY"),
                   deployment(m, provider="gemini", key_env="GEMINI_KEY"),
                   deployment(m + "/v1", model="pinned")))     # names its own model: its list is not asked
    gw = start_gateway(cfg, env={"ANT_KEY": "sk-ant", "GEMINI_KEY": "gm"})
    got = client(gw).models.list().data
    assert [x.id for x in got] == (["team-default", "gpt-4o"] + [i for i in MOCK_MODELS if i != "gpt-4o"]
                                   + [i for i, _, _ in mock_anthropic.MODELS]
                                   + [i for i, _, methods in mock_gemini.MODELS if "generateContent" in methods])
    assert got[1].owned_by == "fastgw"                    # a virtual name wins over the upstream's entry
    assert client(gw).models.retrieve("claude-sonnet-4-5").owned_by == "anthropic"
    assert client(gw).models.retrieve("gemini-2.5-pro").owned_by == "google"
    with pytest.raises(openai.NotFoundError):
        client(gw).models.retrieve("text-embedding-004")  # Gemini lists it, but it cannot chat


class Silent:
    """A TCP server that accepts and never answers (an upstream that hangs)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        try:
            while True:
                self.held.append(self.sock.accept()[0])
        except OSError:
            pass

    def close(self):
        self.sock.close()
        for s in self.held:
            s.close()


def test_upstreams_down_or_hanging_do_not_hold_up_the_list_or_other_requests(mock, start_gateway):
    silent = Silent()
    try:
        cfg = model("mine", deployment(mock.url)) + model(
            "*", deployment(f"http://127.0.0.1:{free_port()}/v1"), deployment(f"http://127.0.0.1:{silent.port}/v1"),
            deployment(mock.url))
        gw = start_gateway(cfg)
        listing = {}

        def first_listing():
            t0 = time.monotonic()
            listing["ids"] = ids(gw)
            listing["took"] = time.monotonic() - t0

        t = threading.Thread(target=first_listing)
        t.start()
        time.sleep(0.3)                                   # the listing waits for the hanging upstream's list
        t0 = time.monotonic()
        assert client(gw).chat.completions.create(model="mine", **CHAT).choices[0].message.content
        assert time.monotonic() - t0 < 1.0                # other requests do not wait with it
        t.join(10)
        assert 1.5 < listing["took"] < 3.5                # the first listing waited at most the first wait (2 s)
        assert listing["ids"] == ["mine"] + MOCK_MODELS   # with what it had: the mock's list, none of the others
        t0 = time.monotonic()
        assert ids(gw) == ["mine"] + MOCK_MODELS          # later listings answer at once
        assert time.monotonic() - t0 < 0.5
    finally:
        silent.close()


def test_a_failing_upstream_is_logged_once_per_streak_not_per_listing(mock, start_gateway):
    down = f"127.0.0.1:{free_port()}"
    gw = start_gateway(f"[upstream]\nmodels_cache_s = 0.1\n" + model("*", deployment(f"http://{down}/v1"),
                                                                      deployment(mock.url)))
    for _ in range(8):                                    # several refreshes, each failing for `down`
        assert ids(gw) == MOCK_MODELS
        time.sleep(0.15)
    lines = [line for line in gw.ops_log().splitlines() if "upstream model list unavailable" in line]
    assert len(lines) == 1 and down in lines[0]


def test_a_restricted_consumer_sees_only_its_models(tmp_path, mock, start_gateway):
    d = tmp_path / "policies"
    d.mkdir()
    (d / "10-auth.toml").write_text(f"""policy = "key-auth"
[[consumers]]
name = "team"
keys = ["{hash_key("sk-team")}"]
models = ["gpt-4o*", "house-*"]
[[consumers]]
name = "admin"
keys = ["{hash_key("sk-admin")}"]
""")
    gw = start_gateway(f'policies_dir = "{d}"\n' + model("house-model", deployment(mock.url))
                       + model("other-model", deployment(mock.url)) + model("*", deployment(mock.url)))
    assert ids(gw, "sk-team") == ["house-model", "gpt-4o-mini", "gpt-4o"]
    assert ids(gw, "sk-admin") == ["house-model", "other-model"] + MOCK_MODELS
    assert client(gw, "sk-team").models.retrieve("gpt-4o").id == "gpt-4o"
    for hidden in ("o4-mini", "other-model"):
        with pytest.raises(openai.NotFoundError) as e:
            client(gw, "sk-team").models.retrieve(hidden)
        assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        ids(gw, "sk-wrong")
