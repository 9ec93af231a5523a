"""The small profile's base model: a byte-level BPE tokenizer and a small Mistral, pre-trained locally."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.data.chatml import CHATML_TEMPLATE, prompt_messages
from dpo_pipeline.data.filters import first_special, special_texts
from dpo_pipeline.data.formats import history_messages
from dpo_pipeline.data.raw import read_corpus
from dpo_pipeline.errors import StageError
from dpo_pipeline.io import atomic_dir, sha256_file, template_hash, write_json

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import BuiltinModelParams, Params

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, with ChatML special tokens and chat template.

    Deterministic for the same texts and vocab size. eos is `<|im_end|>` as in OpenHermes-2.5, so
    generation stops at the end of an assistant turn. No BOS is added automatically: prompts are built
    with the chat template and tokenized with add_special_tokens=False throughout.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def model_config(b: BuiltinModelParams, tokenizer) -> Any:
    """MistralConfig for the builtin model from `base.builtin` params."""
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=b.hidden_size,
        intermediate_size=b.intermediate_size,
        num_hidden_layers=b.num_hidden_layers,
        num_attention_heads=b.num_attention_heads,
        num_key_value_heads=b.num_key_value_heads,
        max_position_embeddings=b.max_position_embeddings,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(b: BuiltinModelParams, tokenizer, seed: int):
    """A randomly initialised MistralForCausalLM, deterministic for the seed."""
    import torch
    from transformers import MistralForCausalLM

    torch.manual_seed(seed)
    model = MistralForCausalLM(model_config(b, tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _turns(row: dict[str, str]) -> list[dict[str, str]]:
    """A corpus row's prompt turns (the internal row: system, earlier turns, question; formats.py)."""
    history = history_messages(row["history"]) if row.get("history", "[]") != "[]" else []
    return prompt_messages(row["system"], history, row["question"])


def tokenizer_texts(rows: list[dict[str, str]]) -> list[str]:
    """The text the tokenizer is trained on: every turn and both answers of every row."""

    def earlier(row: dict[str, str]) -> list[str]:
        return [m["content"] for m in history_messages(row.get("history", "[]"))]

    return ["\n".join([r["system"], *earlier(r), r["question"], r["chosen"], r["rejected"]]) for r in rows]


def pretrain_documents(rows: list[dict[str, str]], tokenizer) -> list[str]:
    """Chat-template text of each prompt with each of its answers (both, so the model learns no preference)."""
    docs = []
    for row in rows:
        for answer in (row["chosen"], row["rejected"]):
            if answer.strip():
                docs.append(
                    tokenizer.apply_chat_template(
                        [*_turns(row), {"role": "assistant", "content": answer}], tokenize=False
                    )
                )
    return docs


def pack_blocks(docs: list[str], tokenizer, block_len: int, seed: int):
    """Shuffle documents by the seed, concatenate their tokens and cut into [n_blocks, block_len]."""
    import torch

    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    encoded = tokenizer([docs[i] for i in order], add_special_tokens=False)["input_ids"]
    stream = [tok for ids in encoded for tok in ids]
    n_blocks = len(stream) // block_len
    if n_blocks < 2:
        raise StageError(
            f"pre-training corpus has {len(stream)} tokens: too few for two blocks of "
            f"base.builtin.pretrain_max_length={block_len}"
        )
    return torch.tensor(stream[: n_blocks * block_len], dtype=torch.long).view(n_blocks, block_len)


def split_blocks(blocks, batch_size: int):
    """(train, held-out): hold out about a tenth of the blocks, at most one batch, at least one."""
    n_eval = max(1, min(batch_size, len(blocks) // 10))
    return blocks[:-n_eval], blocks[-n_eval:]


def eval_loss(model, blocks, batch_size: int) -> float:
    """Mean causal-LM loss over `blocks` (no gradients)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start : start + batch_size]
            total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
            count += len(batch)
    return total / count


def pretrain(model, train_blocks, b: BuiltinModelParams, seed: int, log=None) -> list[float]:
    """Causal-LM pre-training for b.pretrain_steps steps; returns the per-step training losses.

    Batches are drawn from `train_blocks` in a seeded permutation, epoch after epoch.
    """
    import torch
    from transformers import get_cosine_schedule_with_warmup

    steps = b.pretrain_steps
    if steps <= 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=b.pretrain_learning_rate)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    batch_size = min(b.pretrain_batch_size, len(train_blocks))
    order = torch.randperm(len(train_blocks), generator=generator)
    cursor = 0
    losses = []
    model.train()
    for step in range(1, steps + 1):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(train_blocks), generator=generator), 0
        batch = train_blocks[order[cursor : cursor + batch_size]]
        cursor += batch_size
        loss = model(input_ids=batch, labels=batch).loss
        if not math.isfinite(loss.item()):
            raise StageError(
                f"pre-training loss is {loss.item()} at step {step}: lower base.builtin.pretrain_learning_rate"
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log is not None:
            log(step, loss.item())
    model.eval()
    return losses


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_builtin(params: Params, out_dir: Path) -> dict[str, Any]:
    import torch

    from dpo_pipeline import tracking

    b = params.base.builtin
    corpus = Path(b.corpus)
    rows = read_corpus(corpus)
    # Rows the prepare stage drops as `special_token` are not pre-trained on either: their <|im_end|> or </s>
    # would become the real control token mid-text.
    specials = special_texts(SPECIAL_TOKENS)
    kept = [r for r in rows if first_special(list(r.values()), specials) is None]
    skipped, rows = len(rows) - len(kept), kept
    if not rows:
        raise StageError(f"{corpus}: every corpus row holds a special token ({', '.join(SPECIAL_TOKENS)})")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        tokenizer = build_tokenizer(tokenizer_texts(rows), b.vocab_size)
        model = build_model(b, tokenizer, params.seed)
        blocks = pack_blocks(
            pretrain_documents(rows, tokenizer), tokenizer, b.pretrain_max_length, params.seed
        )
        train_blocks, heldout_blocks = split_blocks(blocks, b.pretrain_batch_size)
        n_params = parameter_count(model)
        print(
            f"base: {n_params:,} parameters, vocab {len(tokenizer)}, {len(rows)} rows -> "
            f"{len(train_blocks)} training blocks of {b.pretrain_max_length} tokens ({len(heldout_blocks)} held out)",
            file=sys.stderr,
        )
        loss_initial = eval_loss(model, heldout_blocks, b.pretrain_batch_size)
        every = max(1, b.pretrain_steps // 20)

        def log(step: int, loss: float) -> None:
            if step % every == 0 or step == b.pretrain_steps:
                tracking.log_metrics({"pretrain_train_loss": loss}, step=step)
                print(f"base: step {step}/{b.pretrain_steps} loss {loss:.4f}", file=sys.stderr)

        losses = pretrain(model, train_blocks, b, params.seed, log)
        loss_final = eval_loss(model, heldout_blocks, b.pretrain_batch_size)
    finally:
        torch.use_deterministic_algorithms(previous)

    info = {
        "source": "builtin",
        "name": params.base.name,
        "revision": params.base.revision,
        "chat_template_hash": template_hash(tokenizer.chat_template),
        "parameter_count": n_params,
        "corpus_sha256": sha256_file(corpus),
        "corpus_rows_special_token": skipped,
        "pretrain_steps": len(losses),
        "pretrain_loss_initial": round(loss_initial, 6),
        "pretrain_loss_final": round(loss_final, 6),
    }
    with atomic_dir(out_dir) as tmp:
        model.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "pipeline_base.json", info)
    tracking.log_metrics(
        {
            "pretrain_loss_initial": loss_initial,
            "pretrain_loss_final": loss_final,
            "parameter_count": n_params,
        }
    )
    return info
