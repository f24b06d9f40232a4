"""Prompt templates of the reasoning tasks: the R1-Zero format (DeepSeek-R1, Nature 2025) and a compact one.

The model reasons inside ``<think> … </think>`` and answers inside ``<answer> … </answer>``. A template is a name in
``TEMPLATES`` or any string containing ``{question}``; it belongs to the task (``[task] template``), so SFT, GRPO,
evaluation and serving all render a question the same way.
"""

from __future__ import annotations

from nanoseek.schema import require

TEMPLATES = {
    # The R1-Zero prompt (DeepSeek-R1, Table 1), in our words.
    "r1_zero": (
        "A conversation between User and Assistant. The User asks a question and the Assistant solves it: it first "
        "thinks about the reasoning process, then gives the answer. The reasoning goes inside <think> </think> and "
        "the answer inside <answer> </answer>, i.e. <think> reasoning here </think> <answer> answer here </answer>."
        "\nUser: {question}\nAssistant:"
    ),
    # Short enough for byte-level models with a small context; the prompt opens the think block itself.
    "compact": "{question}\n<think>",
}
THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


def check_template(template: str) -> None:
    require(
        template in TEMPLATES or "{question}" in template,
        "template",
        template,
        f"expected one of {', '.join(TEMPLATES)} or a string containing {{question}}",
    )


def render_prompt(template: str, question: str) -> str:
    """The prompt for ``question``: ``template`` is a name in TEMPLATES or a string containing "{question}"."""
    check_template(template)
    return TEMPLATES.get(template, template).replace("{question}", question)


def opens_think(prompt: str) -> bool:
    """The prompt itself opens the think block (the compact template does)."""
    return prompt.rstrip().endswith(THINK_OPEN)


def render_target(prompt: str, reasoning: str, answer: str) -> str:
    """The ideal completion of ``prompt``, for supervised fine-tuning: think block (unless the prompt opened it),
    then the answer block."""
    head = "" if opens_think(prompt) else THINK_OPEN
    return f"{head}{reasoning}{THINK_CLOSE}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"
