#!/usr/bin/env python3
"""Generate the engine's sample corpus (train.txt, valid.txt, test.txt).

The corpus is the offline default training data of the GPT-2 fine-tuning
engine. It is entirely synthetic: every document is built by this script from
a small hand-written grammar of sentence templates (characters with names and
professions, places, objects, weather, small events, dialogue, numbers and
simple cause and effect). No third-party text is used.

Each output file holds one document per line (UTF-8, ``\\n`` line endings, no
blank lines). A document is a short story or note of 2-6 sentences that always
ends with a moral-style sentence from a small fixed set; some stories start
with "Once upon a time". A few templates and names contain non-ASCII
characters (café, naïve, Zoë, an em dash) so UTF-8 handling is exercised.

The grammar is varied enough to read like simple prose but regular enough that
a tiny randomly initialised GPT-2 learns it quickly, which makes the corpus
useful for smoke tests and short training runs.

Output is fully deterministic: the same ``--seed`` and document counts give
byte-identical files on any Python 3 version (only ``random.Random`` with an
integer seed, ``choice``/``randint``/``random`` and ordered containers are
used). The train, valid and test splits use the same grammar with different
random streams (seed, seed + 1 and seed + 2).

Usage::

    python make_corpus.py                      # writes next to this script
    python make_corpus.py --out-dir /tmp/corpus --seed 1234
"""

import argparse
import os
import random

# ---------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------

# (name, pronoun) -- pronoun is "she" or "he".
NAMES = [
    ("Mara", "she"), ("Tomas", "he"), ("Lena", "she"), ("Ivo", "he"),
    ("Priya", "she"), ("Osei", "he"), ("Hana", "she"), ("Felix", "he"),
    ("Rosa", "she"), ("Arjun", "he"), ("Nell", "she"), ("Bram", "he"),
    ("Sofia", "she"), ("Kenji", "he"), ("Amara", "she"), ("Olek", "he"),
    ("Wren", "she"), ("Dario", "he"), ("Ines", "she"), ("Theo", "he"),
    ("Greta", "she"), ("Yusuf", "he"), ("Eliza", "she"), ("Milo", "he"),
    ("Zora", "she"), ("Rafael", "he"), ("Noor", "she"), ("Jonas", "he"),
    ("Zoë", "she"), ("Anton", "he"),
]

PROFESSIONS = [
    "baker", "carpenter", "teacher", "doctor", "sailor", "farmer", "painter",
    "librarian", "blacksmith", "gardener", "potter", "tailor", "shepherd",
    "miller", "clockmaker", "mapmaker", "beekeeper", "weaver", "cook",
    "musician", "nurse", "engineer", "fisher", "innkeeper",
]

PLACES = [
    "the market", "the harbor", "the old mill", "the village square",
    "the library", "the bakery", "the forest", "the river bank", "the hill",
    "the station", "the café", "the lighthouse", "the garden", "the school",
    "the bridge", "the orchard", "the workshop", "the post office",
    "the town hall", "the beach", "the meadow", "the inn",
]

TOWNS = [
    "Millbrook", "Ashford", "Stonebridge", "Westhaven", "Larkfield",
    "Oakmere", "Brightwater", "Fernhill", "Redcliff", "Elmstead",
]

OBJECTS = [
    "umbrella", "basket", "lantern", "letter", "key", "map", "book", "kettle",
    "scarf", "bicycle", "ladder", "hammer", "compass", "notebook", "violin",
    "kite", "blanket", "boat", "clock", "mirror", "bell", "candle", "rope",
    "coat", "hat", "box", "teapot", "wheelbarrow", "fishing rod", "paintbrush",
]

ADJECTIVES = [
    "red", "blue", "green", "yellow", "old", "small", "heavy", "wooden",
    "silver", "brass", "bright", "worn", "new", "tiny", "large", "striped",
]

STATES = ["old", "dusty", "heavy", "cracked", "muddy", "wet", "bent", "faded"]

# (singular, plural)
ANIMALS = [
    ("cat", "cats"), ("dog", "dogs"), ("goat", "goats"), ("fox", "foxes"),
    ("owl", "owls"), ("horse", "horses"), ("duck", "ducks"), ("crow", "crows"),
    ("sheep", "sheep"), ("rabbit", "rabbits"), ("hen", "hens"),
    ("squirrel", "squirrels"), ("cow", "cows"), ("swan", "swans"),
    ("mouse", "mice"),
]

# Countable foods, plural form.
FOODS = [
    "apples", "pears", "eggs", "plums", "loaves of bread", "jars of honey",
    "carrots", "potatoes", "onions", "cakes", "pies", "lemons",
    "bowls of soup", "cups of tea", "biscuits",
]

FEELINGS = [
    "happy", "tired", "worried", "proud", "surprised", "calm", "curious",
    "nervous", "glad", "cheerful", "puzzled", "grateful",
]

# (cause clause for "Because ...", description sentence, what it calls for)
WEATHER = [
    ("it rained", "Rain fell over {place} all morning", "umbrella"),
    ("it snowed all night", "Snow covered {place} like a white blanket",
     "scarf"),
    ("the wind was strong", "A strong wind blew across {place}", "kite"),
    ("the sun was hot", "The sun was hot over {place}", "hat"),
    ("the fog was thick", "Thick fog hid {place} from view", "lantern"),
    ("the night was cold", "The night was cold and clear above {place}",
     "blanket"),
    ("the road was icy", "Ice made the road to {place} slippery", "rope"),
    ("a storm was coming", "Dark clouds gathered over {place}", "coat"),
    ("the river was high", "The river rose almost to {place}", "boat"),
    ("it was a fine spring day", "Spring flowers grew all around {place}",
     "basket"),
]

TIMES = [
    "in the morning", "at noon", "in the evening", "at dawn", "after lunch",
    "before supper", "late at night", "early one morning", "at sunset",
    "in the afternoon",
]

TIME_SHORT = ["noon", "sunset", "supper", "evening", "midnight", "dawn"]

DAYS = [
    "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday",
    "Sunday",
]

EVENTS = [
    "festival", "storm", "new bridge", "lost goat", "big race",
    "harvest fair", "concert", "wedding", "flood", "market day",
]

SKY = ["stars", "sunset", "clouds", "moon", "rain", "boats"]

COLORS = ["red", "orange", "pink", "gold", "grey", "purple", "silver"]

NUM_WORDS = [
    "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve",
]

# ---------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------
# Fields: {A} main character, {Ap} profession, {aAp} "a baker",
# {he}/{He}/{his}/{His}/{him} pronouns of A; {B}, {Bp}, {aBp}, {bhe}, {bhis},
# {bhim} for the second character; {place}, {place2}, {town}; {obj}, {obj2}
# (bare nouns), {adj}, {state}, {aobj} "a red umbrella", {theobj}
# "the red umbrella", {aobj2}; {animal}, {animals}; {food}; {feeling};
# {time}, {Time}, {tshort}, {day}; {num} (word), {numd} (digits), {price};
# {color}, {event}, {sky}, {w_cause}, {w_desc}, {w_need}.

OPENERS_ONCE = [
    "Once upon a time, there was {aAp} named {A} who lived near {place}.",
    "Once upon a time, in the town of {town}, lived {A}, {aAp}.",
    "Once upon a time, {A} the {Ap} found {aobj} at {place}.",
    "Once upon a time, {aAp} called {A} kept {num} {animals} behind "
    "{his} house.",
]

OPENERS = [
    "{A} was {aAp} who worked at {place}.",
    "{Time}, {A} the {Ap} walked to {place}.",
    "Every {day}, {A} opened the door of {his} little shop by {place}.",
    "On {day}, {A} woke up early and looked out of the window.",
    "There was once {aAp} called {A}.",
    "In the town of {town}, {A} the {Ap} was known for {his} {adj} {obj}.",
    "{w_desc} when {A} left home.",
    "Note from {A}, the {Ap} of {town}: {he} has lost {aobj}.",
    "Day {numd}. {A} arrived in {town} with only {aobj}.",
    "Last {day}, {A} and {B} met at {place}.",
]

EVENTS_T = [
    "{He} found {aobj} under a bench at {place}.",
    "{A} carried {theobj} all the way to {place}.",
    "On the way, {he} met {B}, {aBp}.",
    "{B} the {Bp} was waiting at {place2}.",
    "{A} counted {num} {animals} near {place2}.",
    "{He} bought {num} {food} for {price} coins.",
    "The {animal} followed {him} home.",
    "{A} gave {theobj} to {B}.",
    "{B} thanked {him} and put it in {bhis} bag.",
    "The {obj} was {state}, but it still worked.",
    "{He} spent the afternoon fixing {theobj}.",
    "At {place}, everyone was talking about the {event}.",
    "{A} and {B} shared {num} {food} and watched the {sky}.",
    "By {tshort}, the work was done.",
    "{He} wrote a letter to {B} and left it at the post office.",
    "Nobody knew who had left {aobj} at the door of {place}.",
    "{A} felt {feeling} and decided to go home.",
    "The {animal} ran across {place} and knocked over {aobj}.",
    "It took {him} {num} hours to reach {place2}.",
    "{B} lent {him} {aobj2} for the trip.",
    "The café on the corner was closed, so they went to {place2}.",
    "{A} did not want to seem naïve, so {he} asked {B} for advice.",
    "The sky over {place} turned {color} {time}.",
    "{A} laughed, because the {animal} had taken {his} {obj}.",
    "There were {numd} people at {place} that {day}.",
    "{He} tied {theobj} to the fence with a piece of rope.",
    "Later, {A} told the story to {his} friends at {place2}.",
    "The {Bp} said the {obj} was worth {price} coins.",
    "{A} put {theobj} on the shelf next to {aobj2}.",
    "{B} came by {time} with {num} {food}.",
    "{A} looked everywhere for {his} {obj} — it was in {his} pocket "
    "all along.",
    "The {animals} at {place} were {feeling} that day.",
]

DIALOGUE_T = [
    "\"Where is {theobj}?\" asked {A}.",
    "\"I left it at {place2},\" said {B}.",
    "\"We need {num} more {food},\" said {A} to {B}.",
    "{B} smiled and said, \"Thank you, {A}.\"",
    "\"Do not worry,\" said {B}. \"It will be ready by {tshort}.\"",
    "\"Is it far?\" asked {A}. \"Not at all,\" said {B} — \"just past "
    "{place2}.\"",
    "\"I have never seen {aobj} like this,\" said the {Bp}.",
    "\"Come quickly!\" shouted {B}. \"The {animal} is in {place}!\"",
    "\"How much is {theobj}?\" asked {A}. \"{Price} coins,\" said {B}.",
    "\"I feel {feeling} today,\" {A} told {B}.",
]

CAUSE_T = [
    "Because {w_cause}, {A} took the {adj} {w_need} to {place}.",
    "Because {B} was {feeling}, {A} made {bhim} a cup of tea.",
    "{A} was late, so {he} ran all the way to {place}.",
    "Since the {obj} was {state}, {A} asked {B} the {Bp} to fix it.",
    "When {w_cause}, nobody went to {place}.",
    "The bread burned because {A} forgot to watch the oven.",
    "After {A} fixed {theobj}, the whole street was {feeling}.",
    "Because the {animal} was hungry, {A} gave it some of {his} {food}.",
    "{A} missed the {event} because {he} was busy at {place}.",
]

MORALS = [
    "And so {A} learned that a small kindness can change a whole day.",
    "The moral of the story: help others, and they will help you.",
    "Sometimes the simplest plan is the best one.",
    "And that is why it is always wise to be prepared.",
    "In the end, good friends are worth more than gold.",
    "The lesson is simple: always look before you leap.",
    "And so they learned that honesty is the best policy.",
    "It goes to show that hard work pays off.",
    "The moral of the story: patience is its own reward.",
    "And so everyone agreed that sharing makes a good day better.",
]

MAX_LINE_CHARS = 600


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------

def article(phrase):
    """Return phrase with the right indefinite article ("a"/"an")."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def cap(text):
    return text[0].upper() + text[1:]


PRONOUNS = {
    "she": {"he": "she", "his": "her", "him": "her"},
    "he": {"he": "he", "his": "his", "him": "him"},
}


def make_context(rng):
    """Draw the entities that stay fixed for one document."""
    a_name, a_pro = rng.choice(NAMES)
    b_name, b_pro = rng.choice(NAMES)
    while b_name == a_name:
        b_name, b_pro = rng.choice(NAMES)
    a_prof = rng.choice(PROFESSIONS)
    b_prof = rng.choice(PROFESSIONS)
    place = rng.choice(PLACES)
    place2 = rng.choice(PLACES)
    while place2 == place:
        place2 = rng.choice(PLACES)
    obj = rng.choice(OBJECTS)
    adj = rng.choice(ADJECTIVES)
    w_cause, w_desc, w_need = rng.choice(WEATHER)
    animal, animals = rng.choice(ANIMALS)
    time = rng.choice(TIMES)
    ctx = {
        "A": a_name, "Ap": a_prof, "aAp": article(a_prof),
        "he": PRONOUNS[a_pro]["he"], "He": cap(PRONOUNS[a_pro]["he"]),
        "his": PRONOUNS[a_pro]["his"], "His": cap(PRONOUNS[a_pro]["his"]),
        "him": PRONOUNS[a_pro]["him"],
        "B": b_name, "Bp": b_prof, "aBp": article(b_prof),
        "bhe": PRONOUNS[b_pro]["he"], "bhis": PRONOUNS[b_pro]["his"],
        "bhim": PRONOUNS[b_pro]["him"],
        "place": place, "place2": place2, "town": rng.choice(TOWNS),
        "obj": obj, "adj": adj, "aobj": article(adj + " " + obj),
        "theobj": "the " + adj + " " + obj,
        "animal": animal, "animals": animals,
        "time": time, "Time": cap(time), "day": rng.choice(DAYS),
        "w_cause": w_cause, "w_desc": cap(w_desc.format(place=place)),
        "w_need": w_need, "event": rng.choice(EVENTS),
    }
    return ctx


def fresh_slots(rng, ctx):
    """Slots redrawn for every sentence, so sentences vary within a story."""
    obj2 = rng.choice(OBJECTS)
    while obj2 == ctx["obj"]:
        obj2 = rng.choice(OBJECTS)
    price = str(rng.randint(2, 60))
    return {
        "obj2": obj2,
        "aobj2": article(rng.choice(ADJECTIVES) + " " + obj2),
        "state": rng.choice(STATES),
        "food": rng.choice(FOODS),
        "feeling": rng.choice(FEELINGS),
        "tshort": rng.choice(TIME_SHORT),
        "num": rng.choice(NUM_WORDS),
        "numd": str(rng.randint(2, 99)),
        "price": price,
        "Price": price,
        "sky": rng.choice(SKY),
        "color": rng.choice(COLORS),
    }


def render(rng, template, ctx):
    slots = dict(ctx)
    slots.update(fresh_slots(rng, ctx))
    return cap(template.format(**slots))


def pick_body_template(rng, used):
    """Pick an unused middle-sentence template: events, dialogue or cause."""
    while True:
        r = rng.random()
        if r < 0.55:
            pool = EVENTS_T
        elif r < 0.80:
            pool = DIALOGUE_T
        else:
            pool = CAUSE_T
        template = rng.choice(pool)
        if template not in used:
            used.append(template)
            return template


def make_document(rng):
    ctx = make_context(rng)
    n_sentences = rng.randint(2, 6)  # including the closing moral
    sentences = []
    used = []
    r = rng.random()
    if r < 0.30:
        sentences.append(render(rng, rng.choice(OPENERS_ONCE), ctx))
    elif r < 0.80:
        sentences.append(render(rng, rng.choice(OPENERS), ctx))
    while len(sentences) < n_sentences - 1:
        sentences.append(render(rng, pick_body_template(rng, used), ctx))
    moral = render(rng, rng.choice(MORALS), ctx)
    # Keep lines short: drop middle sentences if ever needed.
    while len(" ".join(sentences + [moral])) > MAX_LINE_CHARS and \
            len(sentences) > 1:
        sentences.pop()
    return " ".join(sentences + [moral])


def generate(seed, n_docs):
    rng = random.Random(seed)
    return [make_document(rng) for _ in range(n_docs)]


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            assert line and "\n" not in line and "\r" not in line
            f.write(line + "\n")


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(
        description="Generate the engine's synthetic sample corpus.")
    parser.add_argument("--out-dir", default=here,
                        help="output folder (default: this script's folder)")
    parser.add_argument("--seed", type=int, default=1234,
                        help="base seed; valid uses seed+1, test seed+2")
    parser.add_argument("--train-docs", type=int, default=3600)
    parser.add_argument("--valid-docs", type=int, default=225)
    parser.add_argument("--test-docs", type=int, default=225)
    args = parser.parse_args(argv)

    os.makedirs(args.out_dir, exist_ok=True)
    splits = [
        ("train.txt", args.seed, args.train_docs),
        ("valid.txt", args.seed + 1, args.valid_docs),
        ("test.txt", args.seed + 2, args.test_docs),
    ]
    for name, seed, n_docs in splits:
        path = os.path.join(args.out_dir, name)
        lines = generate(seed, n_docs)
        write_lines(path, lines)
        print("%s: %d documents, %d bytes"
              % (path, len(lines), os.path.getsize(path)))


if __name__ == "__main__":
    main()
