"""Plugin hooks called one at a time through gateway.testing (no gateway, no server): the
unit layer under the full-stack plugin tests."""

from __future__ import annotations

import dataclasses

import pytest
from redis.crc import key_slot

from gateway import testing
from gateway.plugin import ResponseHead
from gateway.redis import Keys
from plugins.cart import Cart, CartInstruction, parse
from plugins.page_cache import PageCache
from plugins.rate_limit import Decision, RateLimit
from plugins.viewed_items import ViewedItems

from ..conftest import RedisServer


def test_cart_parses_its_instructions_in_apply_order() -> None:
    got = parse(
        {
            "x-session-cart-add": "sku=a; qty=2; price=1.50",
            "x-session-cart-clear": "1",
            "x-session-cart-remove": "sku=b",
        }
    )
    assert got == [
        CartInstruction("clear", {"clear": "1"}),
        CartInstruction("remove", {"sku": "b"}),
        CartInstruction("add", {"sku": "a", "qty": "2", "price": "1.50"}),
    ]
    assert parse({"x-session-cart-clear": "maybe", "x-session-cart-add": "sku=a; sku=b"}) == []


def test_cart_and_viewed_items_ask_the_core_for_their_keys() -> None:
    svc = testing.services(testing.settings_for_tests(session={"key_prefix": "shop1:"}))
    ctx = testing.context("GET", "/products/x")
    cart = testing.plugin(Cart, svc=svc)
    assert cart.prefetch(ctx, "abc") == (
        ("HGETALL", "shop1:cart:abc"),
        ("GET", "shop1:cart_merged:abc"),
    )
    viewed = testing.plugin(ViewedItems, {"header": True, "keep": 5}, svc)
    assert viewed.prefetch(ctx, "abc") == (("ZREVRANGE", "shop1:viewed:abc", "0", "4"),)
    assert Cart.instructions == {
        "cart": ("X-Session-Cart-Add", "X-Session-Cart-Remove", "X-Session-Cart-Clear")
    }


async def test_cart_keys_keep_each_users_cart_in_the_users_slot() -> None:
    """Under Redis Cluster's hash tags each cart script touches one slot: a guest's cart
    with its session, a user's cart with the user's index."""
    svc = testing.services()
    svc = dataclasses.replace(svc, keys=Keys(hash_tags=True))
    cart = testing.plugin(Cart, svc=svc)
    await cart.startup()
    guest, user = testing.session(), testing.session("42")
    assert cart.cart_key(guest) == f"cart:{{{guest.key_id}}}"
    assert key_slot(cart.cart_key(guest).encode()) == key_slot(
        svc.keys.session(guest.key_id).encode()
    )
    assert cart.cart_key(user) == "user_cart:{u:42}"
    assert key_slot(cart.cart_key(user).encode()) == key_slot(
        svc.keys.user_sessions("42").encode()
    )
    # Once this process has seen the session, its user's cart rides on the lookup.
    ctx = testing.context("GET", "/cart", session=user)
    ctx.prefetched["cart"] = [{}, None]
    ctx.state["cart"] = cart.prefetch(ctx, user.key_id)[0][1]
    await cart.request(ctx)
    assert cart.prefetch(ctx, user.key_id)[0] == ("HGETALL", "user_cart:{u:42}")


async def test_rate_limit_response_hook_alone() -> None:
    rl = testing.plugin(RateLimit, {"limit": 10, "window": 30})
    await rl.startup()
    ctx = testing.context("GET", "/x")
    ctx.state["rate_limit"] = Decision(True, 7, 12)
    head = ResponseHead(200, testing.CIMultiDict(), from_upstream=True)
    await rl.response(ctx, head)
    assert dict(head.headers) == {
        "RateLimit-Limit": "10",
        "RateLimit-Remaining": "7",
        "RateLimit-Reset": "12",
        "RateLimit-Policy": "10;w=30",
    }


async def test_rate_limit_request_hook_against_a_real_redis(redis_server: RedisServer) -> None:
    rl = testing.plugin(
        RateLimit,
        {"per": "address", "limit": 2, "window": 60},
        testing.services(redis_url=redis_server.url),
    )
    await rl.startup()
    answers = [await rl.request(testing.context(client_address="198.51.100.7")) for _ in range(3)]
    assert answers[:2] == [None, None]
    assert answers[2] is not None and answers[2].status == 429
    # Another address has its own budget.
    assert await rl.request(testing.context(client_address="198.51.100.8")) is None
    await rl.services.redis.aclose()


@pytest.mark.parametrize(
    ("method", "headers", "eligible"),
    [
        ("GET", {}, True),
        ("HEAD", {}, True),
        ("POST", {}, False),
        ("GET", {"Authorization": "Bearer x"}, False),
        ("GET", {"X-HTTP-Method-Override": "DELETE"}, False),
        ("GET", {"Content-Length": "4"}, False),
    ],
)
async def test_page_cache_eligibility_alone(
    method: str, headers: dict[str, str], eligible: bool
) -> None:
    pc = testing.plugin(PageCache, {"paths": ["/products/"]})
    await pc.startup()
    ctx = testing.context(method, "/products/a", headers=headers)
    assert pc._eligible(ctx) is eligible
    logged_in = testing.context("GET", "/products/a", session=testing.session("7"))
    assert pc._eligible(logged_in) is False


def test_a_session_for_hooks() -> None:
    s = testing.session("7", username="ann")
    assert s.authenticated and s.user_id == "7" and s.fields["username"] == "ann"
