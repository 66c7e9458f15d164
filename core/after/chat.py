"""``fx chat``: a conversation with a trained run. Every turn is prompted with the whole conversation so far in
the run's template (its system prompt included), and the answer is printed token by token as it is generated."""

from __future__ import annotations

import sys

from fx.after.inference import Loaded
from fx.data.templating import Message
from fx.evaluation import generate

EXIT = {"exit", "quit"}


def chat(loaded: Loaded, max_new_tokens: int, read=input) -> list[Message]:
    """Read user turns with ``read(prompt)`` until end of input or ``exit``; return the conversation."""
    from transformers import TextStreamer

    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    conversation: list[Message] = []
    while True:
        try:
            line = read("you> ")
        except EOFError:
            print()
            break
        if line.strip().lower() in EXIT:
            break
        if not line.strip():
            continue
        conversation.append({"role": "user", "content": line.strip()})
        print("assistant> ", end="", flush=True)
        answer = generate(loaded.model, loaded.tokenizer, loaded.template, [conversation], max_new_tokens,
                          streamer=streamer)[0]
        sys.stdout.flush()
        conversation.append({"role": "assistant", "content": answer})
    return conversation
