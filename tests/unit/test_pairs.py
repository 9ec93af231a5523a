"""pairs stage: which pairs a run consumes (pairs_seed) and in which order (seed), decided before training."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dpo_pipeline import layout
from dpo_pipeline.train import dpo
from dpo_pipeline.train import pairs as pairs_lib
from dpo_pipeline.train import reference as reference_lib
from stages import pairs
from tests.conftest import REPO, replace_params

IDS = [f"id{i:03d}" for i in range(50)]
LENGTHS = {row_id: 10 + (i * 37) % 90 for i, row_id in enumerate(IDS)}


def test_select_draws_exactly_the_pairs_needed_or_the_whole_split():
    picked = pairs_lib.select_train(IDS, 16, pairs_seed=0)
    assert len(picked) == len(set(picked)) == 16 and picked == sorted(picked) and set(picked) <= set(IDS)
    assert (
        pairs_lib.select_train(list(reversed(IDS)), 16, pairs_seed=0) == picked
    )  # input order is irrelevant
    assert pairs_lib.select_train(IDS, 16, pairs_seed=1) != picked
    assert pairs_lib.select_train(IDS, 50, pairs_seed=0) == IDS
    assert pairs_lib.select_train(IDS, 120, pairs_seed=5) == IDS  # more than one epoch: the whole split
    assert pairs_lib.select_eval(IDS[::-1], 5) == IDS[:5] and pairs_lib.select_eval(IDS, 0) == IDS


def test_order_runs_seeded_epochs_and_groups_by_length():
    order = pairs_lib.training_order(IDS, LENGTHS, 120, seed=3, batch=8, group_by_length=True)
    assert len(order) == 120
    counts = Counter(order)
    assert set(counts) == set(IDS) and set(counts.values()) <= {2, 3}  # 2.4 epochs
    assert Counter(order[:50]) == Counter(IDS) and Counter(order[50:100]) == Counter(IDS)  # whole epochs
    assert order != pairs_lib.training_order(IDS, LENGTHS, 120, seed=4, batch=8, group_by_length=True)
    assert order == pairs_lib.training_order(IDS, LENGTHS, 120, seed=3, batch=8, group_by_length=True)
    assert LENGTHS[order[0]] == max(LENGTHS.values())  # longest first, as transformers' sampler does
    many = [f"m{i:04d}" for i in range(400)]
    lengths = {row_id: 10 + (i * 37) % 290 for i, row_id in enumerate(many)}

    def padding(order):  # pad tokens when each batch of 4 is padded to its longest row
        batches = [order[k : k + 4] for k in range(0, len(order), 4)]
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = pairs_lib.training_order(many, lengths, 400, seed=3, batch=4, group_by_length=True)
    shuffled = pairs_lib.training_order(many, lengths, 400, seed=3, batch=4, group_by_length=False)
    assert padding(grouped) < padding(shuffled) / 5


@pytest.fixture
def tokenized(tmp_path):
    root = tmp_path / "tokenized"
    root.mkdir()
    for split, ids in (("train", IDS), ("test", [f"t{i}" for i in range(7)])):
        pq.write_table(
            pa.table({"id": ids, "length": pa.array([LENGTHS.get(i, 20) for i in ids], pa.int32())}),
            root / f"{split}.parquet",
        )
    return root


def test_a_seed_only_reorders_and_pairs_seed_only_reselects(default_params, tokenized, tmp_path):
    params = replace_params(
        default_params,
        train={
            "max_steps": 3,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "eval_pairs": 4,
        },
    )
    selected, order, metrics = pairs_lib.build(params, tokenized)
    assert metrics["pairs_needed"] == 24 == metrics["selected_train"] and metrics["eval_pairs"] == 4
    assert (
        sorted(order.column("id").to_pylist())
        == selected.filter(pa.compute.equal(selected.column("split"), "train")).column("id").to_pylist()
    )
    reseeded = replace_params(params, seed=params.seed + 1)
    selected2, order2, _ = pairs_lib.build(reseeded, tokenized)
    assert selected2.equals(selected) and not order2.equals(order)
    pairs_lib.write(tmp_path / "a", selected, order)
    pairs_lib.write(tmp_path / "b", selected2, order2)
    # Byte-identical selected.parquet: DVC then skips the reference stage on a seed sweep.
    assert (tmp_path / "a" / layout.SELECTED_FILE).read_bytes() == (
        tmp_path / "b" / layout.SELECTED_FILE
    ).read_bytes()
    other_pairs, _, _ = pairs_lib.build(replace_params(params, train={"pairs_seed": 9}), tokenized)
    assert not other_pairs.equals(selected)
    assert pairs_lib.read_order(tmp_path / "a") == order.column("id").to_pylist()


def test_declared_params_and_deps_match_dvc_yaml():

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["pairs"]["params"] == pairs.SECTIONS
    assert stages["reference"]["params"] == reference_lib.SECTIONS
    assert "data/pairs/selected.parquet" in stages["reference"]["deps"]
    assert "data/pairs/order.parquet" not in stages["reference"]["deps"]  # a reorder never re-scores
    assert {"data/pairs/selected.parquet", "data/pairs/order.parquet"} <= set(stages["train"]["deps"])


def test_train_reads_the_order_front_to_back(default_params, tmp_path):
    from torch.utils.data import SequentialSampler

    config = dpo.dpo_config(default_params, tmp_path)
    assert config.train_sampling_strategy == "sequential"
    assert isinstance(SequentialSampler(range(3)), SequentialSampler)
