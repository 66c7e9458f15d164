"""Templates described the way Ollama prompts a model: a Go template over ``.System`` and ``.Messages``.

Most chat formats wrap each message in fixed text (:class:`Wrapping`), which a Go template expresses directly;
:func:`probe` finds that wrapping in a Jinja chat template by rendering marked conversations, and refuses one it
cannot reproduce exactly. Ollama puts the Modelfile's ``SYSTEM`` first when a conversation has no system message,
joins system messages into ``.System`` and keeps them in ``.Messages``; the templates below read the system prompt
from ``.System`` and skip system messages in the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fx.errors import UserError

Message = dict[str, str]


def literal(text: str) -> str:
    """Text placed in a Go template as it is; refused when Go would read part of it as an action."""
    if "{{" in text or "}}" in text:
        raise UserError(f"the text {text!r} holds '{{{{' or '}}}}', which a Go template cannot carry as plain text")
    return text


@dataclass(frozen=True)
class Wrapping:
    """A format that puts fixed text before and after every message, and the answer's opening after the last user
    message: ``system``/``user``/``assistant`` are (before, after) pairs; ``no_system`` stands where the system
    block would when there is no system prompt (a default system prompt, or nothing)."""

    system: tuple[str, str]
    no_system: str
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str

    def prompt(self, system: str | None, turns: list[Message], generation: bool = True) -> str:
        """The text this wrapping gives a conversation, with the answer's opening when ``generation`` (what
        :meth:`go` renders), for checking it against a template."""
        text = self.no_system if system is None else self.system[0] + system + self.system[1]
        for message in turns:
            before, after = self.user if message["role"] == "user" else self.assistant
            text += before + message["content"] + after
        return text + (self.generation if generation else "")

    def go(self) -> str:
        (sb, sa), (ub, ua), (ab, aa) = self.system, self.user, self.assistant
        text = "{{ if .System }}" + literal(sb) + "{{ .System }}" + literal(sa) + "{{ else }}" + literal(self.no_system)
        text += "{{ end }}{{ range .Messages }}{{ if eq .Role \"user\" }}" + literal(ub) + "{{ .Content }}"
        text += literal(ua) + "{{ else if eq .Role \"assistant\" }}" + literal(ab) + "{{ .Content }}" + literal(aa)
        return text + "{{ end }}{{ end }}" + literal(self.generation)


# Marked contents that no chat format adds or changes.
MARKS = {"system": "\u27e6S\u27e7", "user": ("\u27e6U1\u27e7", "\u27e6U2\u27e7"), "assistant": "\u27e6A1\u27e7"}


def probe(chat: Callable[[list[Message], bool], str], name: str) -> Wrapping:
    """The wrapping of a chat template given as ``chat(messages, add_generation_prompt) -> text``, read off marked
    conversations and then checked on others; a template that isn't a fixed wrapping is refused."""
    s, (u1, u2), a1 = MARKS["system"], MARKS["user"], MARKS["assistant"]
    turns = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}, {"role": "user", "content": u2}]
    system = [{"role": "system", "content": s}]
    refusal = UserError(f"template {name!r}: its chat template is not one that wraps each message in fixed text, "
                        "so an Ollama Modelfile cannot reproduce it; choose an explicit template (e.g. chatml) and "
                        "train with it")
    try:
        prompt, without = chat(system + turns, True), chat(turns, True)
        closed, answered = chat(system + turns, False), chat(system + turns[:2], False)
        head, rest = prompt.split(s)
        system_after_user_before, rest = rest.split(u1)
        between_user_assistant, rest = rest.split(a1)
        assistant_after_user_before, generation_full = rest.split(u2)
        user_after = closed.split(u2)[1]
        assistant_after = answered.split(a1)[1]
        no_head = without.split(u1)[0]
    except Exception as exc:  # raised for these conversations, or a mark missing or repeated
        raise refusal from exc
    user_before = assistant_after_user_before[len(assistant_after):]
    found = Wrapping(system=(head, system_after_user_before[: len(system_after_user_before) - len(user_before)]),
                     no_system=no_head[: len(no_head) - len(user_before)], user=(user_before, user_after),
                     assistant=(between_user_assistant[len(user_after):], assistant_after),
                     generation=generation_full[len(user_after):])
    if (not assistant_after_user_before.startswith(assistant_after)
            or not system_after_user_before.endswith(user_before) or not no_head.endswith(user_before)
            or not between_user_assistant.startswith(user_after) or not generation_full.startswith(user_after)
            or not agrees(found, chat)):
        raise refusal
    return found


def agrees(wrapping: Wrapping, chat: Callable[[list[Message], bool], str]) -> bool:
    """The wrapping gives the template's own prompts for conversations of one to three turns, with and without a
    system prompt, in contents with spaces, newlines and quotes."""
    texts = ["Hi", " two  words ", "a\nline \"quoted\"", "ünï {x}", "last"]
    for n in (1, 2, 3):
        turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": texts[i % len(texts)]}
                 for i in range(2 * n - 1)]
        for system in (None, "Be brief.\nVery."):
            messages = turns if system is None else [{"role": "system", "content": system}, *turns]
            answered = [*turns, {"role": "assistant", "content": texts[-1]}]
            closed = answered if system is None else [{"role": "system", "content": system}, *answered]
            try:
                if chat(messages, True) != wrapping.prompt(system, turns) \
                        or chat(closed, False) != wrapping.prompt(system, answered, generation=False):
                    return False
            except Exception:
                return False
    return True
