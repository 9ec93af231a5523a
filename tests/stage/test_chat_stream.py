"""Issue 17, point 1: the chat streams an answer piece by piece as tokens are generated, and stops mid-answer."""

from __future__ import annotations

import threading

from dpo_pipeline.scoring import load_eval_model
from tests.conftest import replace_params
from tools import chat


class Recorder:
    def __init__(self):
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


def test_the_answer_arrives_in_pieces_and_is_the_whole_reply(tiny_base_dir, tiny_params):
    import torch

    params = replace_params(tiny_params, eval={"max_new_tokens": 24})
    model, tokenizer = load_eval_model(tiny_base_dir, params.eval)
    messages = [{"role": "user", "content": "What is a Large Language Model?"}]
    out = Recorder()
    torch.manual_seed(0)
    answer = chat.stream_answer(model, tokenizer, messages, params.eval, threading.Event(), out)
    assert len(out.writes) >= 2, out.writes  # streamed, not printed once at the end
    assert "".join(out.writes) == answer and answer.strip()
    torch.manual_seed(0)
    again = chat.stream_answer(model, tokenizer, messages, params.eval, threading.Event(), Recorder())
    assert again == answer  # seeded sampling: the same conversation, the same answer

    stopped = threading.Event()
    stopped.set()  # as after Ctrl-C: generation ends at the next token
    short = Recorder()
    chat.stream_answer(model, tokenizer, messages, params.eval, stopped, short)
    assert len(tokenizer("".join(short.writes), add_special_tokens=False)["input_ids"]) <= 2
