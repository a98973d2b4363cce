"""fastgw.runtime.permissions: the files whose permissions undo access control are named, one line each; the
config refuses an admin listener on the public port; URLs in messages lose their passwords."""
import io
import os

import orjson
import pytest

from fastgw.observability.logs import Logger
from fastgw.runtime import config
from fastgw.runtime.permissions import loose_files, warn_loose_files


@pytest.fixture
def setup(tmp_path):
    """A config file, a policies folder with two policy files (one holding a Redis password) and a CA file, all
    with tight permissions."""
    pol = tmp_path / "policies"
    pol.mkdir(mode=0o755)
    (pol / "10-auth.toml").write_text('policy = "key-auth"\n[[consumers]]\nname = "a"\nkeys = ["' + "0" * 64 + '"]\n')
    (pol / "20-rate.toml").write_text('policy = "rate-limit"\nbackend = "redis"\n[redis]\n'
                                      'url = "redis://:s3cret@127.0.0.1:6379/0"\n[[rules]]\nrequests = 5\n')
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg_path = tmp_path / "fastgw.toml"
    cfg_path.write_text(f'policies_dir = "{pol}"\n[[models]]\nname = "m"\n[[models.deployments]]\n'
                        f'url = "https://up.example/v1"\nca_file = "{ca}"\n')
    for path, mode in ((cfg_path, 0o644), (pol / "10-auth.toml", 0o644), (pol / "20-rate.toml", 0o600),
                       (ca, 0o644), (pol, 0o755)):
        os.chmod(path, mode)
    cfg = config.Config(policies_dir=str(pol), models=[config.Model(name="m", deployments=[
        config.DeploymentConfig(url="https://up.example/v1", ca_file=str(ca))])])
    cfg.source = str(cfg_path)
    return cfg, cfg_path, pol, ca


def test_tight_permissions_say_nothing(setup):
    cfg = setup[0]
    assert loose_files(cfg) == []


@pytest.mark.parametrize("which,mode,words", [
    ("config", 0o666, "config file is world-writable (mode 666): anyone on this host can change it"),
    ("folder", 0o777, "policies folder is world-writable (mode 777): anyone on this host can add a policy file"),
    ("folder", 0o1777, "policies folder is world-writable (mode 1777)"),     # sticky: one can still add a file
    ("auth", 0o646, "policy file is world-writable (mode 646)"),
    ("rate", 0o640, "policy file holds a password and is open to group or others (mode 640); chmod 600 it"),
    ("rate", 0o604, "policy file holds a password and is open to group or others (mode 604)"),
    ("ca", 0o666, "CA file is world-writable (mode 666)"),
])
def test_each_loose_file_is_named_once(setup, which, mode, words):
    cfg, cfg_path, pol, ca = setup
    path = {"config": cfg_path, "folder": pol, "auth": pol / "10-auth.toml", "rate": pol / "20-rate.toml",
            "ca": ca}[which]
    os.chmod(path, mode)
    found = loose_files(cfg)
    assert [p for p, _ in found] == [str(path)]
    assert words in found[0][1]
    # The warning: one JSON line naming the file, without the file's content.
    buf = io.StringIO()
    warn_loose_files(cfg, Logger(buf))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    line = orjson.loads(lines[0])
    assert (line["level"], line["event"], line["file"]) == ("warning", "loose file permissions", str(path))
    assert "s3cret" not in lines[0]


def test_a_policy_file_without_a_password_may_be_read_by_others(setup):
    cfg, _, pol, _ = setup
    os.chmod(pol / "10-auth.toml", 0o664)        # digests only: group-writable is the operator's business
    assert loose_files(cfg) == []


def test_no_file_no_warning():
    cfg = config.load(None, env={})             # the embedded default
    assert loose_files(cfg) == []


def test_the_admin_listener_is_never_on_the_public_port():
    with pytest.raises(config.ConfigError) as e:
        config.parse("[server]\nport = 8080\nadmin_port = 8080\n", "f.toml")
    assert "server.admin_port: 8080 is the public port" in str(e.value)
    with pytest.raises(config.ConfigError):
        config.load(None, env={"FASTGW_PORT": "9001", "FASTGW_ADMIN_PORT": "9001"})
    cfg = config.parse("[server]\nport = 8080\nadmin_port = 8081\n")
    cfg.server.port = 8081                       # a command-line --port, applied after loading
    with pytest.raises(config.ConfigError):
        config.check(cfg)
    config.parse("[server]\nport = 0\nadmin_port = 0\n")    # no admin listener at all


@pytest.mark.parametrize("url,shown", [
    ("redis://:pw-123@h:6379/0", "redis://:***@h:6379/0"),
    ("http://user:pw-123@h/v1", "http://user:***@h/v1"),
    ("rediss://u:p%40w@h", "rediss://u:***@h"),
    ("http://h:8080/v1", "http://h:8080/v1"),
    ("not a url", "not a url"),
])
def test_urls_in_messages_lose_their_password(url, shown):
    assert config.redact_url(url) == shown


def test_config_and_policy_errors_never_show_a_password(tmp_path):
    with pytest.raises(config.ConfigError) as e:
        config.parse('[[models]]\nname = "m"\n[[models.deployments]]\nurl = "ftp://u:pw-123@h/v1"\n')
    assert "pw-123" not in str(e.value) and "ftp://u:***@h/v1" in str(e.value)
    from fastgw.policies.redis_client import RedisClient
    with pytest.raises(ValueError) as e:
        RedisClient("redis+nope://:pw-123@h:6379/0")
    assert "pw-123" not in str(e.value)


def test_a_config_holding_a_redis_password_is_flagged(tmp_path):
    from fastgw.runtime.permissions import loose_files
    path = tmp_path / "fastgw.toml"
    for url in ("redis://:pw@r:6379/0", "redis+sentinel://s1:1/m?sentinel_password=pw"):
        path.write_text('[[models]]\nname = "m"\n[[models.deployments]]\nurl = "http://127.0.0.1:1/v1"\n'
                        f'[passthrough]\nresources_redis = "{url}"\n')
        path.chmod(0o644)
        cfg = config.load(str(path))
        assert any("holds a password" in problem for _, problem in loose_files(cfg)), url
        path.chmod(0o600)
        assert loose_files(config.load(str(path))) == []
