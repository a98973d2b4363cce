"""fastgw.routing.router (compiled): deployments ready to send to, weighted round-robin, model resolution.
(The other balancing strategies, tiers and per-deployment settings: test_balancing.py.)"""
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgw.runtime.config import Config, ConfigError, DeploymentConfig, Model
from fastgw.routing.router import PROXIED, Route, Router, Deployment


def cfg(*models):
    return Config(models=[Model(name=n, deployments=ds) for n, ds in models])


def test_deployment_plain_http_with_base_path_and_key():
    t = Deployment("http://example.test:8000/api/v1/", "gpt-4o-2024", "sk-secret")
    assert (t.host, t.port, t.tls, t.ssl, t.server_hostname) == ("example.test", 8000, False, None, None)
    assert t.name == "example.test:8000"
    assert t.pool_key == ("example.test", 8000, False, "")
    assert t.request_lines == {ep: f"POST /api{ep} HTTP/1.1\r\n".encode() for ep in PROXIED}
    assert t.header_lines == b"host: example.test:8000\r\nauthorization: Bearer sk-secret\r\n"
    assert (t.model, t.model_json) == ("gpt-4o-2024", b'"gpt-4o-2024"')
    assert t.pool is None
    assert "sk-secret" not in repr(t)


def test_deployment_https_default_port_no_key_keeps_client_model():
    t = Deployment("https://api.example.test/v1", "", "")
    assert (t.host, t.port, t.tls, t.server_hostname) == ("api.example.test", 443, True, "api.example.test")
    assert t.ssl is not None
    assert t.request_lines["/v1/chat/completions"] == b"POST /v1/chat/completions HTTP/1.1\r\n"
    assert t.header_lines == b"host: api.example.test\r\n"
    assert (t.model, t.model_json) == ("", b"")


def test_deployment_model_json_escapes():
    t = Deployment("http://h/v1", 'we"ird\\model', "")
    assert orjson.loads(t.model_json) == 'we"ird\\model'


def test_deployment_pool_is_a_settable_cache():
    t = Deployment("http://h/v1", "", "")
    marker = object()
    t.pool = marker
    assert t.pool is marker


def test_bad_ca_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        Deployment("https://h/v1", "", "", str(tmp_path / "missing.pem"))


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.integers(1, 5), min_size=1, max_size=5), cycles=st.integers(1, 4))
def test_round_robin_gives_each_its_weight_in_every_cycle(weights, cycles):
    deployments = [Deployment(f"http://h{i}/v1", "", "") for i in range(len(weights))]
    route = Route("m", list(zip(deployments, weights)))
    total = sum(weights)
    for _ in range(cycles):     # smooth weighted round robin: every `total` picks hold each exactly `weight` times
        picked = [route.pick(None) for _ in range(total)]
        assert [picked.count(d) for d in deployments] == weights
    assert route.deployments == deployments
    for t in deployments:
        assert route.fallbacks(t) == [o for o in deployments if o is not t]


def test_route_without_weight_is_refused():
    with pytest.raises(ValueError):
        Route("m", [(Deployment("http://h/v1", "", ""), 0)])


def test_route_rejects_non_targets():
    with pytest.raises(TypeError):
        Route("m", [("http://h/v1", 1)])


def test_resolve_exact_then_wildcard():
    r = Router(cfg(("gpt-4o", [DeploymentConfig(url="http://a/v1", model="gpt-4o-x", weight=2),
                               DeploymentConfig(url="http://b/v1")]),
                   ("*", [DeploymentConfig(url="http://c/v1")])))
    route = r.resolve("gpt-4o")
    assert route is r.routes["gpt-4o"] and route.name == "gpt-4o"
    assert [route.pick(None).name for _ in range(6)] == ["a:80", "b:80", "a:80"] * 2   # interleaved 2:1
    assert r.resolve("anything-else") is r.wildcard and r.wildcard.name == "*"
    assert "*" not in r.routes
    assert list(r.routes) == ["gpt-4o"]


def test_resolve_unknown_without_wildcard_is_none():
    r = Router(cfg(("gpt-4o", [DeploymentConfig(url="http://a/v1")])))
    assert r.wildcard is None
    assert r.resolve("llama") is None
    assert r.resolve("gpt-4o").name == "gpt-4o"


def test_keys_from_env_and_mock_url():
    r = Router(cfg(("m", [DeploymentConfig(url="http://mock.invalid/v1", key_env="K")])), env={"K": "sk-1"},
               mock_url="http://127.0.0.1:9999/v1")
    t = r.resolve("m").pick(None)
    assert t.name == "127.0.0.1:9999"
    assert t.header_lines.endswith(b"authorization: Bearer sk-1\r\n")
    with pytest.raises(ConfigError):
        Router(cfg(("m", [DeploymentConfig(url="http://a/v1", key_env="MISSING")])), env={})
