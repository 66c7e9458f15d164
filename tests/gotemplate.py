"""A small renderer of the part of Go's text/template that Ollama's chat templates use, for tests: text, ``{{ }}``
actions with ``-`` trimming, fields (``.Role``, ``$.System``, ``$x.Content``), variables (``:=``, ``=``), string,
number and boolean literals, parentheses, ``if``/``else if``/``else``/``end``, ``range [$i, $x :=] pipeline``, and
the functions ``eq ne and or not len slice index``. Anything else raises, so a template outside this subset fails
its test instead of being rendered wrongly. Semantics follow the text/template documentation."""

from __future__ import annotations

import re

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(\(|\))|(:=|=)|([^\s()]+))')


def _truthy(value) -> bool:
    return bool(value) if value is not None else False


def _lex(action: str) -> list[str]:
    tokens, pos = [], 0
    action = action.strip()
    while pos < len(action):
        m = TOKEN.match(action, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot read {action[pos:]!r}")
        tokens.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return tokens


def _parse(text: str):
    """A list of nodes: ("text", s), ("action", tokens), ("if", [(cond, body)...], else_body),
    ("range", tokens, body)."""
    parts, pos = [], 0
    for m in ACTION.finditer(text):
        parts.append(("text", text[pos:m.start()]))
        parts.append(("action", _lex(m.group(2)), bool(m.group(1)), bool(m.group(3))))
        pos = m.end()
    parts.append(("text", text[pos:]))
    for i, part in enumerate(parts):  # trimming markers remove the white space beside them
        if part[0] == "action":
            if part[2] and i and parts[i - 1][0] == "text":
                parts[i - 1] = ("text", parts[i - 1][1].rstrip(" \t\r\n"))
            if part[3] and i + 1 < len(parts) and parts[i + 1][0] == "text":
                parts[i + 1] = ("text", parts[i + 1][1].lstrip(" \t\r\n"))
    nodes, end = _block(parts, 0)
    if end != len(parts):
        raise ValueError("unexpected {{ end }} or {{ else }}")
    return nodes


def _block(parts, i):
    nodes = []
    while i < len(parts):
        part = parts[i]
        if part[0] == "text":
            nodes.append(part)
            i += 1
            continue
        tokens = part[1]
        if tokens[0] in ("end", "else"):
            return nodes, i
        if tokens[0] == "if":
            branches, otherwise = [], []
            cond = tokens[1:]
            while True:
                body, i = _block(parts, i + 1)
                branches.append((cond, body))
                closing = parts[i][1] if i < len(parts) else ["<eof>"]
                if closing[:2] == ["else", "if"]:
                    cond = closing[2:]
                    continue
                if closing == ["else"]:
                    otherwise, i = _block(parts, i + 1)
                    closing = parts[i][1] if i < len(parts) else ["<eof>"]
                if closing != ["end"]:
                    raise ValueError("if without end")
                break
            nodes.append(("if", branches, otherwise))
            i += 1
        elif tokens[0] == "range":
            body, i = _block(parts, i + 1)
            if i >= len(parts) or parts[i][1] != ["end"]:
                raise ValueError("range without end (or with else, which is not supported)")
            nodes.append(("range", tokens[1:], body))
            i += 1
        else:
            nodes.append(("action", tokens))
            i += 1
    return nodes, i


class _Scope:
    def __init__(self, root):
        self.frames = [{"$": root}]

    def get(self, name):
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise ValueError(f"undefined variable {name}")

    def set(self, name, value):
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise ValueError(f"assignment to undeclared variable {name}")


def _field(value, path: list[str]):
    for name in path:
        if not isinstance(value, dict) or name not in value:
            raise ValueError(f"no field {name} in {value!r}")
        value = value[name]
    return value


FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truthy(a),
    "len": len,
    "slice": lambda a, *ix: a[ix[0]:ix[1]] if len(ix) == 2 else a[ix[0]:] if ix else a,
    "index": lambda a, *ix: _index(a, ix),
}


def _index(value, ix):
    for i in ix:
        value = value[i]
    return value


def _operand(token: str, dot, scope: _Scope):
    if token.startswith('"'):
        return bytes(token[1:-1], "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
    if token in ("true", "false"):
        return token == "true"
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token == ".":
        return dot
    if token.startswith("."):
        return _field(dot, token[1:].split("."))
    if token.startswith("$"):
        name, _, rest = token.partition(".")
        value = scope.get(name)
        return _field(value, rest.split(".")) if rest else value
    raise ValueError(f"unknown operand {token!r}")


def _expression(tokens: list[str], dot, scope: _Scope):
    """A command: a function applied to operands (``and``/``or`` short-circuit as Go's do), or one operand."""
    args, i = [], 0
    while i < len(tokens):
        if tokens[i] == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            args.append(("value", _expression(tokens[i + 1:j - 1], dot, scope)))
            i = j
        else:
            args.append(("token", tokens[i]))
            i += 1
    head = args[0]
    if head[0] == "token" and head[1] in ("and", "or"):
        result = None
        for arg in args[1:]:
            result = arg[1] if arg[0] == "value" else _operand(arg[1], dot, scope)
            if _truthy(result) == (head[1] == "or"):
                return result
        return result
    values = [a[1] if a[0] == "value" else None for a in args[1:]]
    values = [v if a[0] == "value" else _operand(a[1], dot, scope) for v, a in zip(values, args[1:])]
    if head[0] == "token" and head[1] in FUNCS:
        return FUNCS[head[1]](*values)
    if values:
        raise ValueError(f"{head[1]!r} is not a function this renderer knows")
    return head[1] if head[0] == "value" else _operand(head[1], dot, scope)


def _pipeline(tokens: list[str], dot, scope: _Scope, declare: bool):
    """A pipeline, perhaps an assignment ``$x := p`` / ``$x = p``; returns (value, printed)."""
    if len(tokens) > 2 and tokens[1] in (":=", "="):
        value = _expression(tokens[2:], dot, scope)
        if tokens[1] == ":=":
            scope.frames[-1][tokens[0]] = value
        else:
            scope.set(tokens[0], value)
        return value, False
    return _expression(tokens, dot, scope), True


def _run(nodes, dot, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "action":
            value, printed = _pipeline(node[1], dot, scope, declare=True)
            if printed:
                out.append("" if value is None else str(value))
        elif kind == "if":
            for cond, body in node[1]:
                if _truthy(_pipeline(cond, dot, scope, declare=True)[0]):
                    _run(body, dot, scope, out)
                    break
            else:
                _run(node[2], dot, scope, out)
        elif kind == "range":
            tokens = node[1]
            names: list[str] = []
            if ":=" in tokens:
                cut = tokens.index(":=")
                names = [t.rstrip(",") for t in tokens[:cut] if t != ","]
                tokens = tokens[cut + 1:]
            items = _expression(tokens, dot, scope)
            for i, item in enumerate(items or []):
                scope.frames.append({})
                if len(names) == 2:
                    scope.frames[-1][names[0]], scope.frames[-1][names[1]] = i, item
                elif len(names) == 1:
                    scope.frames[-1][names[0]] = item
                _run(node[2], item, scope, out)
                scope.frames.pop()


def render(template: str, data: dict) -> str:
    out: list[str] = []
    _run(_parse(template), data, _Scope(data), out)
    return "".join(out)


def ollama_prompt(template: str, messages: list[dict[str, str]], system: str | None) -> str:
    """What Ollama renders for a chat: the Modelfile's SYSTEM first when the conversation has no system message,
    consecutive messages of one role joined by a blank line, system messages joined into ``.System`` and kept in
    ``.Messages`` (Ollama's server/routes.go and template/template.go, collate)."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    collated: list[dict[str, str]] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    systems = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return render(template, {"System": systems, "Messages": collated})
