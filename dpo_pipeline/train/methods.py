"""train.method -> trl's trainer config and the rows it reads: dpo, simpo, cpo, orpo, kto (config.METHODS).

dpo is trl's DPOTrainer on the tokenize stage's ids with the cached reference log-probs (dpo.dpo_config,
dpo.training_datasets). The other methods run trl's own trainers, which in trl 1.16 take no pre-tokenized
rows: they get the text of the very rows the pairs stage selected, in its order, as the tokenize stage handed it
to its tokenizer (data.tables.trl_texts), and tokenize it themselves:
- simpo, cpo: trl.experimental.cpo.CPOTrainer (simpo: loss_type simpo, cpo_alpha 0, train.simpo_gamma;
  cpo: loss_type sigmoid, train.cpo_alpha). No reference model.
- orpo: trl.experimental.orpo.ORPOTrainer (train.beta is the odds-ratio weight lambda). No reference model.
- kto: trl.KTOTrainer on the pairs unpaired by trl's rule (unpair_preference_dataset: chosen -> label true,
  rejected -> label false) one pair at a time, then shuffled with `seed`: trl's batched unpairing would put a
  thousand desirable rows before their undesirable twins, and KTO reads its rows in order (its KL term pairs
  each prompt with the completion of the row before it in the batch). Its reference (the base with the adapter
  disabled) is computed by trl inside train, once before the first step with train.precompute_ref, else on
  every step: the reference stage's paired log-probs cannot serve the KL term's mismatched completions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_pipeline.train import dpo

if TYPE_CHECKING:  # annotations only, never run: tools/dag.py counts no code dep for it
    from dpo_pipeline.config import Params


def trainer_config(p: Params, out_dir: str | Path):
    """The trl config of train.method with every knob from params; `out_dir` receives the checkpoints."""
    t = p.train
    if t.method == "dpo":
        return dpo.dpo_config(p, out_dir)
    common = dpo.common_kwargs(p, out_dir)
    if t.method in ("simpo", "cpo"):
        from trl.experimental.cpo import CPOConfig

        from dpo_pipeline.config import SIMPO_CPO_ALPHA

        if t.method == "simpo":
            method = {"loss_type": "simpo", "cpo_alpha": SIMPO_CPO_ALPHA, "simpo_gamma": t.simpo_gamma}
        else:
            method = {"loss_type": "sigmoid", "cpo_alpha": t.cpo_alpha}
        return CPOConfig(**common, **method, label_smoothing=t.label_smoothing)
    if t.method == "orpo":
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig(**common)
    if t.method == "kto":
        from trl import KTOConfig

        return KTOConfig(
            **common,
            desirable_weight=t.desirable_weight,
            undesirable_weight=t.undesirable_weight,
            precompute_ref_log_probs=t.precompute_ref,
            precompute_ref_batch_size=t.reference_batch_size,
        )
    raise ValueError(f"unknown train.method {t.method!r}")  # config.parse refuses it first


def inert_options(p: Params) -> list[str]:
    """The pipeline's own optimisations that cannot engage with train.method, each as one line (logged)."""
    from dpo_pipeline.config import METHODS

    t = p.train
    if t.method == "dpo":
        return []
    out = []
    if t.share_prompt:
        out.append(
            f"train.share_prompt: true cannot engage with method {t.method} (trl's trainer runs its own "
            "forward): chosen and rejected run as two rows"
        )
    if not METHODS[t.method]["reference"]:
        if t.precompute_ref:
            out.append(
                f"train.precompute_ref: method {t.method} has no reference model: nothing to precompute"
            )
    elif t.group_by_length:
        out.append(
            "train.group_by_length: method kto shuffles the unpaired rows (see dpo_pipeline/train/methods.py): "
            "batches are not length-grouped"
        )
    return out


def text_datasets(p: Params, prepared_dir: Path, pairs_dir: Path, eos: str) -> dict[str, Any]:
    """{split: datasets.Dataset} of the selected pairs' text for simpo/cpo/orpo (prompt, chosen, rejected) or
    kto (prompt, completion, label), in the pairs stage's order."""
    from datasets import Dataset

    from dpo_pipeline.data.tables import read_prepared, trl_texts
    from dpo_pipeline.layout import SPLITS
    from dpo_pipeline.train import pairs

    wanted = pairs.training_ids(pairs_dir)
    datasets = {}
    for split in SPLITS:
        texts = trl_texts(read_prepared(prepared_dir, split), eos)
        path = Path(prepared_dir) / f"{split}.parquet"
        table = pairs.rows_in_order(texts, wanted[split], path).select(["prompt", "chosen", "rejected"])
        dataset = Dataset(table)
        if p.train.method == "kto":
            dataset = unpaired(dataset, p.seed)
            if split == "train":  # the rows the run's steps read: trl would compute their reference for all
                dataset = dataset.select(
                    range(min(len(dataset), pairs.global_batch(p.train) * p.train.max_steps))
                )
        datasets[split] = dataset
    return datasets


def unpaired(dataset, seed: int):
    """trl's unpairing rule, one pair at a time (chosen row then rejected row), then shuffled with `seed`."""
    from trl.data_utils import unpair_preference_dataset

    rows = unpair_preference_dataset(dataset, batch_size=1)
    return rows.shuffle(seed=seed).flatten_indices()
