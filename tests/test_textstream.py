"""hublabio.textstream without a model: UTF-8 split across tokens, stop strings held back at
token granularity, and log-probabilities that stay with exactly the tokens they came from."""

from __future__ import annotations

from hublabio.textstream import TextStream, TokenInfo


def tok(i: int, data, lp: float = -1.0) -> TokenInfo:
    return TokenInfo(i, data if isinstance(data, bytes) else data.encode(), lp)


def run(stream: TextStream, tokens):
    pieces = []
    for t in tokens:
        pieces += stream.push(t)
    return pieces + stream.finish()


def test_without_stop_strings_every_token_is_a_piece_at_once():
    s = TextStream()
    assert [p.text for p in s.push(tok(1, "Hel"))] == ["Hel"]
    assert [p.text for p in s.push(tok(2, "lo"))] == ["lo"]
    assert s.finish() == []


def test_a_character_split_over_two_tokens_travels_with_the_second():
    e_acute = "é".encode()  # two bytes
    pieces = run(TextStream(), [tok(1, e_acute[:1], -0.5), tok(2, e_acute[1:], -0.25)])
    assert [p.text for p in pieces] == ["é"]
    assert [t.id for t in pieces[0].tokens] == [1, 2]
    assert pieces[0].logprob == -0.75


def test_an_incomplete_character_at_the_end_is_replaced_not_lost():
    pieces = run(TextStream(), [tok(1, "a"), tok(2, "é".encode()[:1])])
    assert "".join(p.text for p in pieces) == "a\ufffd"
    assert sum(len(p.tokens) for p in pieces) == 2


def test_stop_string_inside_one_token():
    s = TextStream(stop=["END"])
    pieces = run(s, [tok(1, "one "), tok(2, "twoEND three", -2.0), tok(3, "four")])
    assert "".join(p.text for p in pieces) == "one two"
    assert s.stopped
    assert [(t.id, t.text, t.logprob) for p in pieces for t in p.tokens] == \
        [(1, "one ", -1.0), (2, "two", -2.0)]


def test_stop_string_across_tokens_is_held_back_then_dropped():
    s = TextStream(stop=["\nUser:"])
    out = s.push(tok(1, "Hi"))
    assert [p.text for p in out] == ["Hi"]
    assert s.push(tok(2, "\nUs")) == []           # could be the stop string: held
    out = s.push(tok(3, "er: more"))
    assert out == [] and s.stopped                # it was: nothing after "Hi"
    assert s.finish() == []


def test_held_text_that_turns_out_harmless_is_released_with_its_tokens():
    s = TextStream(stop=["STOP"])
    assert s.push(tok(1, "ST", -0.1)) == []
    out = s.push(tok(2, "ART", -0.2))
    assert [p.text for p in out] == ["START"]
    assert [(t.id, t.logprob) for t in out[0].tokens] == [(1, -0.1), (2, -0.2)]


def test_hold_back_is_only_as_long_as_a_possible_match():
    s = TextStream(stop=["ab"])
    assert [p.text for p in s.push(tok(1, "xyz"))] == ["xyz"]   # no suffix starts "ab"
    assert s.push(tok(2, "a")) == []
    assert [p.text for p in s.push(tok(3, "c"))] == ["ac"]


def test_the_earliest_of_several_stop_strings_wins():
    pieces = run(TextStream(stop=["zz", "b"]), [tok(1, "a b zz")])
    assert "".join(p.text for p in pieces) == "a "


def test_every_piece_is_the_concatenation_of_its_tokens():
    pieces = run(TextStream(stop=["</s>"]), [tok(i, w) for i, w in
                                             enumerate(["<", "/", "x", "> ", "</", "s", ">", "!"])])
    assert "".join(p.text for p in pieces) == "</x> "
    assert all(p.text == "".join(t.text for t in p.tokens) for p in pieces)
