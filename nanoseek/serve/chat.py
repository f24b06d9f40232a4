"""``nanoseek chat``: a terminal chat with a checkpoint, on the same batcher, template and text stream as the server.

Tokens are printed as they arrive; the thinking is shown dimmed (on a terminal) before the answer. The history is
rendered with the checkpoint's template (previous reasoning dropped) and its oldest turns are left out when the
conversation no longer fits the context. ``-p PROMPT`` answers once: the answer on stdout, the thinking and the
statistics on stderr, so scripts can capture the answer alone.
"""

from __future__ import annotations

import argparse
import queue
import sys

from nanoseek.serve.batcher import Batcher, Job, Sampling
from nanoseek.serve.protocol import Prices
from nanoseek.serve.reasoning import ReasoningSplitter
from nanoseek.serve.template import ChatFormat, PromptError
from nanoseek.train.load import load_model

SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "max_tokens": int, "seed": int}
HELP = """commands: /set NAME VALUE (temperature, top_p, top_k, max_tokens — 0 = the checkpoint's task budget or
the context left —, seed or /set seed none), /show, /clear (forget the conversation), /bye. End a line with \\ to
go on on the next line."""
DIM, RESET = "\033[2m", "\033[0m"


def check_setting(name: str, value: float | int | None) -> None:
    """Raise ValueError for a value ``generate`` would refuse, naming what is allowed."""
    if name == "temperature" and not 0 <= value <= 2:
        raise ValueError("temperature must be in [0, 2] (0 is greedy)")
    if name == "top_p" and not 0 < value <= 1:
        raise ValueError("top_p must be in (0, 1]")
    if name in ("top_k", "max_tokens") and value < 0:
        raise ValueError(f"{name} must be >= 0 (0 disables it)")
    if name == "seed" and value is not None and not 0 <= value < 2**63:
        raise ValueError("seed must be in [0, 2**63) (or none: a new one every answer)")


class Chat:
    """A conversation with one loaded model."""

    def __init__(self, loaded, settings: dict, meter=None, out=None, err=None):
        out, err = out or sys.stdout, err or sys.stderr
        self.loaded, self.settings, self.out, self.err = loaded, settings, out, err
        self.format = ChatFormat.from_config(loaded.config)
        self.seq_len = loaded.model.cfg.seq_len
        self.batcher = Batcher(loaded.model, loaded.tokenizer.decode, max_batch=1, max_queue=1, meter=meter,
                               log=lambda m: print(m, file=err)).start()  # fmt: skip
        self.history: list[dict] = []
        self.energy = meter.describe()["method"] if meter is not None else "none"
        self.color = out.isatty()

    def prompt_ids(self, message: str) -> list[int]:
        """The conversation plus ``message`` as token ids, oldest turns left out until an answer fits."""
        turns = self.history + [{"role": "user", "content": message}]
        while True:
            ids = self.loaded.tokenizer.encode(self.format.render(turns))
            if len(ids) < self.seq_len - 1 or len(turns) == 1:
                break
            turns = turns[2:]  # one user turn and its answer
        if len(ids) >= self.seq_len:
            raise PromptError(f"the message is {len(ids)} tokens; the context holds {self.seq_len}", "message")
        return ids

    def answer(self, message: str, script: bool = False) -> str:
        """Stream the answer to ``message``; returns its content (kept in the history)."""
        ids = self.prompt_ids(message)
        s = self.settings
        room = self.seq_len - len(ids)
        limit = min(s["max_tokens"] or self.format.max_new_tokens or room, room)
        sampling = Sampling(limit, s["temperature"], s["top_k"], s["top_p"], s["seed"], self.format.stop)
        events: queue.Queue = queue.Queue()
        job = Job(ids, sampling, lambda kind, value: events.put((kind, value)))
        self.batcher.submit([job])
        text = self.format.render(self.history + [{"role": "user", "content": message}])
        splitter = ReasoningSplitter(self.format.thinking_at_start(text)) if self.format.reasoning else None
        content, thinking_shown = [], False
        think_out = self.err if script else self.out
        try:
            while True:
                kind, value = events.get()
                if kind == "error":
                    raise RuntimeError(value)
                final = kind == "done"
                piece = value if kind == "text" else ""
                r, c = splitter.feed(piece) if splitter else ("", piece)
                if final and splitter:
                    r2, c2 = splitter.finish()
                    r, c = r + r2, c + c2
                if r:
                    if not thinking_shown:
                        think_out.write(self._dim("thinking: "))
                        thinking_shown = True
                    think_out.write(self._dim(r))
                    think_out.flush()
                if c:
                    if thinking_shown and not content:
                        think_out.write("\n")
                    content.append(c)
                    self.out.write(c)
                    self.out.flush()
                if final:
                    break
        except KeyboardInterrupt:
            job.cancel()
            self.out.write(" [stopped]")
        if script and thinking_shown and not content:  # the thinking's line ends before the statistics follow it
            think_out.write("\n")
        self.out.write("\n")
        st = job.stats
        tps = st.completion_tokens / st.decode_s if st.decode_s else 0.0
        usd = (st.prompt_tokens * Prices().input_per_million + st.completion_tokens * Prices().output_per_million) / 1e6
        stats = f"[{st.completion_tokens} tokens, {tps:.0f} tok/s, {st.joules:.3g} J {self.energy}, ${usd:.6f}]"
        print(self._dim(stats), file=self.err if script else self.out)
        answer = "".join(content)
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        return answer

    def command(self, line: str) -> bool:
        """Run a /command; False means leave the chat."""
        name, *args = line[1:].split() or [""]  # a bare "/" shows the help
        if name in ("bye", "exit", "quit"):
            return False
        if name == "clear":
            self.history = []
            print("(conversation cleared)", file=self.out)
        elif name == "show":
            cfg = self.loaded.model.cfg
            print(f"model: {self.loaded.folder} ({self.loaded.stage}, step {self.loaded.step}), "
                  f"{self.loaded.model.num_params():,} parameters, context {cfg.seq_len}, prompts: {self.format.name}",
                  file=self.out)  # fmt: skip
            print("settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()), file=self.out)
            print(f"history: {len(self.history) // 2} turns", file=self.out)
        elif name == "set" and len(args) == 2 and args[0] in SETTINGS:
            key, raw = args
            try:
                value = None if key == "seed" and raw == "none" else SETTINGS[key](raw)
                check_setting(key, value)
            except ValueError as err:
                print(f"error: {key}={raw!r}: {err}", file=self.out)
                return True
            self.settings[key] = value
            print(f"{key} = {value}", file=self.out)
        else:
            print(HELP, file=self.out)
        return True

    def _dim(self, text: str) -> str:
        return f"{DIM}{text}{RESET}" if self.color else text


def read_message(prompt: str = ">>> ") -> str:
    """One message; a line ending with a backslash continues on the next line."""
    lines = []
    while True:
        line = input(prompt if not lines else "... ")
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def run_chat(args: argparse.Namespace, meter=None) -> int:
    settings = {k: getattr(args, k) for k in SETTINGS}
    for key, value in settings.items():
        if value is not None:
            check_setting(key, value)
    chat = Chat(load_model(args.ckpt), settings, meter)
    try:
        if args.prompt is not None:
            chat.answer(args.prompt, script=True)
            return 0
        print(f"nanoseek chat: {chat.loaded.folder} ({chat.format.name} prompts). /help for commands, /bye to leave.")
        while True:
            try:
                message = read_message()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                continue
            if message.startswith("/"):
                if not chat.command(message):
                    return 0
            elif message.strip():
                try:
                    chat.answer(message)
                except PromptError as err:
                    print(f"error: {err}")
    finally:
        chat.batcher.stop()
