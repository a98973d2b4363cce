"""The policy loader: registry, [config] tables, errors naming the file, the field and the problem."""
import os
import textwrap

import pytest

from fastgw.runtime.config import ConfigError
from fastgw.policies import load_policies, load_policy_file, resolve
from fastgw.policies.auth.policy import KeyAuth
from fastgw.policies.budget.policy import Budget
from fastgw.policies.ratelimit.policy import RateLimit

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "policies")


def write(d, name, text):
    p = d / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_shipped_examples_load(policy_ctx):
    policies = load_policies(EXAMPLES, policy_ctx)
    kinds = [type(p) for p in policies]
    assert kinds == [KeyAuth, RateLimit, Budget]          # sorted by priority
    rl = policies[1]
    assert rl.config.id == "20-rate-limit"                 # counters are named after the file
    assert [r.id for r in rl.rules] == ["automation-rps", "per-consumer-model", "o3-daily", "batch"]
    assert policies[2].prices.lookup("my-finetune") == (3.0, 12.0)
    img = policies[2].prices.media("my-image-model")
    assert img.per_image == {"standard/1024x1024": 0.03, "hd/1024x1024": 0.06} and img.default_quality == "standard"
    assert policies[2].prices.lookup("my-image-model") is None       # no token price given: none made up


def test_config_table_and_builtin_names(tmp_path, policy_ctx):
    write(tmp_path, "a.toml", """
        policy = "rate-limit"
        [config]
        backend = "local"
        [[config.rules]]
        requests = 5
    """)
    [p] = load_policies(str(tmp_path), policy_ctx)
    assert isinstance(p, RateLimit) and p.rules[0].requests == 5.0 and p.rules[0].id == "rules[0]"


@pytest.mark.parametrize("body,expect", [
    ('backend = "local"\n', "20-x.toml: policy: missing"),
    ('policy = "nope"\n', "20-x.toml: policy: unknown policy 'nope'"),
    ('policy = "os:path"\n', "20-x.toml: policy: 'os:path' is not a fastgw.policies.api.Policy subclass"),
    ('policy = "rate-limit"\n[[rules]]\nrequests = "ten"\n', "20-x.toml: rules[0].requests: Expected `int`, got `str`"),
    ('policy = "rate-limit"\n[[rules]]\nrequests = 1\nwindow = "fortnight"\n', "20-x.toml: rules[0].window: Invalid enum value 'fortnight'"),
    ('policy = "rate-limit"\n[[rules]]\nrequests = 1\nbogus = 2\n', "20-x.toml: rules[0]: Object contains unknown field `bogus`"),
    ('policy = "rate-limit"\n', "20-x.toml: (top level): Object missing required field `rules`"),
    ('policy = "rate-limit"\n[[rules]]\nwindow = "day"\n', "20-x.toml: rules[0]: set requests and/or tokens"),
    ('policy = "rate-limit"\n[[rules]]\nrequests = 1\nper = ["ip"]\n', "20-x.toml: rules[0].per[0]: unknown key 'ip'"),
    ('policy = "key-auth"\n[[consumers]]\nname = "a"\nkeys = ["sk-plaintext"]\n', "20-x.toml: consumers[0].keys[0]: expected a SHA-256 hex digest"),
    ('policy = "budget"\n[[budgets]]\nusd = 5.0\n', "20-x.toml: budgets[0]: name exactly one of consumer or group"),
    ('policy = "budget"\n[prices.m]\ninput = -1.0\n', "20-x.toml: prices.m: prices must be >= 0"),
    ('policy = "rate-limit"\nx = [\n', "20-x.toml: not valid TOML"),
])
def test_errors_name_file_field_and_problem(tmp_path, policy_ctx, body, expect):
    path = write(tmp_path, "20-x.toml", body)
    with pytest.raises(ConfigError) as e:
        load_policy_file(path, policy_ctx)
    assert str(e.value).startswith(path[: -len("20-x.toml")]) and expect in str(e.value), str(e.value)


def test_custom_policy_by_module_path(tmp_path, policy_ctx, monkeypatch):
    (tmp_path / "mypol.py").write_text(textwrap.dedent("""
        import msgspec
        from fastgw.policies.api import Policy, Reject

        class RequireUser(Policy):
            name = "require-user"
            priority = 500

            class Config(msgspec.Struct, forbid_unknown_fields=True):
                message: str = "the 'user' field is required"

            def request(self, ex):
                if getattr(ex.fields, "user", None) is None:
                    raise Reject(400, self.config.message, param="user", code="missing_user")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    d = tmp_path / "pol"
    d.mkdir()
    write(d, "50-user.toml", 'policy = "mypol:RequireUser"\nmessage = "who are you?"\n')
    [p] = load_policies(str(d), policy_ctx)
    assert type(p).__name__ == "RequireUser" and p.config.message == "who are you?"
    assert resolve("key-auth") is KeyAuth


def test_missing_directory(policy_ctx, tmp_path):
    with pytest.raises(ConfigError, match="not a directory"):
        load_policies(str(tmp_path / "none"), policy_ctx)
