# ruff: noqa: F811 - the fixtures imported from test_train are parameters here
"""Each trl 1.16 DPO loss the pipeline exposes, on a fixed batch of the tiny 4-bit model: the loss the trainer
computes (through the pipeline's trainer, with and without one row per pair) equals the loss written out here
from its formula, from log-probs computed here by a plain forward of the two rows (policy = the base with a
perturbed adapter, reference = the adapter disabled)."""

from __future__ import annotations

import math

import pytest

from tests.conftest import replace_params
from tests.stage.test_train import (  # noqa: F401 - the fixtures
    pairs_of,
    tokenized_dir,
    train_params,
)

BETA = 0.3
EPS = 0.1


def formula(loss: str, pc, pr, rc, rr, mask_c, mask_r, tok_c):
    """Per-pair losses from policy (pc, pr) and reference (rc, rr) sequence log-probs; mask_c/mask_r: completion
    token counts; tok_c: the chosen answers' per-token log-probs (for sft)."""
    import torch
    import torch.nn.functional as F

    lc, lr = pc - rc, pr - rr
    d = lc - lr
    b = BETA
    if loss == "sigmoid":
        return -F.logsigmoid(b * d)
    if loss == "hinge":
        return torch.relu(1 - b * d)
    if loss == "ipo":
        return (lc / mask_c - lr / mask_r - 1 / (2 * b)) ** 2
    if loss == "robust":
        return (-(1 - EPS) * F.logsigmoid(b * d) + EPS * F.logsigmoid(-b * d)) / (1 - 2 * EPS)
    if loss == "exo_pair":
        q, nq = torch.sigmoid(b * d), torch.sigmoid(-b * d)
        return q * (F.logsigmoid(b * d) - math.log(1 - EPS)) + nq * (F.logsigmoid(-b * d) - math.log(EPS))
    if loss == "nca_pair":
        return -F.logsigmoid(b * lc) - 0.5 * F.logsigmoid(-b * lc) - 0.5 * F.logsigmoid(-b * lr)
    if loss == "bco_pair":
        return -F.logsigmoid(b * lc) - F.logsigmoid(-b * lr)
    if loss == "sppo_hard":
        return (lc - 0.5 / b) ** 2 + (lr + 0.5 / b) ** 2
    if loss == "apo_zero":
        return 1 - torch.sigmoid(b * lc) + torch.sigmoid(b * lr)
    if loss == "apo_down":
        return torch.sigmoid(b * lc) + 1 - torch.sigmoid(b * d)
    if loss == "sigmoid_norm":
        return -F.logsigmoid(b * (lc / mask_c - lr / mask_r))
    if loss == "discopop":
        x = b * d
        mod = torch.sigmoid(x / 0.05)
        return -F.logsigmoid(x) * (1 - mod) + torch.exp(-x) * mod
    if loss == "aot":
        x = torch.sort(pc - pr).values - torch.sort(rc - rr).values
        return -F.logsigmoid(b * x) * (1 - EPS) - F.logsigmoid(-b * x) * EPS
    if loss == "aot_unpaired":
        x = torch.sort(lc).values - torch.sort(lr).values
        return -F.logsigmoid(b * x) * (1 - EPS) - F.logsigmoid(-b * x) * EPS
    if loss == "sft":
        return -tok_c.mean().expand(pc.shape[0])
    raise AssertionError(loss)


LOSSES = [
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "apo_zero", "apo_down", "sigmoid_norm", "discopop", "aot", "aot_unpaired", "sft",
]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory, train_params, tiny_base_dir, tokenized_dir):
    """A pipeline DPO trainer per layout on the tiny model with a perturbed adapter, one fixed batch, and the
    log-probs of that batch computed here."""
    import torch

    from dpo_pipeline.data.tables import read_tokenized
    from dpo_pipeline.models import loading
    from dpo_pipeline.train import dpo, pairs, trl_glue

    params = replace_params(
        train_params,
        train={"precompute_ref": False, "beta": BETA, "lora": {"dropout": 0.0}, "loss_type": "sigmoid"},
    )
    table = read_tokenized(tokenized_dir, "train").slice(0, 6)
    dataset = pairs.to_dataset(table)
    trainers = {}
    for share in (False, True):
        torch.manual_seed(0)
        trainer = trl_glue.trainer_class(share)(
            model=loading.load_policy(tiny_base_dir, params.train),
            args=dpo.dpo_config(params, tmp_path_factory.mktemp("out")),
            train_dataset=dataset,
            processing_class=loading.load_tokenizer(tiny_base_dir),
            peft_config=loading.lora_config(params.train.lora),
        )
        with torch.no_grad():  # the same perturbation in both: policy != reference
            gen = torch.Generator().manual_seed(1)
            for name, weight in sorted(trainer.model.named_parameters()):
                if "lora_B" in name:
                    weight.copy_(torch.randn(weight.shape, generator=gen) * 0.05)
        trainer.model.eval()
        trainers[share] = trainer
    trainer = trainers[False]
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    batch = {k: v.to(trainer.accelerator.device) for k, v in batch.items()}

    def logps(model):
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.float()
        per_token = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        return per_token * batch["completion_mask"][:, 1:]

    policy = logps(trainer.model)
    with trainer.model.disable_adapter():
        reference = logps(trainer.model)
    mask = batch["completion_mask"][:, 1:]
    n = mask.shape[0] // 2
    pc, pr = policy.sum(1)[:n], policy.sum(1)[n:]
    rc, rr = reference.sum(1)[:n], reference.sum(1)[n:]
    counts = batch["completion_mask"].sum(1).float()
    tok_c = policy[:n][mask[:n].bool()]
    expected = {
        loss: formula(loss, pc, pr, rc, rr, counts[:n], counts[n:], tok_c).mean().item() for loss in LOSSES
    }
    assert abs(pc - rc).max() > 1e-3, "the perturbed adapter did not move the policy"
    return trainers, batch, expected


def trainer_loss(trainer, batch, losses, weights, eps=EPS):
    import torch

    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = losses, weights, eps
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(batch)).item()


@pytest.mark.parametrize("share", [False, True], ids=["two_rows", "one_row_per_pair"])
@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_is_its_formula(setup, loss, share):
    trainers, batch, expected = setup
    got = trainer_loss(trainers[share], batch, [loss], [1.0])
    assert got == pytest.approx(expected[loss], rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("share", [False, True], ids=["two_rows", "one_row_per_pair"])
def test_a_weighted_loss_list_is_the_weighted_sum(setup, share):
    """RPO ([sigmoid, sft] with [1, alpha]) and MPO ([sigmoid, bco_pair, sft] with [0.8, 0.2, 1.0])."""
    trainers, batch, expected = setup
    rpo = trainer_loss(trainers[share], batch, ["sigmoid", "sft"], [1.0, 0.5])
    assert rpo == pytest.approx(expected["sigmoid"] + 0.5 * expected["sft"], rel=1e-3, abs=1e-4)
    mpo = trainer_loss(trainers[share], batch, ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    want = 0.8 * expected["sigmoid"] + 0.2 * expected["bco_pair"] + expected["sft"]
    assert mpo == pytest.approx(want, rel=1e-3, abs=1e-4)


def test_label_smoothing_moves_exactly_the_losses_that_read_it(setup):
    """The behaviour behind config.LABEL_SMOOTHING_LOSSES: only those losses change with label_smoothing."""
    from dpo_pipeline.config import LABEL_SMOOTHING_LOSSES

    trainers, batch, _expected = setup
    moved = {
        loss
        for loss in LOSSES
        if loss != "exo_pair"  # undefined at 0 (trl refuses it there); it reads epsilon by definition
        and abs(
            trainer_loss(trainers[False], batch, [loss], [1.0], 0.0)
            - trainer_loss(trainers[False], batch, [loss], [1.0], 0.2)
        )
        > 1e-6
    }
    assert moved | {"exo_pair"} == set(LABEL_SMOOTHING_LOSSES)
