"""SamplingParams validation: every field's type and range, named in the message; the checks that need the model."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from cupaged.sampling_params import SamplingParams, SamplingParamsError, check_token_ids


def refused(field: str, match: str | None = None, **kwargs) -> SamplingParamsError:
    with pytest.raises(SamplingParamsError, match=match) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field and str(info.value).startswith(field)
    return info.value


# -- the failures of the issue, one test each ------------------------------------------------------------------

def test_float_n_is_refused() -> None:
    refused("n", r"n must be an integer .*got 2\.5 \(float\)", n=2.5)
    refused("n", r"got 2\.0 \(float\)", n=2.0)  # integral floats too (documented)


def test_float_max_tokens_is_refused() -> None:
    refused("max_tokens", r"max_tokens must be None or an integer .*got 2\.5 \(float\)", max_tokens=2.5)


def test_float_token_id_is_refused() -> None:
    refused("stop_token_ids", r"stop_token_ids\[1\] must be a token id .*got 1\.7 \(float\)", stop_token_ids=[3, 1.7])
    refused("stop_token_ids", r"stop_token_ids\[0\] .*got True \(bool\)", stop_token_ids=[True])
    with pytest.raises(SamplingParamsError, match=r"prompt\[1\] must be a token id .*got 1\.7") as info:
        check_token_ids("prompt", [5, 1.7], vocab_size=100)
    assert info.value.field == "prompt"
    assert check_token_ids("prompt", np.array([5, 7], np.int32), vocab_size=100) == [5, 7]
    with pytest.raises(SamplingParamsError, match=r"prompt\[0\] must be a token id \(an integer in \[0, 100\)\)"):
        check_token_ids("prompt", [100], vocab_size=100)


def test_string_max_tokens_names_the_field() -> None:
    error = refused("max_tokens", r"max_tokens must be .*got 'ten' \(str\)", max_tokens="ten")
    assert isinstance(error, ValueError)


def test_negative_seed_names_the_field_and_range() -> None:
    refused("seed", r"seed must be None or an integer in \[0, 2\*\*64\), got -1", seed=-1)
    refused("seed", r"got 18446744073709551616", seed=2**64)
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1


def test_logprobs_limited_by_max_logprobs_and_vocabulary() -> None:
    huge = SamplingParams(logprobs=10**6)
    with pytest.raises(SamplingParamsError, match=r"logprobs \(1000000\) must not exceed the engine's "
                                                  r"max_logprobs \(20\)") as info:
        huge.verify_for_model(vocab_size=1000)
    assert info.value.field == "logprobs"
    with pytest.raises(SamplingParamsError, match=r"vocabulary size \(1000\)"):
        huge.verify_for_model(vocab_size=1000, max_logprobs=-1)  # -1: no limit but the vocabulary
    SamplingParams(logprobs=20).verify_for_model(vocab_size=1000)
    SamplingParams(logprobs=0).verify_for_model(vocab_size=1000, max_logprobs=0)
    SamplingParams(logprobs=50).verify_for_model(vocab_size=1000, max_logprobs=50)
    with pytest.raises(SamplingParamsError, match="max_logprobs"):
        SamplingParams(logprobs=21).verify_for_model(vocab_size=1000)


def test_logprobs_with_beam_search_are_refused() -> None:
    with pytest.raises(SamplingParamsError, match=r"logprobs are not available with beam search") as info:
        SamplingParams(beam_width=2, logprobs=1).verify_for_model(vocab_size=1000)
    assert info.value.field == "logprobs"
    SamplingParams(beam_width=2).verify_for_model(vocab_size=1000)


def test_stop_token_ids_within_the_vocabulary() -> None:
    SamplingParams(stop_token_ids=[0, 999]).verify_for_model(vocab_size=1000)
    with pytest.raises(SamplingParamsError, match=r"stop_token_ids\[1\] must be a token id \(an integer in "
                                                  r"\[0, 1000\)\), got 1000") as info:
        SamplingParams(stop_token_ids=[5, 1000]).verify_for_model(vocab_size=1000)
    assert info.value.field == "stop_token_ids"


# -- semantics kept, normalisation ------------------------------------------------------------------------------

def test_defaults_and_normalisation() -> None:
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.top_k, p.stop, p.stop_token_ids, p.early_stopping) == (1, 16, 0, [], [], False)
    p = SamplingParams(n=np.int64(2), temperature=np.float32(0.5), top_p=1, top_k=-1, seed=np.uint64(7),
                       stop="###", stop_token_ids=(np.int32(3), 4), ignore_eos=np.bool_(True), early_stopping="never")
    assert (p.n, p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.stop_token_ids, p.ignore_eos) == \
        (2, 0.5, 1.0, 0, 7, ["###"], [3, 4], True)
    assert [type(x) for x in (p.n, p.temperature, p.top_p, p.seed, p.stop_token_ids[0], p.ignore_eos)] == \
        [int, float, float, int, int, bool]
    assert SamplingParams(stop_token_ids=np.array([3, 4])).stop_token_ids == [3, 4]
    stops = ["a"]
    assert SamplingParams(stop=stops).stop is not stops  # a copy: the caller's list is not shared


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=1e300), "temperature"), (dict(top_p=10**400), "top_p"), (dict(min_p=True), "min_p"),
    (dict(n=10**5000), "n"), (dict(top_k=2**63), "top_k"), (dict(ignore_eos=1), "ignore_eos"),
    (dict(early_stopping=1), "early_stopping"), (dict(early_stopping=np.array([1, 2])), "early_stopping"),
    (dict(output_kind=["final_only"]), "output_kind"), (dict(stop=[["x"]]), "stop"), (dict(stop={"a": 1}), "stop"),
    (dict(stop=""), "stop"), (dict(stop_token_ids=3), "stop_token_ids"), (dict(length_penalty="1"), "length_penalty"),
    (dict(n=2, best_of=1), "best_of"), (dict(n=3, beam_width=2), "n"), (dict(beam_width=2, best_of=2), "best_of"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
])
def test_more_refusals_name_the_field(kwargs: dict, field: str) -> None:
    refused(field, **kwargs)


def test_replace_validates() -> None:
    p = SamplingParams(temperature=0.7, top_k=-1, stop="x", max_tokens=10)
    assert dataclasses.replace(p) == p
    assert dataclasses.replace(p, n=2).n == 2
    with pytest.raises(SamplingParamsError, match="n must be an integer"):
        dataclasses.replace(p, n=2.5)
    with pytest.raises(SamplingParamsError, match="min_tokens"):
        dataclasses.replace(p, min_tokens=11)
    assert SamplingParams(**{**p.__dict__, "stop": ["y"]}).stop == ["y"]  # as the server's tests rebuild one


# -- property: any keyword arguments -> a valid SamplingParams, or a ValueError naming a wrong field -----------

F32_MAX = float(np.finfo(np.float32).max)
INT_FIELDS = {"n": (1, 2**63), "best_of": (1, 2**63), "top_k": (-1, 2**63), "seed": (0, 2**64),
              "max_tokens": (1, 2**63), "min_tokens": (0, 2**63), "logprobs": (0, 2**63), "beam_width": (1, 2**63)}
OPTIONAL = {"best_of", "seed", "max_tokens", "logprobs"}
FLOAT_FIELDS = {"temperature": lambda v: 0 <= v <= F32_MAX, "top_p": lambda v: 0 < v <= 1,
                "min_p": lambda v: 0 <= v <= 1, "repetition_penalty": lambda v: v > 0,
                "presence_penalty": lambda v: -2 <= v <= 2, "frequency_penalty": lambda v: -2 <= v <= 2,
                "length_penalty": lambda v: True}
BOOL_FIELDS = {"ignore_eos", "include_stop_str_in_output", "skip_special_tokens"}


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v) -> bool:
    if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, (bool, np.bool_)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def field_ok(name: str, v) -> bool:
    """The documented type and range of each field, written independently of the implementation."""
    if name in INT_FIELDS:
        lo, hi = INT_FIELDS[name]
        return (v is None and name in OPTIONAL) or (is_int(v) and lo <= v < hi)
    if name in FLOAT_FIELDS:
        return is_number(v) and FLOAT_FIELDS[name](float(v))
    if name in BOOL_FIELDS:
        return isinstance(v, (bool, np.bool_))
    if name == "stop":
        items = [v] if isinstance(v, str) else v if isinstance(v, (list, tuple)) else None
        return items is not None and all(isinstance(s, str) and s for s in items)
    if name == "stop_token_ids":
        return isinstance(v, (list, tuple)) and all(is_int(t) and 0 <= t < 2**63 for t in v)
    if name == "early_stopping":
        return isinstance(v, (bool, np.bool_)) or (isinstance(v, str) and v == "never")
    if name == "output_kind":
        return isinstance(v, str) and v in ("cumulative", "final_only")
    raise AssertionError(name)


def broken_together(kw: dict) -> set[str]:
    """Fields named by the checks between fields that these (individually valid) arguments fail."""
    n, best_of, beam = kw.get("n", 1), kw.get("best_of"), kw.get("beam_width", 1)
    max_tokens, min_tokens = kw.get("max_tokens", 16), kw.get("min_tokens", 0)
    names = set()
    if best_of is not None and best_of < n:
        names.add("best_of")
    if beam > 1 and n > beam:
        names.add("n")
    if beam > 1 and best_of is not None:
        names.add("best_of")
    if max_tokens is not None and min_tokens > max_tokens:
        names.add("min_tokens")
    return names


small = st.integers(-2, 40)
valid_ints = {name: st.one_of(st.integers(lo, lo + 8), st.sampled_from([lo, hi - 1]),
                              st.integers(lo, lo + 8).map(np.int64))
              for name, (lo, hi) in INT_FIELDS.items()}
for name in OPTIONAL:
    valid_ints[name] = st.one_of(st.none(), valid_ints[name])
bounds = {"temperature": (0, 5), "top_p": (1e-6, 1), "min_p": (0, 1), "repetition_penalty": (1e-3, 5),
          "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2), "length_penalty": (-5, 5)}
valid_floats = {name: st.one_of(st.floats(lo, hi), st.integers(math.ceil(lo), math.floor(hi)),
                                st.floats(lo, hi).map(np.float32).filter(lambda v, lo=lo, hi=hi: lo <= v <= hi))
                for name, (lo, hi) in bounds.items()}
stop_text = st.text(min_size=1, max_size=5)
VALID = {**valid_ints, **valid_floats, **{name: st.booleans() for name in BOOL_FIELDS},
         "stop": st.one_of(stop_text, st.lists(stop_text, max_size=3), st.tuples(stop_text)),
         "stop_token_ids": st.one_of(st.lists(st.integers(0, 10**6), max_size=3), st.tuples(st.integers(0, 5))),
         "early_stopping": st.sampled_from([True, False, "never"]),
         "output_kind": st.sampled_from(["cumulative", "final_only"])}

scalars = st.one_of(
    small, st.integers(), st.sampled_from([-1, 0, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, 10**400, -10**400]),
    st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 2.0, -0.0, 1e300, 3.5e38]),
    st.booleans(), st.none(), st.text(max_size=6), st.sampled_from(["", "never", "final_only", "ten", "1", "é🙂"]),
    small.map(np.int64), st.integers(0, 255).map(np.uint8), st.floats(width=32).map(np.float32),
    st.booleans().map(np.bool_),
    st.binary(max_size=3), st.complex_numbers(max_magnitude=4),
)
JUNK = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner),
                                                     st.dictionaries(st.text(max_size=3), inner, max_size=2)),
                    max_leaves=6)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid=st.fixed_dictionaries({}, optional=VALID),
       junk=st.dictionaries(st.sampled_from(sorted(VALID)), JUNK, max_size=2))
def test_any_arguments_give_valid_params_or_a_value_error_naming_a_wrong_field(valid: dict, junk: dict) -> None:
    kwargs = {**valid, **junk}
    wrong = {name for name, v in kwargs.items() if not field_ok(name, v)}
    expected = wrong or broken_together(kwargs)
    try:
        p = SamplingParams(**kwargs)
    except ValueError as error:  # anything else fails the test
        event("refused: a field's own check" if wrong else "refused: a check between fields")
        assert isinstance(error, SamplingParamsError), repr(error)
        assert error.field in expected, (error.field, expected, str(error))
        assert str(error).startswith(error.field), str(error)
        return
    event("constructed")
    assert not expected, f"accepted {kwargs}, but {expected} are wrong"
    for name, (lo, hi) in INT_FIELDS.items():
        v = getattr(p, name)
        assert (v is None and name in OPTIONAL) or (type(v) is int and lo <= v < hi), (name, v)
        if name in kwargs and kwargs[name] is not None:
            assert v == (0 if name == "top_k" and kwargs[name] == -1 else kwargs[name])
    assert p.top_k >= 0
    for name, ok in FLOAT_FIELDS.items():
        v = getattr(p, name)
        assert type(v) is float and math.isfinite(v) and ok(v), (name, v)
        if name in kwargs:
            assert v == float(kwargs[name])
    for name in BOOL_FIELDS:
        assert type(getattr(p, name)) is bool
    assert type(p.stop) is list and all(type(s) is str and s for s in p.stop)
    assert type(p.stop_token_ids) is list and all(type(t) is int and t >= 0 for t in p.stop_token_ids)
    assert p.early_stopping in (True, False, "never") and type(p.early_stopping) in (bool, str)
    assert p.output_kind in ("cumulative", "final_only")
    assert dataclasses.replace(p) == p  # a valid SamplingParams re-validates to itself
