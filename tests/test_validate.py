"""vlmprune.validate: the scalar checks every floor shares, against a plain table of cases."""

import math

import pytest

from vlmprune import VlmpruneError
from vlmprune.validate import check_integer, check_number, check_share, is_integer, is_number, is_share

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "value, integer, number",
    [(3, True, True), (0, True, True), (-2, True, True), (2.0, False, True), (NAN, False, True),
     (True, False, False), (False, False, False), ("3", False, False), (None, False, False), ([1], False, False)],
)
def test_types(value, integer, number):
    assert is_integer(value) is integer and is_number(value) is number


@pytest.mark.parametrize(
    "value, minimum, maximum, ok",
    [(1, 1, None, True), (0, 1, None, False), (5, 0, 5, True), (6, 0, 5, False), (-9, None, None, True),
     (True, None, None, False), (1.0, None, None, False)],
)
def test_check_integer(value, minimum, maximum, ok):
    if ok:
        check_integer(value, "never raised", minimum, maximum)
    else:
        with pytest.raises(VlmpruneError, match="^count=.* bad$"):
            check_integer(value, f"count={value!r} bad", minimum, maximum)


@pytest.mark.parametrize(
    "value, minimum, finite, ok",
    [(0, 0, False, True), (0.5, 0, False, True), (-0.1, 0, False, False), (NAN, 0, False, False), (NAN, None, False, True),
     (INF, 0, False, True), (INF, 0, True, False), (NAN, None, True, False), (False, None, False, False), ("1", None, False, False)],
)
def test_check_number(value, minimum, finite, ok):
    if ok:
        check_number(value, "never raised", minimum, finite)
    else:
        with pytest.raises(VlmpruneError, match="^beta is wrong$"):
            check_number(value, "beta is wrong", minimum, finite)


VALUES = [-0.5, 0, 0.0, 1e-9, 0.5, 1, 1.0, 1.5, NAN, INF, True, "half", None]


@pytest.mark.parametrize("allow_zero", [True, False])
@pytest.mark.parametrize("allow_one", [True, False])
@pytest.mark.parametrize("value", VALUES)
def test_check_share_against_the_interval(value, allow_zero, allow_one):
    inside = (
        isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
        and (0 <= value if allow_zero else 0 < value) and (value <= 1 if allow_one else value < 1)
    )
    assert is_share(value, allow_zero, allow_one) is inside
    interval = ("[" if allow_zero else "(") + "0, 1" + ("]" if allow_one else ")")
    if inside:
        check_share("share", value, "the hint", allow_zero=allow_zero, allow_one=allow_one)
    else:
        with pytest.raises(VlmpruneError) as err:
            check_share("share", value, "the hint", allow_zero=allow_zero, allow_one=allow_one)
        assert str(err.value) == f"share={value!r} is outside {interval}: the hint"


def test_methods_base_still_exports_check_share():
    from vlmprune.methods.base import check_share as from_base

    assert from_base is check_share
