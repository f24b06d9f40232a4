"""The OpenMP wait nanoseek chooses (nanoseek/openmp.py): a short spin unless the user chose otherwise."""

import os
import subprocess
import sys

import pytest

from nanoseek.openmp import choose_openmp

WAIT = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NANOSEEK_OPENMP")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, (None, "10000")),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, ("ACTIVE", None)),  # the user's wait policy wins
        ({"OMP_WAIT_POLICY": "PASSIVE"}, ("PASSIVE", None)),  # a spin count would override PASSIVE: none is set
        ({"GOMP_SPINCOUNT": "500"}, (None, "500")),  # the user's spin count wins
        ({"NANOSEEK_OPENMP": "keep"}, (None, None)),  # the environment left exactly as it is
    ],
)
def test_wait_policy(monkeypatch, given, expected):
    for name in WAIT:
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    choose_openmp()
    assert (os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")) == expected


def test_set_before_torch_loads():
    """Importing nanoseek sets the spin count before torch (and with it OpenMP) is imported: a finder records the
    environment at the moment torch's import starts."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT}
    code = (
        "import os, sys\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' and not hasattr(sys, 'seen'):\n"
        "            sys.seen = os.environ.get('GOMP_SPINCOUNT')\n"
        "sys.meta_path.insert(0, Spy())\n"
        "import nanoseek\n"
        "print(sys.seen)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "10000"
