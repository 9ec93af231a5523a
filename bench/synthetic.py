"""Synthetic raw rows with the size and text lengths of the real Intel/orca_dpo_pairs (12,859 rows).

The shipped sample's rows are short (questions of ~60 characters); the real data's are not. This generator
makes rows whose lengths follow log-normal distributions fitted by eye to orca_dpo_pairs: questions of a
few hundred to over a thousand characters (long tail to ~12k), answers of several hundred characters, an
orca-style system prompt on ~70% of rows. The text is English-like: words drawn with a Zipf law from a
fixed list of common words, plus ~8% random "rare" words (names, terms) that a BPE tokenizer must split,
numbers and punctuation. A few real-data quirks (duplicates, identical answers) are mixed in, so the
prepare stage's filters have work to do. Standard library only; the same (n, seed) give the same rows.
"""

from __future__ import annotations

import math
import random
import string

ORCA_ROWS = 12_859  # rows in Intel/orca_dpo_pairs (train split)

# (median characters, sigma of log-length, min, max) per text column.
LENGTHS = {
    "question": (520, 0.9, 12, 12_000),
    "chosen": (480, 0.8, 2, 6_000),
    "rejected": (560, 0.8, 2, 6_000),
}
EMPTY_SYSTEM_SHARE = 0.3
RARE_WORD_SHARE = 0.08
NUMBER_SHARE = 0.03
SENTENCE_WORDS = (8, 22)
DUPLICATE_EVERY = 1000  # one exact duplicate row per this many rows
IDENTICAL_EVERY = 1000  # one row with chosen == rejected per this many rows (half-way between duplicates)

SYSTEM_PROMPTS = (
    "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.",
    "You are a helpful assistant, who always provide explanation. Think like you are answering to a five "
    "year old.",
    "You are an AI assistant that follows instruction extremely well. Help as much as you can.",
    "You are an AI assistant. User will you give you a task. Your goal is to complete the task as faithfully "
    "as you can. While performing the task think step-by-step and justify your steps.",
    "You are an AI assistant that helps people find information.",
    "You are an AI assistant. Provide a detailed answer so user don't need to search outside to understand "
    "the answer.",
    "User will you give you a task with some instruction. Your job is follow the instructions as faithfully "
    "as you can. While answering think step-by-step and justify your answer.",
    "You are a teacher. Given a task, you explain in simple steps what the task is asking, any guidelines it "
    "provides and how to use those guidelines to find an answer.",
    "Explain how you used the definition to come up with the answer.",
    "You should describe the task and explain your answer. While answering a multiple choice question, first "
    "output the correct answer(s). Then explain why other answers are wrong.",
)

# Common English words, most frequent first (the Zipf rank is the position).
WORDS = tuple(
    """the of and to a in is that for it as was with be by on not he this are or his from at which but
have an they you were her she there been one all we their has would when if so no will more can who out
what about up said some into them other time only new could these two may first then do any like my now
over such our man me even most made after also did many before must through back years where much your way
well down should because each just those people how too little state good very make world still own see
men work long get here between both life being under never day same another know while last might us great
old year off come since against go came right used take three states himself few house use during without
again place american around however home small found mrs thought went say part once general high upon
school every does got united left number course war until always away something fact though water less
public put think almost hand enough far took head yet government system better set told nothing night end
why called didn eyes find going look asked later knew point next program city business give group toward
young days let room president side social given present several order national possible rather second face
per among form important often things looked early white case become large big need four within felt along
children saw best church ever least power development light thing seemed family interest want members
others mind country area question answer sentence task step text following information data summary
review article answer options explain reason because therefore example correct choose premise hypothesis
true false translate language english french german question context passage movie film story plot
character""".split()
)


AVG_WORD_CHARS = 4.75  # characters per word including the space, for the word count of a target length
RARE_POOL = 6000  # distinct rare words (names, terms) per generator seed: they recur, as names do
COMMA_SHARE = 0.06


def _length(rng: random.Random, column: str) -> int:
    median, sigma, low, high = LENGTHS[column]
    return int(min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))))


def _rare_word(rng: random.Random) -> str:
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 11)))
    return word.capitalize() if rng.random() < 0.4 else word


def _vocabulary(rng: random.Random) -> tuple[list[str], list[float]]:
    """(words, cumulative weights): common words by Zipf, then rare words and numbers with fixed shares."""
    common = list(WORDS) + [w + "," for w in WORDS[:60]]
    weights = [1.0 / rank for rank in range(1, len(WORDS) + 1)]
    weights += [w * COMMA_SHARE for w in weights[:60]]
    common_mass = sum(weights) / (1.0 - RARE_WORD_SHARE - NUMBER_SHARE)
    rare = [_rare_word(rng) for _ in range(RARE_POOL)]
    numbers = [str(rng.randint(0, 10_000)) for _ in range(RARE_POOL // 4)]
    weights += [common_mass * RARE_WORD_SHARE / len(rare)] * len(rare)
    weights += [common_mass * NUMBER_SHARE / len(numbers)] * len(numbers)
    cumulative, total = [], 0.0
    for w in weights:
        total += w
        cumulative.append(total)
    return common + rare + numbers, cumulative


def text(rng: random.Random, chars: int, vocabulary: tuple[list[str], list[float]]) -> str:
    """English-like text of about `chars` characters (at least one word), in sentences."""
    words, cumulative = vocabulary
    picked = rng.choices(words, cum_weights=cumulative, k=max(1, round(chars / AVG_WORD_CHARS)))
    start = 0
    while start < len(picked):
        picked[start] = picked[start][:1].upper() + picked[start][1:]
        end = min(len(picked), start + rng.randint(*SENTENCE_WORDS)) - 1
        picked[end] = picked[end].rstrip(",") + rng.choice((".", ".", ".", "?", "!"))
        start = end + 1
    return " ".join(picked)


def synthetic_rows(n: int = ORCA_ROWS, seed: int = 0) -> list[dict[str, str]]:
    """`n` raw rows in the current orca_dpo_pairs columns (system, question, chosen, rejected)."""
    rng = random.Random(seed)
    vocabulary = _vocabulary(rng)
    rows: list[dict[str, str]] = []
    for i in range(n):
        if i and i % DUPLICATE_EVERY == 0:
            rows.append(dict(rows[rng.randrange(len(rows))]))
            continue
        system = "" if rng.random() < EMPTY_SYSTEM_SHARE else rng.choice(SYSTEM_PROMPTS)
        row = {
            "system": system,
            "question": text(rng, _length(rng, "question"), vocabulary),
            "chosen": text(rng, _length(rng, "chosen"), vocabulary),
            "rejected": text(rng, _length(rng, "rejected"), vocabulary),
        }
        if i % IDENTICAL_EVERY == IDENTICAL_EVERY // 2:
            row["rejected"] = row["chosen"]
        rows.append(row)
    return rows
