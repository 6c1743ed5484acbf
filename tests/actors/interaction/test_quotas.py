"""Per-caller limits: sessions per tenant at the router, and background task starts per session."""

import asyncio

import pytest

from actors.interaction.quotas import Tenants, TokenBucket
from actors.interaction.placement import Direct
from actors.interaction.router import Router
from protocols import ProtocolError
from tests.fakes import FakePool

from tests.waits import until

from .helpers import chunk, exchange_then_step, make
from .test_router import Fake


def test_a_tenant_holds_at_most_its_limit_and_a_released_place_is_free_again():
    tenants = Tenants(limit=2)
    tenants.admit("s1", "alice")
    tenants.admit("s2", "alice")
    tenants.admit("s2", "alice")  # the same session again takes no second place
    with pytest.raises(ProtocolError) as info:
        tenants.admit("s3", "alice")
    assert info.value.code == "rate_limit_exceeded"
    tenants.admit("s3", "bob")  # another tenant is unaffected
    tenants.admit("s4", None)  # no tenant: not counted
    tenants.release("s1")
    tenants.release("s1")  # twice is harmless
    tenants.admit("s5", "alice")
    assert tenants.held == {"alice": 2, "bob": 1}


def test_a_bucket_allows_its_burst_then_its_rate():
    bucket = TokenBucket(rate_per_s=0.5, burst=2, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert not bucket.take(1.0)  # half a token
    assert bucket.take(2.0) and not bucket.take(2.0)
    assert [bucket.take(100.0) for _ in range(3)] == [True, True, False]  # never more than the burst


def test_the_router_refuses_a_tenants_session_past_its_limit_and_frees_it_on_leave_or_failure():
    async def main():
        a, b = Fake("a", capacity=8), Fake("b", capacity=8)
        router = Router({"a": (a, 8), "b": (b, 8)}, sessions_per_tenant=2)
        await router.place("s1", "alice")
        await router.place("s2", "alice")
        with pytest.raises(ProtocolError) as info:
            await router.place("s3", "alice")
        assert info.value.code == "rate_limit_exceeded" and "s3" not in router.where
        await router.place("s3", "bob")
        await router.leave("s1")
        await router.place("s4", "alice")
        # a join that fails everywhere leaves no place held
        full = Router({"a": (Fake("a", capacity=0), 0)}, sessions_per_tenant=1)
        with pytest.raises(ProtocolError):
            await full.place("x", "carol")
        assert full.tenants.held == {}
        direct = Direct(Fake("d", capacity=8), sessions_per_tenant=1)
        await direct.place("y", "dave")
        with pytest.raises(ProtocolError):
            await direct.place("z", "dave")
        await direct.leave("y")
        await direct.place("z", "dave")

    asyncio.run(main())


def test_a_session_asking_for_a_task_every_tick_gets_its_burst_and_the_other_session_its_task():
    async def scenario():
        pool = FakePool(replies=("working", "done"))
        inter = make(background=pool)
        inter.tasks.starts_per_s, inter.tasks.burst = 0.5, 2
        await inter.join("flood")
        await inter.join("calm")
        refusals = 0
        for tick in range(20):  # 4 s of ticks: the flooder asks every tick
            inter.now.t = tick * 0.2
            chunks = [chunk("flood", tick, text="please delegate again")]
            chunks.append(chunk("calm", tick, text="please delegate the weather" if tick == 12 else ""))
            got, _ = await exchange_then_step(inter, tick, chunks, ["flood", "calm"])
            assert {o.session_id for o in got} == {"flood", "calm"}  # both stepped every tick
            for out in got:
                codes = [e["error"]["code"] for e in out.events if e.get("type") == "error"]
                assert out.session_id == "flood" or not codes
                refusals += codes.count("rate_limit_exceeded")
        flood = [t for t in pool.tasks if t.session_id == "flood"]
        assert len(flood) == 2 + 1  # the burst, then one more as 2 s of ticks refilled a token (4 s at 0.5/s, less the first)
        assert refusals >= 20 - len(flood) - 1  # every other ask was refused out loud (the last one's event may still wait)
        (calm,) = [t for t in pool.tasks if t.session_id == "calm"]
        # its updates reached it (those the following ticks carried into the model, and any waiting)
        await until(lambda: inter.engine.sessions["calm"]["updates"] + inter.sessions["calm"].updates == ["working", "done"])
        assert calm.instruction == "please delegate the weather"
        assert (await inter.stats()).totals["tasks_refused"] == 20 - len(flood)

    asyncio.run(scenario())
