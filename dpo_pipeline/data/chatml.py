"""The ONE rule that turns (system, question, answer) into the article's ChatML strings, and its checks."""

from __future__ import annotations


def has_system_turn(system: str) -> bool:
    """THE rule for the system turn, everywhere (prepare's rows, the builtin base's pre-training text, the
    evaluation prompts): a system turn whenever the system text is non-empty, even only whitespace, exactly as
    the article's `chatml_format` (`len(example['system']) > 0`)."""
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
    """The prompt as the prepare stage builds it: the conversation rendered by the tokenizer's own chat template
    in one call, ending in the assistant's generation prompt. For ChatML it equals format_row's prompt (the
    article's two calls) byte for byte (tests/unit/test_prepare_format.py)."""
    return tokenizer.apply_chat_template(
        conversation(system, question), tokenize=False, add_generation_prompt=True
    )


# ChatML's turn markers: text holding one would open or close a turn (filters.special_texts refuses them).
TURN_MARKERS = ("<|im_start|>", "<|im_end|>")

# The article appends the end-of-turn marker to both answers by hand.
ANSWER_SUFFIX = "<|im_end|>\n"


def require_chatml(tokenizer) -> None:
    """Refuse a tokenizer whose chat template is not ChatML: the answers are closed with ANSWER_SUFFIX as in the
    article, which only a ChatML template (with <|im_end|> as a token) ends a turn with."""
    from dpo_pipeline.errors import StageError

    end_of_turn = ANSWER_SUFFIX.strip()
    token_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    try:
        prompt = format_prompt("s", "q", tokenizer)
    except Exception as err:  # noqa: BLE001 - any template error means "not this shape"
        raise StageError(f"chat template: rendering a prompt failed ({type(err).__name__}: {err})") from None
    if token_id in (None, tokenizer.unk_token_id) or not prompt.endswith(f"{TURN_MARKERS[0]}assistant\n"):
        raise StageError(
            f"chat template: answers are closed with {end_of_turn!r} as in the article, but the base "
            f"tokenizer's template renders a prompt as {prompt[-60:]!r}; expected a ChatML template"
        )


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
