"""FLOP count of one 7B recipe run (recipes/neuralhermes-2.5.yaml): ours against the article's way, on paper.

    python -m bench.flops [--rows N] [--out metrics/flops.json]

Token counts are real: orca-length synthetic rows (bench.synthetic, 12,859 rows) through the prepare and
tokenize stages' own functions with OpenHermes-2.5's real tokenizer (the Mistral sentencepiece model from the
mistral-common wheel + the ChatML tokens, tools.hub_layout) at the recipe's limits (1,024 / 1,536). The model
is Mistral-7B's shape (4,096 wide, 32 layers, 14,336 MLP, 8 KV heads, vocabulary 32,002), counted on the meta
device.

Each DPO forward runs chosen and rejected of every pair of a micro-batch as 2 x batch sequences padded to the
batch's longest; the GPU computes on the pads too, so they are counted. A forward costs 2 x (matmul weights)
per token plus causal attention 2 x layers x width x S^2 per sequence of S tokens. Training the LoRA policy
costs a forward, the recomputation of gradient checkpointing (a second forward) and a backward that, with the
4-bit base frozen, needs only activation gradients (one more forward's matmuls, two of attention); the rank-16
LoRA weights' own gradients are under 0.5 % and left out on both sides.

- article: 200 steps x 16 pairs drawn at random from the split (trl's random sampler), micro-batches of 4:
  policy (3 forwards) + the second 4-bit model's reference forward (1) on every micro-batch.
- ours: the pairs stage's selection and order (length-grouped) for the same 3,200 pairs; the reference stage's
  one forward over exactly those pairs and the 256 held-out ones (longest first, batches of 8 as trl's
  precompute runs them); training's 3 forwards per micro-batch; the held-out evaluation after training
  (policy forward on 256 pairs; the article's script evaluates nothing, so this is ours alone). With the
  recipe's `train.share_prompt` every forward of ours runs one row per pair, prompt + chosen + 1 + rejected
  (dpo_pipeline.train.shared_prompt), padded to the micro-batch's longest row; its dense attention mask is counted
  as the full square of the row, like the two rows' causal squares. `ours_two_rows_*`: the same with trl's
  two rows per pair.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from bench.synthetic import ORCA_ROWS, synthetic_rows
from dpo_pipeline.data import prepare, raw, tokens
from dpo_pipeline.train import pairs as pairs_lib
from tools.hub_layout import MISTRAL_7B_SHAPE as SHAPE_7B

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "neuralhermes-2.5.yaml"


def model_counts(shape: dict[str, int]) -> dict[str, int]:
    """Parameters of a Mistral of `shape` (vocabulary 32,002): all, and those in matmuls (not the embedding)."""
    import torch
    from transformers import MistralForCausalLM

    from tools.hub_layout import model_config

    with torch.device("meta"):
        model = MistralForCausalLM(model_config(**shape))
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"params": total, "matmul_params": total - embedding}


def forward_flops(batch_lengths: list[list[int]], matmul_params: int, layers: int, width: int) -> float:
    """FLOPs of one forward over micro-batches, each a list of sequence lengths padded to its longest."""
    total = 0.0
    for lengths in batch_lengths:
        padded = max(lengths)
        total += len(lengths) * (2 * matmul_params * padded + 2 * layers * width * padded * padded)
    return total


def dpo_batches(
    rows: dict[str, tuple[int, int, int]], ids: list[str], batch: int, share_prompt: bool = False
) -> list[list[int]]:
    """Micro-batches of `batch` pairs in `ids` order: each pair gives prompt+chosen and prompt+rejected (trl's
    two rows), or with `share_prompt` one row prompt+chosen+1+rejected (dpo_pipeline.train.shared_prompt)."""
    out = []
    for start in range(0, len(ids), batch):
        lengths = []
        for row_id in ids[start : start + batch]:
            prompt, chosen, rejected = rows[row_id]
            if share_prompt:
                lengths.append(prompt + chosen + 1 + rejected)
            else:
                lengths += [prompt + chosen, prompt + rejected]
        out.append(lengths)
    return out


def tokenized_recipe_rows(params, n_rows: int, work: Path):
    """({split: tokenize stage's table}, {split: prepare stage's table}) of the orca-length rows, with the real
    OpenHermes tokenizer (written to work/tokenizer)."""
    from dpo_pipeline.models.loading import load_tokenizer
    from tools.hub_layout import write_tokenizer

    tokenizer = load_tokenizer(write_tokenizer(work / "tokenizer"))
    raw_file = work / "raw.jsonl"
    raw_file.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(n_rows)), encoding="utf-8")
    data = dataclasses.replace(params.data, path=str(raw_file))
    table, _schema = raw.read_local(raw_file, data.format)
    train, test, _counts = prepare.prepare_table(table, tokenizer, data)
    tokenized = {}
    for split, prepared in (("train", train), ("test", test)):
        tokenized[split], _dropped = tokens.tokenize_split(prepared, tokenizer, data)
    return tokenized, {"train": train, "test": test}


def count(n_rows: int = ORCA_ROWS) -> dict[str, float]:
    import torch

    from dpo_pipeline import config

    params = config.load(RECIPE)
    t = params.train
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenized, _prepared = tokenized_recipe_rows(params, n_rows, work)
        (work / "tokenized").mkdir()
        for split, table in tokenized.items():
            pq.write_table(table, work / "tokenized" / f"{split}.parquet")
        selected, order, _metrics = pairs_lib.build(params, work / "tokenized")
    rows = {}
    for table in tokenized.values():
        for row_id, p_ids, c_ids, r_ids in zip(
            table.column("id").to_pylist(),
            table.column("prompt_ids").to_pylist(),
            table.column("chosen_ids").to_pylist(),
            table.column("rejected_ids").to_pylist(),
            strict=True,
        ):
            rows[row_id] = (len(p_ids), len(c_ids), len(r_ids))
    counts = model_counts(SHAPE_7B)
    layers, width, mm = SHAPE_7B["num_hidden_layers"], SHAPE_7B["hidden_size"], counts["matmul_params"]
    batch = t.per_device_train_batch_size

    def fwd(batches):
        return forward_flops(batches, mm, layers, width)

    def train_cost(batches):  # forward + checkpointing's recompute + activation-gradient backward
        return 3 * fwd(batches) + sum(
            len(b) * 2 * 2 * layers * width * max(b) ** 2 for b in batches
        )  # attention's backward is two forwards' worth, one more than the matmuls'

    needed = pairs_lib.pairs_needed(t)
    train_ids = tokenized["train"].column("id").to_pylist()
    random_ids = [
        train_ids[i]
        for i in torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(params.seed))
    ]
    article_batches = dpo_batches(rows, (random_ids * math.ceil(needed / len(train_ids)))[:needed], batch)
    article = train_cost(article_batches) + fwd(article_batches)

    sel = selected.to_pydict()
    selected_train = [i for s, i in zip(sel["split"], sel["id"], strict=True) if s == "train"]
    held_out = [i for s, i in zip(sel["split"], sel["id"], strict=True) if s == "test"]

    def longest_first(ids):
        return sorted(ids, key=lambda i: rows[i][0] + max(rows[i][1], rows[i][2]), reverse=True)

    def ours_costs(share: bool):
        """(reference, training, evaluation) FLOPs and the training batches, with trl's two rows or one."""
        reference = sum(
            fwd(dpo_batches(rows, longest_first(ids), t.reference_batch_size, share))
            for ids in (selected_train, held_out)
        )
        batches = dpo_batches(rows, order.column("id").to_pylist(), batch, share)
        return reference, train_cost(batches), fwd(dpo_batches(rows, sorted(held_out), batch, share)), batches

    reference, training, evaluation, ours_batches = ours_costs(t.share_prompt)
    ours = reference + training + evaluation
    two = ours_costs(False)

    def pad_share(batches):
        real = sum(sum(b) for b in batches)
        return 1 - real / sum(len(b) * max(b) for b in batches)

    return {
        "params": counts["params"],
        "train_rows": len(train_ids),
        "pairs_trained": needed,
        "reference_pairs": len(selected_train) + len(held_out),
        "mean_prompt_tokens": sum(rows[i][0] for i in train_ids) / len(train_ids),
        "mean_answer_tokens": sum((rows[i][1] + rows[i][2]) / 2 for i in train_ids) / len(train_ids),
        "article_pad_share": pad_share(article_batches),
        "ours_pad_share": pad_share(ours_batches),
        "article_pflop": article / 1e15,
        "ours_reference_pflop": reference / 1e15,
        "ours_train_pflop": training / 1e15,
        "ours_eval_pflop": evaluation / 1e15,
        "ours_pflop": ours / 1e15,
        "ours_vs_article": ours / article,
        # A 4-run sweep of a train-only param (beta, learning rate, LoRA, loss type): the same pairs in the
        # same order, so one reference pass serves all four trainings; the article pays everything 4 times.
        "ours_sweep4_vs_article": (reference + 4 * (training + evaluation)) / (4 * article),
        "share_prompt": float(t.share_prompt),
        # The same with trl's two rows per pair (train.share_prompt: false).
        "ours_two_rows_vs_article": sum(two[:3]) / article,
        "ours_two_rows_sweep4_vs_article": (two[0] + 4 * (two[1] + two[2])) / (4 * article),
        "ours_two_rows_pad_share": pad_share(two[3]),
        # The cost if the reference stage scored every tokenized row, as it did before the pairs stage.
        "ours_all_rows_vs_article": (
            ours
            - reference
            + fwd(
                dpo_batches(
                    rows,
                    longest_first(train_ids + tokenized["test"].column("id").to_pylist()),
                    t.reference_batch_size,
                )
            )
        )
        / article,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ORCA_ROWS)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    figures = count(args.rows)
    for key, value in figures.items():
        print(f"{key:>26}: {value:,.4g}" if isinstance(value, float) else f"{key:>26}: {value:,}")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
