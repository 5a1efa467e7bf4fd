"""diffinstruct.checks: the one bool-vs-int helper every layer uses."""

import math

import pytest

from diffinstruct import checks
from diffinstruct.errors import ConfigError


@pytest.mark.parametrize("value, is_int, is_number, finite", [
    (3, True, True, True), (0, True, True, True), (True, False, False, False), (False, False, False, False),
    (2.5, False, True, True), (math.inf, False, True, False), (math.nan, False, True, False),
    ("3", False, False, False), (None, False, False, False),
])
def test_predicates(value, is_int, is_number, finite):
    assert checks.is_int(value) is is_int
    assert checks.is_number(value) is is_number
    assert checks.is_finite_number(value) is finite


def test_check_int_names_the_argument_and_refuses_booleans():
    assert checks.check_int("steps", 4, 1) == 4
    with pytest.raises(ConfigError, match=r"^steps must be an integer >= 1, got True$"):
        checks.check_int("steps", True, 1)
    with pytest.raises(ValueError, match=r"^keep must be an integer >= 0 \(0 keeps all\), got -1$"):
        checks.check_int("keep", -1, 0, ValueError, hint=" (0 keeps all)")


def test_check_finite():
    assert checks.check_finite("omega", 4) == 4
    for bad in (True, math.nan, "1"):
        with pytest.raises(ConfigError, match="^omega must be a finite number"):
            checks.check_finite("omega", bad)


def test_runner_and_config_refuse_a_boolean_count():
    from diffinstruct.config import DIConfig
    from diffinstruct.runner import RunOptions

    with pytest.raises(ConfigError, match="ta_steps must be an integer"):
        DIConfig(ta_steps=True).validate()
    with pytest.raises(ConfigError, match="steps must be an integer"):
        RunOptions(steps=True, out_dir=None, checkpoint_every=1).check()
