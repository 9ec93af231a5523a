"""Issue 17, point 1: `python -m tools.chat` (what `make chat` and `dpo-chat` run) talks to the session's tuned
small model through a real pseudo-terminal: a question typed, the answer streamed back, Ctrl-D or Ctrl-C ends it
with exit status 0."""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import time

import pytest

from tools import chat

pytestmark = pytest.mark.slow


class Terminal:
    """A child process on a pseudo-terminal it has as its controlling terminal (so Ctrl-C is a real SIGINT)."""

    def __init__(self, root, env, *args: str):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.chdir(root)
            os.execve(sys.executable, [sys.executable, "-m", "tools.chat", *args], env)
        self.output = b""

    def read_until(self, marker: bytes, timeout: float = 120.0) -> bytes:
        deadline = time.monotonic() + timeout
        start = len(self.output)
        while marker not in self.output[start:]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{marker!r} not seen; the terminal shows: {self.output[-2000:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {marker!r}: {self.output[-2000:]!r}")
                self.output += chunk
        return self.output[start:]

    def type(self, text: bytes) -> None:
        os.write(self.fd, text)

    def exit_status(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:  # keep draining so the child never blocks on a full terminal
                while select.select([self.fd], [], [], 0.1)[0]:
                    self.output += os.read(self.fd, 4096)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"chat did not exit: {self.output[-2000:]!r}")


def test_a_question_gets_a_streamed_answer_and_ctrl_d_ends_it(tiny_project):
    term = Terminal(tiny_project.root, tiny_project.env, "--system", "You are a helpful assistant chatbot.")
    banner = term.read_until(chat.PROMPT.encode())
    assert b"chat with models/merged" in banner
    assert b"note: this is the builtin demo model (" in banner  # the tiny project's base is the builtin one
    term.type(b"What is a Large Language Model?\n")
    answer = term.read_until(chat.PROMPT.encode())
    # the terminal echoes the question, then the answer streams in before the next prompt
    text = answer.decode("utf-8", "replace").replace("\r", "")
    assert text.startswith("What is a Large Language Model?\n")
    reply = text.split("\n", 1)[1].rsplit(chat.PROMPT, 1)[0]
    assert reply.strip() and "<|im_" not in reply
    term.type(b"/reset\n")
    assert b"(new conversation)" in term.read_until(chat.PROMPT.encode())
    term.type(b"\x04")  # Ctrl-D at the start of a line: end of input
    assert term.exit_status() == 0
    assert b"bye" in term.output and b"Traceback" not in term.output


def test_ctrl_c_ends_it_cleanly_and_the_base_answers_too(tiny_project):
    term = Terminal(tiny_project.root, tiny_project.env, "--model", "base")
    assert b"chat with models/base" in term.read_until(chat.PROMPT.encode())
    term.type(b"Name a fruit that is yellow.\n")
    term.read_until(chat.PROMPT.encode())
    term.type(b"\x03")  # Ctrl-C: SIGINT from the terminal
    assert term.exit_status() == 0
    assert (
        b"bye" in term.output and b"Traceback" not in term.output and b"KeyboardInterrupt" not in term.output
    )
