"""A small exact parser for arithmetic answers: non-negative integers, binary + - * /, parentheses — nothing else.

Verifiers must never ``eval`` model output. This parser accepts only the grammar below, computes with
``fractions.Fraction`` (exact rational arithmetic, so 7/2*2 is exactly 7), and rejects everything else — powers,
unary signs, names, calls, non-ASCII digits, division by zero, over-long or over-deep input — with
``ExpressionError``, a ``ValueError``. Sizes are bounded so no input can make it slow:

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := NUMBER | "(" expr ")"
    NUMBER := [0-9]{1,9}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

MAX_CHARS = 200
MAX_DEPTH = 32
MAX_DIGITS = 9
_TOKEN = re.compile(r"[ \t\n]*(?:([0-9]+)|([-+*/()]))")


class ExpressionError(ValueError):
    """The text is not an expression of the accepted grammar, or it divides by zero."""


@dataclass(frozen=True)
class Expression:
    value: Fraction
    numbers: tuple[int, ...]
    """The integer literals in the order they appear (Countdown checks each given number is used at most once)."""


def parse_expression(text: str) -> Expression:
    """Parse and evaluate ``text`` exactly; raise ExpressionError for anything outside the grammar."""
    if len(text) > MAX_CHARS:
        raise ExpressionError(f"expression of {len(text)} characters is longer than {MAX_CHARS}")
    tokens = _tokenize(text)
    parser = _Parser(tokens)
    value = parser.expr(0)
    if parser.pos != len(tokens):
        raise ExpressionError(f"unexpected {tokens[parser.pos]!r} after a complete expression")
    return Expression(value, tuple(parser.numbers))


def _tokenize(text: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip(" \t\n") == "":
                break
            raise ExpressionError(f"character {text[pos]!r} at {pos} is not a digit, + - * / ( ) or a space")
        number, op = m.groups()
        if number is not None and len(number) > MAX_DIGITS:
            raise ExpressionError(f"number {number[:12]}... has more than {MAX_DIGITS} digits")
        tokens.append(number if number is not None else op)
        pos = m.end()
    if not tokens:
        raise ExpressionError("empty expression")
    return tokens


class _Parser:
    """Recursive descent over the token list; ``depth`` counts open parentheses."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.numbers = tokens, 0, []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self.factor(depth)
            if op == "/" and rhs == 0:
                raise ExpressionError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor(self, depth: int) -> Fraction:
        tok = self.peek()
        if tok is None:
            raise ExpressionError("expression ends where a number or '(' was expected")
        self.pos += 1
        if tok.isdigit():
            self.numbers.append(int(tok))
            return Fraction(int(tok))
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self.expr(depth + 1)
            if self.peek() != ")":
                raise ExpressionError("missing ')'")
            self.pos += 1
            return value
        raise ExpressionError(f"expected a number or '(' but found {tok!r}")
