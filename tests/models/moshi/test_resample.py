"""Resampler: fed in blocks it gives what one pass gives; it keeps a tone's level and pitch."""

import math

import pytest
import torch

from models.moshi.resample import Resampler


@pytest.mark.parametrize("up, down, block", [(3, 2, 1280), (2, 3, 1920), (3, 2, 2), (2, 3, 3 * 7)])
def test_chunked_equals_one_shot(up, down, block):
    r = Resampler(up, down)
    x = torch.randn(3, block * 9)
    whole, _ = r(x, r.init_state(3))
    state, parts = r.init_state(3), []
    for i in range(9):
        y, state = r(x[:, i * block:(i + 1) * block], state)
        parts.append(y)
    assert torch.equal(torch.cat(parts, 1), whole)
    with pytest.raises(ValueError, match="whole number"):
        r(x[:, : down + 1], state)


def test_a_tone_keeps_its_level_and_pitch_both_ways():
    t = torch.arange(16_000) / 16_000
    tone = torch.sin(2 * math.pi * 440 * t)[None]
    up, down = Resampler(3, 2), Resampler(2, 3)
    y24, _ = up(tone, up.init_state(1))
    y16, _ = down(y24, down.init_state(1))
    assert y24.shape == (1, 24_000) and y16.shape == (1, 16_000)
    assert y24[0, 2000:].abs().max() == pytest.approx(1.0, abs=0.01)
    spectrum = torch.fft.rfft(y24[0, 2000:22_000]).abs()
    assert abs(spectrum.argmax().item() * 24_000 / 20_000 - 440) < 2
    delay = ((up.taps - 1) // 2 + (down.taps - 1) // 2) // 3  # both filters run at 48 kHz: 3 samples per 16 kHz one
    assert torch.allclose(y16[0, 4000:8000], tone[0, 4000 - delay:8000 - delay], atol=0.02)
