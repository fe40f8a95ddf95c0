"""Study signal names: Signal reads and writes exactly the names the study's rows carry."""

from __future__ import annotations

import pytest

from actcache.errors import ConfigError
from actcache.study import Signal


@pytest.mark.parametrize("sig", [Signal.moment("isolated", "mlp", 3, "kurt"),
                                 Signal.sae_feature("2776e78d0123456789", "label-masked", "max", 41),
                                 Signal.sae_stat("2776e78d0123456789", "isolated", "fvu")])
def test_parse_of_format_is_the_signal(sig):
    assert Signal.parse(str(sig)) == sig


@pytest.mark.parametrize("name,want", [
    ("isolated|mlp|3|kurt", "isolated/mlp/3/kurt"),
    ("sae|2776e78d|isolated|stat|l0", "sae/2776e78d/isolated/stat/l0"),
    ("sae|2776e78d|label-masked|mean|7", "sae/2776e78d/label-masked/mean/7")])
def test_format_of_parse_is_the_name(name, want):
    s = Signal.parse(name)
    assert str(s) == name and s.format("/") == name.replace("|", "/") == want
    assert s.sae in (None, "2776e78d")


@pytest.mark.parametrize("bad", ["isolated|mlp|x|kurt", "sae|k|m|mean|f", "sae|k|m|stat|nope", "a|b", "a||c|d"])
def test_bad_names_are_refused_with_the_forms(bad):
    with pytest.raises(ConfigError, match="a signal name reads"):
        Signal.parse(bad)
