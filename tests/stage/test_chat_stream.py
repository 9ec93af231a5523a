"""Issue 17, point 1: the chat streams an answer piece by piece as tokens are generated, and stops mid-answer."""

from __future__ import annotations

import threading

from dpo_pipeline.evaluate.harness import load_eval_model
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


def test_a_ctrl_c_that_lands_on_another_thread_still_ends_the_wait_for_input():
    """The kernel may hand a terminal's SIGINT to any thread (torch runs several); Python raises the
    KeyboardInterrupt only when the main thread runs again, so the wait for input must wake up by itself."""
    import os
    import signal
    import time

    import pytest

    master, slave = os.openpty()
    stdin = os.fdopen(slave, "r")
    unblocked = threading.Event()

    def interrupt_from_here() -> None:
        time.sleep(0.3)
        signal.pthread_kill(
            threading.get_ident(), signal.SIGINT
        )  # delivered to this thread, not the main one
        time.sleep(3.0)
        unblocked.set()  # a reader that never woke would only return now, on this typed line
        os.write(master, b"too late\n")

    helper = threading.Thread(target=interrupt_from_here, daemon=True)
    helper.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            chat.read_line(stdin)
        assert not unblocked.is_set(), "the Ctrl-C was only seen once a line was typed"
    finally:
        helper.join()
        stdin.close()
        os.close(master)
