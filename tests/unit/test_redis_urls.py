"""Redis URLs (single, TLS, Sentinel, Cluster) and cluster hash slots, without a server. (CLUSTER KEYSLOT itself is
compared with key_slot on many keys in tests/integration/test_redis_ops.py.)"""
import pytest

from fastgw.policies.redis_client import RedisClient, command_key, crc16, key_slot, parse_url


def test_crc16_is_xmodem():
    assert crc16(b"123456789") == 0x31C3          # the CRC16-CCITT (XMODEM) check value Redis's cluster spec gives
    assert crc16(b"") == 0


@pytest.mark.parametrize("a,b", [
    ("{user1000}.following", "{user1000}.followers"),       # the spec's examples
    ("foo{bar}{zap}", "bar"),                                # the first tag only
    ("foo{{bar}}zap", "{bar"),                               # from the first "{" to the next "}"
    ("fastgw:rl:{abc}0001", "fastgw:rl:{abc}0002"),
])
def test_hash_tags_share_a_slot(a, b):
    assert key_slot(a) == key_slot(b)


@pytest.mark.parametrize("key", ["foo{}{bar}", "{}", "{", "}{x", "plain"])
def test_no_tag_hashes_the_whole_key(key):
    assert key_slot(key) == crc16(key.encode()) % 16384


def test_key_slot_of_str_and_bytes_agree():
    assert key_slot("日本{語}") == key_slot("日本{語}".encode()) == crc16("語".encode()) % 16384


@pytest.mark.parametrize("args,key", [
    (("GET", "k"), "k"), (("SET", "k", "v"), "k"), ((b"hset", b"k", b"f", b"v"), b"k"),
    (("EVALSHA", "sha", 2, "k1", "k2", "a"), "k1"), (("EVAL", "src", "0", "a"), None),
    (("PING",), None), (("CLUSTER", "SLOTS"), None), (("TIME",), None),
])
def test_command_key(args, key):
    assert command_key(args) == key


def test_urls():
    t = parse_url("redis://127.0.0.1:6380/2")
    assert (t.mode, t.nodes, t.username, t.password, t.db, t.tls) == ("single", (("127.0.0.1", 6380),), None, None,
                                                                       2, False)
    t = parse_url("redis://:p%40ss@h")
    assert (t.nodes, t.username, t.password, t.db) == ((("h", 6379),), None, "p@ss", 0)
    t = parse_url("rediss://gw:pw@redis.internal:6379/0?ca_file=/etc/ca.pem&cert_file=/c.pem&key_file=/k.pem"
                  "&server_name=redis")
    assert (t.mode, t.tls, t.username, t.password, t.ca_file, t.cert_file, t.key_file, t.server_name) == (
        "single", True, "gw", "pw", "/etc/ca.pem", "/c.pem", "/k.pem", "redis")
    t = parse_url("redis+sentinel://gw:pw@s1:26379,s2:26380,[::1]:26381/mymaster/3?sentinel_password=sp")
    assert (t.mode, t.nodes, t.master, t.db, t.username, t.password, t.sentinel_password) == (
        "sentinel", (("s1", 26379), ("s2", 26380), ("::1", 26381)), "mymaster", 3, "gw", "pw", "sp")
    t = parse_url("rediss+cluster://n1:7000,n2:7001")
    assert (t.mode, t.tls, t.nodes, t.db) == ("cluster", True, (("n1", 7000), ("n2", 7001)), 0)


@pytest.mark.parametrize("url,why", [
    ("http://h:6379", "unknown scheme"),
    ("h:6379", "no scheme"),
    ("redis://a:1,b:2", "one host expected"),
    ("redis://h:99999", "bad port"),
    ("redis://h:6379/x", "bad database"),
    ("redis://:pw@/0", "a host is missing"),
    ("redis+sentinel://s1:26379", "master's name is missing"),
    ("redis+cluster://n1:7000/1", "only database 0"),
    ("redis://h?ca_file=/ca.pem", "TLS options need rediss://"),
    ("rediss://h?cert_file=/c.pem", "cert_file and key_file go together"),
    ("redis://h?sentinel_password=x", "need redis+sentinel://"),
    ("redis://h?timeout=1", "unknown option"),
])
def test_bad_urls_say_why(url, why):
    with pytest.raises(ValueError) as e:
        parse_url(url)
    assert why in str(e.value)


def test_messages_never_show_passwords():
    for url in ("redis+nope://:pw-123@h:6379/0", "redis+sentinel://u:pw-123@s1:1/m?sentinel_password=pw-123&x=1"):
        with pytest.raises(ValueError) as e:
            RedisClient(url)
        assert "pw-123" not in str(e.value)
    c = RedisClient("redis+sentinel://u:pw-1@s1:1/m?sentinel_password=pw-2")
    assert c.redact("WRONGPASS pw-1 pw-2") == "WRONGPASS *** ***"


def test_missing_tls_files_are_a_config_error(tmp_path):
    with pytest.raises(ValueError) as e:
        RedisClient(f"rediss://h:6379?ca_file={tmp_path}/none.pem")
    assert "TLS files" in str(e.value)


def test_rate_limit_keys_share_a_slot_per_request(policy_ctx, make_exchange):
    """The hash tag of a request's buckets: from the `per` keys every rule has (so one request's keys are in one
    cluster slot and different consumers spread), else one per policy."""
    from fastgw.policies.ratelimit.policy import Config, RateLimit, RedisConfig, Rule
    from fastgw.policies.ratelimit.redis import RedisLimiter

    def policy(*rules):
        return RateLimit(Config(rules=list(rules), id="p", backend="redis",
                                redis=RedisConfig(url="redis://127.0.0.1:1/0")), policy_ctx)

    by_consumer = policy(Rule(id="a", requests=5, tokens=50, per=["consumer"]),
                         Rule(id="b", tokens=100, per=["model", "consumer"]))
    ex1, ex2 = make_exchange(consumer="alice", model="m1"), make_exchange(consumer="alice", model="m2")
    assert by_consumer._tag(ex1) == by_consumer._tag(ex2) != by_consumer._tag(make_exchange(consumer="bob"))
    plan = by_consumer._make_plan(ex1)
    keys = [RedisLimiter(None, "fastgw:rl:")._key(k, plan.tag) for k, _, _ in plan.base]
    assert len(keys) == 3 and len({key_slot(k) for k in keys}) == 1
    assert keys[0].startswith("fastgw:rl:{" + plan.tag + "}")
    shared = policy(Rule(id="all", requests=5), Rule(id="b", requests=5, per=["consumer"]))
    assert shared._tag(make_exchange(consumer="alice")) == shared._tag(make_exchange(consumer="bob"))


def test_config_refuses_a_bad_resources_redis_url():
    from fastgw.runtime import config

    base = '[[models]]\nname = "m"\n[[models.deployments]]\nurl = "http://127.0.0.1:1/v1"\n[passthrough]\n'
    with pytest.raises(config.ConfigError) as e:
        config.parse(base + 'resources_redis = "redis://:pw-9@a:1,b:2/0"\n')
    assert "passthrough.resources_redis" in str(e.value) and "pw-9" not in str(e.value)
    assert config.parse(base + 'resources_redis = "redis+cluster://a:1,b:2"\n').passthrough.resources_redis
