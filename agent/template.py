"""The payload template language of ``[actions.*] payload``: literal text with ``{{ expr }}`` holes.

Expressions: numbers, the variables ``setpoint`` (the device's current setpoint) and ``value`` (the
action's ``value``), ``+ - * /``, unary minus and parentheses, evaluated by the small parser below (never
eval). Every number written is a setpoint: rounded to 0.5 and clamped to the action's range.

Pure and importing nothing of the agent but its errors: the config schema checks templates at load with
the same parser ``agent.actions`` renders them with.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.errors import ActionError

SETPOINT_STEP = 0.5
TEMPLATE_VARIABLES = ("setpoint", "value")
MAX_EXPRESSION_CHARS = 200
MAX_EXPRESSION_DEPTH = 16


@dataclass(frozen=True, slots=True)
class _Number:
    value: float


@dataclass(frozen=True, slots=True)
class _Variable:
    name: str


@dataclass(frozen=True, slots=True)
class _Negate:
    operand: _Expr


@dataclass(frozen=True, slots=True)
class _Binary:
    operator: str
    left: _Expr
    right: _Expr


_Expr = _Number | _Variable | _Negate | _Binary

_TOKEN = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>[-+*/()])"
)


class _ExpressionParser:
    """Recursive descent over: expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary)*;
    unary := ('-'|'+') unary | atom; atom := number | variable | '(' expr ')'."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens: list[tuple[str, str, int]] = []  # (kind, text, position)
        position = 0
        while position < len(source):
            if source[position] in " \t\r\n":
                position += 1
                continue
            match = _TOKEN.match(source, position)
            if match is None:
                raise ActionError(f"unexpected character {source[position]!r} in expression {source!r}")
            kind = match.lastgroup or "op"
            self.tokens.append((kind, match.group(), position))
            position = match.end()
        self.index = 0
        self.depth = 0

    def parse(self) -> _Expr:
        if not self.tokens:
            raise ActionError("empty expression in '{{ }}'")
        expr = self._expr()
        if self.index < len(self.tokens):
            raise ActionError(f"unexpected {self.tokens[self.index][1]!r} in expression {self.source!r}")
        return expr

    def _peek(self) -> str | None:
        return self.tokens[self.index][1] if self.index < len(self.tokens) else None

    def _expr(self) -> _Expr:
        return self._left_associative(("+", "-"), self._term)

    def _term(self) -> _Expr:
        return self._left_associative(("*", "/"), self._unary)

    def _left_associative(self, operators: tuple[str, ...], operand: Callable[[], _Expr]) -> _Expr:
        """``operand (operator operand)*`` with any of ``operators``, grouped from the left."""
        left = operand()
        while self._peek() in operators:
            operator = self.tokens[self.index][1]
            self.index += 1
            left = _Binary(operator, left, operand())
        return left

    def _unary(self) -> _Expr:
        self.depth += 1
        if self.depth > MAX_EXPRESSION_DEPTH:
            raise ActionError(f"expression nested too deeply: {self.source!r}")
        try:
            token = self._peek()
            if token in ("-", "+"):
                self.index += 1
                operand = self._unary()
                return _Negate(operand) if token == "-" else operand
            return self._atom()
        finally:
            self.depth -= 1

    def _atom(self) -> _Expr:
        if self.index >= len(self.tokens):
            raise ActionError(f"expression ends too early: {self.source!r}")
        kind, text, _ = self.tokens[self.index]
        self.index += 1
        if kind == "number":
            return _Number(float(text))
        if kind == "name":
            if text not in TEMPLATE_VARIABLES:
                raise ActionError(f"unknown name {text!r} in expression {self.source!r} "
                                  f"(only {' and '.join(TEMPLATE_VARIABLES)} are defined)")
            return _Variable(text)
        if text == "(":
            inner = self._expr()
            if self._peek() != ")":
                raise ActionError(f"missing ')' in expression {self.source!r}")
            self.index += 1
            return inner
        raise ActionError(f"unexpected {text!r} in expression {self.source!r}")


def _variables_of(expr: _Expr) -> set[str]:
    if isinstance(expr, _Variable):
        return {expr.name}
    if isinstance(expr, _Negate):
        return _variables_of(expr.operand)
    if isinstance(expr, _Binary):
        return _variables_of(expr.left) | _variables_of(expr.right)
    return set()


def _evaluate(expr: _Expr, variables: Mapping[str, float]) -> float:
    if isinstance(expr, _Number):
        return expr.value
    if isinstance(expr, _Variable):
        return variables[expr.name]
    if isinstance(expr, _Negate):
        return -_evaluate(expr.operand, variables)
    left = _evaluate(expr.left, variables)
    right = _evaluate(expr.right, variables)
    if expr.operator == "+":
        return left + right
    if expr.operator == "-":
        return left - right
    if expr.operator == "*":
        return left * right
    if right == 0:
        raise ActionError("division by zero in payload template")
    return left / right


class PayloadTemplate:
    """Literal text with ``{{ expr }}`` holes. Parsing errors raise ActionError."""

    def __init__(self, source: str) -> None:
        self.source = source
        parts: list[str | _Expr] = []
        position = 0
        while True:
            start = source.find("{{", position)
            if start < 0:
                parts.append(source[position:])
                break
            end = source.find("}}", start + 2)
            if end < 0:
                raise ActionError(f"'{{{{' at position {start} is never closed with '}}}}'")
            expression = source[start + 2 : end].strip(" \t\r\n")
            if len(expression) > MAX_EXPRESSION_CHARS:
                raise ActionError(
                    f"expression at position {start} is longer than {MAX_EXPRESSION_CHARS} characters")
            parts.append(source[position:start])
            parts.append(_ExpressionParser(expression).parse())
            position = end + 2
        self._parts = tuple(part for part in parts if part != "")
        names: set[str] = set()
        for part in self._parts:
            if not isinstance(part, str):
                names |= _variables_of(part)
        self.variables = frozenset(names)
        self.expression_count = sum(1 for part in self._parts if not isinstance(part, str))

    def evaluate(
        self, variables: Mapping[str, float], finish: Callable[[float], float]
    ) -> tuple[str, list[float]]:
        """The rendered text and the (finished) value of each expression."""
        out: list[str] = []
        values: list[float] = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
                continue
            raw = _evaluate(part, variables)
            if not math.isfinite(raw):
                raise ActionError("payload template produced a number that is not finite")
            value = finish(raw)
            values.append(value)
            out.append(format_number(value))
        return "".join(out), values


def format_number(value: float) -> str:
    """A JSON-valid number: ``22.0``, ``21.5`` (never ``-0.0``, ``nan`` or ``inf``)."""
    return repr(float(value) + 0.0)


def clamp_setpoint(value: float, low: float, high: float) -> float:
    """Round half up to SETPOINT_STEP, then clamp to [low, high]."""
    rounded = math.floor(value / SETPOINT_STEP + 0.5) * SETPOINT_STEP
    return min(max(rounded, low), high)


def check_renders_json(template: PayloadTemplate, low: float, high: float) -> None:
    """Render once with in-range numbers, so a payload that looks like JSON is known to stay JSON.
    Raises ActionError."""
    sample = dict.fromkeys(TEMPLATE_VARIABLES, low)
    try:
        text, _ = template.evaluate(sample, lambda v: clamp_setpoint(v, low, high))
    except ActionError:
        return  # e.g. division by zero for these sample numbers; reported when it happens at firing
    if text.lstrip(" \t\r\n")[:1] in ("{", "["):
        try:
            json.loads(text)
        except ValueError as err:
            raise ActionError(
                f"payload looks like JSON but renders to invalid JSON ({err}): {text!r}") from err
