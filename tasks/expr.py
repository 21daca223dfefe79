"""A small, safe grammar for arithmetic expressions in `a` and `b`.

Sweep files give the base, subtask and downstream functions as text (`a + ab`, `2a^2`,
`(a - b)^2`). They are parsed here by a recursive-descent parser, never by Python's `eval`, and
evaluated elementwise modulo p on integer arrays.

Grammar::

    expr    := term (('+' | '-') term)*
    term    := unary (['*'] unary)*          # a missing '*' is an implicit product: ab, 2a^2
    unary   := '-' unary | power
    power   := atom ['^' INT]
    atom    := INT | 'a' | 'b' | '(' expr ')'
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

VARIABLES = ("a", "b")
_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_]\w*)|(.))")


class ExpressionError(ValueError):
    """A text that is not a valid expression in a and b; the message says where and why."""


@dataclasses.dataclass(frozen=True)
class Node:
    """An expression tree node: op is 'int', 'var', 'neg', '+', '-', '*' or '^'."""

    op: str
    args: tuple = ()
    value: int | str | None = None

    def __str__(self) -> str:
        if self.op in ("int", "var"):
            return str(self.value)
        if self.op == "neg":
            return f"-({self.args[0]})"
        if self.op == "^":
            return f"({self.args[0]})^{self.value}"
        left, right = self.args
        return f"({left} {self.op} {right})"


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        assert match is not None  # the pattern's last branch matches any character
        number, name, other = match.groups()
        start = match.start(match.lastindex)
        if number is not None:
            tokens.append(("int", number, start))
        elif name is not None:
            # Names split into single letters so that `ab` reads as a * b; anything else is refused.
            for i, letter in enumerate(name):
                if letter not in VARIABLES:
                    raise ExpressionError(
                        f"unknown name {name!r} at position {start} in {text!r}: "
                        f"only the variables {', '.join(VARIABLES)} are allowed"
                    )
                tokens.append(("var", letter, start + i))
        elif other in "+-*^()":
            tokens.append((other, other, start))
        else:
            raise ExpressionError(
                f"unexpected character {other!r} at position {start} in {text!r}: "
                "use integers, a, b, + - * ^ and parentheses"
            )
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str, int]:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def fail(self, what: str) -> ExpressionError:
        if self.i < len(self.tokens):
            kind, value, pos = self.tokens[self.i]
            where = f"{value!r} at position {pos}"
        else:
            where = "the end"
        return ExpressionError(f"{what}, found {where} in {self.text!r}")

    def parse(self) -> Node:
        if not self.tokens:
            raise ExpressionError("empty expression: give a function of a and b, e.g. 'a + ab'")
        node = self.expr()
        if self.peek() is not None:
            raise self.fail("expected an operator or the end")
        return node

    def expr(self) -> Node:
        node = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()[0]
            node = Node(op, (node, self.term()))
        return node

    def term(self) -> Node:
        node = self.unary()
        while self.peek() in ("*", "int", "var", "("):
            if self.peek() == "*":
                self.take()
            node = Node("*", (node, self.unary()))
        return node

    def unary(self) -> Node:
        if self.peek() == "-":
            self.take()
            return Node("neg", (self.unary(),))
        return self.power()

    def power(self) -> Node:
        node = self.atom()
        if self.peek() == "^":
            self.take()
            if self.peek() != "int":
                raise self.fail("expected a non-negative integer exponent after '^'")
            node = Node("^", (node,), int(self.take()[1]))
        return node

    def atom(self) -> Node:
        kind = self.peek()
        if kind == "int":
            return Node("int", value=int(self.take()[1]))
        if kind == "var":
            return Node("var", value=self.take()[1])
        if kind == "(":
            self.take()
            node = self.expr()
            if self.peek() != ")":
                raise self.fail("expected ')'")
            self.take()
            return node
        raise self.fail("expected a number, a, b or '('")


def parse(text: str) -> Node:
    """Parse `text` into an expression tree; raises ExpressionError with the position of a fault."""
    if not isinstance(text, str):
        raise ExpressionError(f"an expression must be text, got {type(text).__name__}")
    return _Parser(text).parse()


def evaluate(node: Node, a: np.ndarray, b: np.ndarray, modulus: int) -> np.ndarray:
    """Evaluate `node` elementwise on integer arrays, reducing modulo `modulus` at every step."""
    a = np.asarray(a, dtype=np.int64) % modulus
    b = np.asarray(b, dtype=np.int64) % modulus

    def ev(n: Node) -> np.ndarray:
        if n.op == "int":
            return np.full(a.shape, int(n.value) % modulus, dtype=np.int64)
        if n.op == "var":
            return a if n.value == "a" else b
        if n.op == "neg":
            return (-ev(n.args[0])) % modulus
        if n.op == "^":
            base, result, exp = ev(n.args[0]), np.ones_like(a), int(n.value)
            while exp:  # square-and-multiply keeps every intermediate below modulus^2
                if exp & 1:
                    result = result * base % modulus
                base = base * base % modulus
                exp >>= 1
            return result
        left, right = ev(n.args[0]), ev(n.args[1])
        if n.op == "+":
            return (left + right) % modulus
        if n.op == "-":
            return (left - right) % modulus
        return left * right % modulus

    return ev(node)


def slug(text: str) -> str:
    """A column-name-friendly form of an expression: `2a^2` -> `2a2`, `a^2 + b^2` -> `a2_plus_b2`."""
    out = text.replace(" ", "").replace("^", "").replace("*", "")
    for sym, word in (("+", "_plus_"), ("-", "_minus_"), ("(", "L"), (")", "R")):
        out = out.replace(sym, word)
    return out
