"""One row per pair: the prompt runs through the model once for both answers (`train.share_prompt`).

trl 1.16 feeds a pair as two padded rows, prompt + chosen and prompt + rejected, so every prompt token is
computed twice (the prompt is about half of an orca row). Here a pair is one row

    prompt  chosen  p  rejected            p = a copy of the prompt's last token

with position ids 0..|prompt|+|chosen|-1, then |prompt|-1.. again for `p rejected`, and a 4-D attention mask:
prompt and chosen are causal as usual; `p rejected` see the prompt without its last token, and themselves
causally, never the chosen answer. The copy `p` sits at the prompt's last position and sees exactly what the
prompt's last token sees (the prompt, itself), so its hidden state is that token's and it predicts the first
rejected token, as the prompt's last token does in trl's rejected row. Every answer token is predicted from
exactly the context and positions it has in trl's layout: the log-probs are the same numbers up to float
summation order (tests/unit/test_shared_prompt.py compares them, and the gradients, with trl's two rows).

Short pairs share a row: the pairs of a micro-batch are placed first-fit decreasing into rows as wide as its
widest pair (`place`), each pair seeing only itself (block-diagonal mask, its own position ids), so the padding
left is what the widest pair leaves, not what every pair leaves (trl pads every row to the longest).

`SharedPromptModel(model)` takes trl's call (`model(input_ids, attention_mask, labels=..., fused_lm_head=True)`
on the two-row batch), runs the one-row batch with pre-shifted labels (`shift_labels`, which trl's fused LM
head scores as given) and hands back every per-token output (log_probs, entropy, mean_logits, is_top1, ...)
in the two-row layout, so trl's loss and metrics code runs unchanged. A batch it cannot share (a pair whose
two rows do not start with the same prompt, an empty prompt, left padding, a sequence longer than the model's
sliding attention window, an MoE model's router logits) goes to the model as it came, and is counted
(`outcomes`): the trainer warns once when a batch falls back and logs how many shared. A log-prob call in a
shape this was not written for (a trl that passes position ids, shifted labels or positional arguments, or no
longer asks for the fused head) fails the run: `train.share_prompt: true` never silently means trl's two rows.

Cost: the linear layers (most of the FLOPs) see |prompt| + |chosen| + |rejected| + 1 positions per pair
instead of 2 x max(|prompt| + |answer|), and less padding; attention with a dense mask costs at most the
widest pair's square per row, about what its two rows cost.
Supported attention implementations: sdpa (boolean mask) and eager (additive float mask); flash attention
takes no 4-D mask, so the trainer refuses share_prompt with it (`check_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpo_pipeline.errors import StageError

# Attention implementations that take a custom 4-D mask, and the mask kind each wants.
SUPPORTED_ATTENTION = ("sdpa", "eager")
# Outputs of trl's fused LM head that are per position (batch, seq - 1) and move back to the two-row layout.
PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
IGNORE = -100


def check_attention(implementation: str | None) -> None:
    """Refuse an attention implementation the one-row layout cannot run on (no 4-D mask)."""
    if implementation not in SUPPORTED_ATTENTION:
        raise StageError(
            f"train.share_prompt: true needs attention that takes a 4-D mask ({' or '.join(SUPPORTED_ATTENTION)}); "
            f"the model uses {implementation!r} (set train.share_prompt: false)"
        )


@dataclass
class Packed:
    """The one-row batch and how to read its outputs back in the two-row layout."""

    input_ids: Any  # (rows, N): N = the widest pair's prompt + chosen + 1 + rejected; rows <= pairs
    position_ids: Any  # (rows, N)
    attention_mask: Any  # (rows, 1, N, N): bool (sdpa) or additive float (eager)
    shift_labels: Any  # (rows, N): the label each position predicts, IGNORE elsewhere
    index: Any  # (2 x pairs, L - 1): flat position in the one-row outputs of each two-row output
    valid: Any  # (2 x pairs, L - 1): where the two-row layout has a label
    real_positions: int  # positions holding a token (no padding)

    @property
    def positions(self) -> int:
        return self.input_ids.numel()


def _row_span(labels_row, mask_row) -> tuple[int, int] | None:
    """(prompt length, sequence length) of one right-padded trl row, or None if it is not that shape."""
    n = int(mask_row.sum())
    if n == 0 or not bool(mask_row[:n].all()):
        return None  # empty or not right-padded
    answer = (labels_row[:n] != IGNORE).nonzero().flatten()
    if answer.numel() == 0:
        return None
    start = int(answer[0])
    if start == 0 or answer.numel() != n - start or int(answer[-1]) != n - 1:
        return None  # no prompt, or the answer is not one block up to the end
    if bool((labels_row[n:] != IGNORE).any()):
        return None
    return start, n


def place(widths: list[int]) -> tuple[list[tuple[int, int]], int, int]:
    """First-fit decreasing: each pair's (row, offset) in rows as wide as the widest pair, the row count and
    the width. A row never grows past the widest pair, so attention's square per row does not grow either."""
    width = max(widths)
    free: list[int] = []  # room left per row
    spots: list[tuple[int, int]] = [(0, 0)] * len(widths)
    for i in sorted(range(len(widths)), key=lambda i: (-widths[i], i)):
        row = next((r for r, room in enumerate(free) if room >= widths[i]), None)
        if row is None:
            free.append(width)
            row = len(free) - 1
        spots[i] = (row, width - free[row])
        free[row] -= widths[i]
    return spots, len(free), width


def pack(input_ids, attention_mask, labels, mask_dtype=None, window: int | None = None) -> Packed | None:
    """The one-row-per-pair form of trl's two-row batch (rows 0..B-1 chosen, B..2B-1 rejected), short pairs
    sharing a row (each sees only itself: block-diagonal mask), or None when some pair cannot share its
    prompt. `mask_dtype` None gives a boolean mask (sdpa), a float dtype an additive mask. `window`: the
    model's sliding attention window; a sequence longer than it is left to the model's own masks (the 4-D
    mask here is full causal)."""
    import torch

    rows, length = input_ids.shape
    if rows % 2 or attention_mask is None or attention_mask.dim() != 2 or labels is None:
        return None
    pairs = rows // 2
    spans = []
    for b in range(pairs):
        chosen = _row_span(labels[b], attention_mask[b])
        rejected = _row_span(labels[pairs + b], attention_mask[pairs + b])
        if chosen is None or rejected is None or chosen[0] != rejected[0]:
            return None
        prompt = chosen[0]
        if not torch.equal(input_ids[b, :prompt], input_ids[pairs + b, :prompt]):
            return None
        if window is not None and max(chosen[1], rejected[1]) > window:
            return None
        spans.append((prompt, chosen[1], rejected[1]))

    sizes = [n_c + n_r - prompt + 1 for prompt, n_c, n_r in spans]
    spots, n_rows, width = place(sizes)
    device = input_ids.device
    ids = torch.zeros((n_rows, width), dtype=input_ids.dtype, device=device)
    positions = torch.zeros((n_rows, width), dtype=torch.long, device=device)
    shift = torch.full((n_rows, width), IGNORE, dtype=labels.dtype, device=device)
    allowed = torch.zeros((n_rows, width, width), dtype=torch.bool, device=device)
    index = torch.zeros((rows, length - 1), dtype=torch.long, device=device)
    used = torch.zeros((n_rows, width), dtype=torch.bool, device=device)
    s = torch.arange(length - 1, device=device)
    for b, ((prompt, n_c, n_r), n, (row, o)) in enumerate(zip(spans, sizes, spots, strict=True)):
        ids[row, o : o + n_c] = input_ids[b, :n_c]
        ids[row, o + n_c : o + n] = input_ids[pairs + b, prompt - 1 : n_r]
        positions[row, o : o + n_c] = torch.arange(n_c, device=device)
        positions[row, o + n_c : o + n] = torch.arange(prompt - 1, n_r, device=device)
        shift[row, o : o + n_c - 1] = labels[b, 1:n_c]
        shift[row, o + n_c : o + n - 1] = labels[pairs + b, prompt:n_r]
        q = torch.arange(n, device=device).unsqueeze(1)
        k = torch.arange(n, device=device).unsqueeze(0)
        rejected_query = q >= n_c
        hidden_from_rejected = (k >= prompt - 1) & (k < n_c)  # the prompt's last token and the chosen answer
        allowed[row, o : o + n, o : o + n] = (k <= q) & ~(rejected_query & hidden_from_rejected)
        used[row, o : o + n] = True
        # Two-row output position s predicts token s + 1; its place in the packed outputs:
        index[b] = row * width + (o + s).clamp(max=width - 1)
        index[pairs + b] = row * width + (o + n_c + s - (prompt - 1)).clamp(min=0, max=width - 1)
    # Padding sees itself only (a softmax over nothing is NaN); its position ids are never read.
    pad_row, pad_col = (~used).nonzero(as_tuple=True)
    allowed[pad_row, pad_col, pad_col] = True
    valid = labels[:, 1:] != IGNORE
    index = index.masked_fill(~valid, 0)
    mask = allowed.unsqueeze(1)
    if mask_dtype is not None:
        mask = torch.zeros(mask.shape, dtype=mask_dtype, device=device).masked_fill(
            ~mask, torch.finfo(mask_dtype).min
        )
    return Packed(ids, positions, mask, shift, index, valid, sum(sizes))


def unpack(value, packed: Packed):
    """A per-position one-row output (rows, N) in the two-row layout (2 x pairs, L - 1); zero where the
    two-row layout has no label (as trl's fused head leaves it)."""
    if value is None:
        return None
    out = value.reshape(-1)[packed.index.reshape(-1)].view(packed.index.shape)
    return out.masked_fill(~packed.valid, 0)


# What trl 1.16's _compute_loss and compute_ref_log_probs pass to the model, beyond the batch's tensors
# (input_ids, attention_mask, labels) and use_cache; anything else means trl changed how it calls the model.
KNOWN_CALL_KEYS = {
    "input_ids",
    "attention_mask",
    "labels",
    "fused_lm_head",
    "use_cache",
    "output_router_logits",
}


def check_call_shape(args: tuple, kwargs: dict) -> None:
    """Refuse a log-prob call this layout was not written for, naming what differs (a trl upgrade)."""
    problems = []
    if args:
        problems.append(f"{len(args)} positional argument(s)")
    if not kwargs.get("fused_lm_head"):
        problems.append("no fused_lm_head=True")
    missing = [k for k in ("input_ids", "attention_mask", "labels") if kwargs.get(k) is None]
    if missing:
        problems.append(f"no {', '.join(missing)}")
    unknown = sorted(set(kwargs) - KNOWN_CALL_KEYS)
    if unknown:
        problems.append(f"unknown argument(s) {', '.join(unknown)}")
    if problems:
        raise StageError(
            "train.share_prompt: true cannot engage: trl called the model with "
            + "; ".join(problems)
            + " (one row per pair is written for trl 1.16's model(input_ids=, attention_mask=, labels=, "
            "fused_lm_head=True)). Set train.share_prompt: false, or install the locked trl (constraints.txt)"
        )


class SharedPromptModel:
    """Callable in place of the (wrapped) model inside trl's loss and reference code; see the module doc."""

    def __init__(
        self,
        model: Any,
        implementation: str,
        mask_dtype: Any = None,
        counts: dict | None = None,
        window: int | None = None,
        outcomes: dict | None = None,
    ):
        check_attention(implementation)
        self.model = model
        self.window = window
        self.eager = implementation == "eager"
        self.mask_dtype = mask_dtype
        self.counts = (
            counts  # when given: the positions each one-row forward computed (all, those with a token)
        )
        # when given: how many log-prob calls ran one row per pair ("shared") and how many could not ("fallback",
        # with the last reason in "reason")
        self.outcomes = outcomes if outcomes is not None else {}

    def __call__(self, *args, **kwargs):
        import torch

        labels = kwargs.get("labels")
        if labels is None and not kwargs.get("fused_lm_head"):
            return self.model(
                *args, **kwargs
            )  # not a log-prob call (trl's deprecated return_outputs forward)
        check_call_shape(args, kwargs)
        packed = None
        reason = "an MoE model's router logits"
        if not kwargs.get("output_router_logits"):
            dtype = (self.mask_dtype or torch.float32) if self.eager else None
            packed = pack(kwargs["input_ids"], kwargs.get("attention_mask"), labels, dtype, self.window)
            reason = "a pair without a shared right-padded prompt, or longer than the sliding window"
        if packed is None:
            self.outcomes["fallback"] = self.outcomes.get("fallback", 0) + 1
            self.outcomes["reason"] = reason
            return self.model(*args, **kwargs)
        self.outcomes["shared"] = self.outcomes.get("shared", 0) + 1
        if self.counts is not None:
            self.counts["positions"] = self.counts.get("positions", 0) + packed.positions
            self.counts["real_positions"] = self.counts.get("real_positions", 0) + packed.real_positions
        rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "labels")}
        out = self.model(
            input_ids=packed.input_ids,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
            shift_labels=packed.shift_labels,
            **rest,
        )
        fields = {name: unpack(getattr(out, name, None), packed) for name in PER_TOKEN_FIELDS}
        log_probs = fields["log_probs"]
        valid = packed.valid
        num_items = kwargs.get("num_items_in_batch")
        loss = -log_probs.sum() / (valid.sum().clamp(min=1) if num_items is None else num_items)
        return type(out)(
            loss=loss,
            **fields,
            label_mask=valid,
            aux_loss=getattr(out, "aux_loss", None),
        )
