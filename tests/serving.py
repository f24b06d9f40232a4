"""Helpers of the serving tests: tiny checkpoints made in seconds and a server on 127.0.0.1 in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nanoseek.config import load_run_config
from nanoseek.data.tokenizer import ByteTokenizer
from nanoseek.model import Transformer
from nanoseek.train.checkpoint import save_checkpoint
from nanoseek.train.load import load_model

REASONING, ANSWER = "x é y", "7"
COMPLETION = f"{REASONING}</think>\n<answer>{ANSWER}</answer>"  # what the memorised model answers to "Q"


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Imported by every serving test module: tiny models run fastest on one thread, and on two threads of a busy
    machine ten times slower (docs/LOG.md); the previous setting is restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(task: bool, seq_len: int = 128, d_model: int = 64):
    overrides = [f"model.d_model={d_model}", "model.n_layers=2", "model.n_heads=2", f"model.seq_len={seq_len}"]
    return load_run_config([], overrides + (["task.name='arithmetic'"] if task else []))


def random_checkpoint(folder, task: bool = True, seq_len: int = 128):
    """A checkpoint of random weights (sft stage with a [task] section, or a plain pretrained one)."""
    cfg = tiny_config(task, seq_len)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    save_checkpoint(folder, 1, model.state_dict(), cfg.to_dict(), ByteTokenizer(), {"step": 1, "stage": "sft"})
    return folder


def memorised_checkpoint(folder):
    """A byte model with the compact template that answers "Q" with COMPLETION under greedy decoding: about 300
    full-batch steps on that one sequence (a few seconds)."""
    cfg = tiny_config(task=True)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    ids = torch.tensor([list(("Q\n<think>" + COMPLETION).encode())])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):
        _, loss = model(ids[:, :-1], targets=ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.002:
            break
    save_checkpoint(folder, 1, model.state_dict(), cfg.to_dict(), ByteTokenizer(), {"step": 1, "stage": "sft"})
    return folder


def shared_memorised(tmp_path_factory):
    """memorised_checkpoint made once per test session (the API, page and chat tests share it)."""
    folder = tmp_path_factory.getbasetemp() / "memorised"
    return folder if folder.is_dir() else memorised_checkpoint(folder)


class SlowModel(nn.Module):
    """A model that waits ``delay`` seconds before every forward pass, so a test can act while it generates."""

    def __init__(self, inner: Transformer, delay: float):
        super().__init__()
        self.inner, self.delay, self.cfg = inner, delay, inner.cfg

    def forward(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner(*args, **kwargs)

    def num_params(self, active: bool = False) -> int:
        return self.inner.num_params(active)


def load_slowly(folder, delay: float):
    loaded = load_model(folder)
    loaded.model = SlowModel(loaded.model, delay)
    return loaded


def slow_loader(folder, delay: float):
    """A picklable load() of a SlowModel (a generation process loads it again)."""
    return partial(load_slowly, folder, delay)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(load, healthy: bool = True, **options):
    """Serve ``load()`` on 127.0.0.1 in a thread until the block ends; yields url, app and the Server state.
    Waits for /health to answer 200 (``healthy``) or only for the port to listen."""
    import httpx
    import uvicorn

    from nanoseek.measure.energy import CpuTimeMeter
    from nanoseek.serve.app import ServeOptions, create_app

    options.setdefault("model_name", "tiny")
    app = create_app(load, ServeOptions(**options), meter=CpuTimeMeter(), log=lambda message: None)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health").status_code == 200 or (not healthy and server.started):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("the test server did not become healthy in 30 s")
            time.sleep(0.05)
        yield SimpleNamespace(url=url, app=app, state=app.state.server, port=port)
    finally:
        server.should_exit = True
        thread.join(15)
