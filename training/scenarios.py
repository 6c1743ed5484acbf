"""The scenarios: each writes one labelled dialogue of its kind into a `Script`.

`SCENARIOS` names them; `BUILDERS[name](script)` writes one, drawing its words (training/content.py),
timings and, for counting, its video (training/video.py) from the script's random generator.
Each records the events evaluation scores: turn ends, pauses, interruptions, backchannels, timed
requests, counts, typed text and background updates answered once they have entered the model.
"""

from __future__ import annotations

from training import content, video
from training.script import MODEL_VOICE, PLAY_DELAY_TICKS, ModelTurn, Script, Utterance

SCENARIOS = ("turn_end", "pause", "interruption", "backchannel", "timer", "counting", "typed", "update")


def _warmup(s: Script, p: float = 0.5) -> float:
    """Maybe an exchange first, so the scenario's event does not always open the dialogue."""
    t = s.rng.uniform(0.3, 1.2)
    if s.rng.random() < p:
        s.exchange(t)
        t = s.gap()
    return t


def turn_end(s: Script) -> None:
    t = s.rng.uniform(0.3, 1.2)
    for _ in range(s.rng.randint(2, 4)):
        s.exchange(t)
        t = s.gap(0.4, 1.5)


def pause(s: Script) -> None:
    t = _warmup(s, 0.4)
    for _ in range(s.rng.randint(1, 2)):
        (head, tail), reply = content.paused_turn(s.rng)
        parts = [head, s.rng.uniform(0.8, 2.5), tail]
        if s.rng.random() < 0.3:  # two pauses in one turn
            head2, _ = content.paused_turn(s.rng)[0]
            parts = [head, s.rng.uniform(0.8, 2.0), head2, s.rng.uniform(0.8, 2.0), tail]
        us = s.say(parts, t)
        for a, b in zip(us, us[1:]):
            s.events.append({"type": "pause", "start": a.end, "end": b.start, "expect": "hold"})
        s.reply(reply, us)
        t = s.gap()


def _long_turn(s: Script, t: float, sentences: int) -> tuple[list[Utterance], ModelTurn]:
    ask, answer = content.long_answer(s.rng, sentences)
    us = s.say(ask, t)
    return us, s.reply(answer, us)


def interruption(s: Script) -> None:
    t = _warmup(s, 0.3)
    _, turn = _long_turn(s, t, s.rng.randint(3, 5))
    at = turn.start + s.rng.uniform(1.0, max(1.2, min(6.0, turn.natural_end - turn.start - 1.5)))
    cut = s.rng.choice(content.INTERRUPTIONS)
    if s.rng.random() < 0.5:
        q, a = content.question(s.rng)
        us = s.say([cut, s.rng.uniform(0.05, 0.2), q], at, kind="interruption", gain_db=s.rng.uniform(1.0, 5.0))
    else:
        a = s.rng.choice(content.INTERRUPTION_REPLIES)
        us = s.say(cut, at, kind="interruption", gain_db=s.rng.uniform(1.0, 5.0))
    s.interrupt(turn, us)
    s.reply(a, us)


def backchannel(s: Script) -> None:
    t = _warmup(s, 0.3)
    _, turn = _long_turn(s, t, s.rng.randint(3, 5))
    lo, hi = turn.start + 1.0, turn.natural_end - 1.5
    n = s.rng.randint(1, 3)
    times = sorted(s.rng.uniform(lo, hi) for _ in range(n)) if hi > lo else []
    last = -1.0
    for at in times:
        if at < last + 1.0:
            continue
        u = s.say(s.rng.choice(content.BACKCHANNELS), at, kind="backchannel", gain_db=s.rng.uniform(-10.0, -2.0))
        s.events.append({"type": "backchannel", "start": u[0].start, "end": u[-1].end, "expect": "continue"})
        last = u[-1].end
    if s.rng.random() < 0.5:
        us = s.say(s.rng.choice(["Thanks, that was interesting.", "Cool, thank you.", "Okay, thanks."]), s.gap(0.5, 1.2))
        s.reply(s.rng.choice(["You are welcome.", "Glad you liked it."]), us)


TIMER_SECONDS = (3, 5, 8, 10, 12, 15, 20)


def timer(s: Script) -> None:
    t = _warmup(s, 0.3)
    seconds = s.rng.choice(TIMER_SECONDS)
    request, ack, done = content.timer_request(s.rng, seconds)
    us = s.say(request, t, kind="request")
    ack_turn = s.reply(ack, us)
    deadline = us[-1].end + seconds
    if seconds >= 10 and s.rng.random() < 0.5:  # chat while waiting; the deadline still holds
        q, a = content.question(s.rng)
        qu = s.say(q, ack_turn.end + s.rng.uniform(0.8, 2.0))
        if s.reply_tick(qu[-1].end) * s.cfg.tick_s + 3.0 < deadline:
            s.reply(a, qu)
        else:
            s.utterances = [u for u in s.utterances if u not in qu]
    tick = max(s.boundary_after(s.now + 0.4), round(deadline / s.cfg.tick_s))
    turn = s.speak([done], tick)
    s.events.append({"type": "timer", "seconds": seconds, "request_end": us[-1].end, "target_t": deadline,
                     "speak_t": turn.start, "speak_tick": turn.tick - PLAY_DELAY_TICKS})


def counting(s: Script) -> None:
    rng, size = s.rng, s.cfg.frame_size
    shape, motion = rng.choice(video.SHAPES), rng.choice(video.MOTIONS)
    count, period = rng.randint(1, 6), rng.randint(4, 8)
    background = tuple(rng.randint(0, 90) for _ in range(3))
    colour = tuple(rng.randint(150, 255) for _ in range(3))
    t = _warmup(s, 0.25)
    first = s.boundary_after(t) + rng.randint(1, 4)
    q, a = content.count_answer(rng, shape, motion, count)
    motion_end = (first + count * period) * s.cfg.tick_s
    us = s.say(q, motion_end + rng.uniform(0.2, 1.0), kind="question")
    turn = s.reply(a, us)
    last = s.boundary_after(turn.end + 1.5)
    frames = video.motion_frames(shape, motion, count, period, max(0, last - first - count * period), colour, background, size)
    rest = frames[-1]
    for k in range(0, last + 1):
        s.frames[k] = frames[k - first] if first <= k < first + len(frames) else rest
    s.events.append({"type": "count", "count": count, "shape": shape, "motion": motion, "motion_start": first * s.cfg.tick_s,
                     "motion_end": motion_end, "question_end": us[-1].end, "answer": a, "reply_tick": turn.tick - PLAY_DELAY_TICKS})


def _answer_when_entered(s: Script, entered: int, sentences: list[str], busy: ModelTurn | None) -> ModelTurn:
    """Say `sentences` once input tick `entered` has been seen: after the model's current sentence
    (appended to `busy`), or after the user's turn if the user is speaking, or right away."""
    ready = (entered + PLAY_DELAY_TICKS) * s.cfg.tick_s
    if busy is not None and busy.start <= ready < busy.natural_end:
        busy.finish_sentence_after(ready)
        busy.sentences += [(x, s.synth.render(x, MODEL_VOICE)) for x in sentences]
        return busy
    talking = [u for u in s.utterances if u.start <= ready + s.cfg.min_silence_s and u.end > ready - s.cfg.min_silence_s]
    tick = entered + PLAY_DELAY_TICKS
    if talking:
        tick = max(tick, s.reply_tick(max(u.end for u in talking)))
    return s.speak(sentences, tick)


def typed(s: Script) -> None:
    text, answer = content.typed_message(s.rng)
    if s.rng.random() < 0.5:  # while the model is talking
        _, busy = _long_turn(s, _warmup(s, 0.3), s.rng.randint(3, 4))
        k = s.tick_of(busy.start + s.rng.uniform(0.5, 3.0))
    else:
        busy = None
        k = s.boundary_after(_warmup(s, 0.6) + s.rng.uniform(0.0, 1.5))
    entered = s.entered_tick(k, text, s.cfg.text_per_tick)
    s.typed[k] = text
    turn = _answer_when_entered(s, entered, [answer], busy)
    s.events.append({"type": "typed", "tick": k, "t": k * s.cfg.tick_s, "text": text, "entered_tick": entered,
                     "reply_t": turn.sentence_ends()[-1] - turn.sentences[-1][1].end + turn.sentences[-1][1].start,
                     "while_speaking": busy is not None})


def update(s: Script) -> None:
    t = _warmup(s, 0.3)
    ask, ack, result = content.lookup(s.rng)
    us = s.say(ask, t, kind="request")
    delegate_tick = s.reply_tick(us[-1].end) - PLAY_DELAY_TICKS  # a silent output tick
    task_id = f"task_{s.rng.getrandbits(48):012x}"
    s.tasks.append((delegate_tick, task_id))
    ack_turn = s.reply(ack, us, delay_ticks=1)
    mode = s.rng.choice(["idle", "user", "model"])
    busy = None
    if mode == "idle":
        k = s.boundary_after(ack_turn.end + s.rng.uniform(0.5, 3.0))
    elif mode == "user":
        u = s.say(s.rng.choice(["Thanks, no rush.", "Take your time, I am not in a hurry.", "Great, I will wait."]),
                  ack_turn.end + s.rng.uniform(0.4, 1.0))
        k = s.tick_of(s.rng.uniform(u[0].start, u[-1].end))
    else:
        _, busy = _long_turn(s, ack_turn.end + s.rng.uniform(0.4, 1.0), s.rng.randint(3, 4))
        k = s.tick_of(busy.start + s.rng.uniform(0.5, 3.0))
    entered = s.entered_tick(k, result, s.cfg.bg_per_tick)
    s.updates.append((k, task_id, result))
    turn = _answer_when_entered(s, entered, [result], busy)
    s.events.append({"type": "update", "tick": k, "t": k * s.cfg.tick_s, "text": result, "task_id": task_id,
                     "delegate_tick": delegate_tick, "entered_tick": entered, "mode": mode,
                     "reply_t": turn.sentence_ends()[-1] - turn.sentences[-1][1].end + turn.sentences[-1][1].start})


BUILDERS = {"turn_end": turn_end, "pause": pause, "interruption": interruption, "backchannel": backchannel,
            "timer": timer, "counting": counting, "typed": typed, "update": update}
assert tuple(BUILDERS) == SCENARIOS
