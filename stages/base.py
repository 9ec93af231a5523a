"""base stage: pin the starting model as a local, versioned artifact.

Reads: params `seed`, `base`; for `base.source: builtin` the raw corpus file `base.builtin.corpus`.
Writes: models/base/ (model.safetensors + config + tokenizer with the ChatML chat template).

Also writes models/base/pipeline_base.json: source, name, revision, chat template hash, parameter count
and the pre-training losses (builtin).

builtin: a small Mistral-architecture causal LM made locally and deterministically: a byte-level BPE
tokenizer trained on the raw text with the ChatML special tokens, random init from the seed, then a short
causal-LM pre-training on the raw text (prompts and both answers, so it has no preference yet).
Pre-training: every row becomes two ChatML conversations (prompt + chosen, prompt + rejected), shuffled by
the seed, concatenated and cut into blocks of `pretrain_max_length` tokens; a few blocks (at most one
batch, about a tenth of the corpus) are held out to measure the loss before and after. Plain torch AdamW
(torch defaults: weight decay 0.01), 5% linear warm-up then cosine decay, gradient norm clipped at 1.0,
deterministic algorithms: the same params and corpus give a byte-identical model.safetensors.
hub: a snapshot of `base.name` at the pinned `base.revision` (safetensors, json, tokenizer files and chat
template; no pickles, no Python unless trust_remote_code). This is the only stage that may talk to the
model hub; every later stage loads models/base/. The token comes only from the environment (HF_TOKEN).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from pathlib import Path
from typing import Any

from stages.common import (
    BASE_DIR,
    CHATML_TEMPLATE,
    StageError,
    atomic_dir,
    require_safetensors,
    run_main,
    sha256_file,
    template_hash,
    write_json,
)

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


def model_config(b: Any, tokenizer) -> Any:
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


def build_model(b: Any, tokenizer, seed: int):
    """A randomly initialised MistralForCausalLM, deterministic for the seed."""
    import torch
    from transformers import MistralForCausalLM

    torch.manual_seed(seed)
    model = MistralForCausalLM(model_config(b, tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------------------------------------------------
# builtin: corpus -> tokenizer -> pre-trained model

ANSWER_COLUMNS = (("chosen", "rejected"), ("chatgpt", "llama2-13b-chat"))  # current and original schema


def read_corpus(path: str | Path) -> list[dict[str, str]]:
    """Raw rows from a .jsonl file as {system, question, answers...}; StageError names the line and key."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: corpus file not found (base.builtin.corpus)")
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise StageError(
            f"{path}: not UTF-8 text (byte {err.start}); base.builtin.corpus must be a JSON Lines file"
        ) from None
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise StageError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise StageError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        answers = next((cols for cols in ANSWER_COLUMNS if all(c in row for c in cols)), None)
        if answers is None:
            raise StageError(
                f"{path}:{line_no}: expected columns system, question and chosen/rejected "
                f"(or chatgpt/llama2-13b-chat), got {sorted(row)}"
            )
        picked = {}
        for key, name in (
            ("system", "system"),
            ("question", "question"),
            ("chosen", answers[0]),
            ("rejected", answers[1]),
        ):
            value = row.get(name, "")
            if not isinstance(value, str):
                raise StageError(
                    f"{path}:{line_no}: column {name!r}: expected a string, got {type(value).__name__}"
                )
            picked[key] = value
        rows.append(picked)
    if not rows:
        raise StageError(f"{path}: corpus is empty")
    return rows


def tokenizer_texts(rows: list[dict[str, str]]) -> list[str]:
    """The text the tokenizer is trained on: every field of every row."""
    return [f"{r['system']}\n{r['question']}\n{r['chosen']}\n{r['rejected']}" for r in rows]


def conversation(system: str, question: str, answer: str | None = None) -> list[dict[str, str]]:
    """ChatML messages: a system turn only when the system text is non-empty (as the article does)."""
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def pretrain_documents(rows: list[dict[str, str]], tokenizer) -> list[str]:
    """ChatML text of each prompt with each of its answers (both, so the model learns no preference)."""
    docs = []
    for row in rows:
        for answer in (row["chosen"], row["rejected"]):
            if answer.strip():
                docs.append(
                    tokenizer.apply_chat_template(
                        conversation(row["system"], row["question"], answer), tokenize=False
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


def pretrain(model, train_blocks, b: Any, seed: int, log=None) -> list[float]:
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


def _run_builtin(params: Any, out_dir: Path) -> dict[str, Any]:
    import torch

    from stages import tracking

    b = params.base.builtin
    corpus = Path(b.corpus)
    rows = read_corpus(corpus)
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


# ---------------------------------------------------------------------------------------------------------
# hub: pinned snapshot -> the same layout

HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.jinja",
    "*.model",
    "tokenizer*",
    "merges.txt",
    "vocab.txt",
]
HUB_IGNORE_PATTERNS = [
    "pytorch_model*",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "training_args*",
]


def hub_patterns(trust_remote_code: bool) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns for snapshot_download: weights as safetensors only; code only if trusted."""
    allow = list(HUB_ALLOW_PATTERNS) + (["*.py"] if trust_remote_code else [])
    return allow, list(HUB_IGNORE_PATTERNS)


def snapshot_files(snapshot: Path, trust_remote_code: bool) -> list[str]:
    """The files of a cached snapshot that models/base takes: the same allow/ignore patterns as the download,
    applied with huggingface_hub's own matcher (a cache filled by another tool may hold pickles too)."""
    from huggingface_hub.utils import filter_repo_objects

    allow, ignore = hub_patterns(trust_remote_code)
    names = sorted(p.name for p in snapshot.iterdir() if p.is_file())
    return list(filter_repo_objects(names, allow_patterns=allow, ignore_patterns=ignore))


# Probes for the saved tokenizer: a ChatML turn, a leading space, runs of spaces, a tab, non-ASCII.
TOKENIZER_PROBES = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\n",
    " Hello  world\n\tdef f():\n    return 1",
    "naïve café, 日本語 🤖",
)


def require_same_ids(tokenizer, saved_dir: Path, what: str) -> None:
    """The tokenizer reloaded from what was saved must give the ids the converted one gives.

    A sentencepiece-only repo is converted by transformers at load time; what later stages read is the saved
    tokenizer.json, and a conversion that does not survive its own save/reload (seen with transformers 5 on a
    folder without config.json: the Metaspace prepend scheme changed) would silently change every id.
    """
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(saved_dir), local_files_only=True)
    for text in TOKENIZER_PROBES:
        before, after = tokenizer(text)["input_ids"], reloaded(text)["input_ids"]
        if before != after:
            raise StageError(
                f"{what}: the saved tokenizer.json encodes {text[:40]!r}... as {after[:12]} but the loaded "
                f"tokenizer as {before[:12]}; not publishing a tokenizer that changes ids"
            )


def require_complete_shards(model_dir: Path, what: str) -> None:
    """A sharded checkpoint must hold every shard its index names (a partial download fails here, clearly)."""
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return
    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
    if missing:
        raise StageError(f"{what}: {index.name} names shard(s) that are missing: {', '.join(missing)}")


def download_snapshot(name: str, revision: str, trust_remote_code: bool) -> Path:
    """snapshot_download into the Hugging Face cache; hub failures become one clear StageError.

    The token is read by huggingface_hub from HF_TOKEN (or its login); it is never passed or printed here.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"base.name={name!r} at base.revision={revision!r}"
    allow, ignore = hub_patterns(trust_remote_code)
    try:
        return Path(
            snapshot_download(repo_id=name, revision=revision, allow_patterns=allow, ignore_patterns=ignore)
        )
    except GatedRepoError as err:
        raise StageError(
            f"{what}: the repo is gated; accept its licence on the hub and set HF_TOKEN"
        ) from err
    except RepositoryNotFoundError as err:
        raise StageError(f"{what}: repo not found on the hub (or private: set HF_TOKEN)") from err
    except RevisionNotFoundError as err:
        raise StageError(f"{what}: revision not found in the repo (expected an existing commit sha)") from err
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise StageError(
            f"{what}: the model hub is unreachable or offline mode is on (HF_HUB_OFFLINE=1) and the snapshot "
            "is not in the local Hugging Face cache. Connect to the hub (unset HF_HUB_OFFLINE) or pre-fill "
            "the cache (HF_HOME) with that revision."
        ) from err
    except OSError as err:  # connection errors (httpx/requests derive from OSError), disk full
        raise StageError(
            f"{what}: download failed, the model hub is unreachable? ({type(err).__name__}: {err})"
        ) from err


def _run_hub(params: Any, out_dir: Path) -> dict[str, Any]:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from stages import tracking

    b = params.base
    snapshot = download_snapshot(b.name, b.revision, b.trust_remote_code)
    require_safetensors(snapshot)
    config_file = snapshot / "config.json"
    if not config_file.is_file():
        raise StageError(f"{b.name}@{b.revision}: snapshot has no config.json")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("auto_map") and not b.trust_remote_code:
        raise StageError(
            f"{b.name}@{b.revision}: config.json needs the repo's own Python code (auto_map); refused because "
            "base.trust_remote_code is false"
        )
    with atomic_dir(out_dir) as tmp:
        for name in snapshot_files(snapshot, b.trust_remote_code):
            # The cache holds symlinks to blobs: copy the content. Only the allowed files: offline,
            # snapshot_download returns the whole cached folder, whatever else the user's cache holds.
            shutil.copyfile(snapshot / name, tmp / name)
        require_complete_shards(tmp, f"{b.name}@{b.revision}")
        tokenizer = AutoTokenizer.from_pretrained(
            str(tmp), local_files_only=True, trust_remote_code=b.trust_remote_code
        )
        template_added = tokenizer.chat_template is None
        if template_added:
            tokenizer.chat_template = CHATML_TEMPLATE
            if len(tokenizer.encode("<|im_start|>", add_special_tokens=False)) != 1:
                print(
                    f"warning: {b.name} had no chat template; ChatML was set, but <|im_start|> is not a single "
                    "token of its tokenizer",
                    file=sys.stderr,
                )
        if not tokenizer.is_fast:
            raise StageError(
                f"{b.name}@{b.revision}: transformers loaded a slow ({type(tokenizer).__name__}) tokenizer; "
                "expected one backed by the `tokenizers` library"
            )
        # Saved once here, so models/base always holds tokenizer.json: a sentencepiece-only repo (Mistral,
        # OpenHermes: tokenizer.model, no tokenizer.json) is converted once and no later stage needs the slow
        # path or sentencepiece.
        tokenizer.save_pretrained(tmp)
        require_same_ids(tokenizer, tmp, f"{b.name}@{b.revision}")
        n_params = 0
        for weights in sorted(tmp.glob("*.safetensors")):
            with safe_open(str(weights), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                    n_params += math.prod(fh.get_slice(key).get_shape())
        info = {
            "source": "hub",
            "name": b.name,
            "revision": b.revision,
            "chat_template_hash": template_hash(tokenizer.chat_template),
            "chat_template_added": template_added,
            "parameter_count": n_params,
            "pretrain_loss_initial": None,
            "pretrain_loss_final": None,
        }
        write_json(tmp / "pipeline_base.json", info)
    tracking.log_metrics({"parameter_count": n_params})
    return info


# ---------------------------------------------------------------------------------------------------------


def run(params: Any, out_dir: str | Path = BASE_DIR) -> dict[str, Any]:
    """Build (builtin) or fetch (hub) the base model into `out_dir`; returns pipeline_base.json's content."""
    from stages import tracking

    out_dir = Path(out_dir)
    builtin = params.base.source == "builtin"
    inputs = {"corpus": Path(params.base.builtin.corpus)} if builtin else {}
    with tracking.stage_run("base", params, sections=["seed", "base"], inputs=inputs):
        info = _run_builtin(params, out_dir) if builtin else _run_hub(params, out_dir)
        tracking.set_tags({"base.chat_template_hash": info["chat_template_hash"]})
        tracking.log_outputs({"base": out_dir})
    print(
        f"base: wrote {out_dir} ({info['source']} {info['name']}, {info['parameter_count']:,} parameters"
        + (
            f", pre-training loss {info['pretrain_loss_initial']:.3f} -> {info['pretrain_loss_final']:.3f})"
            if builtin
            else ")"
        ),
        file=sys.stderr,
    )
    return info


def main() -> None:
    from stages import config

    run_main(lambda: run(config.load()))


if __name__ == "__main__":
    main()
