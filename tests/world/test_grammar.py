import pytest

from smpo.world import grammar
from smpo.world.grammar import Attributes, parse_prompt, split, to_prompt


def test_prompt_round_trip_for_every_combination():
    attributes = grammar.all_attributes()
    assert len(attributes) == 5 * 3 * 2 * 5 * 3 == 450
    for a in attributes:
        assert parse_prompt(to_prompt(a)) == a


def test_prompt_text_and_parse():
    a = Attributes(colour="red", shape="circle", size="small", position="left", background="white")
    assert to_prompt(a) == "a small red circle on the left, white background"
    assert parse_prompt("A Large blue triangle at the top,  black background") == Attributes(
        "blue", "triangle", "large", "top", "black")


@pytest.mark.parametrize("bad", ["a small red circle", "a small pink circle on the left, white background",
                                 "a small red circle at the left, white background",
                                 "a small red circle on the left, red background"])
def test_parse_rejects_text_outside_the_grammar(bad):
    with pytest.raises(ValueError, match="prompt"):
        parse_prompt(bad)


def test_split_is_fixed_disjoint_and_complete():
    train, held = split("train"), split("held_out")
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(split("all"))
    # sha256-based: the same on every machine (these numbers are a regression check).
    assert (len(train), len(held)) == (357, 93)
    assert held[0] == "a small red circle at the top, black background"
    with pytest.raises(ValueError, match="unknown split"):
        split("test")


def test_vocabulary_covers_every_prompt_word():
    vocab = set(grammar.vocabulary())
    for prompt in split("all"):
        assert set(prompt.replace(",", " ").split()) <= vocab


def test_world_prompts_command_prints_a_split(capsys):
    from smpo.cli import main

    assert main(["world", "prompts", "--split", "held_out"]) == 0
    assert capsys.readouterr().out.splitlines() == split("held_out")
