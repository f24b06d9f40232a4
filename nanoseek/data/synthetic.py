"""A generated pretraining corpus for the R1-Zero experiment: arithmetic text that never shows the template.

DeepSeek-R1-Zero started from a base model that knew language, arithmetic and markup from its pretraining, and was
told the output format by its prompt. The laptop-scale analogue here is a byte-level base pretrained on two kinds of
lines, interleaved at random:

* arithmetic facts of the task's training split, ``question=answer`` (``7+3-2=8``): what the numbers mean, with no
  intermediate steps — never a worked solution;
* markup lines in which the four tags of the R1 format wrap unrelated words and numbers (``<think>river
  stone</think>`` then ``<answer>lamp</answer>`` or ``<answer>17</answer>``): the tags exist as markup, but never
  after a question, and what they hold is never about one.

The base has thus seen neither the template (a question followed by ``<think>``) nor reasoning inside it; whether
RL with rule-based rewards alone can assemble the two is what the experiment asks.
"""

from __future__ import annotations

import random

from nanoseek.data.tasks import Task
from nanoseek.data.templates import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN
from nanoseek.schema import require_int

WORDS = [
    "river",
    "stone",
    "lamp",
    "cloud",
    "garden",
    "window",
    "silver",
    "paper",
    "orange",
    "winter",
    "bridge",
    "candle",
    "forest",
    "little",
    "music",
    "quiet",
    "yellow",
    "simple",
    "window",
    "morning",
    "travel",
    "letter",
    "market",
    "summer",
    "mirror",
    "pencil",
    "harbor",
    "island",
    "basket",
    "meadow",
    "thunder",
]


def base_corpus(task: Task, lines: int, seed: int = 0, markup_share: float = 0.3) -> str:
    """``lines`` lines of arithmetic facts (from the task's training split under ``seed``) and markup lines."""
    require_int("lines", lines, 1, 10_000_000)
    rng = random.Random(f"base-corpus|{seed}")
    out = []
    for i in range(lines):
        if rng.random() < markup_share:
            thought = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
            answer = rng.choice(WORDS) if rng.random() < 0.5 else str(rng.randint(-20, 30))
            out.append(f"{THINK_OPEN}{thought}{THINK_CLOSE}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}")
        else:
            p = task.problem("train", seed, i)
            out.append(f"{p.question}={p.answer}")
    return "\n".join(out) + "\n"
