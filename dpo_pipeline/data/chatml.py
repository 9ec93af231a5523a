"""The ONE rule that turns (system, question, answer) into the article's ChatML strings, and its checks."""

from __future__ import annotations

from collections.abc import Iterable

from dpo_pipeline.errors import StageError
from dpo_pipeline.layout import TEXT_COLUMNS


def has_system_turn(system: str) -> bool:
    """THE rule for the system turn, everywhere (prepare's rows, the builtin base's pre-training text, the
    evaluation prompts): a system turn whenever the system text is non-empty, even only whitespace, exactly as
    the article's `chatml_format` (`len(example['system']) > 0`). format_table applies it vectorised
    (utf8_length > 0), checked against format_row on every run."""
    return len(system) > 0


def conversation(system: str, question: str, answer: str | None = None) -> list[dict[str, str]]:
    """ChatML messages for (system, question[, answer]), the system turn by has_system_turn."""
    messages = [{"role": "system", "content": system}] if has_system_turn(system) else []
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def format_prompt(system: str, question: str, tokenizer) -> str:
    """A ChatML prompt as the prepare stage builds it (the same turns as format_row's prompt), ending in the
    assistant's generation prompt."""
    return tokenizer.apply_chat_template(
        conversation(system, question), tokenize=False, add_generation_prompt=True
    )


# ChatML's turn markers: text holding one would open or close a turn (filters.special_texts refuses them).
TURN_MARKERS = ("<|im_start|>", "<|im_end|>")

# The article appends the end-of-turn marker to both answers by hand.
ANSWER_SUFFIX = "<|im_end|>\n"


CHECK_ROWS = 8  # rows on which the vectorised formatting is compared with format_row at run time


def format_row(row: dict[str, str], tokenizer) -> dict[str, str]:
    """One row in ChatML, exactly as the article's `chatml_format`: the reference implementation."""
    # Format system
    if has_system_turn(row["system"]):
        message = {"role": "system", "content": row["system"]}
        system = tokenizer.apply_chat_template([message], tokenize=False)
    else:
        system = ""

    # Format instruction
    message = {"role": "user", "content": row["question"]}
    prompt = tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)

    # Format chosen answer
    chosen = row["chosen"] + ANSWER_SUFFIX

    # Format rejected answer
    rejected = row["rejected"] + ANSWER_SUFFIX

    return {"prompt": system + prompt, "chosen": chosen, "rejected": rejected}


_SENTINEL = "\x00SENTINEL-{}\x00"


# Contents that a template which strips, escapes or otherwise edits the text would render differently.
_PROBES = ("plain", " leading and trailing space \n", "line\n\nbreaks {{ braces }} <b>&amp;</b>", "é 日本")


def template_pieces(tokenizer) -> dict[str, str]:
    """The constant text around a system turn and around a user turn (with the generation prompt).

    The template is rendered once with sentinel contents and split around them. Raises StageError when
    the template does not render as prefix + content + suffix for every content, since then the
    vectorised formatting would differ from `format_row`.
    """
    pieces: dict[str, str] = {}
    for role, kwargs in (("system", {}), ("user", {"add_generation_prompt": True})):

        def render(content: str, role: str = role, kwargs: dict = kwargs) -> str:
            try:
                return tokenizer.apply_chat_template(
                    [{"role": role, "content": content}], tokenize=False, **kwargs
                )
            except Exception as err:  # noqa: BLE001 - jinja errors of any kind mean "not this shape"
                raise StageError(
                    f"chat template: rendering a single {role} turn failed ({type(err).__name__}: {err}); "
                    "expected a ChatML template"
                ) from None

        sentinel = _SENTINEL.format(role)
        rendered = render(sentinel)
        if not isinstance(rendered, str) or rendered.count(sentinel) != 1:
            raise StageError(
                f"chat template: a single {role} turn does not render its content exactly once; "
                "expected a ChatML-style template (prefix + content + suffix)"
            )
        prefix, suffix = rendered.split(sentinel)
        for probe in _PROBES:
            got = render(probe)
            if got != prefix + probe + suffix:
                raise StageError(
                    f"chat template: the {role} turn is not rendered as a constant prefix + content + "
                    f"constant suffix (content {probe!r} rendered as {got!r}); expected a ChatML-style "
                    "template"
                )
        pieces[f"{role}_prefix"], pieces[f"{role}_suffix"] = prefix, suffix
    end_of_turn = ANSWER_SUFFIX.strip()
    token_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    if token_id is None or token_id == tokenizer.unk_token_id or end_of_turn not in pieces["user_suffix"]:
        raise StageError(
            f"chat template: answers are closed with {end_of_turn!r} as in the article, but the base "
            "tokenizer does not have it as a token ending the user turn; expected a ChatML template"
        )
    return pieces


def format_table(table, tokenizer):
    """(prompt, chosen, rejected) arrays for a table with TEXT_COLUMNS: `format_row` for every row at once."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pieces = template_pieces(tokenizer)
    system = table["system"]
    system_turn = pc.if_else(
        pc.greater(pc.utf8_length(system), 0),
        pc.binary_join_element_wise(pieces["system_prefix"], system, pieces["system_suffix"], ""),
        pa.scalar("", pa.string()),
    )
    prompt = pc.binary_join_element_wise(
        system_turn, pieces["user_prefix"], table["question"], pieces["user_suffix"], ""
    )
    chosen = pc.binary_join_element_wise(table["chosen"], ANSWER_SUFFIX, "")
    rejected = pc.binary_join_element_wise(table["rejected"], ANSWER_SUFFIX, "")
    return prompt, chosen, rejected


def check_formatting(table, formatted, tokenizer, rows: Iterable[int]) -> None:
    """Raise StageError unless the vectorised formatting equals `format_row` on the given rows."""
    prompt, chosen, rejected = formatted
    for i in rows:
        raw = {name: table[name][i].as_py() for name in TEXT_COLUMNS}
        expected = format_row(raw, tokenizer)
        got = {"prompt": prompt[i].as_py(), "chosen": chosen[i].as_py(), "rejected": rejected[i].as_py()}
        if got != expected:
            raise StageError(
                f"internal check failed: vectorised ChatML formatting of row {i} differs from format_row "
                f"(got {str(got)[:300]!r}, expected {str(expected)[:300]!r})"
            )


def check_rows(table) -> list[int]:
    """A few rows to compare: the first rows plus the first with and without a system prompt."""
    import pyarrow.compute as pc

    n = table.num_rows
    picks = set(range(min(CHECK_ROWS, n)))
    has_system = pc.greater(pc.utf8_length(table["system"]), 0)
    for wanted in (True, False):
        index = pc.index(has_system, wanted).as_py()
        if index >= 0:
            picks.add(index)
    return sorted(picks)
