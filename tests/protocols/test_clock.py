"""TickClock: the one place tick arithmetic lives."""

import pytest

from protocols import ProtocolError, TickClock, check_tick_ms


def test_ticks_cover_half_open_spans_from_the_origin():
    clock = TickClock(100.0, 200)
    assert clock.start(0) == 100.0 and clock.end(0) == pytest.approx(100.2)
    assert clock.tick_at(100.0) == 0 and clock.tick_at(100.1999) == 0 and clock.tick_at(100.2) == 1
    assert clock.tick_at(99.9) == -1
    assert clock.start(clock.tick_at(137.31)) <= 137.31 < clock.end(clock.tick_at(137.31))


@pytest.mark.parametrize("tick_ms, samples, frames", [(200, 3_200, 8), (100, 1_600, 4), (400, 6_400, 16), (50, 800, 2)])
def test_lengths_follow_the_tick(tick_ms, samples, frames):
    clock = TickClock(0.0, tick_ms)
    assert clock.samples() == samples and clock.frames == frames and clock.tick_s == tick_ms / 1000
    assert clock.samples(48_000) == samples * 3


@pytest.mark.parametrize("bad", [0, 10, 49, 2_025, 5_000, 200.0, True, "200", None])
def test_a_tick_a_model_cannot_be_trained_at_is_refused(bad):
    with pytest.raises(ProtocolError) as info:
        TickClock(0.0, bad)
    assert info.value.param == "tick_ms"
    with pytest.raises(ProtocolError):
        check_tick_ms(bad)


def test_a_tick_needs_no_25_ms_hops_since_the_model_decides_its_granularity():
    assert TickClock(0.0, 80).samples() == 1_280 and check_tick_ms(160) == 160


def test_a_clock_travels_as_a_dict_and_keeps_its_tick():
    clock = TickClock(1234.5, 100)
    back = TickClock.from_dict(clock.to_dict())
    assert back == clock
    assert TickClock.from_dict({"t0": 1.0, "tick_s": 0.4}).tick_ms == 400  # older peers sent seconds


def test_offset_moves_now_not_the_ticks():
    clock = TickClock(0.0, 200)
    ahead = clock.with_offset(0.5)  # this process's clock runs 0.5 s ahead of the origin's
    assert ahead.start(3) == clock.start(3)
    assert ahead.now() == pytest.approx(clock.now() - 0.5, abs=0.01)
    assert ahead.current() in (clock.current() - 3, clock.current() - 2)
