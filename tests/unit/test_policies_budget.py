"""budget: price table, periods, reservation against the budget, settling with real cost, ex.cost."""
import calendar

import orjson
import pytest

from fastgw.errors import GatewayError
from fastgw.policies.budget.policy import Budget, BudgetRule, Config, Price, period_end, period_id
from fastgw.policies.budget.prices import PriceTable


def test_price_lookup():
    t = PriceTable({"mine": (1.0, 2.0)})
    assert t.lookup("gpt-4o") == (2.5, 10.0)
    assert t.lookup("gpt-4o-mini-2024-07-18") == (0.15, 0.6)     # longest prefix, not gpt-4o
    assert t.lookup("gpt-4o-2024-08-06") == (2.5, 10.0)
    assert t.lookup("gpt-4ox") is None and t.lookup("unknown") is None
    assert t.lookup("mine") == (1.0, 2.0)
    assert PriceTable(default=(5.0, 5.0)).lookup("unknown") == (5.0, 5.0)
    assert t.cost("gpt-4o", 1_000_000, 100_000) == pytest.approx(2.5 + 1.0)


def test_periods():
    t = calendar.timegm((2024, 2, 29, 13, 0, 0))   # a Thursday
    assert period_id("day", t) == t // 86400
    assert period_id("month", t) == 2024 * 12 + 1
    assert period_end("month", period_id("month", t)) == calendar.timegm((2024, 3, 1, 0, 0, 0))
    assert period_end("month", 2024 * 12 + 11) == calendar.timegm((2025, 1, 1, 0, 0, 0))
    monday = calendar.timegm((2024, 2, 26, 0, 0, 0))
    assert period_id("week", monday) == period_id("week", t) == period_id("week", monday + 7 * 86400 - 1)
    assert period_id("week", monday - 1) == period_id("week", t) - 1
    assert period_end("week", period_id("week", t)) == monday + 7 * 86400
    assert period_end("day", period_id("day", t)) == calendar.timegm((2024, 3, 1, 0, 0, 0))


def make(ctx, *budgets, **kw):
    return Budget(Config(budgets=list(budgets), id="b", **kw), ctx)


def finish(b, ex, prompt, completion, status=200):
    ex.status, ex.prompt_tokens, ex.completion_tokens = status, prompt, completion
    b.complete(ex)


def test_budget_stops_spend_at_the_limit(policy_ctx, make_exchange):
    # $1 per million tokens in and out: 1000 tokens = $0.001. Budget $0.01 a day.
    b = make(policy_ctx, BudgetRule(usd=0.01, consumer="*", period="day"), prices={"m": Price(1.0, 1.0)})
    admitted = 0
    for _ in range(50):
        ex = make_exchange(model="m", consumer="alice", prompt=500, max_tokens=500)   # estimate $0.001
        try:
            b.request(ex)
        except GatewayError as e:
            body = orjson.loads(e.body())["error"]
            assert e.status == 429 and body["type"] == body["code"] == "insufficient_quota"
            assert int(dict(e.headers)["retry-after"]) <= 86400
            assert e.reason == "budget"
            break
        admitted += 1
        finish(b, ex, 400, 600)                                                     # real cost $0.001 too
        assert ex.cost == pytest.approx(0.001)
    assert admitted == 10
    assert b.spent("alice") == pytest.approx(0.01)
    b.request(make_exchange(model="m", consumer="bob", prompt=500, max_tokens=500))   # bob has his own


def test_reservation_replaced_by_actual_cost(policy_ctx, make_exchange):
    b = make(policy_ctx, BudgetRule(usd=100.0, group="g"))
    ex = make_exchange(model="gpt-4o", consumer="a", group="g", prompt=1000, max_tokens=1000)
    b.request(ex)
    assert b.spent("g") == pytest.approx((1000 * 2.5 + 1000 * 10) / 1e6)
    finish(b, ex, 1000, 10)
    assert ex.cost == pytest.approx((1000 * 2.5 + 10 * 10) / 1e6)
    assert b.spent("g") == pytest.approx(ex.cost)
    ex = make_exchange(model="gpt-4o", consumer="a", group="g", prompt=1000, max_tokens=1000)
    b.request(ex)
    finish(b, ex, -1, -1, status=502)                  # failed upstream: the reservation is returned
    assert b.spent("g") == pytest.approx((1000 * 2.5 + 10 * 10) / 1e6)


def test_consumer_and_group_budgets_both_apply(policy_ctx, make_exchange):
    b = make(policy_ctx, BudgetRule(usd=1.0, consumer="*", period="day"), BudgetRule(usd=0.0, group="frozen"),
             prices={"m": Price(1.0, 1.0)})
    with pytest.raises(GatewayError) as e:
        b.request(make_exchange(model="m", consumer="a", group="frozen", prompt=10, max_tokens=10))
    assert "group 'frozen'" in e.value.message
    assert b.spent("a", 0) == 0.0                      # the consumer's reservation was given back
    ex = make_exchange(model="m", consumer="a", group="other", prompt=10, max_tokens=10)
    b.request(ex)
    assert b.spent("a", 0) == pytest.approx(20 / 1e6)


def test_anonymous_and_unpriced(policy_ctx, make_exchange):
    b = make(policy_ctx, BudgetRule(usd=0.0, consumer="*"))
    ex = make_exchange(model="m", consumer="")         # no consumer: consumer budgets do not apply
    assert b.request(ex) is None
    finish(b, ex, 10, 10)
    assert ex.cost == 0.0                              # no price for "m"
    ex = make_exchange(model="gpt-4o-mini", consumer="")
    finish(b, ex, 1_000_000, 0)
    assert ex.cost == pytest.approx(0.15)              # cost is set even without a budget



def test_refusal_names_the_period_and_the_figures(policy_ctx, make_exchange):
    b = make(policy_ctx, BudgetRule(usd=0.002, consumer="*", period="day"), prices={"m": Price(1.0, 1.0)})
    for _ in range(2):
        ex = make_exchange(model="m", consumer="a", prompt=500, max_tokens=500)     # $0.001 each
        b.request(ex)
        finish(b, ex, 500, 500)
    with pytest.raises(GatewayError) as e:
        b.request(make_exchange(model="m", consumer="a", prompt=500, max_tokens=500))
    assert "the daily budget of consumer 'a' ($0.002) is spent ($0.0020 used, this request is estimated at " \
           "$0.0010)" in e.value.message
    assert 1 <= int(dict(e.value.headers)["retry-after"]) <= 86400
    for period, adverb in (("week", "weekly"), ("month", "monthly")):
        w = make(policy_ctx, BudgetRule(usd=0.0, group="*", period=period), prices={"m": Price(1.0, 1.0)})
        with pytest.raises(GatewayError) as e:
            w.request(make_exchange(model="m", consumer="a", group="g", prompt=10, max_tokens=10))
        assert f"whole {adverb} budget of group 'g'" in e.value.message


def test_a_request_larger_than_the_whole_budget_says_so(policy_ctx, make_exchange):
    # Nothing spent yet, but this one request's estimate ($0.003) is more than the whole budget ($0.002): the
    # message must say that (not "$0.0000 used"), and waiting for the next period would not help.
    b = make(policy_ctx, BudgetRule(usd=0.002, consumer="*", period="day"), prices={"m": Price(1.0, 1.0)})
    with pytest.raises(GatewayError) as e:
        b.request(make_exchange(model="m", consumer="a", prompt=1000, max_tokens=2000))
    err = e.value
    assert err.status == 429 and err.code == err.type == "insufficient_quota"
    assert err.message == ("This request's estimated cost alone ($0.0030) exceeds the whole daily budget of "
                           "consumer 'a' ($0.002). Please reduce your prompt or max_tokens.")
    assert dict(err.headers) == {"x-should-retry": "false"}        # no Retry-After: no wait makes it fit
    assert b.spent("a") == 0.0
