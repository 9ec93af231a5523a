"""Deterministic generator of the shipped raw sample, data/raw/orca_dpo_sample.jsonl.

    python -m tools.make_raw_sample --rows 3000 --seed 1234 --out data/raw/orca_dpo_sample.jsonl

Rows have the current Intel/orca_dpo_pairs columns (system, question, chosen, rejected), all strings.
Standard library only (random.Random(seed)); the same arguments give a byte-identical file.

What the data looks like, and why:
- Orca-like tasks: fact questions (capitals, chemical symbols, authors, animals), summarising a short
  news item, sentiment classification of a review, a short sentence about a subject, and the E2E-style
  "Data: name = ..., eatType = ..." to sentence task. System prompts are orca-style ones, and about 30% are
  empty, as in the real data.
- The preference is in the text, not the length. The chosen answer is on topic (it re-uses the entity of
  the question and gets the fact, summary or label right) and opens/closes in a helpful register
  ("Sure! ...", "I hope this helps!"). The rejected answer is built from the same body templates but about
  another entity or with the wrong fact/label, and in a dismissive register ("Whatever. ...", "I dunno.
  ..."). Openers and closers of both registers have matched lengths, so chosen and rejected have the same
  length distribution (chosen is longer in about half of the pairs).
- A few real-data quirks that the prepare stage's content filters must drop (n >= 100 only): exact
  duplicate rows (n // 500, at least 1), rows with chosen == rejected (1 when n < 1000, else 2) and rows
  with a blank answer (same count: an empty chosen, then a whitespace-only rejected).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

SYSTEM_PROMPTS = [
    "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.",
    "You are a helpful assistant, who always provide explanation. Think like you are answering to a five year old.",
    "You are an AI assistant that follows instruction extremely well. Help as much as you can.",
    "You are an AI assistant. User will you give you a task. Your goal is to complete the task as faithfully "
    "as you can. While performing the task think step-by-step and justify your steps.",
    "You are an AI assistant that helps people find information.",
    "You are an AI assistant. Provide a detailed answer so user don't need to search outside to understand the answer.",
    "User will you give you a task with some instruction. Your job is follow the instructions as faithfully "
    "as you can. While answering think step-by-step and justify your answer.",
    "You are a teacher. Given a task, you explain in simple steps what the task is asking, any guidelines it "
    "provides and how to use those guidelines to find an answer.",
    "Explain how you used the definition to come up with the answer.",
    "You are a helpful assistant chatbot.",
]
EMPTY_SYSTEM_SHARE = 0.3

# Register cues. Each helpful opener/closer has a dismissive partner of about the same length, so the
# register differs but the length distribution does not.
HELPFUL_OPENERS = [
    "Sure! ",
    "Certainly. ",
    "Of course. ",
    "Happy to help. ",
    "Good question! ",
    "Glad to help. ",
]
DISMISSIVE_OPENERS = [
    "Meh. ",
    "Whatever. ",
    "I dunno. ",
    "Who cares? ",
    "Ugh, fine then. ",
    "Not my problem. ",
]
HELPFUL_CLOSERS = ["I hope this helps!", "Let me know if you need more.", "Feel free to ask more."]
DISMISSIVE_CLOSERS = ["Not that it matters.", "Do not ask me again, okay.", "Figure out the rest."]
OPENER_SHARE = 0.85  # share of answers that open with a register cue (the rest open with the body)
CLOSER_SHARE = 0.5  # share of answers that end with a register cue

CAPITALS = [
    ("France", "Paris", "Europe"),
    ("Japan", "Tokyo", "Asia"),
    ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"),
    ("Germany", "Berlin", "Europe"),
    ("Canada", "Ottawa", "North America"),
    ("Egypt", "Cairo", "Africa"),
    ("Peru", "Lima", "South America"),
    ("Kenya", "Nairobi", "Africa"),
    ("Norway", "Oslo", "Europe"),
    ("Brazil", "Brasilia", "South America"),
    ("Australia", "Canberra", "Oceania"),
    ("India", "New Delhi", "Asia"),
    ("Mexico", "Mexico City", "North America"),
    ("Greece", "Athens", "Europe"),
    ("Portugal", "Lisbon", "Europe"),
    ("Sweden", "Stockholm", "Europe"),
    ("Poland", "Warsaw", "Europe"),
    ("Chile", "Santiago", "South America"),
    ("Argentina", "Buenos Aires", "South America"),
    ("Turkey", "Ankara", "Asia"),
    ("Ireland", "Dublin", "Europe"),
    ("Austria", "Vienna", "Europe"),
    ("Thailand", "Bangkok", "Asia"),
    ("Vietnam", "Hanoi", "Asia"),
    ("Morocco", "Rabat", "Africa"),
    ("Finland", "Helsinki", "Europe"),
    ("Cuba", "Havana", "North America"),
    ("Nigeria", "Abuja", "Africa"),
    ("South Korea", "Seoul", "Asia"),
]
ELEMENTS = [
    ("hydrogen", "H", 1),
    ("helium", "He", 2),
    ("carbon", "C", 6),
    ("nitrogen", "N", 7),
    ("oxygen", "O", 8),
    ("neon", "Ne", 10),
    ("sodium", "Na", 11),
    ("sulfur", "S", 16),
    ("chlorine", "Cl", 17),
    ("potassium", "K", 19),
    ("calcium", "Ca", 20),
    ("iron", "Fe", 26),
    ("copper", "Cu", 29),
    ("zinc", "Zn", 30),
    ("silver", "Ag", 47),
    ("tin", "Sn", 50),
    ("gold", "Au", 79),
    ("mercury", "Hg", 80),
    ("lead", "Pb", 82),
    ("uranium", "U", 92),
]
BOOKS = [
    ("Pride and Prejudice", "Jane Austen", "1813"),
    ("Hamlet", "William Shakespeare", "1603"),
    ("Nineteen Eighty-Four", "George Orwell", "1949"),
    ("Moby-Dick", "Herman Melville", "1851"),
    ("War and Peace", "Leo Tolstoy", "1869"),
    ("Don Quixote", "Miguel de Cervantes", "1605"),
    ("Frankenstein", "Mary Shelley", "1818"),
    ("The Hobbit", "J. R. R. Tolkien", "1937"),
    ("Great Expectations", "Charles Dickens", "1861"),
    ("Dracula", "Bram Stoker", "1897"),
    ("Jane Eyre", "Charlotte Bronte", "1847"),
    ("The Great Gatsby", "F. Scott Fitzgerald", "1925"),
    ("Crime and Punishment", "Fyodor Dostoevsky", "1866"),
    ("The Old Man and the Sea", "Ernest Hemingway", "1952"),
    ("Little Women", "Louisa May Alcott", "1868"),
    ("Treasure Island", "Robert Louis Stevenson", "1883"),
]
ANIMALS = [
    ("lion", "mammal", "the African savanna", "zebras and antelopes"),
    ("penguin", "bird", "the cold coasts of Antarctica", "fish and krill"),
    ("dolphin", "mammal", "warm oceans", "fish and squid"),
    ("eagle", "bird", "high mountains", "rabbits and fish"),
    ("frog", "amphibian", "ponds and wet forests", "insects and worms"),
    ("shark", "fish", "the open ocean", "fish and seals"),
    ("koala", "mammal", "the eucalyptus forests of Australia", "eucalyptus leaves"),
    ("camel", "mammal", "hot deserts", "dry desert plants"),
    ("owl", "bird", "quiet forests", "mice and voles"),
    ("sea turtle", "reptile", "tropical seas", "jellyfish and sea grass"),
    ("honey bee", "insect", "meadows and gardens", "nectar and pollen"),
    ("giant panda", "mammal", "the bamboo forests of China", "bamboo shoots"),
    ("wolf", "mammal", "northern forests", "deer and elk"),
    ("salmon", "fish", "cold rivers and oceans", "insects and small fish"),
    ("crocodile", "reptile", "slow tropical rivers", "fish and birds"),
    ("parrot", "bird", "tropical rainforests", "seeds, nuts and fruit"),
    ("polar bear", "mammal", "the Arctic sea ice", "seals"),
    ("rabbit", "mammal", "grassy fields", "grass and clover"),
]
TOWNS = [
    "Millbrook", "Ashford", "Riverton", "Oakdale", "Kingsport", "Lakeview", "Westfield", "Stonebridge",
    "Fairhaven", "Elmwood", "Greenvale", "Hillcrest", "Maplewood", "Redcliff", "Silverton", "Brookside",
]  # fmt: skip
FACILITIES = [
    "library", "bridge", "school", "park", "hospital", "museum", "market", "swimming pool",
    "train station", "bike path", "community garden", "sports hall",
]  # fmt: skip
GROUPS = [
    "families",
    "students",
    "children",
    "shop owners",
    "farmers",
    "nurses",
    "older residents",
    "cyclists",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DISHES = ["pasta", "soup", "pizza", "curry", "burger", "salad", "coffee", "cake", "noodles", "fish"]
VENUES = ["Luigi's", "the Blue Door", "Cafe Sol", "Rosie's Diner", "the Golden Wok", "Harbour Grill"]
POSITIVE_WORDS = ["wonderful", "delicious", "excellent", "fresh", "amazing", "lovely", "perfect", "tasty"]
NEGATIVE_WORDS = ["terrible", "cold", "awful", "bland", "disgusting", "stale", "horrible", "soggy"]
STAFF_POSITIVE = ["friendly", "kind", "helpful", "quick", "polite", "cheerful"]
STAFF_NEGATIVE = ["rude", "slow", "careless", "unhelpful", "grumpy", "lazy"]
SUBJECTS = [
    ("dog", "runs", "across"), ("cat", "sleeps", "beside"), ("child", "plays", "near"),
    ("old man", "walks", "through"), ("bird", "sings", "above"), ("girl", "reads", "under"),
    ("farmer", "works", "in"), ("horse", "gallops", "along"), ("teacher", "waits", "outside"),
    ("fox", "hides", "behind"),
]  # fmt: skip
PLACES = [
    "the park",
    "the garden",
    "the river",
    "the old barn",
    "the school",
    "the forest",
    "the beach",
    "the hill",
]
TIMES = ["in the morning", "at sunset", "after the rain", "every evening", "on a sunny day", "at night"]
ADJECTIVES = ["happy", "small", "tired", "brave", "quiet", "curious", "young", "lazy"]
E2E_NAMES = [
    "The Eagle", "Blue Spice", "The Punter", "Zizzi", "Cotto", "Fitzbillies", "The Mill", "Aromi",
    "Browns Cambridge", "Giraffe", "Alimentum", "Wildwood", "The Phoenix", "Loch Fyne", "Green Man",
    "The Olive Grove", "Strada", "Cocum",
]  # fmt: skip
E2E_TYPES = ["restaurant", "pub", "coffee shop"]
E2E_FOODS = ["Italian", "French", "Chinese", "Indian", "Japanese", "English", "fast food"]
E2E_PRICES = ["cheap", "moderately priced", "expensive"]
E2E_AREAS = [("city centre", "in the city centre"), ("riverside", "by the riverside")]
E2E_RATINGS = ["low", "average", "high"]


def _a(word: str) -> str:
    """The indefinite article for `word` ("a" or "an")."""
    return "an" if word[0].lower() in "aeiou" else "a"


def _other(rng: random.Random, items: list, current):
    """A random item of `items` other than `current`."""
    while True:
        item = rng.choice(items)
        if item != current:
            return item


# Each task returns (question, chosen_body, rejected_body). The rejected body comes from the same template
# as the chosen body, filled with another entity (off topic) or a wrong fact/label (contradicting).
Task = Callable[[random.Random], tuple[str, str, str]]


def _task_capital(rng: random.Random) -> tuple[str, str, str]:
    country, city, continent = rng.choice(CAPITALS)
    question = rng.choice(
        [
            "What is the capital of {c}?",
            "Answer the following question: What is the capital city of {c}?",
            "Q: Which city is the capital of {c}?\nA:",
            "Question: What is the capital of {c}? Answer:",
        ]
    ).format(c=country)
    body = rng.choice(
        [
            "The capital of {c} is {city}. {city} is a large city in {cont}.",
            "{city} is the capital of {c}, a country in {cont}.",
            "The capital city of {c} is {city}, where the government of {c} meets.",
        ]
    )
    other = _other(rng, CAPITALS, (country, city, continent))
    if rng.random() < 0.5:  # off topic: a different country altogether
        wrong = body.format(c=other[0], city=other[1], cont=other[2])
    else:  # contradicting: the right country with a wrong city
        wrong = body.format(c=country, city=other[1], cont=other[2])
    return question, body.format(c=country, city=city, cont=continent), wrong


def _task_element(rng: random.Random) -> tuple[str, str, str]:
    name, symbol, number = rng.choice(ELEMENTS)
    question = rng.choice(
        [
            "What is the chemical symbol of {n}?",
            "Answer this question. Which chemical element has the symbol {s}?",
            "What is the atomic number of {n}?",
        ]
    ).format(n=name, s=symbol)
    body = rng.choice(
        [
            "The chemical symbol of {n} is {s}, and its atomic number is {z}.",
            "{N} has the symbol {s}. It has {z} protons, so its atomic number is {z}.",
        ]
    )
    other = _other(rng, ELEMENTS, (name, symbol, number))
    fill = lambda e: body.format(n=e[0], N=e[0].capitalize(), s=e[1], z=e[2])  # noqa: E731
    return question, fill((name, symbol, number)), fill(other)


def _task_book(rng: random.Random) -> tuple[str, str, str]:
    book = rng.choice(BOOKS)
    question = rng.choice(
        ["Who wrote {b}?", "Who is the author of the novel {b}?", "Q: Who wrote the book {b}?\nA:"]
    ).format(b=book[0])
    body = rng.choice(
        [
            "{b} was written by {a}. It was first published in {y}.",
            "The author of {b} is {a}, and the book came out in {y}.",
        ]
    )
    other = _other(rng, BOOKS, book)
    if rng.random() < 0.5:
        wrong = body.format(b=other[0], a=other[1], y=other[2])
    else:
        wrong = body.format(b=book[0], a=other[1], y=other[2])
    return question, body.format(b=book[0], a=book[1], y=book[2]), wrong


def _task_animal(rng: random.Random) -> tuple[str, str, str]:
    animal = rng.choice(ANIMALS)
    kind = rng.random() < 0.5
    question = (
        rng.choice(["What does a {a} eat?", "What kind of food does the {a} eat?"])
        if kind
        else rng.choice(["Where does a {a} live?", "Tell me where the {a} lives."])
    ).format(a=animal[0])
    body = (
        "{A} {a} mostly eats {f}. This {g} lives in {h}."
        if kind
        else "{A} {a} lives in {h}. It is {ag} {g} that eats {f}."
    )
    other = _other(rng, ANIMALS, animal)
    fill = lambda x: body.format(A=_a(x[0]).capitalize(), a=x[0], ag=_a(x[1]), g=x[1], h=x[2], f=x[3])  # noqa: E731
    return question, fill(animal), fill(other)


def _task_summary(rng: random.Random) -> tuple[str, str, str]:
    town, facility, group = rng.choice(TOWNS), rng.choice(FACILITIES), rng.choice(GROUPS)
    day, count = rng.choice(DAYS), rng.randrange(40, 900, 10)
    passage = (
        f"The town of {town} opened a new {facility} on {day}. The mayor said the {facility} would help "
        f"local {group}. About {count} people came to the opening, and many {group} said they were glad."
    )
    question = rng.choice(
        [
            "Summarize this text in one sentence.\n\n{p}",
            "Write a one-sentence summary of the following article:\n{p}",
            "{p}\n\nWhat is a short summary of the text above?",
        ]
    ).format(p=passage)
    body = "The text says that {t} {verb} {f} on {d}, which local {g} {react}."
    chosen = body.format(t=town, verb="opened a new", f=facility, d=day, g=group, react="welcomed")
    if rng.random() < 0.5:  # off topic: another town and facility
        rejected = body.format(
            t=_other(rng, TOWNS, town), verb="opened a new", f=_other(rng, FACILITIES, facility),
            d=_other(rng, DAYS, day), g=_other(rng, GROUPS, group), react="welcomed",
        )  # fmt: skip
    else:  # contradicting: closed instead of opened, and people objected
        rejected = body.format(t=town, verb="closed the old", f=facility, d=day, g=group, react="opposed")
    return question, chosen, rejected


def _task_sentiment(rng: random.Random) -> tuple[str, str, str]:
    positive = rng.random() < 0.5
    dish, venue = rng.choice(DISHES), rng.choice(VENUES)
    food_word = rng.choice(POSITIVE_WORDS if positive else NEGATIVE_WORDS)
    staff_word = rng.choice(STAFF_POSITIVE if positive else STAFF_NEGATIVE)
    review = f"The {dish} at {venue} was {food_word} and the staff were {staff_word}."
    question = rng.choice(
        [
            'Review: "{r}"\nIs this review positive or negative?',
            'Classify the sentiment of this review as positive or negative.\n\n"{r}"',
            'What is the sentiment of the following review?\n"{r}"\nOPTIONS:\n- negative\n- positive',
        ]
    ).format(r=review)
    body = "The review is {label}. The customer says the {d} was {w}, so they {verb} {v}."
    label, verb = ("positive", "liked") if positive else ("negative", "disliked")
    chosen = body.format(label=label, d=dish, w=food_word, verb=verb, v=venue)
    wrong_label, wrong_verb = ("negative", "disliked") if positive else ("positive", "liked")
    wrong_word = rng.choice(NEGATIVE_WORDS if positive else POSITIVE_WORDS)
    rejected = body.format(
        label=wrong_label, d=_other(rng, DISHES, dish), w=wrong_word, verb=wrong_verb, v=venue
    )
    return question, chosen, rejected


def _task_sentence(rng: random.Random) -> tuple[str, str, str]:
    subject = rng.choice(SUBJECTS)
    place = rng.choice(PLACES)
    question = rng.choice(
        [
            "Write a short sentence about a {s} and {p}.",
            "Generate a sentence that mentions a {s} in {p}.",
            "Write one sentence describing a {s} near {p}.",
        ]
    ).format(s=subject[0], p=place)
    body = "Here is a sentence: The {adj} {s} {verb} {prep} {p} {time}."
    other = _other(rng, SUBJECTS, subject)
    fill = lambda s, p: body.format(  # noqa: E731
        adj=rng.choice(ADJECTIVES), s=s[0], verb=s[1], prep=s[2], p=p, time=rng.choice(TIMES)
    )
    return question, fill(subject, place), fill(other, _other(rng, PLACES, place))


def _task_data_to_text(rng: random.Random) -> tuple[str, str, str]:
    name, kind, food = rng.choice(E2E_NAMES), rng.choice(E2E_TYPES), rng.choice(E2E_FOODS)
    price, (area_key, area_text), rating = (
        rng.choice(E2E_PRICES),
        rng.choice(E2E_AREAS),
        rng.choice(E2E_RATINGS),
    )
    data = f"name = {name}, eatType = {kind}, food = {food}, priceRange = {price}, area = {area_key}, customer rating = {rating}"
    question = rng.choice(
        [
            "Data: {d}. Write a sentence that describes this data.",
            "Generate an approximately fifteen-word sentence that describes all this data: {d}",
            "Here is some data about a restaurant: {d}. Write a sentence about it.",
        ]
    ).format(d=data)
    body = "{n} is {ap} {p} {f} {k} {a} with a {r} customer rating."
    chosen = body.format(n=name, ap=_a(price), p=price, f=food, k=kind, a=area_text, r=rating)
    if rng.random() < 0.5:  # off topic: another place
        wrong_price = rng.choice(E2E_PRICES)
        rejected = body.format(
            n=_other(rng, E2E_NAMES, name), ap=_a(wrong_price), p=wrong_price, f=_other(rng, E2E_FOODS, food),
            k=rng.choice(E2E_TYPES), a=rng.choice(E2E_AREAS)[1], r=rng.choice(E2E_RATINGS),
        )  # fmt: skip
    else:  # contradicting: the right name with wrong facts
        wrong_price = _other(rng, E2E_PRICES, price)
        rejected = body.format(
            n=name, ap=_a(wrong_price), p=wrong_price, f=_other(rng, E2E_FOODS, food),
            k=_other(rng, E2E_TYPES, kind), a=_other(rng, E2E_AREAS, (area_key, area_text))[1],
            r=_other(rng, E2E_RATINGS, rating),
        )  # fmt: skip
    return question, chosen, rejected


TASKS: list[tuple[Task, float]] = [
    (_task_capital, 1.0),
    (_task_element, 0.7),
    (_task_book, 0.7),
    (_task_animal, 1.0),
    (_task_summary, 1.0),
    (_task_sentiment, 1.0),
    (_task_sentence, 1.0),
    (_task_data_to_text, 1.0),
]


def _answer(rng: random.Random, body: str, openers: list[str], closers: list[str]) -> str:
    text = body
    if rng.random() < OPENER_SHARE:
        text = rng.choice(openers) + text
    if rng.random() < CLOSER_SHARE:
        text = text + " " + rng.choice(closers)
    return text


def _row(rng: random.Random) -> dict[str, str]:
    tasks, weights = zip(*TASKS, strict=True)
    task = rng.choices(tasks, weights=weights)[0]
    system = "" if rng.random() < EMPTY_SYSTEM_SHARE else rng.choice(SYSTEM_PROMPTS)
    question, chosen_body, rejected_body = task(rng)
    return {
        "system": system,
        "question": question,
        "chosen": _answer(rng, chosen_body, HELPFUL_OPENERS, HELPFUL_CLOSERS),
        "rejected": _answer(rng, rejected_body, DISMISSIVE_OPENERS, DISMISSIVE_CLOSERS),
    }


def quirk_counts(n: int) -> dict[str, int]:
    """How many rows of each content quirk generate_rows(n, ...) mixes in."""
    if n < 100:
        return {"duplicate": 0, "chosen_equals_rejected": 0, "blank_answer": 0}
    per_kind = 1 if n < 1000 else 2
    return {"duplicate": max(1, n // 500), "chosen_equals_rejected": per_kind, "blank_answer": per_kind}


def generate_rows(n: int, seed: int) -> list[dict[str, str]]:
    """`n` raw rows with keys system, question, chosen, rejected (all str); deterministic for the seed."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = random.Random(seed)
    rows = [_row(rng) for _ in range(n)]
    quirks = quirk_counts(n)
    # Quirk rows replace clean rows at distinct positions; duplicates copy a clean row from elsewhere.
    positions = rng.sample(range(n), sum(quirks.values()))
    taken = set(positions)
    clean = [i for i in range(n) if i not in taken]
    it = iter(positions)
    for _ in range(quirks["duplicate"]):
        rows[next(it)] = dict(rows[rng.choice(clean)])
    for _ in range(quirks["chosen_equals_rejected"]):
        pos = next(it)
        rows[pos]["rejected"] = rows[pos]["chosen"]
    for k in range(quirks["blank_answer"]):
        pos = next(it)
        rows[pos]["chosen" if k % 2 == 0 else "rejected"] = "" if k % 2 == 0 else "  \n"
    return rows


def to_jsonl(rows: list[dict[str, str]]) -> bytes:
    """JSON Lines bytes, one row per line in the column order system, question, chosen, rejected."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=3000, help="number of rows to write")
    parser.add_argument("--seed", type=int, default=1234, help="random seed (same seed, same bytes)")
    parser.add_argument(
        "--out", type=Path, default=Path("data/raw/orca_dpo_sample.jsonl"), help="output file"
    )
    args = parser.parse_args(argv)
    data = to_jsonl(generate_rows(args.rows, args.seed))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(args.out)
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
