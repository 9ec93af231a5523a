"""The ONE rule that turns a conversation and its two answers into the strings DPO trains on: the base tokenizer's
own chat template (ChatML for OpenHermes and the builtin base, where it equals the article's strings byte for
byte), and the template's control strings no raw text may hold."""

from __future__ import annotations

import re
from collections.abc import Sequence


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


def prompt_messages(system: str, history: Sequence[dict[str, str]], question: str) -> list[dict[str, str]]:
    """Every turn of a prompt in order: the system turn (by has_system_turn), the earlier turns, the question."""
    messages = [{"role": "system", "content": system}] if has_system_turn(system) else []
    return [*messages, *history, {"role": "user", "content": question}]


def render_pair(
    messages: list[dict[str, str]], answers: Sequence[str], tokenizer, where: str = ""
) -> tuple[str, list[str]]:
    """(prompt, each answer) as the template renders them: the prompt is the conversation with the generation
    prompt; an answer is what the whole conversation with that answer as the assistant's turn adds after the
    prompt (its end-of-turn marker included). One call per string, so a template that adds a default system
    prompt adds it once, in the prompt, never again in an answer. For ChatML an answer is the text plus
    "<|im_end|>\n", as the article writes it by hand."""
    from dpo_pipeline.errors import StageError

    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = []
    for answer in answers:
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": answer}], tokenize=False
        )
        if not full.startswith(prompt):
            raise StageError(
                f"chat template{where}: the conversation rendered with its answer does not begin with the prompt "
                f"rendered with add_generation_prompt ({prompt[-40:]!r} vs {full[len(prompt) - 40 : len(prompt)]!r}), "
                "so prompt and answer cannot be split as trl trains them"
            )
        out.append(full[len(prompt) :])
    return prompt, out


_MARKUP = re.compile(r"<[^<>\s]{1,40}>|\[[^\[\]\s]{1,40}\]")
_PROBE = ("zqxsystemzqx", "zqxuserzqx", "zqxassistantzqx", "zqxnextzqx")


def template_controls(tokenizer) -> tuple[str, ...]:
    """The template's control strings: the bracketed markup (<...> or [...], no spaces) in what it writes around
    a probe conversation's messages (ChatML: <|im_start|>, <|im_end|>; Llama-3: <|start_header_id|>, ...;
    Mistral: [INST], [/INST]; Zephyr: <|user|>, </s>, ...). A raw text holding one could open or close a turn.
    Plain-word markup (Alpaca's "### Instruction:") is not found this way: such templates are not guarded."""
    system, user, assistant, nxt = _PROBE
    turns = [
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
        {"role": "user", "content": nxt},
    ]
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, *turns], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # noqa: BLE001 - templates without a system role (Gemma) raise: probe without it
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    for probe in _PROBE:
        text = text.replace(probe, "\n")
    return tuple(sorted(set(_MARKUP.findall(text))))


def require_template(tokenizer) -> None:
    """A template the prepare stage can render rows with: it renders a two-turn probe, and the probe with an
    answer begins with the prompt (render_pair). StageError naming what broke."""
    from dpo_pipeline.errors import StageError

    if not getattr(tokenizer, "chat_template", None):
        raise StageError("chat template: the base tokenizer has none (models/base/tokenizer_config.json)")
    try:
        render_pair(conversation("s", "q"), ["a"], tokenizer)
        template_controls(tokenizer)
    except StageError:
        raise
    except Exception as err:  # noqa: BLE001 - any template error means "cannot render rows"
        raise StageError(f"chat template: rendering a prompt failed ({type(err).__name__}: {err})") from None


def format_prompt(system: str, question: str, tokenizer) -> str:
    """The prompt as the prepare stage builds it: the conversation rendered by the tokenizer's own chat template
    in one call, ending in the assistant's generation prompt. For ChatML it equals format_row's prompt (the
    article's two calls) byte for byte (tests/unit/test_prepare_format.py)."""
    return tokenizer.apply_chat_template(
        conversation(system, question), tokenize=False, add_generation_prompt=True
    )


# ChatML's turn markers: text holding one would open or close a turn (filters.special_texts refuses them where
# the base's template is not at hand; template_controls finds the same two in a ChatML template).
TURN_MARKERS = ("<|im_start|>", "<|im_end|>")

# The article appends the end-of-turn marker to both answers by hand.
ANSWER_SUFFIX = "<|im_end|>\n"


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
