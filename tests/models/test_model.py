"""The model: streaming equals one full pass, MoE dispatch, sizes, training step."""

from __future__ import annotations

import pickle

import pytest
import torch

from models.config import PRESETS, InteractionConfig
from models.engine import StreamingEngine
from models.model import InteractionModel, TickInputs, build_model
from models.transformer import MoE
from tests.models.helpers import TracingEngine, make_chunk, micro, step_ok


def _run_traced(dtype, ticks=40, sessions=("a", "b"), tick_ms=200):
    torch.manual_seed(0)
    window = micro(tick_ms=tick_ms, window=100).max_tokens_per_tick + 3  # 24 at 200 ms
    eng = TracingEngine(micro(tick_ms=tick_ms, window=window), max_sessions=4, dtype=dtype)
    for s in sessions:
        eng.add_session(s)
    for k in range(ticks):
        if k == 7:
            eng.push_update("a", "weather: sunny, 21C")
        chunks = [make_chunk(s, k, seed=i, tick_ms=tick_ms, text="hello there" if (k, s) in {(2, "a"), (11, "b")} else "")
                  for i, s in enumerate(sessions)]
        step_ok(eng, chunks)
    return eng


@pytest.mark.parametrize("dtype, atol, tick_ms", [(torch.float64, 1e-9, 200), (torch.float32, 1e-4, 200),
                                                  (torch.float64, 1e-9, 100), (torch.float64, 1e-9, 400)])
def test_streaming_equals_one_full_pass(dtype, atol, tick_ms):
    """40 ticks with a window of about two ticks, so the ring wraps over a dozen times; frames, text, a
    background update: per-tick predictions from the KV-cached stream equal one teacher-forced full
    pass, at the usual tick and at shorter and longer ones."""
    eng = _run_traced(dtype, tick_ms=tick_ms)
    f = tick_ms // 25
    for sid in ("a", "b"):
        trace = eng.trace[sid]
        ticks = TickInputs.cat([t["inputs"] for t in trace])
        assert ticks.video_rows and any(ticks.text_ids) and (sid != "a" or any(ticks.bg_ids))
        noise = torch.stack([t["noise"] for t in trace])
        with torch.inference_mode():
            ref = eng.model.reference_forward(ticks, noise, block=16)
        ctrl = torch.stack([t["ctrl_logits"] for t in trace])
        text = torch.stack([t["text_logits"] for t in trace])
        mel = torch.stack([t["mel"] for t in trace])
        torch.testing.assert_close(ctrl, ref["ctrl_logits"], atol=atol, rtol=0)
        torch.testing.assert_close(text, ref["text_logits"], atol=atol, rtol=0)
        torch.testing.assert_close(mel, ref["mel"], atol=atol * 100, rtol=0)
        assert ctrl.argmax(-1).tolist() == ref["ctrl_logits"].argmax(-1).tolist()
        assert text.argmax(-1).tolist() == ref["text_logits"].argmax(-1).tolist()
        assert ticks.mel_codes.shape[1:] == (f, eng.cfg.n_mels) and mel.shape[1] == f
        # The sequence really is longer than the window: old tokens must have been dropped.
        assert int(eng.rows["pos"][eng.sessions.index(sid)]) > 12 * eng.cfg.window


def test_one_full_pass_differs_without_window():
    """The check above can fail: the same trace under full causal attention gives other logits."""
    eng = _run_traced(torch.float64, ticks=12, sessions=("a",))
    trace = eng.trace["a"]
    ticks = TickInputs.cat([t["inputs"] for t in trace])
    noise = torch.stack([t["noise"] for t in trace])
    wide = eng.model.cfg.replace(window=10_000)
    eng.model.cfg = eng.model.transformer.cfg = wide
    with torch.inference_mode():
        ref = eng.model.reference_forward(ticks, noise)
    ctrl = torch.stack([t["ctrl_logits"] for t in trace])
    assert (ctrl - ref["ctrl_logits"]).abs().max() > 1e-6


@pytest.mark.parametrize("skew", [0.0, 4.0], ids=["balanced-bmm", "skewed-per-expert"])
def test_moe_grouped_dispatch_matches_per_token_reference(skew):
    torch.manual_seed(0)
    cfg = micro(n_experts=8, top_k=2)
    moe = MoE(cfg).double()
    moe.reset_parameters(0.2, 0.2)
    torch.nn.init.normal_(moe.shared.w1.weight, std=0.2)
    x = torch.randn(37, cfg.d_model, dtype=torch.float64) + (1.0 if skew else 0.0)
    with torch.no_grad():
        moe.router.weight[0] += skew / cfg.d_model  # expert 0 takes every token when skewed
    moe.eval()
    counts = torch.bincount(moe.router(x).topk(2, -1)[1].flatten(), minlength=8)
    assert (8 * counts.max() <= 2 * 37 * 2) == (skew == 0)  # each case takes its dispatch path
    y, aux = moe(x)
    assert aux is None
    probs = torch.softmax(moe.router(x), -1)
    w, idx = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    ref = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(2):
            e = int(idx[t, j])
            g, u = (x[t] @ moe.w13[e]).chunk(2)
            ref[t] += w[t, j] * ((torch.nn.functional.silu(g) * u) @ moe.w2[e])
    ref += moe.shared(x)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    # A token's output does not depend on the other tokens in the batch.
    torch.testing.assert_close(moe(x[:5])[0], y[:5], atol=1e-12, rtol=0)
    moe.train()
    _, aux = moe(x)
    assert aux is not None and aux.item() >= 1.0 - 1e-9  # E * sum f_e P_e >= 1, equality when balanced
    assert (aux.item() > 1.5) == (skew > 0)


def test_gpu12b_shape_on_meta_device():
    cfg = PRESETS["gpu12b"]
    model = build_model(cfg, "meta", torch.bfloat16)
    active, total = model.num_params(active=True), model.num_params()
    assert abs(active - 12e9) / 12e9 < 0.10, active
    assert total * 2 < 60e9  # bf16 weights leave room for 64 sessions' caches on an 80 GB H100
    assert all(p.is_meta for p in model.parameters())


def test_presets_and_config_round_trip():
    for name, cfg in PRESETS.items():
        assert InteractionConfig.preset(name) is cfg
        back = InteractionConfig.from_dict(pickle.loads(pickle.dumps(cfg.to_dict())))
        assert back == cfg
        assert cfg.window >= cfg.max_tokens_per_tick
    with pytest.raises(KeyError):
        InteractionConfig.preset("huge")
    tiny = PRESETS["tiny"]  # 512-token window; a quiet tick is 10 tokens, 26 with a 160x160 frame
    assert (tiny.tokens_per_tick(False), tiny.tokens_per_tick(True)) == (10, 26)
    assert tiny.horizon_s(False) == pytest.approx(10.24) and tiny.horizon_s(True) == pytest.approx(512 / 26 * 0.2)
    assert tiny.replace(tick_ms=400).horizon_s(False) == pytest.approx(512 / 18 * 0.4)
    with pytest.raises(ValueError):
        micro(window=8)  # cannot hold one tick
    with pytest.raises(ValueError):
        micro(n_heads=3)


def test_embed_layout():
    torch.manual_seed(0)
    cfg = micro()
    model = InteractionModel(cfg).eval()
    b, f, m = 3, cfg.frames_per_tick, cfg.n_mels
    inp = TickInputs(
        torch.randint(0, 16, (b, f, m)), torch.randint(0, 16, (b, f, m)), torch.tensor([0, 1, 2]),
        torch.full((b, cfg.text_out), model.tokenizer.pad_id), torch.tensor([0, 5, 9]),
        torch.randn(1, cfg.n_patches, 3, cfg.patch, cfg.patch), [1], [[], [104, 105], []], [[], [], [model.tokenizer.bg_id]],
    )
    x, lens = model.embed(inp)
    assert lens.tolist() == [1 + f + 1, 1 + f + cfg.n_patches + 2 + 1, 1 + f + 1 + 1]
    assert x.shape == (b, max(lens.tolist()), cfg.d_model)
    assert torch.all(x[0, lens[0]:] == 0)  # padding stays zero
    torch.testing.assert_close(x[0, lens[0] - 1], model.embed_in.tok.weight[model.tokenizer.out_id])


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    eng = _run_traced(torch.float32, ticks=12, sessions=("a",))
    ticks = TickInputs.cat([t["inputs"] for t in eng.trace["a"]])
    model = InteractionModel(micro())
    k, cfg = ticks.batch, model.cfg
    targets = {
        "ctrl": torch.arange(k) % cfg.n_controls,
        "text": torch.randint(0, 256, (k, cfg.text_out)),
        "mel": torch.randn(k, cfg.frames_per_tick, cfg.n_mels) * 2,
    }
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        parts = model.loss(ticks, targets, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        losses.append(parts["loss"].item())
    assert parts["balance"].item() > 0
    assert losses[-1] < 0.7 * losses[0], losses


def test_small_preset_runs_on_cpu():
    """The same code path at the `small` shape: a few ticks for two sessions, outputs sane."""
    eng = StreamingEngine("small", max_sessions=2)
    assert 0.1e9 < eng.model.num_params() < 0.2e9
    for s in ("a", "b"):
        eng.add_session(s)
    for k in range(3):
        outs = step_ok(eng, [make_chunk("a", k, 0, frame_size=160, video_every=1), make_chunk("b", k, 1, frame_size=None)])
    assert [o.seq for o in outs] == [2, 2] and all(o.audio.shape == (3200,) for o in outs)


@pytest.mark.parametrize("tick_ms", [100, 400])
def test_a_preset_at_another_tick_length_builds_and_steps(tick_ms):
    """The tick is one setting: `tiny` at 100 or 400 ms takes and gives that much audio a chunk,
    with frames, tokens and the clock to match."""
    cfg = PRESETS["tiny"].replace(tick_ms=tick_ms)
    assert cfg.frames_per_tick == tick_ms // 25 and cfg.samples_per_tick == 16 * tick_ms
    eng = StreamingEngine(cfg, max_sessions=2)
    assert eng.tick_ms == tick_ms
    eng.add_session("a")
    for k in range(3):
        (out,) = step_ok(eng, [make_chunk("a", k, 0, frame_size=160, tick_ms=tick_ms)])
        assert out.audio.shape == (16 * tick_ms,) and out.seq == k
    _, errors = eng.step([make_chunk("a", 3, 0, frame_size=160)])  # a 200 ms chunk
    assert errors["a"].code == "invalid_audio" and f"{16 * tick_ms} samples" in str(errors["a"])
    with pytest.raises(ValueError, match="tick_ms"):
        PRESETS["tiny"].replace(tick_ms=210)
