"""BufferedAudioInput, without any network."""

import numpy as np
import pytest

from actors.ingress.buffered_audio import BufferedAudioInput, InputBufferFull
from protocols.clock import TickClock

T0 = 1000.0  # the interaction clock's t0 in these tests


def tone(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


CLOCK = TickClock(T0, 200)


def test_audio_sent_faster_than_real_time_is_handed_out_one_tick_at_a_time():
    audio = BufferedAudioInput(CLOCK, max_s=2)
    audio.push(tone(16000, 0.5), 16000)  # faster than real time: kept, not dropped
    assert audio.pop_ready() == []
    got = [audio.pop_ready(until=k) for k in (3, 4)]
    assert [[seq for seq, _ in g] for g in got] == [[3], [4]]
    assert all(len(g[0][1]) == 3200 for g in got)


def test_a_partial_chunk_waits_until_the_client_is_quiet_for_a_tick():
    audio = BufferedAudioInput(CLOCK, max_s=2)
    audio.push(tone(16000, 0.1), 16000)
    assert audio.pop_ready(until=5) == []  # 100 ms: waits for more until the client is quiet a tick
    audio._last_push -= CLOCK.tick_s
    (seq, last), = audio.pop_ready(until=5)
    assert seq == 5 and last[:1500].any() and not last[1700:].any()


def test_more_than_max_s_buffered_is_refused_and_nothing_of_it_kept():
    audio = BufferedAudioInput(CLOCK, max_s=2)
    audio.push(tone(16000, 0.5), 16000)
    with pytest.raises(InputBufferFull):
        audio.push(tone(16000, 2.5), 16000)
    assert audio.buffered_s == 0.5
