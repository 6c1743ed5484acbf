import math

import pytest
import torch

from models.features import DMel, FeatureConfig, mel_filterbank, patchify

SR = 16_000


@pytest.fixture(scope="module")
def dmel() -> DMel:
    return DMel()


def tone(freq: float, seconds: float, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(SR * seconds)) / SR
    return amplitude * torch.sin(2 * math.pi * freq * t)


def sweep_tone_noise(seconds: float = 3.0) -> torch.Tensor:
    t = torch.arange(int(SR * seconds)) / SR
    sweep = 0.3 * torch.sin(2 * math.pi * torch.cumsum(200 + 2000 * t / seconds, 0) / SR)
    noise = 0.02 * torch.randn(t.shape, generator=torch.Generator().manual_seed(0))
    return sweep + tone(440, seconds, 0.2) + noise


def test_chunked_equals_one_shot(dmel):
    audio = (sweep_tone_noise() * 32767).round().to(torch.int16)[None]  # (1, 48000)
    full = dmel.logmel_full(audio)
    state = dmel.init_state(1)
    assert state.shape == (1, dmel.cfg.win - dmel.cfg.hop)
    chunks = []
    for chunk in audio.split(3200, dim=1):
        logmel, state = dmel(chunk, state)
        assert logmel.shape == (1, 8, 80) and logmel.dtype == torch.float32
        chunks.append(logmel)
    assert full.shape == (1, 120, 80)
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_one_khz_tone_lights_its_mel_band(dmel):
    logmel = dmel.logmel_full(tone(1000, 1.0))[0, 4:]  # (T, 80), past the onset
    bin_1k = round(1000 * dmel.cfg.n_fft / SR)
    expected_band = int(dmel.fb[:, bin_1k].argmax())
    profile = logmel.mean(0)
    assert int(profile.argmax()) in (expected_band, expected_band + 1)
    centres = mel_filterbank(dmel.cfg).argmax(1) * SR / dmel.cfg.n_fft  # (80,) Hz at each triangle's peak
    far = (centres < 500) | (centres > 2000)
    assert profile[far].max() < profile.max() - 6.0  # at least 6 nats (52 dB) below the tone's band


def test_silence_and_dither_quantise_to_level_zero(dmel):
    silence = torch.zeros(2, 3200, dtype=torch.int16)
    codes = dmel.quantize(dmel(silence, dmel.init_state(2))[0])
    assert codes.shape == (2, 8, 80) and codes.dtype == torch.long
    assert int(codes.max()) == 0
    dither = torch.randint(-1, 2, (1, 16000), generator=torch.Generator().manual_seed(0), dtype=torch.int16)
    assert int(dmel.quantize(dmel.logmel_full(dither)).max()) == 0


def test_full_scale_tone_reaches_top_levels_without_clipping(dmel):
    for freq in (300, 1000, 6000):
        logmel = dmel.logmel_full(tone(freq, 0.5, amplitude=1.0))
        assert logmel.max() < dmel.cfg.hi  # below the top of the range: no clipping
        assert int(dmel.quantize(logmel).max()) >= dmel.cfg.levels - 2


def test_quantise_round_trip_within_half_a_level(dmel):
    cfg = dmel.cfg
    logmel = torch.linspace(cfg.lo, cfg.hi - 1e-4, 1000)
    codes = dmel.quantize(logmel)
    assert int(codes.min()) == 0 and int(codes.max()) == cfg.levels - 1
    step = (cfg.hi - cfg.lo) / cfg.levels
    assert (dmel.dequantize(codes) - logmel).abs().max() <= step / 2 + 1e-6
    assert torch.equal(dmel.quantize(dmel.dequantize(codes)), codes)


def test_int16_and_float_inputs_agree(dmel):
    pcm = (sweep_tone_noise(0.4) * 32767).round().to(torch.int16).view(2, 3200)
    from_int, _ = dmel(pcm, dmel.init_state(2))
    from_float, _ = dmel(pcm.float() / 32768, dmel.init_state(2))
    torch.testing.assert_close(from_int, from_float, atol=1e-6, rtol=0)


def test_config_is_frozen_and_consistent():
    cfg = FeatureConfig()
    assert cfg.frames_per_chunk * cfg.hop == cfg.samples_per_chunk == 3200
    assert FeatureConfig(tick_ms=100).frames_per_chunk == 4 and FeatureConfig(tick_ms=400).samples_per_chunk == 6400
    with pytest.raises(AttributeError):
        cfg.hop = 200


@pytest.mark.parametrize("tick_ms", [50, 100, 400])
def test_chunked_equals_one_shot_at_any_tick(dmel, tick_ms):
    audio = (sweep_tone_noise(1.2) * 32767).round().to(torch.int16)[None]
    n = FeatureConfig(tick_ms=tick_ms).samples_per_chunk
    state, chunks = dmel.init_state(1), []
    for chunk in audio.split(n, dim=1):
        logmel, state = dmel(chunk, state)
        chunks.append(logmel)
    torch.testing.assert_close(torch.cat(chunks, dim=1), dmel.logmel_full(audio), atol=1e-5, rtol=0)


def test_patchify_shape_and_row_major_order():
    frame = torch.zeros(1, 120, 160, 3, dtype=torch.uint8)  # 3 rows x 4 columns of patches
    for k in range(12):
        row, col = divmod(k, 4)
        frame[0, row * 40 : (row + 1) * 40, col * 40 : (col + 1) * 40] = k * 20
    patches = patchify(frame)
    assert patches.shape == (1, 12, 3, 40, 40) and patches.dtype == torch.float32
    expected = torch.arange(12) * 20 / 127.5 - 1.0
    torch.testing.assert_close(patches.mean(dim=(2, 3, 4))[0], expected)
    assert patches.amin(dim=(2, 3, 4)).equal(patches.amax(dim=(2, 3, 4)))  # each patch uniform
    black_and_white = torch.zeros(1, 40, 40, 3, dtype=torch.uint8)
    black_and_white[:, :, 20:] = 255
    patches = patchify(black_and_white)
    assert patches.min() == -1.0 and patches.max() == 1.0


def test_patchify_refuses_edges_off_the_patch_grid():
    with pytest.raises(ValueError):
        patchify(torch.zeros(1, 100, 160, 3, dtype=torch.uint8))


