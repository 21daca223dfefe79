import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks import expr


def ev(text, a, b, p=7):
    return int(expr.evaluate(expr.parse(text), np.array([a]), np.array([b]), p)[0])


@pytest.mark.parametrize(
    "text, fn",
    [
        ("a + ab", lambda a, b: a + a * b),
        ("ab", lambda a, b: a * b),
        ("a^2 + ab", lambda a, b: a**2 + a * b),
        ("2a^2", lambda a, b: 2 * a**2),
        ("a^2 + b^2", lambda a, b: a**2 + b**2),
        ("(a - b)^2", lambda a, b: (a - b) ** 2),
        ("-a + 3*b", lambda a, b: -a + 3 * b),
        ("2(a + b)b", lambda a, b: 2 * (a + b) * b),
        ("a^0", lambda a, b: 1),
        ("  a   *  b ", lambda a, b: a * b),
    ],
)
@pytest.mark.parametrize("a, b", [(0, 0), (3, 5), (999, 998), (123, 456)])
def test_valid_expressions_match_python(text, fn, a, b):
    assert ev(text, a, b) == fn(a, b) % 7


def test_power_binds_tighter_than_implicit_product():
    # 2a^2 is 2 * (a^2), not (2a)^2
    assert ev("2a^2", 3, 0, 1000) == 18


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("__import__('os')", "unknown name '__import__'"),
        ("a.__class__", "unexpected character '.'"),
        ("os", "unknown name 'os'"),
        ("x + 1", "unknown name 'x'"),
        ("a + ", "expected a number, a, b or '('"),
        ("(a + b", "expected ')'"),
        ("a ^ b", "non-negative integer exponent"),
        ("a ^ -1", "non-negative integer exponent"),
        ("", "empty expression"),
        ("a + b)", "expected an operator or the end"),
        ("a; b", "unexpected character ';'"),
        ("lambda: 1", "unknown name 'lambda'"),
        ("a / b", "unexpected character '/'"),
        ("a ** 2", "expected a number"),
        ("'a'", "unexpected character"),
    ],
)
def test_invalid_expressions_are_rejected_with_a_clear_error(text, fragment):
    with pytest.raises(expr.ExpressionError) as info:
        expr.parse(text)
    assert fragment in str(info.value)


def test_non_text_is_rejected():
    with pytest.raises(expr.ExpressionError, match="must be text"):
        expr.parse(3)


def test_slug_is_column_friendly():
    assert expr.slug("2a^2") == "2a2"
    assert expr.slug("a^2 + b^2") == "a2_plus_b2"


# Property: random expression trees, built together with a Python reference of their value,
# render to text that the parser evaluates to the same number mod p.
leaves = st.one_of(
    st.integers(0, 50).map(lambda n: (str(n), lambda a, b, n=n: n)),
    st.sampled_from([("a", lambda a, b: a), ("b", lambda a, b: b)]),
)
_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def _combine(children):
    binary = st.tuples(children, st.sampled_from(sorted(_OPS)), children).map(
        lambda t: (
            f"({t[0][0]} {t[1]} {t[2][0]})",
            lambda a, b, t=t: _OPS[t[1]](t[0][1](a, b), t[2][1](a, b)),
        )
    )
    power = st.tuples(children, st.integers(0, 5)).map(
        lambda t: (f"({t[0][0]})^{t[1]}", lambda a, b, t=t: t[0][1](a, b) ** t[1])
    )
    neg = children.map(lambda c: (f"-({c[0]})", lambda a, b, c=c: -c[1](a, b)))
    implicit = st.tuples(children, children).map(
        lambda t: (f"({t[0][0]})({t[1][0]})", lambda a, b, t=t: t[0][1](a, b) * t[1][1](a, b))
    )
    return st.one_of(binary, power, neg, implicit)


@settings(max_examples=200, deadline=None)
@given(st.recursive(leaves, _combine, max_leaves=8), st.integers(0, 999), st.integers(0, 999), st.integers(2, 50))
def test_parser_agrees_with_python_arithmetic(tree, a, b, p):
    text, reference = tree
    assert ev(text, a, b, p) == reference(a, b) % p
