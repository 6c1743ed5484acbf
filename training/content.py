"""What synthetic speakers say: question/answer templates, long answers, fillers, backchannels,
interruptions, timed requests, look-ups and counting questions. Every picker takes a
`random.Random`, so a dialogue's words are a function of its seed. Text is plain ASCII with
numbers spelled out, so that what espeak-ng says and the transcript agree word for word.
"""

from __future__ import annotations

import random

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    if not 0 <= n < 100:
        raise ValueError(f"number_words covers 0..99, got {n}")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Canada", "Ottawa"),
            ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"),
            ("Germany", "Berlin"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Chile", "Santiago")]
COLOURS = [("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("a banana", "yellow"), ("coal", "black"),
           ("a tomato", "red"), ("an orange", "orange"), ("a lemon", "yellow")]
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
OPPOSITES = [("hot", "cold"), ("up", "down"), ("early", "late"), ("big", "small"), ("fast", "slow"), ("open", "closed"),
             ("light", "dark"), ("happy", "sad")]
PLACES = ["Paris", "the beach", "the mountains", "my parents' house", "a trip to Rome", "the market", "the gym"]
FOODS = ["pizza", "soup", "pasta", "rice", "curry", "salad", "pancakes"]


def question(rng: random.Random) -> tuple[str, str]:
    """A short question or statement that ends a turn, and the model's reply."""
    kind = rng.randrange(8)
    if kind == 0:
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        return rng.choice([f"What is {number_words(a)} plus {number_words(b)}?", f"Can you add {number_words(a)} and {number_words(b)}?"]), \
            f"{number_words(a).capitalize()} plus {number_words(b)} is {number_words(a + b)}."
    if kind == 1:
        country, capital = rng.choice(CAPITALS)
        return rng.choice([f"What is the capital of {country}?", f"Do you know the capital of {country}?"]), f"The capital of {country} is {capital}."
    if kind == 2:
        thing, colour = rng.choice(COLOURS)
        return f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is usually {colour}."
    if kind == 3:
        i = rng.randrange(7)
        return f"What day comes after {DAYS[i]}?", f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}."
    if kind == 4:
        w, o = rng.choice(OPPOSITES)
        return f"What is the opposite of {w}?", f"The opposite of {w} is {o}."
    if kind == 5:
        place = rng.choice(PLACES)
        return rng.choice([f"I just got back from {place}.", f"I spent the weekend at {place}."]), \
            rng.choice(["Oh nice! How was it?", "That sounds lovely. Did you have fun?"])
    if kind == 6:
        food = rng.choice(FOODS)
        return f"I think I will have {food} for dinner.", rng.choice([f"{food.capitalize()} sounds good.", f"Nice, enjoy the {food}."])
    return rng.choice([("How are you today?", "I am doing well, thanks for asking."),
                       ("Can you hear me?", "Yes, I can hear you clearly."),
                       ("Thanks for your help.", "You are welcome."),
                       ("Good morning!", "Good morning! How can I help?")])


TOPICS = {
    "the moon": ["The moon is about a quarter the size of the earth.", "It takes roughly a month to go around us.",
                 "Its pull on the oceans causes the tides.", "People first walked on it in nineteen sixty-nine.",
                 "It has no air, so the sky there is always black."],
    "bees": ["Bees live in large colonies with one queen.", "They collect nectar and pollen from flowers.",
             "Honey is nectar that they dry and store in wax cells.", "A worker bee lives only a few weeks in summer.",
             "They talk to each other with a little dance."],
    "trains": ["The first steam trains ran about two hundred years ago.", "Today many trains are electric.",
               "Fast trains can go over three hundred kilometres an hour.", "They use much less energy than cars per person.",
               "Some lines run right under the sea."],
    "volcanoes": ["A volcano is an opening where melted rock comes out.", "The melted rock is called lava once it reaches the surface.",
                  "Some volcanoes sleep for thousands of years.", "Ash from a big eruption can cool the whole planet.",
                  "Iceland has many active volcanoes."],
    "coffee": ["Coffee comes from the seeds of a small red fruit.", "The seeds are roasted before they are ground.",
               "It was first drunk in Ethiopia and Yemen.", "A cup has about a hundred milligrams of caffeine.",
               "Brazil grows more coffee than any other country."],
    "penguins": ["Penguins are birds that cannot fly.", "They swim very well and catch fish under water.",
                 "Most of them live in the southern half of the world.", "Emperor penguins keep their eggs warm on their feet.",
                 "They huddle together to stay warm in winter."],
    "the ocean": ["The ocean covers most of the earth.", "Its deepest point is about eleven kilometres down.",
                  "Most of it has never been explored.", "It makes much of the oxygen we breathe.",
                  "Sound travels far under water."],
    "chess": ["Chess is played on a board of sixty-four squares.", "Each player starts with sixteen pieces.",
              "The goal is to trap the other king.", "The queen is the strongest piece.",
              "A game can last a few minutes or many hours."],
}


def long_answer(rng: random.Random, sentences: int = 4) -> tuple[str, list[str]]:
    """A request for a few sentences on a topic, and those sentences."""
    topic = rng.choice(sorted(TOPICS))
    ask = rng.choice([f"Can you tell me about {topic}?", f"Tell me something about {topic}.", f"What do you know about {topic}?"])
    return ask, TOPICS[topic][:sentences]


FILLERS = ["um", "uh", "hmm", "so", "well", "let me think"]
UNFINISHED = ["So I was thinking about", "And then we went to", "The thing is that", "I wanted to ask you about",
              "Yesterday I saw a", "My plan for today is to", "Could you maybe", "I'm not sure if I should"]
ENDINGS = ["the beach this weekend.", "a new place for lunch.", "my little brother.", "the blue one or the red one.",
           "call my friend later.", "go for a walk.", "buy a new phone.", "the trip next month."]


def paused_turn(rng: random.Random) -> tuple[list[str], str]:
    """A turn broken by a thinking pause: the phrase before the pause (unfinished, often with a
    filler), the phrase after it, and the model's reply to the whole."""
    head = rng.choice(UNFINISHED)
    if rng.random() < 0.7:
        filler = rng.choice(FILLERS)
        head = f"{head}, {filler}..." if rng.random() < 0.5 else f"{filler.capitalize()}, {head[0].lower() + head[1:]}..."
    else:
        head = head + "..."
    tail = rng.choice(ENDINGS)
    reply = rng.choice(["Okay, that sounds good.", "I see. Tell me more.", "Sure, that makes sense.", "Alright, good idea."])
    return [head, tail], reply


BACKCHANNELS = ["mm-hm", "yeah", "right", "okay", "uh-huh", "I see", "sure"]
INTERRUPTIONS = ["Wait, sorry, can I ask something?", "Hold on, stop for a second.", "Actually, never mind that.",
                 "Sorry to cut in, I have a question.", "No no, that's not what I meant.", "Wait, wait.",
                 "Hang on, let me ask you something else."]
INTERRUPTION_REPLIES = ["Sure, go ahead.", "Of course, what is it?", "Okay, I'm listening.", "No problem."]


def timer_request(rng: random.Random, seconds: int) -> tuple[str, str, str]:
    """(request, acknowledgement, what to say when the time has come)."""
    n = number_words(seconds)
    request = rng.choice([f"Tell me when {n} seconds have passed.", f"Let me know when {n} seconds are up.",
                          f"Can you tell me when {n} seconds have gone by?", f"Say stop after {n} seconds."])
    ack = rng.choice(["Okay.", "Sure, starting now.", "Alright, I will tell you."])
    done = "Stop." if request.startswith("Say stop") else rng.choice([f"{n.capitalize()} seconds have passed.", "Time is up."])
    return request, ack, done


LOOKUPS = [
    ("Can you check the weather in {city}?", "It is {n} degrees and {sky} in {city}."),
    ("Could you look up when the next train to {city} leaves?", "The next train to {city} leaves at {h} {m}."),
    ("Can you find out how far it is to {city}?", "It is about {n} kilometres to {city}."),
]
CITIES = ["Oslo", "Lyon", "Porto", "Bergen", "Turin", "Leeds", "Graz", "Ghent"]


def lookup(rng: random.Random) -> tuple[str, str, str]:
    """(request, acknowledgement, the background update's text, read out verbatim)."""
    ask, result = rng.choice(LOOKUPS)
    fill = dict(city=rng.choice(CITIES), n=number_words(rng.randint(2, 40)), sky=rng.choice(["sunny", "cloudy", "rainy", "windy"]),
                h=number_words(rng.randint(1, 12)), m=rng.choice(["fifteen", "thirty", "forty-five", "o'clock"]))
    return ask.format(**fill), rng.choice(["Sure, let me check.", "One moment, I will look that up."]), result.format(**fill)


READOUTS = ["The meeting moved to three o'clock.", "Buy milk, eggs and bread.", "Call the dentist on Friday.",
            "The door code is four two seven one.", "Dinner is at seven tonight.", "Remember to water the plants."]


def typed_message(rng: random.Random) -> tuple[str, str]:
    """Typed text and what the model says about it: a question it answers, or a note it reads out."""
    if rng.random() < 0.5:
        q, a = question(rng)
        return q, a
    note = rng.choice(READOUTS)
    return f"Please read this out: {note}", f"You wrote: {note}"


SHAPES = ["circle", "square", "triangle"]
MOTIONS = {  # motion -> (question, past tense verb for the answer)
    "bounce": ("How many times did the {shape} bounce?", "bounced"),
    "slide": ("How many times did the {shape} move across?", "moved across"),
    "pulse": ("How many times did the {shape} grow and shrink?", "grew and shrank"),
    "blink": ("How many times did the {shape} blink?", "blinked"),
}


def count_answer(rng: random.Random, shape: str, motion: str, count: int) -> tuple[str, str]:
    q, verb = MOTIONS[motion]
    times = {1: "once", 2: "twice"}.get(count, f"{number_words(count)} times")
    return q.format(shape=shape), rng.choice([f"It {verb} {times}.", f"The {shape} {verb} {times}."])
