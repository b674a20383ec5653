"""The sampler: greedy, every parameter's effect, logprobs, seeded reproducibility in any batch,
parameter validation and proto presence."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmasos.proto import common_pb2
from llmasos.services.inference import sampler
from llmasos.services.inference.sampler import (
    SamplingParams,
    apply_penalties,
    filter_thresholds,
    sample,
)

VOCAB = 49152
P4 = torch.tensor([0.5, 0.3, 0.15, 0.05])  # a small distribution whose cuts are easy to reason on
EPS32 = torch.finfo(torch.float32).eps


def exact_logprob(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The log-softmax at tokens in fp64: the reference, so only our fp32 error is measured."""
    return torch.log_softmax(logits.double(), dim=-1).gather(1, tokens[:, None]).squeeze(1)


def logprob_atol(logits: torch.Tensor) -> float:
    """fp32 x - logsumexp(x) over V terms: rounding near |lse| plus the sum's relative error,
    which grows like sqrt(V) ulps with an order that depends on the SIMD width (AVX2/AVX-512)."""
    lse = torch.logsumexp(logits.double(), dim=-1).abs().max().item()
    return (lse + math.sqrt(logits.shape[-1])) * EPS32


def draw_many(logits: torch.Tensor, params: SamplingParams, n: int = 2000) -> torch.Tensor:
    """n draws from one row, as counts per token, using seeds 0..n-1 in one batch."""
    batch = logits.expand(n, -1).contiguous()
    rows = [SamplingParams(**{**params.__dict__, "seed": s}) for s in range(n)]
    tokens, _ = sample(batch, rows, [[] for _ in range(n)], [0] * n)
    return torch.bincount(tokens, minlength=logits.shape[-1])


def test_greedy_is_argmax_with_unmodified_logprob() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, VOCAB, generator=gen) * 4
    tokens, logprobs = sample(logits, [SamplingParams()] * 8, [[]] * 8, [0] * 8)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(tokens, logits.argmax(dim=-1))
    torch.testing.assert_close(logprobs.double(), exact_logprob(logits, tokens),
                               atol=logprob_atol(logits), rtol=0)


def test_logprob_ignores_temperature_filters_and_penalties() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 1000, generator=gen)
    params = [
        SamplingParams(temperature=0.3, top_k=5, seed=1),
        SamplingParams(temperature=2.0, top_p=0.5, seed=2),
        SamplingParams(temperature=1.0, repetition_penalty=3.0, presence_penalty=1.5, seed=3),
        SamplingParams(repetition_penalty=5.0, frequency_penalty=2.0),
    ]
    history = [[1, 2, 3], [4], [int(logits[2].argmax())] * 3, [int(logits[3].argmax())]]
    tokens, logprobs = sample(logits, params, history, [0] * 4)
    torch.testing.assert_close(logprobs.double(), exact_logprob(logits, tokens),
                               atol=logprob_atol(logits), rtol=0)
    assert tokens[3] != logits[3].argmax()  # the penalty moved the greedy row off its argmax


def test_temperature_shapes_the_distribution() -> None:
    logits = P4.log()[None, :]
    for temperature in (0.5, 1.0, 2.0):
        counts = draw_many(logits, SamplingParams(temperature=temperature), n=4000)
        expected = torch.softmax(logits[0] / temperature, dim=-1)
        # a frequency over n draws has std <= sqrt(0.25 / n) = 0.0079: 0.03 is 3.8 sigma
        torch.testing.assert_close(counts / 4000, expected, atol=0.03, rtol=0)
    cold = draw_many(logits, SamplingParams(temperature=0.05), n=500)
    assert cold[0] == 500  # near zero temperature is nearly greedy


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
        (SamplingParams(temperature=1.0, top_k=1), {0}),
        (SamplingParams(temperature=1.0, top_p=0.75), {0, 1}),  # 0.5 < 0.75, 0.8 >= 0.75
        (SamplingParams(temperature=1.0, top_p=0.85), {0, 1, 2}),
        (SamplingParams(temperature=1.0, top_p=0.3), {0}),
        (SamplingParams(temperature=1.0, min_p=0.5), {0, 1}),  # p >= 0.25
        (SamplingParams(temperature=1.0, min_p=0.2), {0, 1, 2}),  # p >= 0.1
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.6), {0, 1}),  # 0.5/0.95 < 0.6
        (SamplingParams(temperature=1.0), {0, 1, 2, 3}),
    ],
)
def test_filters_keep_exactly_the_allowed_tokens(params: SamplingParams, allowed: set) -> None:
    counts = draw_many(P4.log()[None, :], params, n=3000)
    assert {i for i, c in enumerate(counts.tolist()) if c} == allowed
    kept = P4[sorted(allowed)]
    expected = torch.zeros(4)
    expected[sorted(allowed)] = kept / kept.sum()  # the survivors keep their relative odds
    # std <= sqrt(0.25 / 3000) = 0.0091: 0.035 is 3.8 sigma (the draws are seeded: no flakes)
    torch.testing.assert_close(counts / 3000, expected, atol=0.035, rtol=0)


def test_top_p_wider_than_the_window_falls_back_to_a_full_sort() -> None:
    # a nearly flat row: the 0.9 nucleus holds ~7k tokens, far past the 1024-token prefix
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 8192, generator=gen) * 0.01
    logits[0, 7] = -30.0  # far below the nucleus
    counts = draw_many(logits, SamplingParams(temperature=1.0, top_p=0.9), n=200)
    assert counts[7] == 0
    assert (counts > 0).sum() > 170  # spread over many tokens, not stuck in the prefix


def test_repetition_penalty_follows_the_sign() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_penalties(logits, [SamplingParams(repetition_penalty=2.0)], [[0, 1, 1]])
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, 0.5]]))
    assert torch.equal(logits, torch.tensor([[2.0, -2.0, 1.0, 0.5]]))  # input untouched


def test_presence_and_frequency_penalties() -> None:
    logits = torch.zeros(2, 5)
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(presence_penalty=-1.0),
    ]
    out = apply_penalties(logits, params, [[1, 1, 1, 3], [4]])
    torch.testing.assert_close(out[0], torch.tensor([0.0, -1.25, 0.0, -0.75, 0.0]))
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))
    # a negative presence penalty encourages repeats: greedy now picks the seen token
    tokens, _ = sample(logits, params, [[1, 1, 1, 3], [4]], [0, 0])
    assert tokens[1] == 4 and tokens[0] in (0, 2, 4)


def test_penalties_change_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    plain, _ = sample(logits, [SamplingParams()], [[0]], [1])
    penalised, _ = sample(logits, [SamplingParams(repetition_penalty=1.2)], [[0]], [1])
    freq, _ = sample(logits, [SamplingParams(frequency_penalty=0.2)], [[0]], [1])
    assert plain.item() == 0 and penalised.item() == 1 and freq.item() == 1


def mixed_batch(n: int) -> list[SamplingParams]:
    """n seeded rows cycling through every filter and penalty."""
    shapes = [
        dict(temperature=0.7),
        dict(temperature=1.0, top_k=40),
        dict(temperature=0.9, top_p=0.9),
        dict(temperature=1.2, min_p=0.05),
        dict(temperature=0.8, top_k=100, top_p=0.95, min_p=0.01, repetition_penalty=1.3),
        dict(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.5),
        dict(),  # greedy
        dict(temperature=1.5, top_p=0.99),
    ]
    return [SamplingParams(**shapes[i % len(shapes)], seed=1000 + i) for i in range(n)]


def test_seeded_rows_are_identical_alone_and_in_a_batch_of_32() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(32, VOCAB, generator=gen) * 3
    params = mixed_batch(32)
    histories = [[(7 * i + j) % VOCAB for j in range(i)] for i in range(32)]
    steps = [i % 5 for i in range(32)]
    batched, batched_lp = sample(logits, params, histories, steps)
    atol = logprob_atol(logits)   # each side within it of the exact value
    for i in range(32):
        alone, alone_lp = sample(logits[i : i + 1], [params[i]], [histories[i]], [steps[i]])
        assert alone.item() == batched[i].item(), f"row {i} ({params[i]})"
        assert alone_lp.item() == pytest.approx(batched_lp[i].item(), abs=2 * atol)
    # the same rows in another order, next to unseeded strangers, after a "recompute"
    order = list(reversed(range(32)))
    strangers = [SamplingParams(temperature=1.0, top_k=7)] * 5
    shuffled, _ = sample(
        torch.cat([logits[order], logits[:5]]),
        [params[i] for i in order] + strangers,
        [histories[i] for i in order] + [[]] * 5,
        [steps[i] for i in order] + [0] * 5,
    )
    assert shuffled[:32].tolist() == batched[order].tolist()


def test_seed_and_step_decide_the_draw() -> None:
    logits = torch.zeros(1, 1000)  # uniform: any change of draw shows
    one = SamplingParams(temperature=1.0, seed=42)
    draws = [sample(logits, [one], [[]], [step])[0].item() for step in range(20)]
    again = [sample(logits, [one], [[]], [step])[0].item() for step in range(20)]
    other = SamplingParams(temperature=1.0, seed=43)
    other_draws = [sample(logits, [other], [[]], [step])[0].item() for step in range(20)]
    assert draws == again
    assert len(set(draws)) > 10  # steps give different draws
    assert draws != other_draws


def test_unseeded_rows_use_fresh_randomness() -> None:
    logits = torch.zeros(16, 1000)
    params = [SamplingParams(temperature=1.0)] * 16
    first, _ = sample(logits, params, [[]] * 16, [0] * 16)
    second, _ = sample(logits, params, [[]] * 16, [0] * 16)
    assert first.tolist() != second.tolist()


# ---- validation ----

VALID = SamplingParams(
    temperature=0.7, top_k=50, top_p=0.9, min_p=0.1, repetition_penalty=1.1,
    presence_penalty=0.5, frequency_penalty=-0.5, seed=2**64 - 1, max_tokens=65536,
    stop=["\n\n", "x" * 256], stop_token_ids=[0, VOCAB - 1],
)  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, r"temperature must be in \[0.0, 10.0\]"),
        ("temperature", 10.5, r"temperature must be in \[0.0, 10.0\]"),
        ("temperature", math.nan, "temperature"),
        ("top_k", -1, rf"top_k must be in \[0, {VOCAB}\]"),
        ("top_k", VOCAB + 1, rf"top_k must be in \[0, {VOCAB}\]"),
        ("top_p", 0.0, r"top_p must be in \(0.0, 1.0\]"),
        ("top_p", 1.01, r"top_p must be in \(0.0, 1.0\]"),
        ("min_p", 1.0, r"min_p must be in \[0.0, 1.0\)"),
        ("min_p", -0.01, r"min_p must be in \[0.0, 1.0\)"),
        ("repetition_penalty", 0.0, r"repetition_penalty must be in \(0.0, 10.0\]"),
        ("repetition_penalty", 11.0, r"repetition_penalty must be in \(0.0, 10.0\]"),
        ("presence_penalty", 2.5, r"presence_penalty must be in \[-2.0, 2.0\]"),
        ("frequency_penalty", -2.5, r"frequency_penalty must be in \[-2.0, 2.0\]"),
        ("seed", -1, "seed must be in"),
        ("seed", 2**64, "seed must be in"),
        ("max_tokens", 0, r"max_tokens must be in \[1, 65536\]"),
        ("max_tokens", 65537, r"max_tokens must be in \[1, 65536\]"),
        ("stop", ["s"] * 17, "stop: at most 16 strings"),
        ("stop", ["é" * 129], "stop: each string must be 1 to 256 bytes"),
        ("stop", [""], "stop: each string must be 1 to 256 bytes"),
        ("stop_token_ids", [VOCAB], rf"stop_token_ids: each must be in \[0, {VOCAB}\)"),
    ],
)
def test_validation_names_parameter_and_range(field: str, value: object, message: str) -> None:
    VALID.validate(VOCAB)
    params = SamplingParams(**{**VALID.__dict__, field: value})
    with pytest.raises(ValueError, match=message):
        params.validate(VOCAB)


def test_defaults_are_valid() -> None:
    SamplingParams().validate(VOCAB)
    assert SamplingParams().greedy and not SamplingParams().penalises


def test_from_proto_honours_presence() -> None:
    empty = SamplingParams.from_proto(common_pb2.SamplingParams())
    assert empty == SamplingParams()
    # explicit zeros are not "unset": top_p=0 must reach validation and fail there
    msg = common_pb2.SamplingParams(
        top_p=0.0, seed=0, temperature=0.5, stop=["END"], ignore_eos=True
    )
    params = SamplingParams.from_proto(msg)
    assert params.top_p == 0.0 and params.seed == 0 and params.temperature == 0.5
    assert params.ignore_eos and not empty.ignore_eos
    assert params.max_tokens == 256 and params.stop == ["END"]
    with pytest.raises(ValueError, match="top_p"):
        params.validate(VOCAB)
    round_trip = SamplingParams.from_proto(VALID.to_proto())
    assert round_trip.stop == VALID.stop and round_trip.seed == VALID.seed
    assert round_trip.top_k == VALID.top_k and round_trip.max_tokens == VALID.max_tokens
    assert round_trip.temperature == pytest.approx(VALID.temperature)  # proto floats are fp32


@settings(max_examples=40, deadline=None)
@given(
    vocab=st.sampled_from([300, 5000]),
    sharpness=st.sampled_from([0.01, 1.0, 4.0]),
    filters=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 10, 200, 299, 1000, 4500]),
            st.sampled_from([1.0, 0.5, 0.9, 0.999]),
            st.sampled_from([0.0, 0.001, 0.3]),
        ),
        min_size=1,
        max_size=6,
    ),
    seed=st.integers(0, 2**16),
)
def test_prefix_windows_give_the_full_sort_thresholds(vocab, sharpness, filters, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(len(filters), vocab, generator=gen) * sharpness, dim=-1)
    params = [SamplingParams(temperature=1.0, top_k=k, top_p=p, min_p=m) for k, p, m in filters]
    windowed = filter_thresholds(probs, params)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampler, "TOP_P_WINDOWS", ())
        for row in range(len(filters)):
            full = filter_thresholds(probs[row : row + 1], params[row : row + 1])
            assert windowed[row].item() == full.item(), params[row]
