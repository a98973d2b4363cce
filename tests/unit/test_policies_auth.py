"""key-auth: hashed keys, Bearer and api-key headers, OpenAI-shaped 401/403, group and consumer models."""
import orjson
import pytest

from fastgw.errors import GatewayError
from fastgw.policies.auth.policy import Config, Consumer, Group, KeyAuth, hash_key, hash_key_main, new_key


@pytest.fixture
def auth(policy_ctx):
    cfg = Config(
        groups=[Group("research", ["gpt-4o*", "o3*"]), Group("open")],
        consumers=[
            Consumer("alice", [hash_key("sk-alice")], group="research"),
            Consumer("bob", ["sha256:" + hash_key("sk-bob").upper()], group="research", models=["gpt-4o-mini*"]),
            Consumer("carol", [hash_key("sk-carol-1"), hash_key("sk-carol-2")], group="open"),
            Consumer("dave", [hash_key("sk-dave")], models=["text-*"]),
        ])
    return KeyAuth(cfg, policy_ctx)


def run(auth, ex):
    auth.access(ex)
    auth.request(ex)
    return ex


def test_hash_key_is_sha256_hex():
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    k = new_key()
    assert k.startswith("sk-fgw-") and len(k) > 40 and new_key() != k


def test_hash_key_cli(capsys):
    hash_key_main(["abc"])
    assert capsys.readouterr().out.strip() == hash_key("abc")


@pytest.mark.parametrize("headers,who,model", [
    ({"Authorization": "Bearer sk-alice"}, ("alice", "research"), "gpt-4o"),
    ({"authorization": "bearer   sk-alice  "}, ("alice", "research"), "gpt-4o"),
    ({"api-key": "sk-carol-2"}, ("carol", "open"), "gpt-4o"),
    ({"Authorization": "Bearer sk-bob"}, ("bob", "research"), "gpt-4o-mini"),  # upper-case "sha256:" digest
    ({"Authorization": "Bearer sk-dave"}, ("dave", ""), "text-embedding-3-small"),
])
def test_valid_keys_identify(auth, make_exchange, headers, who, model):
    ex = run(auth, make_exchange(headers=headers, model=model))
    assert (ex.consumer, ex.group) == who


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer "}, {"Authorization": "Basic sk-alice"}, {"Authorization": "Bearer sk-alicex"},
    {"api-key": "SK-ALICE"}, {"Authorization": "sk-alice"},
])
def test_missing_or_wrong_key_is_401(auth, make_exchange, headers, policy_ctx):
    ex = make_exchange(headers=headers)
    with pytest.raises(GatewayError) as e:
        auth.access(ex)
    err = e.value
    assert err.status == 401
    body = orjson.loads(err.body())["error"]
    assert body["type"] == "invalid_request_error" and body["code"] == "invalid_api_key"
    assert "sk-alice" not in body["message"].lower()          # the key is never echoed
    assert ex.consumer == ""
    assert err.reason == "auth"                            # the rejections metric's reason (counted by the gateway)


@pytest.mark.parametrize("consumer_key,model,allowed", [
    ("sk-alice", "gpt-4o", True), ("sk-alice", "o3-mini", True), ("sk-alice", "gpt-3.5-turbo", False),
    ("sk-bob", "gpt-4o-mini-2024-07-18", True), ("sk-bob", "gpt-4o", False),   # consumer narrows the group
    ("sk-carol-1", "anything-at-all", True),                                    # group without a list
    ("sk-dave", "text-embedding-3-large", True), ("sk-dave", "gpt-4o", False),  # no group, own list
])
def test_allowed_models(auth, make_exchange, consumer_key, model, allowed, policy_ctx):
    ex = make_exchange(headers={"Authorization": f"Bearer {consumer_key}"}, model=model)
    auth.access(ex)
    for _ in range(2):   # the second time comes from the cache
        if allowed:
            auth.request(ex)
        else:
            with pytest.raises(GatewayError) as e:
                auth.request(ex)
            body = orjson.loads(e.value.body())["error"]
            assert e.value.status == 403 and body["code"] == "model_not_allowed" and body["param"] == "model"
            assert e.value.reason == "model_not_allowed"
    # GET /v1/models lists the model to this consumer exactly when it may use it, from the cache or not.
    other = make_exchange(headers={"Authorization": f"Bearer {consumer_key}"})
    auth.access(other)
    assert auth.model_visible(other, model) is allowed
    auth._allowed.clear()
    assert auth.model_visible(other, model) is allowed


def test_key_never_logged_or_in_metrics(auth, make_exchange, policy_ctx):
    for h in ({"Authorization": "Bearer sk-alice"}, {"Authorization": "Bearer sk-secret-wrong"}):
        try:
            run(auth, make_exchange(headers=h, model="gpt-4o"))
        except GatewayError:
            pass
    snap = orjson.dumps(policy_ctx.stats.snapshot()).decode() + policy_ctx.log.buffer.getvalue()
    assert "sk-alice" not in snap and "sk-secret" not in snap


def test_duplicate_key_rejected(policy_ctx):
    from fastgw.policies import FieldError
    with pytest.raises(FieldError) as e:
        KeyAuth(Config(consumers=[Consumer("a", [hash_key("k")]), Consumer("b", [hash_key("k")])]), policy_ctx)
    assert e.value.field == "consumers[1].keys[0]"


def test_good_keys_are_remembered_wrong_ones_never(auth, make_exchange, monkeypatch):
    from fastgw.policies.auth import policy as auth_mod
    for _ in range(2):
        assert run(auth, make_exchange(headers={"Authorization": "Bearer sk-alice"}, model="gpt-4o")).consumer == "alice"
        assert run(auth, make_exchange(headers={"api-key": "sk-carol-2"})).consumer == "carol"
    assert auth._seen == {hash(b"Bearer sk-alice"): auth._by_hash[hash_key("sk-alice")]}
    assert list(auth._seen_api_key) == [hash(b"sk-carol-2")]
    for bad in ({"Authorization": "Bearer sk-alicE"}, {"api-key": "sk-nobody"}, {"Authorization": "Basic sk-alice"}):
        with pytest.raises(GatewayError) as e:
            run(auth, make_exchange(headers=bad))
        assert e.value.status == 401
    assert len(auth._seen) == 1 and len(auth._seen_api_key) == 1
    # a remembered key still goes through the model check, and a "Basic" header still falls back to api-key
    with pytest.raises(GatewayError) as e:
        run(auth, make_exchange(headers={"Authorization": "Bearer sk-alice"}, model="gpt-3.5"))
    assert e.value.status == 403
    ex = run(auth, make_exchange(headers={"Authorization": "Basic x", "api-key": "sk-carol-2"}))
    assert ex.consumer == "carol" and ex.group == "open"
    monkeypatch.setattr(auth_mod, "_SEEN_MAX", 2)           # bounded: starts again empty when full
    for h in ("Bearer sk-dave", "Bearer  sk-dave", "bearer sk-dave"):
        assert run(auth, make_exchange(headers={"Authorization": h}, model="text-x")).consumer == "dave"
        assert len(auth._seen) <= 2


def test_the_cache_of_good_keys_never_holds_a_key(auth, make_exchange, monkeypatch):
    # A seen key is found again without SHA-256, by the hash of its header value: the value itself (the key in
    # plain text) is not kept, in the compiled path or the Python one.
    from fastgw.policies.auth import policy as auth_mod
    for access in (auth.access, KeyAuth.access.__get__(auth)):
        for h in ({"Authorization": "Bearer sk-alice"}, {"api-key": "sk-carol-2"}, {"authorization": "bearer sk-bob"}):
            for _ in range(2):
                access(make_exchange(headers=h))
    caches = (auth._seen, auth._seen_api_key)
    assert len(auth._seen) == 2 and len(auth._seen_api_key) == 1
    for cache in caches:
        assert all(type(k) is int for k in cache)
        assert all(type(e) is tuple and all(type(x) is str for x in e) for e in cache.values())
        assert "sk-" not in repr(cache)
    monkeypatch.setattr(auth_mod, "_SEEN_MAX", 3)                 # bounded
    for i in range(10):
        auth.access(make_exchange(headers={"Authorization": "Bearer" + " " * (i + 1) + "sk-dave"}))
        assert len(auth._seen) <= 3


def test_compiled_hooks_match_the_python_reference(policy_ctx, make_exchange):
    # Every request runs auth_lookup.pyx; KeyAuth.access and KeyAuth.request are its plain-Python reference.
    # Two policies from one config, the same random requests (good, wrong, missing keys in either header,
    # allowed and forbidden models, repeated so the caches of seen keys and of model rights are hit): the same
    # consumers, groups and refusals.
    import random

    cfg = Config(groups=[Group("research", ["gpt-4o*", "o3*"]), Group("open")],
                 consumers=[Consumer("alice", [hash_key("sk-alice")], group="research"),
                            Consumer("bob", [hash_key("sk-bob")], group="research", models=["gpt-4o-mini*"]),
                            Consumer("carol", [hash_key("sk-carol")], group="open"),
                            Consumer("dave", [hash_key("sk-dave")], models=["text-*"])])
    fast, ref = KeyAuth(cfg, policy_ctx), KeyAuth(cfg, policy_ctx)
    assert fast.access.__self__.__class__.__name__ == "KeyLookup"
    rng = random.Random(3)
    keys = ["sk-alice", "sk-bob", "sk-carol", "sk-dave", "sk-eve", ""]
    headers = [lambda k: {"Authorization": f"Bearer {k}"}, lambda k: {"authorization": f"bearer  {k} "},
               lambda k: {"api-key": k}, lambda k: {"Authorization": k}, lambda k: {},
               lambda k: {"Authorization": f"Basic {k}", "api-key": k}]

    def outcome(access, request, ex):
        try:
            access(ex)
            request(ex)
        except GatewayError as err:
            return err.status, orjson.loads(err.body())
        return ex.consumer, ex.group

    seen = set()
    for _ in range(800):
        h = rng.choice(headers)(rng.choice(keys))
        model = rng.choice(["gpt-4o", "gpt-4o-mini", "o3-mini", "text-embedding-3-small", "claude"])
        a = outcome(fast.access, fast.request, make_exchange(headers=h, model=model))
        b = outcome(KeyAuth.access.__get__(ref), KeyAuth.request.__get__(ref), make_exchange(headers=h, model=model))
        assert a == b, (h, model)
        seen.add(a[0])
    assert {401, 403, "alice", "bob", "carol", "dave"} <= seen
    assert fast._seen == ref._seen and fast._seen_api_key == ref._seen_api_key     # the same cache entries


def test_a_subclass_overriding_a_hook_keeps_its_own_code(policy_ctx, make_exchange):
    # The compiled hooks replace KeyAuth's own methods only: an override in a subclass runs as written.
    class Audited(KeyAuth):
        def access(self, ex):
            super().access(ex)
            ex.group = "audited:" + ex.group

    cfg = Config(consumers=[Consumer("alice", [hash_key("sk-alice")], group="g")])
    ex = make_exchange(headers={"Authorization": "Bearer sk-alice"})
    Audited(cfg, policy_ctx).access(ex)
    assert (ex.consumer, ex.group) == ("alice", "audited:g")
    assert KeyAuth(cfg, policy_ctx).access.__self__.__class__.__name__ == "KeyLookup"


# -- what the module docstring claims makes a constant-time compare unnecessary --------------------------------

def _trace(fn):
    """The calls fn makes, as (event, name) pairs: Python frames and C functions alike."""
    import gc
    import sys

    calls = []

    def prof(frame, event, arg):
        if event in ("call", "c_call"):
            calls.append((event, arg.__qualname__ if event == "c_call" else frame.f_code.co_qualname))

    gc.disable()                # a collection mid-trace runs gc callbacks (another test's), which are no key path
    sys.setprofile(prof)
    try:
        fn()
    except GatewayError:
        pass
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls


@pytest.mark.parametrize("header", ["authorization", "api-key", "x-api-key"])
def test_a_wrong_key_takes_the_same_path_however_much_of_a_good_key_it_shares(auth, make_exchange, header):
    # The presented key is only ever hashed and its digest looked up: a key one character off a good one and a key
    # sharing nothing with it run the very same calls (compiled hook and Python reference), so how far a compare
    # got can show in neither. (Inside the one dict lookup, a stored digest is compared with the caller's digest,
    # and only when their 64-bit hashes collide: the docstring's argument.)
    good = "sk-carol-1"
    near, far = good[:-1] + "X", "zq#7@!w$5k"
    assert len(near) == len(far) == len(good)

    def run(access, key):
        ex = make_exchange(headers={header: f"Bearer {key}" if header == "authorization" else key})
        return _trace(lambda: access(ex))

    for access in (auth.access, KeyAuth.access.__get__(auth)):
        assert run(access, near) == run(access, far)
        assert any(name == "openssl_sha256" for _, name in run(access, near))   # the key is hashed first


def test_a_stored_digest_is_no_key(auth, make_exchange):
    # Even the whole digest (leaked from a policy file, or learnt bit by bit from timings) does not open the door:
    # a key for it is a SHA-256 preimage.
    digest = hash_key("sk-alice")
    for value in (digest, "sha256:" + digest, digest.upper()):
        with pytest.raises(GatewayError) as e:
            auth.access(make_exchange(headers={"Authorization": f"Bearer {value}"}))
        assert e.value.status == 401


def test_keys_live_in_policy_files_only_as_digests(policy_ctx, tmp_path):
    from fastgw.policies import load_policy_file
    from fastgw.runtime.config import ConfigError

    path = tmp_path / "10-auth.toml"
    path.write_text('policy = "key-auth"\n[[consumers]]\nname = "a"\nkeys = ["sk-live-plain-key-9c2e"]\n')
    with pytest.raises(ConfigError) as e:
        load_policy_file(str(path), policy_ctx)
    assert "consumers[0].keys[0]" in str(e.value) and "not a key" in str(e.value)
    assert "sk-live-plain-key-9c2e" not in str(e.value)          # the refusal does not repeat it either
