"""dpo_pipeline.train.shared_prompt: one row per pair gives trl's two-row log-probs, metrics and gradients."""

from __future__ import annotations

import pytest

from dpo_pipeline.errors import StageError
from dpo_pipeline.train import shared_prompt


def collate(examples):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=0)(examples)


def random_examples(seed: int, n: int, vocab: int = 90):
    import random

    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]

    return [{"prompt_ids": ids(1, 12), "chosen_ids": ids(1, 9), "rejected_ids": ids(1, 9)} for _ in range(n)]


def labelled(batch):
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, shared_prompt.IGNORE)


def test_one_row_per_pair_holds_prompt_chosen_last_prompt_token_rejected():
    import torch

    batch = collate(
        [
            {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]},
            {"prompt_ids": [11], "chosen_ids": [12], "rejected_ids": [13, 14, 15]},
        ]
    )
    packed = shared_prompt.pack(batch["input_ids"], batch["attention_mask"], labelled(batch))
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 7, 10], [11, 12, 11, 13, 14, 15, 0]]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert packed.position_ids[1, :6].tolist() == [0, 1, 0, 1, 2, 3]
    ignore = shared_prompt.IGNORE
    assert packed.shift_labels.tolist() == [
        [ignore, ignore, 8, 9, ignore, 10, ignore],
        [12, ignore, 13, 14, 15, ignore, ignore],
    ]
    allowed = packed.attention_mask[0, 0]
    # The copy of the prompt's last token (position 5) sees the prompt without its last token, and itself.
    assert allowed[5].tolist() == [True, True, False, False, False, True, False]
    # The rejected answer never sees the chosen answer; the chosen answer sees the whole prompt.
    assert allowed[6].tolist() == [True, True, False, False, False, True, True]
    assert allowed[4].tolist() == [True, True, True, True, True, False, False]
    # Padding sees only itself.
    assert packed.attention_mask[1, 0, 6].tolist() == [False] * 6 + [True]
    assert packed.real_positions == 13 and packed.positions == 14
    additive = shared_prompt.pack(batch["input_ids"], batch["attention_mask"], labelled(batch), torch.float32)
    assert additive.attention_mask.dtype == torch.float32
    assert torch.equal(additive.attention_mask == 0, packed.attention_mask)


def test_short_pairs_share_a_row_never_wider_than_the_widest_pair():
    assert shared_prompt.place([10, 4, 5]) == ([(0, 0), (1, 5), (1, 0)], 2, 10)
    assert shared_prompt.place([3, 3, 3, 3]) == ([(0, 0), (1, 0), (2, 0), (3, 0)], 4, 3)
    spots, rows, width = shared_prompt.place([7, 1, 2, 3, 4, 6])
    assert (rows, width) == (4, 7)  # [7], [6, 1], [4, 3], [2]: 23 positions need 4 rows of 7
    for row in range(rows):
        taken = sorted((o, o + w) for (r, o), w in zip(spots, [7, 1, 2, 3, 4, 6], strict=True) if r == row)
        assert all(a[1] <= b[0] for a, b in zip(taken, taken[1:], strict=False)) and taken[-1][1] <= width

    batch = collate(
        [
            {"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10, 11], "rejected_ids": [12, 13]},  # 4+3+1+2 = 10
            {"prompt_ids": [20], "chosen_ids": [21], "rejected_ids": [22]},  # 4
            {"prompt_ids": [30, 31], "chosen_ids": [32], "rejected_ids": [33]},  # 5
        ]
    )
    packed = shared_prompt.pack(batch["input_ids"], batch["attention_mask"], labelled(batch))
    assert packed.input_ids.tolist() == [
        [5, 6, 7, 8, 9, 10, 11, 8, 12, 13],
        [30, 31, 32, 31, 33, 20, 21, 20, 22, 0],
    ]
    assert packed.position_ids[1, :9].tolist() == [0, 1, 2, 1, 2, 0, 1, 0, 1]
    allowed = packed.attention_mask[1, 0]
    # The second pair in row 1 (offset 5) sees only itself: block-diagonal.
    assert not allowed[5:9, :5].any() and not allowed[:5, 5:].any()
    assert allowed[8, 5:9].tolist() == [False, False, True, True]  # its one prompt token is seen as the copy
    assert packed.real_positions == 19 and packed.positions == 20


@pytest.mark.parametrize(
    "change",
    ["different prompts", "no prompt", "left padding", "odd rows", "longer than the sliding window"],
)
def test_a_batch_that_cannot_share_is_left_as_it_came(change):
    import torch

    examples = random_examples(1, 3)
    batch = collate(examples)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], labelled(batch)
    if change == "different prompts":
        ids = ids.clone()
        ids[4, 0] += 1  # the second pair's rejected row starts with another prompt
    elif change == "no prompt":
        labels = labels.clone()
        labels[1, : len(examples[1]["prompt_ids"])] = ids[1, : len(examples[1]["prompt_ids"])]
        labels[4, : len(examples[1]["prompt_ids"])] = ids[4, : len(examples[1]["prompt_ids"])]
    elif change == "left padding":
        mask = torch.flip(mask, dims=[1])
    elif change == "odd rows":
        ids, mask, labels = ids[:5], mask[:5], labels[:5]
    window = int(mask.sum(dim=1).max()) - 1 if change.startswith("longer") else None
    assert shared_prompt.pack(ids, mask, labels, window=window) is None
    if window is not None:
        assert shared_prompt.pack(ids, mask, labels, window=window + 1) is not None

    calls = []

    def model(**kwargs):
        calls.append(kwargs)
        return "as it came"

    outcomes: dict = {}
    wrapped = shared_prompt.SharedPromptModel(model, "sdpa", window=window, outcomes=outcomes)
    assert wrapped(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True) == "as it came"
    assert calls[0]["input_ids"] is ids and "position_ids" not in calls[0]
    # counted, with a reason the trainer logs: share_prompt never falls back without a word
    assert outcomes["fallback"] == 1 and "shared" not in outcomes and outcomes["reason"]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"position_ids": "p"}, "unknown argument.*position_ids"),
        ({"shift_labels": "s"}, "unknown argument.*shift_labels"),
        ({"fused_lm_head": False}, "no fused_lm_head"),
        ({"attention_mask": None}, "no attention_mask"),
    ],
)
def test_a_call_shape_trl_1_16_never_makes_fails_the_run(extra, named):
    """A trl that calls the model another way (padding-free position ids, pre-shifted labels, no fused head)
    must not silently turn train.share_prompt into trl's two rows: the run fails naming what differs."""
    batch = collate(random_examples(1, 2))
    kwargs = {**batch, "labels": labelled(batch), "fused_lm_head": True, "use_cache": False, **extra}
    wrapped = shared_prompt.SharedPromptModel(lambda **kw: "ran", "sdpa")
    with pytest.raises(StageError, match=f"share_prompt: true cannot engage.*{named}"):
        wrapped(**kwargs)
    with pytest.raises(StageError, match="1 positional argument"):
        wrapped(batch["input_ids"], labels=labelled(batch), fused_lm_head=True)


def test_a_forward_that_asks_for_no_log_probs_passes_through():
    """trl's deprecated return_outputs forward (no labels, no fused head) is not a log-prob call."""
    batch = collate(random_examples(1, 2))
    outcomes: dict = {}
    wrapped = shared_prompt.SharedPromptModel(lambda **kw: "ran", "sdpa", outcomes=outcomes)
    assert wrapped(**batch, use_cache=False) == "ran" and outcomes == {}


def test_flash_attention_is_refused_by_name():
    with pytest.raises(StageError, match="train.share_prompt.*flash_attention_2"):
        shared_prompt.check_attention("flash_attention_2")


def tiny_lora_model(implementation: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=implementation,
    )
    model = MistralForCausalLM(config)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, lora).eval()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_same_log_probs_metrics_and_gradients_as_trls_two_rows(implementation):
    import torch

    model = tiny_lora_model(implementation)
    batch = collate(random_examples(6, 4))  # sizes 26, 15, 24, 9: the 15 and the 9 share a row
    labels = labelled(batch)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    counts: dict[str, int] = {}
    shared = shared_prompt.SharedPromptModel(model, implementation, torch.float32, counts)
    results = []
    for forward in (model, shared):
        model.zero_grad()
        out = forward(**kwargs, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out, grads))
    (two_rows, two_grads), (one_row, one_grads) = results
    assert one_row.log_probs.shape == two_rows.log_probs.shape == (8, batch["input_ids"].shape[1] - 1)
    for name in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(getattr(one_row, name), getattr(two_rows, name), atol=1e-5, rtol=1e-5)
    assert torch.equal(one_row.is_top1, two_rows.is_top1)
    assert torch.equal(one_row.label_mask, two_rows.label_mask)
    torch.testing.assert_close(one_row.loss, two_rows.loss)
    assert two_grads and two_grads.keys() == one_grads.keys()
    for name, grad in two_grads.items():
        torch.testing.assert_close(one_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # The one-row batch computed fewer positions than trl's two rows hold tokens: the prompts ran once, and
    # short pairs shared rows (4 pairs in fewer rows).
    assert counts["real_positions"] < int(batch["attention_mask"].sum())
    packed = shared_prompt.pack(kwargs["input_ids"], kwargs["attention_mask"], labels)
    assert packed.input_ids.shape[0] < 4


def test_a_changed_rejected_answer_changes_only_the_rejected_log_probs():
    """The rejected branch must not leak into the chosen one (and back): change one rejected token."""
    import torch

    model = tiny_lora_model("sdpa")
    examples = random_examples(3, 2)
    shared = shared_prompt.SharedPromptModel(model, "sdpa")
    outs = []
    for tweak in (0, 1):
        examples[0]["rejected_ids"][0] = 5 + tweak
        batch = collate(examples)
        with torch.no_grad():
            outs.append(
                shared(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    labels=labelled(batch),
                    fused_lm_head=True,
                ).log_probs
            )
    before, after = outs
    torch.testing.assert_close(before[:2], after[:2], atol=0, rtol=0)  # chosen rows identical
    assert not torch.equal(before[2], after[2])  # the changed pair's rejected row changed
