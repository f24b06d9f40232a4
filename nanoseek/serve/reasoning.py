"""Streaming text for a person or a client: detokenise without splitting characters or stop strings, then split the
reasoning from the answer.

Two holds make a stream of deltas safe:

* ``TextStream`` turns token ids into text. A byte-level model emits a multi-byte UTF-8 character one byte at a
  time; decoding a prefix ends in U+FFFD until the character is complete, so trailing U+FFFD is held back until the
  next token (or the end) settles it. A suffix that could be the start of a stop string is held back too, so a stop
  string never reaches the client, not even in part.
* ``ReasoningSplitter`` routes text inside ``<think> … </think>`` to the reasoning and the rest to the content,
  without the tags (``<answer>`` / ``</answer>`` are dropped as well). A tag arrives over several tokens, so a
  suffix that could be the start of a tag is held back until it is decided. The same holds apply to every delta, so
  the concatenated deltas equal the split of the whole text (tests/test_serve_text.py checks this for every split
  point).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nanoseek.data.templates import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

REPLACEMENT = "\ufffd"


def partial_suffix(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``patterns`` (0 if none). Only
    the prefixes that end with ``text``'s last character are compared (found with ``rfind``): a few per pattern
    instead of one per length, on the generation thread at every token."""
    if not text:
        return 0
    best, last = 0, text[-1]
    for p in patterns:
        i = p.rfind(last, 0, min(len(p) - 1, len(text)))  # p[: i + 1] ends with the last character
        while i + 1 > best:
            if text.endswith(p[: i + 1]):
                best = i + 1
                break
            i = p.rfind(last, 0, i)
    return best


class TextStream:
    """Token ids in, safe text deltas out; ends the text at the first stop string (which is not included)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; returns the text that is now certain (maybe ''). Sets ``stopped`` at a stop string."""
        self.ids.append(token)
        text = self.decode(self.ids)
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._take(text, min(hits))
        end = len(text)
        while end > self.sent and text[end - 1] == REPLACEMENT:  # maybe an unfinished UTF-8 character
            end -= 1
        return self._take(text, end - partial_suffix(text[:end], self.stop))

    def flush(self) -> str:
        """The rest of the text at the end of generation (nothing after a stop string)."""
        return "" if self.stopped else self._take(self.decode(self.ids), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else max(end, self.sent)
        delta, self.sent = text[self.sent : end], end
        return delta


class ReasoningSplitter:
    """Feed completion text in pieces; get (reasoning, content) deltas back.

    ``thinking=True`` when the prompt itself opened the think block (the compact template ends with ``<think>``).
    Otherwise a completion that starts (after whitespace) with ``<think>`` opens it, and one that starts with
    anything else has no reasoning. Whitespace between ``</think>`` and the answer is dropped."""

    def __init__(self, thinking: bool):
        self.state = "think" if thinking else "start"
        self.buf = ""
        self.closed_think = False

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning, content = [], []
        while True:
            if self.state == "start":
                head = self.buf.lstrip()
                if head.startswith(THINK_OPEN):
                    self.buf, self.state = head[len(THINK_OPEN) :], "think"
                elif THINK_OPEN.startswith(head):  # empty, whitespace or a partial "<think>": wait
                    break
                else:
                    self.state = "answer"
            elif self.state == "think":
                i = self.buf.find(THINK_CLOSE)
                if i < 0:
                    cut = len(self.buf) - partial_suffix(self.buf, [THINK_CLOSE])
                    reasoning.append(self.buf[:cut])
                    self.buf = self.buf[cut:]
                    break
                reasoning.append(self.buf[:i])
                self.buf, self.state, self.closed_think = self.buf[i + len(THINK_CLOSE) :], "gap", True
            elif self.state == "gap":
                self.buf = self.buf.lstrip()
                if not self.buf:
                    break
                self.state = "answer"
            else:
                content.append(self._answer_text())
                break
        return "".join(reasoning), "".join(content)

    def _answer_text(self) -> str:
        tags = (ANSWER_OPEN, ANSWER_CLOSE)
        for tag in tags:
            self.buf = self.buf.replace(tag, "")
        cut = len(self.buf) - partial_suffix(self.buf, tags)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def finish(self) -> tuple[str, str]:
        """Everything still held back, at the end of the completion."""
        rest, self.buf = self.buf, ""
        if self.state == "think":
            return rest, ""
        if self.state == "start":
            return "", rest.strip()
        return "", rest.replace(ANSWER_OPEN, "").replace(ANSWER_CLOSE, "")


def split_reasoning(text: str, thinking: bool) -> tuple[str, str]:
    """(reasoning, content) of a whole completion."""
    splitter = ReasoningSplitter(thinking)
    parts = [splitter.feed(text), splitter.finish()]
    return "".join(p[0] for p in parts), "".join(p[1] for p in parts)
