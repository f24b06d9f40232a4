"""Chat messages -> the prompt text a checkpoint was trained on.

A reasoning checkpoint (one saved with a ``[task]`` section, by ``nanoseek sft`` or ``grpo``) was trained on one
question rendered with its task's template (``compact``: ``"{question}\\n<think>"``, ``r1_zero``, or a custom string)
and answers ``<think> … </think>\\n<answer> … </answer>``. A conversation is rendered turn by turn in that format:

    [system text]\\n  template(question 1) </think>\\n<answer>answer 1</answer>\\n  …  template(last question)

Earlier answers keep only their content: the reasoning of a previous turn is dropped (DeepSeek's multi-round
rule), so an empty think block stands in for it. A checkpoint without ``[task]`` (a pretrained model of plain text)
is a continuation model: the prompt is the messages' contents joined by newlines, and the model continues the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nanoseek.data.tasks import TaskConfig
from nanoseek.data.templates import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    TEMPLATES,
    THINK_CLOSE,
    THINK_OPEN,
    opens_think,
    render_prompt,
    render_target,
)
from nanoseek.schema import build_section

ROLES = ("system", "developer", "user", "assistant")
_THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


class PromptError(ValueError):
    """A conversation that cannot be rendered; ``param`` names the offending request field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatFormat:
    """How a checkpoint wants to be prompted, from its run config."""

    template: str | None
    """A name in TEMPLATES or a string with {question}; None for a plain-text continuation model."""
    max_new_tokens: int | None
    """The task's completion budget: the default max_tokens of a chat request (None: the rest of the context)."""
    stop: tuple[str, ...]
    """Stop strings of the task (``</answer>``); they end a completion and are not part of the text returned."""

    @classmethod
    def from_config(cls, config: dict) -> ChatFormat:
        if "task" not in config:
            return cls(None, None, ())
        task = build_section(TaskConfig, config["task"], "task", "the checkpoint's config.toml")
        return cls(task.template, task.max_new_tokens, tuple(task.stop))

    @property
    def reasoning(self) -> bool:
        """Completions are split into reasoning and content: every task trains think/answer completions
        (``render_target``), whatever its template."""
        return self.template is not None

    @property
    def name(self) -> str:
        if self.template is None:
            return "continuation"
        return self.template if self.template in TEMPLATES else "custom"

    def render(self, messages: list[dict]) -> str:
        """Messages [{role, content}] -> prompt text. Raises PromptError naming the message at fault."""
        if not messages:
            raise PromptError("messages must hold at least one message", "messages")
        system, turns, pending = [], [], None
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role not in ROLES:
                raise PromptError(f"messages[{i}].role={role!r} is not supported: expected one of {ROLES}", "messages")
            if role in ("system", "developer"):
                system.append(content)
            elif role == "user":
                if pending is not None:  # two user turns in a row: one question
                    content = pending + "\n" + content
                pending = content
            else:
                turns.append((pending or "", strip_reasoning(content)))
                pending = None
        if pending is None:
            raise PromptError("the last message must be from the user", "messages")
        if self.template is None:
            parts = system + [t for pair in turns for t in pair if t] + [pending]
            return "\n".join(parts)
        rendered = []
        for question, answer in turns:
            prompt = render_prompt(self.template, question)
            rendered.append(prompt + render_target(prompt, "", answer))
        rendered.append(render_prompt(self.template, pending))
        return "\n".join(system + rendered)

    def thinking_at_start(self, prompt: str) -> bool:
        """The prompt already opened the think block, so the completion starts inside it."""
        return self.reasoning and opens_think(prompt)


def strip_reasoning(text: str) -> str:
    """An earlier answer as it is fed back: without its think block and without answer tags. A completion of a
    template that opens the think block itself (``compact``) starts inside it: text up to a ``</think>`` that no
    ``<think>`` opened is reasoning too."""
    close = text.find(THINK_CLOSE)
    if close >= 0 and THINK_OPEN not in text[:close]:
        text = text[close + len(THINK_CLOSE) :]
    text = _THINK_BLOCK.sub("", text)
    return text.replace(ANSWER_OPEN, "").replace(ANSWER_CLOSE, "").strip()
