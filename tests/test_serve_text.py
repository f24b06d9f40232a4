"""Streaming text: whole UTF-8 characters, stop strings never leaked, tags split across tokens, prompt rendering."""

import random

import pytest

from nanoseek.data.tokenizer import ByteTokenizer
from nanoseek.serve.reasoning import ReasoningSplitter, TextStream, partial_suffix, split_reasoning
from nanoseek.serve.template import ChatFormat, PromptError

BYTES = ByteTokenizer()


def stream_bytes(text: str, stop=()) -> tuple[list[str], bool]:
    s = TextStream(BYTES.decode, stop)
    deltas = []
    for b in text.encode():
        deltas.append(s.push(b))
        if s.stopped:
            return deltas, True
    deltas.append(s.flush())
    return deltas, False


def test_partial_suffix_is_the_longest_proper_prefix_at_the_end():
    assert partial_suffix("abc</th", ["</think>"]) == 4
    assert partial_suffix("abc<", ["</think>", "<answer>"]) == 1
    assert partial_suffix("abc</think>", ["</think>"]) == 0  # whole tag: not a proper prefix
    assert partial_suffix("", ["</think>"]) == 0


def test_partial_suffix_equals_trying_every_length():
    def every_length(text, patterns):
        return max((k for p in patterns for k in range(1, min(len(p) - 1, len(text)) + 1) if text.endswith(p[:k])),
                   default=0)  # fmt: skip

    rng = random.Random(0)
    for _ in range(3000):  # a small alphabet, so that prefixes repeat inside patterns and texts
        text = "".join(rng.choices("ab<", k=rng.randint(0, 12)))
        patterns = ["".join(rng.choices("ab<", k=rng.randint(1, 8))) for _ in range(rng.randint(1, 3))]
        assert partial_suffix(text, patterns) == every_length(text, patterns), (text, patterns)


def test_multibyte_characters_are_never_split_across_deltas():
    text = "é€😀 ok"
    deltas, stopped = stream_bytes(text)
    assert "".join(deltas) == text and not stopped
    assert all("\ufffd" not in d for d in deltas)
    # the 4-byte emoji arrives whole, in the delta of its last byte
    assert deltas[: len("é€😀".encode())].count("😀") == 1


def test_invalid_bytes_are_emitted_as_replacement_characters_once_settled():
    s = TextStream(BYTES.decode)
    out = [s.push(b) for b in b"a\xffb"] + [s.flush()]
    assert "".join(out) == "a\ufffdb"
    assert out[1] == ""  # held back while it might start a character


def test_stop_string_ends_the_text_and_no_part_of_it_is_emitted():
    deltas, stopped = stream_bytes("answer 42</answer> and more", stop=["</answer>"])
    assert stopped and "".join(deltas) == "answer 42"
    # a false start of the stop string is held, then released
    deltas, stopped = stream_bytes("a </b> c", stop=["</answer>"])
    assert not stopped and "".join(deltas) == "a </b> c"
    assert "</" not in deltas[3] and deltas[4] == "</b"


@pytest.mark.parametrize("thinking", [True, False])
def test_splitter_gives_the_same_split_for_every_way_of_cutting_the_text(thinking):
    body = "think 1 é</think>\n<answer>42</answer>"
    text = body if thinking else "  <think>" + body
    expected = ("think 1 é", "42")
    assert split_reasoning(text, thinking) == expected
    for size in (1, 2, 3, 5):  # pieces of every size, so each tag is cut at every offset
        sp = ReasoningSplitter(thinking)
        parts = [sp.feed(text[i : i + size]) for i in range(0, len(text), size)] + [sp.finish()]
        assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == expected
        assert all("<" not in p[1] and "think>" not in p[0] for p in parts)


def test_splitter_without_think_block_and_with_an_unclosed_one():
    assert split_reasoning("just text <b>", thinking=False) == ("", "just text <b>")
    assert split_reasoning("still thinking", thinking=True) == ("still thinking", "")
    assert split_reasoning("<thi", thinking=False) == ("", "<thi")


def test_chat_format_renders_turns_and_drops_earlier_reasoning():
    fmt = ChatFormat.from_config({"task": {"name": "arithmetic", "template": "compact"}})
    assert fmt.reasoning and fmt.stop == ("</answer>",) and fmt.max_new_tokens == 64
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "<think>one plus one</think>\n<answer>2</answer>"},
        {"role": "user", "content": "2+2"},
    ]
    prompt = fmt.render(messages)
    assert prompt == "Be brief.\n1+1\n<think></think>\n<answer>2</answer>\n2+2\n<think>"
    assert "one plus one" not in prompt and fmt.thinking_at_start(prompt)
    # a raw compact completion sent back (it starts inside the think block the prompt opened)
    raw = messages[:2] + [{"role": "assistant", "content": "one plus one</think>\n<answer>2</answer>"}, messages[3]]
    assert fmt.render(raw) == prompt
    with pytest.raises(PromptError, match="last message must be from the user"):
        fmt.render(messages[:3])
    with pytest.raises(PromptError, match="role='tool'"):
        fmt.render([{"role": "tool", "content": "x"}, {"role": "user", "content": "y"}])


def test_a_checkpoint_without_task_is_a_continuation_model():
    fmt = ChatFormat.from_config({"model": {}})
    assert not fmt.reasoning and fmt.name == "continuation" and fmt.stop == ()
    assert fmt.render([{"role": "user", "content": "The with statement"}]) == "The with statement"
    r1 = ChatFormat.from_config({"task": {"name": "arithmetic", "template": "r1_zero"}})
    assert r1.render([{"role": "user", "content": "3+4"}]).endswith("User: 3+4\nAssistant:")
    assert not r1.thinking_at_start(r1.render([{"role": "user", "content": "3+4"}]))
