"""One convention for loss options: every registered term takes its options as keywords, parsed
into a typed dataclass (``term.cfg``) by ``validate.parse_options``, so a misspelt option fails at
build time naming the term and its valid options, and invalid values fail in the config."""
import dataclasses

import pytest

from clipforge import losses


@pytest.mark.parametrize("name", losses.available())
def test_every_term_parses_its_options_into_a_typed_config(name):
    term = losses.build(name)
    assert dataclasses.is_dataclass(term.cfg) and not isinstance(term.cfg, type), name
    with pytest.raises(TypeError, match=rf"loss term '{name}' has no option\(s\) \['not_an_option'\]") as err:
        losses.build(name, not_an_option=1)
    listed = str(err.value).split("its options are ")[1]
    assert all(repr(f.name) in listed for f in dataclasses.fields(term.cfg)), (name, listed)


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("alip", {"momentum": 1.0}, "momentum"),
        ("dclip", {"alpha": 1.5}, "alpha"),
        ("hycd", {"alpha": -0.1}, "alpha"),
        ("distill_kl", {"teacher": "not a key"}, "teacher must be a key prefix"),
        ("hard_negative", {"scope": "all"}, "scope"),
        ("multi_positive", {"mode": "sum"}, "mode"),
        ("tic", {"top_k": 0}, "top_k"),
        ("mlcd", {"modality": "audio"}, "modality"),
        ("dreamlip_grouping", {"norm": "l2"}, "norm"),
    ],
)
def test_invalid_option_values_fail_in_the_config(name, options, message):
    with pytest.raises(ValueError, match=message):
        losses.build(name, **options)
