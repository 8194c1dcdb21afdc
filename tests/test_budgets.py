import pytest

from raydefense.budgets import parse_budgets, parse_seeds
from raydefense.errors import UserError


@pytest.mark.parametrize("text,expected", [
    ("0..9", list(range(10))),
    ("3..8", [3, 4, 5, 6, 7, 8]),
    ("0,2,4", [0, 2, 4]),
    ("0..9:2", [0, 2, 4, 6, 8]),
    ("0..2:0.5", [0, 0.5, 1, 1.5, 2]),
    ("0.5,1.5", [0.5, 1.5]),
    ("4,0..2, 2", [0, 1, 2, 4]),
    ("5", [5]),
])
def test_budget_grammar(text, expected):
    assert parse_budgets(text) == expected


@pytest.mark.parametrize("text,message", [
    ("", "empty"),
    ("9..0", "runs backwards"),
    ("0..9:0", "step > 0"),
    ("-1..3", "cannot read budget"),
    ("a..b", "cannot read budget"),
    ("0...9", "cannot read budget"),
    ("1,,2", "cannot read budget"),
    ("0..100000", "at most"),
])
def test_bad_budget_strings(text, message):
    with pytest.raises(UserError, match=message):
        parse_budgets(text)


def test_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("0..1") == [0, 1]
    with pytest.raises(UserError, match="whole numbers"):
        parse_seeds("0.5")
