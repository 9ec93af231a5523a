"""Talk to the tuned model in the terminal, with its chat template, streaming the answer as it is generated.

    make chat                                    # models/merged, the sampling settings of params.yaml's eval
    make chat MODEL=base SYSTEM="Answer briefly."
    dpo-chat --model base --system "..."         # the console entry point (pip install -e .)

Each turn is sampled with `eval.temperature`, `eval.top_p` and `eval.max_new_tokens` (the settings the sample
generations use), on `eval.device` in `eval.dtype`, seeded once by `seed`: the same conversation gives the same
answers. The conversation is kept (multi-turn ChatML). Ctrl-D (end of input) or Ctrl-C ends it cleanly, also in
the middle of an answer; /reset starts a new conversation.
"""

from __future__ import annotations

import argparse
import select
import sys
import threading
from pathlib import Path
from typing import Any

from dpo_pipeline.layout import BASE_DIR, MERGED_DIR

MODELS = {"merged": MERGED_DIR, "base": BASE_DIR}
PROMPT = "you> "
# How often a wait for input or for the next token wakes up. The kernel may hand the terminal's SIGINT to any of
# the process's threads (torch's among them); Python then runs its handler, the KeyboardInterrupt, only when the
# main thread next runs bytecode, so a main thread blocked in read() for good would never see a Ctrl-C.
WAKE_S = 0.2


def read_line(stdin) -> str:
    """stdin.readline(), on a terminal waiting for input in WAKE_S slices (see WAKE_S). A terminal hands over
    one line per read, so nothing typed waits in Python's buffer while select() waits on the descriptor."""
    if stdin.isatty():
        while not select.select([stdin], [], [], WAKE_S)[0]:
            pass
    return stdin.readline()


def _pieces(streamer):
    """The streamer's text pieces, its queue read in WAKE_S slices (see WAKE_S)."""
    import queue

    while True:
        try:
            yield next(streamer)
        except queue.Empty:
            continue
        except StopIteration:
            return


def stream_answer(
    model, tokenizer, messages: list[dict[str, str]], e: Any, stop: threading.Event, out
) -> str:
    """Generate the assistant's next turn, writing each piece of text to `out` as it comes; returns it all."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    from dpo_pipeline.evaluate.samples import generation_kwargs

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=WAKE_S)
    kwargs = {**inputs, **generation_kwargs(e, tokenizer), "streamer": streamer}
    kwargs["stopping_criteria"] = StoppingCriteriaList([Stop()])

    def generate() -> None:
        with torch.no_grad():
            model.generate(**kwargs)

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    pieces = []
    try:
        for piece in _pieces(streamer):
            pieces.append(piece)
            out.write(piece)
            out.flush()
    except BaseException:  # Ctrl-C mid-answer: stop generating at the next token, then pass it on
        stop.set()
        for _ in _pieces(streamer):
            pass
        worker.join()
        raise
    worker.join()
    return "".join(pieces)


def chat(model_name: str, system: str, params_path: str, stdin=None, out=None) -> int:
    from dpo_pipeline import config
    from dpo_pipeline.data.chatml import conversation
    from dpo_pipeline.errors import StageError
    from dpo_pipeline.evaluate.harness import load_eval_model
    from dpo_pipeline.models.loading import require_safetensors

    stdin = stdin or sys.stdin
    out = out or sys.stdout
    params = config.load(params_path)
    model_dir = Path(MODELS[model_name])
    if not model_dir.is_dir():
        raise StageError(f"{model_dir}: no {model_name} model here yet (run `make repro` first)")
    require_safetensors(model_dir)
    import torch

    model, tokenizer = load_eval_model(model_dir, params.eval)
    torch.manual_seed(params.seed)
    out.write(demo_note(Path(MODELS["base"])))
    out.write(
        f"chat with {model_dir} ({params.eval.device}, {params.eval.dtype}; temperature {params.eval.temperature}, "
        f"top_p {params.eval.top_p}, up to {params.eval.max_new_tokens} tokens a turn). "
        "Ctrl-D or Ctrl-C to quit, /reset for a new conversation.\n"
    )
    messages = conversation(system, "")[:-1]  # the system turn alone (none when the system text is empty)
    start = list(messages)
    stop = threading.Event()
    try:
        while True:
            out.write(PROMPT)
            out.flush()
            line = read_line(stdin)
            if not line:  # Ctrl-D
                break
            question = line.rstrip("\n")
            if not question.strip():
                continue
            if question.strip() == "/reset":
                messages = list(start)
                out.write("(new conversation)\n")
                continue
            messages.append({"role": "user", "content": question})
            stop.clear()
            answer = stream_answer(model, tokenizer, messages, params.eval, stop, out)
            messages.append({"role": "assistant", "content": answer})
            out.write("\n")
    except KeyboardInterrupt:  # Ctrl-C, at the prompt or mid-answer
        stop.set()
    out.write("\nbye\n")
    out.flush()
    return 0


def demo_note(base_dir: Path) -> str:
    """A line saying the model is the builtin demo when models/base is the small model made locally (its answers
    are not meant to make sense), else nothing."""
    import json

    from dpo_pipeline.layout import BASE_INFO

    info_path = base_dir / BASE_INFO
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    if info.get("source") != "builtin":
        return ""
    count = info.get("parameter_count", 0)
    return (
        f"note: this is the builtin demo model ({count / 1e6:.1f}M parameters, pre-trained for seconds on the "
        "shipped sample): it shows the pipeline works, its answers are not meant to make sense. A real base: "
        "base.source: hub (docs/params.md).\n"
    )


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="merged", help="which model to talk to")
    parser.add_argument("--system", default="", help="system prompt (none by default)")
    parser.add_argument("--params", default="params.yaml", help="params file whose eval.* settings sample")
    args = parser.parse_args()
    raise SystemExit(chat(args.model, args.system, args.params))


def main() -> None:
    from dpo_pipeline.runner import run_main

    run_main(_main)


if __name__ == "__main__":
    main()
