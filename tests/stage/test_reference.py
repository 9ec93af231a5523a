"""reference stage on the tiny 4-bit model: what it writes, that it is the base model alone, that it reads
only its declared params, and the marker it writes when caching is off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dpo_pipeline import layout
from dpo_pipeline.data import tables, tokens
from dpo_pipeline.models import loading
from dpo_pipeline.train import pairs as pairs_lib
from dpo_pipeline.train import reference as reference_lib
from tests.conftest import REPO, replace_params
from tests.stage.test_train import pairs_of, write_pairs


@pytest.fixture(scope="module")
def train_params(tiny_params):
    return tiny_params


@pytest.fixture(scope="module")
def tokenized_dir(tmp_path_factory, tiny_base_dir, raw_rows, train_params) -> Path:
    from dpo_pipeline.models.loading import load_tokenizer

    root = tmp_path_factory.mktemp("ref_pairs")
    return write_pairs(root, raw_rows[:40], load_tokenizer(tiny_base_dir), train_params, 10)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, train_params, tiny_base_dir, tokenized_dir) -> Path:
    from stages import reference

    out = tmp_path_factory.mktemp("reference") / "reference"
    reference.run(train_params, tiny_base_dir, tokenized_dir, out, pairs_of(tokenized_dir))
    return out


def test_writes_logps_for_the_selected_pairs_only(reference_dir, tokenized_dir, train_params):
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = json.loads((reference_dir / "meta.json").read_text())
    assert meta["precompute_ref"] is True
    assert meta["params"] == {k: getattr(train_params.train, k.split(".")[1]) for k in reference_lib.SECTIONS}
    assert all(k.startswith("train.") for k in reference_lib.SECTIONS)  # no seed, no length limit
    selected = pairs_lib.read_selected(pairs_of(tokenized_dir))
    # The tiny run consumes 4 steps x 4 pairs = 16 of the 30 training rows; the whole test split is held out.
    assert len(selected["train"]) == pairs_lib.pairs_needed(train_params.train) == 16
    assert pq.read_table(tokenized_dir / "train.parquet").num_rows > 16
    for split in ("train", "test"):
        table = pq.read_table(reference_dir / f"{split}.parquet")
        assert table.column_names == ["id", "ref_chosen_logps", "ref_rejected_logps"]
        assert table.schema.field("ref_chosen_logps").type == pa.float32()
        assert table.column("id").to_pylist() == sorted(selected[split])
        assert meta["rows"][split] == table.num_rows
        for name in ("ref_chosen_logps", "ref_rejected_logps"):
            values = table.column(name).to_pylist()
            assert all(v < 0 for v in values), "log-probs of whole answers are negative"


def test_reference_is_the_base_model_alone(reference_dir, tokenized_dir, tiny_base_dir, train_params):
    """Independent check: a plain forward of the 4-bit base (no PEFT wrapper, no trl) gives the same sums."""
    import pyarrow.parquet as pq
    import torch

    from dpo_pipeline.models.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_base_dir)
    model = loading.load_policy(tiny_base_dir, train_params.train).eval()
    prepared = {
        row["id"]: row
        for row in pq.read_table(tokenized_dir.parent / "prepared" / "test.parquet").to_pylist()
    }
    cached = pq.read_table(reference_dir / "test.parquet").to_pylist()
    eos = tokenizer.eos_token
    for ref in cached[:6]:
        row = prepared[ref["id"]]
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        for answer, key in (("chosen", "ref_chosen_logps"), ("rejected", "ref_rejected_logps")):
            text = tokens.strip_turn_newline(row[answer], eos)
            ids = tokenizer(row["prompt"] + text, add_special_tokens=False)["input_ids"]
            assert ids[: len(prompt_ids)] == prompt_ids
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, :-1].float()
            logps = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            expected = logps[len(prompt_ids) - 1 :].sum().item()
            assert ref[key] == pytest.approx(expected, abs=2e-3), (row["id"], answer)


def test_undeclared_params_do_not_change_the_output(
    tmp_path, reference_dir, tokenized_dir, tiny_base_dir, train_params
):
    from stages import reference

    other = replace_params(
        train_params,
        train={
            "beta": 0.5,
            "learning_rate": 1.0e-3,
            "max_steps": 9,
            "lora": {"r": 2},
            "per_device_train_batch_size": 2,
        },
    )
    reference.run(other, tiny_base_dir, tokenized_dir, tmp_path / "reference", pairs_of(tokenized_dir))
    for name in ("train.parquet", "test.parquet", "meta.json"):
        assert (tmp_path / "reference" / name).read_bytes() == (reference_dir / name).read_bytes(), name


def test_declared_params_match_dvc_yaml():
    from stages import prepare, tokenize, train

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages["reference"]["params"] == reference_lib.SECTIONS
    assert stages["train"]["params"] == train.SECTIONS
    assert stages["tokenize"]["params"] == tokenize.SECTIONS
    assert stages["prepare"]["params"] == prepare.SECTIONS
    assert "data/reference" in stages["train"]["deps"]
    assert "data/tokenized" in stages["train"]["deps"]
    # train.method simpo, cpo, orpo and kto hand trl the selected pairs' text (trl 1.16 takes no ids for them);
    # method dpo never reads it (stages/train.py hashes data/prepared as an input only for those methods).
    assert "data/prepared" in stages["train"]["deps"]


def test_precompute_off_writes_only_a_marker(tmp_path, tokenized_dir, tiny_base_dir, train_params):
    from stages import reference

    params = replace_params(train_params, train={"precompute_ref": False})
    meta = reference.run(
        params, tiny_base_dir, tokenized_dir, tmp_path / "reference", pairs_of(tokenized_dir)
    )
    assert sorted(p.name for p in (tmp_path / "reference").iterdir()) == ["meta.json"]
    assert meta["precompute_ref"] is False and meta["rows"] == {}


def test_train_refuses_the_marker(tmp_path, tokenized_dir, tiny_base_dir, train_params):
    from dpo_pipeline.errors import StageError
    from stages import reference, train

    reference.run(
        replace_params(train_params, train={"precompute_ref": False}),
        tiny_base_dir,
        tokenized_dir,
        tmp_path / "ref",
        pairs_of(tokenized_dir),
    )
    with pytest.raises(StageError, match="cached nothing"):
        train.run(
            train_params,
            tiny_base_dir,
            tokenized_dir,
            tmp_path / "ref",
            tmp_path / "adapter",
            tmp_path / "train.json",
            tmp_path / "history.csv",
            tmp_path / "ckpt",
            pairs_dir=pairs_of(tokenized_dir),
        )
    assert not (tmp_path / "adapter").exists()


def test_longest_first_matches_the_prepared_order_row_by_row(
    monkeypatch, reference_dir, tokenized_dir, tiny_base_dir, train_params
):
    """The stage batches rows longest first (less padding); trl on the prepared order, batched as before that
    change, gives the same log-probs for every id, and the output keeps the prepared row order either way."""
    import pyarrow.parquet as pq
    import torch

    prepared = pairs_lib.to_dataset(tables.read_tokenized(tokenized_dir, "train"))
    reordered = reference_lib.longest_first(prepared)
    lengths = reordered[tokens.LENGTH_COLUMN]
    assert lengths == sorted(lengths, reverse=True)
    assert sorted(reordered["id"]) == sorted(prepared["id"])
    assert reordered["id"] != prepared["id"], (
        "the fixture rows must come in another order, or this checks nothing"
    )

    monkeypatch.setattr(reference_lib, "longest_first", lambda dataset: dataset)
    in_prepared_order = reference_lib.compute(
        train_params, tiny_base_dir, tokenized_dir, pairs_of(tokenized_dir)
    )
    for split, table in in_prepared_order.items():
        cached = pq.read_table(reference_dir / f"{split}.parquet")
        assert cached.column("id").to_pylist() == table.column("id").to_pylist()
        for name in layout.REF_COLUMNS:
            expected = torch.tensor(table.column(name).to_pylist())
            actual = torch.tensor(cached.column(name).to_pylist())
            assert torch.allclose(actual, expected, rtol=0, atol=1e-4), (
                split,
                name,
                (actual - expected).abs().max(),
            )
