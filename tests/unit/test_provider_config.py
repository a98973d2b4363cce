"""Provider settings in the config: what each provider needs, refused clearly when missing."""
import pytest

from fastgw.routing.router import Deployment, Router
from fastgw.runtime.config import ConfigError, parse


def cfg(deployment: str):
    return parse(f'[[models]]\nname = "m"\n[[models.deployments]]\n{deployment}\n', "t.toml")


@pytest.mark.parametrize("deployment,message", [
    ('url = "http://h"\nprovider = "cohere"', "unknown provider 'cohere'"),
    ('url = "http://h"\nprovider = "anthropic"', "key_env: the anthropic provider needs a key"),
    ('url = "http://h"\nprovider = "gemini"', "key_env: the gemini provider needs a key"),
    ('url = "http://h"\nprovider = "azure"\nkey_env = "K"', "model: the azure provider needs the Azure deployment"),
    ('url = "http://h"\nprovider = "azure"\nmodel = "d"\nauth = "basic"', "auth: expected"),
])
def test_bad_provider_settings_are_refused_naming_the_field(deployment, message):
    with pytest.raises(ConfigError) as e:
        cfg(deployment)
    assert "models[0] ('m').deployments[0]" in str(e.value) and message in str(e.value)


def test_a_missing_key_variable_is_named():
    c = cfg('url = "http://h"\nprovider = "anthropic"\nkey_env = "ANTHROPIC_TEST_KEY"')
    with pytest.raises(ConfigError, match="environment variable ANTHROPIC_TEST_KEY is not set"):
        Router(c, env={})


def test_request_and_header_lines_of_each_provider():
    c = cfg('url = "https://res.openai.azure.com"\nprovider = "azure"\nmodel = "prod 4o"\nkey_env = "K"\n'
            'api_version = "2024-06-01"')
    d = Router(c, env={"K": "az"}).routes["m"].deployments[0]
    assert d.request_lines["/v1/chat/completions"] == (
        b"POST /openai/deployments/prod%204o/chat/completions?api-version=2024-06-01 HTTP/1.1\r\n")
    assert d.header_lines == b"host: res.openai.azure.com\r\napi-key: az\r\n"
    c = cfg('url = "https://res.openai.azure.com"\nprovider = "azure"\nmodel = "d"\nkey_env = "K"\nauth = "bearer"')
    assert Router(c, env={"K": "tok"}).routes["m"].deployments[0].header_lines.endswith(
        b"authorization: Bearer tok\r\n")
    c = cfg('url = "https://api.anthropic.com/v1"\nprovider = "anthropic"\nkey_env = "K"')
    d = Router(c, env={"K": "sk-ant"}).routes["m"].deployments[0]
    assert d.request_lines["/v1/chat/completions"] == b"POST /v1/messages HTTP/1.1\r\n"
    assert d.header_lines == b"host: api.anthropic.com\r\nx-api-key: sk-ant\r\nanthropic-version: 2023-06-01\r\n"
    assert d.messages_provider is not None and d.provider.translates
    c = cfg('url = "https://generativelanguage.googleapis.com"\nprovider = "gemini"\nkey_env = "K"')
    d = Router(c, env={"K": "g"}).routes["m"].deployments[0]
    assert d.header_lines == b"host: generativelanguage.googleapis.com\r\nx-goog-api-key: g\r\n"
    assert d.messages_provider is None
    assert Deployment("http://h/v1", "", "").messages_provider is not None   # OpenAI: the messages front


def _passthrough_exchange(method, target):
    from fastgw.protocol.http import HEAD, RequestParser
    from fastgw.proxy.exchange import Exchange

    p = RequestParser()
    p.feed(method + b" " + target + b" HTTP/1.1\r\nhost: gw\r\ncontent-length: 0\r\n\r\n")
    assert p.next_event() == HEAD
    return Exchange("r", "127.0.0.1", method, target.split(b"?")[0].decode(), p, 0.0)


@pytest.mark.parametrize("url,provider,extra,method,target,line", [
    ("https://api.openai.com/v1", "openai", "", b"GET", b"/v1/files?purpose=batch&limit=2",
     b"GET /v1/files?purpose=batch&limit=2 HTTP/1.1\r\n"),
    ("http://vllm:8000/proxy/v1", "openai", "", b"DELETE", b"/v1/files/file-1",
     b"DELETE /proxy/v1/files/file-1 HTTP/1.1\r\n"),
    # Azure: per-resource endpoints under /openai, per-model ones under the deployment; api-version added
    ("https://res.openai.azure.com", "azure", 'model = "tts"\napi_version = "2024-10-21"', b"POST",
     b"/v1/audio/speech", b"POST /openai/deployments/tts/audio/speech?api-version=2024-10-21 HTTP/1.1\r\n"),
    ("https://res.openai.azure.com", "azure", 'model = "d"', b"GET", b"/v1/batches?limit=3",
     b"GET /openai/batches?limit=3&api-version=2024-10-21 HTTP/1.1\r\n"),
])
def test_passthrough_request_lines(url, provider, extra, method, target, line):
    c = cfg(f'url = "{url}"\nprovider = "{provider}"\nkey_env = "K"\n{extra}')
    d = Router(c, env={"K": "k"}).routes["m"].deployments[0]
    ex = _passthrough_exchange(method, target)
    assert d.provider.passthrough_line(ex, d) == line


def test_translated_providers_refuse_passthrough():
    from fastgw.errors import GatewayError

    for provider in ("anthropic", "gemini"):
        c = cfg(f'url = "http://h"\nprovider = "{provider}"\nkey_env = "K"')
        d = Router(c, env={"K": "k"}).routes["m"].deployments[0]
        with pytest.raises(GatewayError) as e:
            d.provider.passthrough_line(_passthrough_exchange(b"GET", b"/v1/files"), d)
        assert e.value.status == 400 and e.value.code == "unsupported_endpoint"
