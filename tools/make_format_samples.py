"""Deterministic generator of the shipped format samples, data/raw/formats/: one small file per raw format the
prepare stage reads (docs/data.md), made from the shipped synthetic orca sample (tools/make_raw_sample.py: no
text from any real dataset), so each has the same learnable preference.

    python -m tools.make_format_samples --source data/raw/orca_dpo_sample.jsonl --out data/raw/formats

Files (rows; what each exercises):
  conversational.jsonl   trl's conversational format, multi-turn: 1 to 3 earlier exchanges, a system message on
                         some rows; two thirds with the prompt folded into both answers (implicit), one third with
                         an explicit `prompt` list; scores on every row, some pairs with the rejected answer scored
                         higher (data.filters.swap_disagreeing) or equal (drop_ties)
  hh_rlhf.jsonl          Anthropic hh-rlhf transcripts ("\\n\\nHuman: " / "\\n\\nAssistant: "), 1 to 3 exchanges
  ultrafeedback.parquet  prompt string, chosen/rejected as [user, assistant] messages, score_chosen >=
                         score_rejected (ties included), prompt_id and messages as the binarized set has them
  argilla_orca.parquet   argilla's re-rated orca pairs: system, input, chosen, rejected, generations, rating,
                         status (tie / swapped / unchanged), chosen_score, in_gsm8k_train, original_chosen/rejected
  standard.jsonl         trl's standard format: prompt, chosen, rejected strings

Standard library plus pyarrow (for the Parquet files); the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

ROWS = 400  # per file: big enough to train on, small enough for git


def _orca_rows(path: Path) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    # The sample's deliberate quirks (blank and identical answers) stay in the orca file: these files exercise
    # the formats, so every row here is a usable pair.
    return [r for r in rows if r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]]


def _scores(rng: random.Random, tie_rate: float, swap_rate: float) -> tuple[float, float]:
    """(chosen score, rejected score) on a 1-10 scale, half points."""
    chosen = rng.choice([7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0])
    draw = rng.random()
    if draw < tie_rate:
        return chosen, chosen
    rejected = max(1.0, chosen - rng.choice([1.0, 1.5, 2.0, 3.0, 4.0, 5.0]))
    if draw < tie_rate + swap_rate:
        return rejected, chosen
    return chosen, rejected


def _exchanges(rng: random.Random, pool: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """n earlier user/assistant exchanges drawn from other rows (their question and chosen answer)."""
    turns = []
    for row in rng.sample(pool, n):
        turns += [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": row["chosen"]},
        ]
    return turns


def conversational(rows, rng):
    out = []
    for i, row in enumerate(rows):
        earlier = _exchanges(rng, rows, rng.randint(1, 3))
        system = [{"role": "system", "content": row["system"]}] if row["system"] else []
        prompt = [*system, *earlier, {"role": "user", "content": row["question"]}]
        chosen = [{"role": "assistant", "content": row["chosen"]}]
        rejected = [{"role": "assistant", "content": row["rejected"]}]
        score_chosen, score_rejected = _scores(rng, tie_rate=0.05, swap_rate=0.05)
        if i % 3 == 2:
            record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        else:
            record = {"chosen": [*prompt, *chosen], "rejected": [*prompt, *rejected]}
        out.append({**record, "score_chosen": score_chosen, "score_rejected": score_rejected})
    return out


def hh_rlhf(rows, rng):
    def transcript(turns):
        names = {"user": "Human", "assistant": "Assistant"}
        return "".join(f"\n\n{names[t['role']]}: {t['content']}" for t in turns)

    out = []
    for row in rows:
        prompt = [*_exchanges(rng, rows, rng.randint(0, 2)), {"role": "user", "content": row["question"]}]
        out.append(
            {
                "chosen": transcript([*prompt, {"role": "assistant", "content": row["chosen"]}]),
                "rejected": transcript([*prompt, {"role": "assistant", "content": row["rejected"]}]),
            }
        )
    return out


def ultrafeedback(rows, rng):
    out = []
    for row in rows:
        user = {"role": "user", "content": row["question"]}
        score_chosen, score_rejected = _scores(rng, tie_rate=0.05, swap_rate=0.0)
        chosen = [user, {"role": "assistant", "content": row["chosen"]}]
        out.append(
            {
                "prompt": row["question"],
                "prompt_id": hashlib.sha256(row["question"].encode("utf-8")).hexdigest(),
                "chosen": chosen,
                "rejected": [user, {"role": "assistant", "content": row["rejected"]}],
                "messages": chosen,
                "score_chosen": score_chosen,
                "score_rejected": score_rejected,
            }
        )
    return out


def argilla_orca(rows, rng):
    out = []
    for row in rows:
        first, second = _scores(
            rng, tie_rate=0.1, swap_rate=0.1
        )  # ratings of (original chosen, original rejected)
        swapped = second > first
        status = "tie" if first == second else ("swapped" if swapped else "unchanged")
        chosen, rejected = (row["rejected"], row["chosen"]) if swapped else (row["chosen"], row["rejected"])
        out.append(
            {
                "system": row["system"],
                "input": row["question"],
                "chosen": chosen,
                "rejected": rejected,
                "generations": [row["chosen"], row["rejected"]],
                "order": ["chosen", "rejected"],
                "rating": [first, second],
                "status": status,
                "original_chosen": row["chosen"],
                "original_rejected": row["rejected"],
                "chosen_score": max(first, second),
                "in_gsm8k_train": rng.random() < 0.05,
            }
        )
    return out


def standard(rows, rng):
    del rng
    return [{"prompt": r["question"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


BUILDERS = {
    "conversational.jsonl": conversational,
    "hh_rlhf.jsonl": hh_rlhf,
    "ultrafeedback.parquet": ultrafeedback,
    "argilla_orca.parquet": argilla_orca,
    "standard.jsonl": standard,
}


def write(name: str, records: list[dict], out: Path) -> None:
    path = out / name
    if name.endswith(".jsonl"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        path.write_text(text, encoding="utf-8")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path, compression="zstd")


def make(source: Path, out: Path, rows: int, seed: int) -> list[Path]:
    pool = _orca_rows(source)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (name, build) in enumerate(BUILDERS.items()):
        rng = random.Random(f"{seed}:{name}")
        # Each file draws its own rows, so a mixture of two files overlaps only by chance.
        picked = random.Random(seed + index).sample(pool, rows)
        write(name, build(picked, rng), out)
        written.append(out / name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path("data/raw/orca_dpo_sample.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("data/raw/formats"))
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    for path in make(args.source, args.out, args.rows, args.seed):
        print(path)


if __name__ == "__main__":
    main()
