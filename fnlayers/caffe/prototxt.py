"""A parser for protobuf text format (Caffe's ``.prototxt``), with no protobuf dependency.

:func:`parse` turns the text into nested dicts: every field maps to a **list** of its values
in file order (protobuf text format does not say which fields are repeated, so each may be);
a message value is again such a dict. Scalars: ``"strings"`` (escapes decoded) as ``str``,
integers as ``int``, other numbers as ``float``, ``true``/``false`` as ``bool`` and other bare
identifiers (enum values such as ``MAX``) as :class:`Ident` (a ``str``, so that
:func:`to_text` writes them back bare). :func:`first` reads an optional field
(protobuf's rule: the last value given wins).
"""

from __future__ import annotations

import re

__all__ = ["Ident", "PrototxtError", "first", "parse", "to_text"]


class PrototxtError(ValueError):
    """Malformed text format; the message gives the line and column."""


class Ident(str):
    """A bare identifier in the text (an enum value such as ``MAX``); equal to its ``str``."""

    __slots__ = ()


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<num>[-+]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?[fF]?)(?![\w.]))
  | (?P<ident>-?[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[{}<>\[\]:,;])
    """,
    re.VERBOSE,
)

_SIMPLE_ESCAPES = {
    "n": 10, "t": 9, "r": 13, "a": 7, "b": 8, "f": 12, "v": 11,
    "\\": 92, "'": 39, '"': 34, "?": 63,
}  # fmt: skip


def _unescape(body: str, where: str) -> str:
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        i += 1
        if i >= len(body):
            raise PrototxtError(f"{where}: a string ends in a lone backslash")
        e = body[i]
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
            i += 1
        elif e in "01234567":
            m = re.match(r"[0-7]{1,3}", body[i:])
            out.append(int(m.group(), 8) & 0xFF)
            i += len(m.group())
        elif e in "xX":
            m = re.match(r"[0-9a-fA-F]{1,2}", body[i + 1 :])
            if not m:
                raise PrototxtError(f"{where}: \\x needs hex digits")
            out.append(int(m.group(), 16))
            i += 1 + len(m.group())
        else:
            raise PrototxtError(f"{where}: unknown escape \\{e}")
    return out.decode("utf-8", errors="surrogateescape")


def _tokenize(text: str):
    tokens = []
    pos, line, col0 = 0, 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        where = f"line {line}, column {pos - col0 + 1}"
        if not m:
            raise PrototxtError(f"{where}: unexpected character {text[pos]!r}")
        kind = m.lastgroup
        if kind != "ws":
            tokens.append((kind, m.group(), where))
        newlines = m.group().count("\n")
        if newlines:
            line += newlines
            col0 = m.start() + m.group().rindex("\n") + 1
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.tokens = _tokenize(text)
        self.i = 0
        self.end = f"line {text.count(chr(10)) + 1} (end of input)"

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, None, self.end)

    def take(self, value=None):
        kind, tok, where = self.peek()
        if kind is None:
            raise PrototxtError(f"{where}: expected {value or 'more input'}")
        if value is not None and tok != value:
            raise PrototxtError(f"{where}: expected {value!r}, got {tok!r}")
        self.i += 1
        return kind, tok, where

    def message(self, close):
        msg: dict = {}
        while True:
            kind, tok, where = self.peek()
            if close is None and kind is None:
                return msg
            if tok == close and kind == "punct":
                self.i += 1
                return msg
            if kind != "ident":
                raise PrototxtError(f"{where}: expected a field name, got {tok!r}")
            self.i += 1
            values = msg.setdefault(tok, [])
            _, nxt, _ = self.peek()
            if nxt == ":":
                self.i += 1
                _, nxt, _ = self.peek()
                if nxt == "[":
                    self.i += 1
                    if self.peek()[1] == "]":
                        self.i += 1
                    else:
                        while True:
                            values.append(self.value())
                            _, sep, w = self.take()
                            if sep == "]":
                                break
                            if sep != ",":
                                raise PrototxtError(f"{w}: expected ',' or ']' in a list")
                else:
                    values.append(self.value())
            elif nxt in ("{", "<"):
                values.append(self.value())
            else:
                raise PrototxtError(f"{self.peek()[2]}: expected ':' or '{{' after {tok!r}")
            if self.peek()[1] in (",", ";"):
                self.i += 1

    def value(self):
        kind, tok, where = self.take()
        if tok in ("{", "<") and kind == "punct":
            return self.message("}" if tok == "{" else ">")
        if kind == "str":
            parts = [_unescape(tok[1:-1], where)]
            while self.peek()[0] == "str":  # adjacent strings concatenate
                _, t, w = self.take()
                parts.append(_unescape(t[1:-1], w))
            return "".join(parts)
        if kind == "num":
            return _number(tok)
        if kind == "ident":
            low = tok.lower()
            if tok in ("true", "True", "t"):
                return True
            if tok in ("false", "False", "f"):
                return False
            if low in ("inf", "infinity", "-inf", "-infinity", "nan", "-nan"):
                return float(low.replace("infinity", "inf"))
            return Ident(tok)
        raise PrototxtError(f"{where}: expected a value, got {tok!r}")


def _number(tok: str):
    body = tok.lstrip("+-")
    if body[:2].lower() == "0x":
        return int(tok, 16)
    if re.fullmatch(r"[-+]?\d+", tok):
        return int(tok)
    return float(tok.rstrip("fF"))


def parse(text: str) -> dict:
    """Parse protobuf text format into nested dicts ``{field: [value, ...]}``.

    Raises:
      PrototxtError (a ValueError): malformed text, with its line and column.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return _Parser(text).message(None)


def first(msg: dict, field: str, default=None):
    """The value of an optional field (the last one given, as protobuf reads it), or
    ``default``."""
    values = msg.get(field)
    return values[-1] if values else default


def _quote(s: str) -> str:
    out = []
    for byte in s.encode("utf-8", errors="surrogateescape"):
        c = chr(byte)
        if c in ('"', "\\"):
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif 32 <= byte < 127:
            out.append(c)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Ident):
        return str(v)
    if isinstance(v, str):
        return _quote(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if v == v else "nan"
    raise TypeError(f"to_text: cannot write a {type(v).__name__} value")


def to_text(msg: dict, indent: int = 0) -> str:
    """Text format of a :func:`parse`-style dict (``{field: [value, ...]}``), one field per
    line; ``parse(to_text(d)) == d``. Plain ``str`` values are written quoted,
    :class:`Ident` values (enums) bare."""
    pad = "  " * indent
    lines = []
    for field, values in msg.items():
        for v in values:
            if isinstance(v, dict):
                lines.append(f"{pad}{field} {{")
                body = to_text(v, indent + 1)
                if body:
                    lines.append(body.rstrip("\n"))
                lines.append(f"{pad}}}")
            else:
                lines.append(f"{pad}{field}: {_scalar(v)}")
    return "\n".join(lines) + ("\n" if lines else "")
