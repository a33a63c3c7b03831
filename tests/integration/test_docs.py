"""Every busctl example in README.md (the D-Bus section) runs verbatim, in order, and prints what the docs show."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from . import harness as h
from .conftest import MakeDaemon

pytestmark = pytest.mark.root

DOC = h.REPO / "README.md"


@dataclass(frozen=True)
class Example:
    command: str
    output: list[str]


def busctl_examples() -> list[Example]:
    """`$ busctl ...` lines of the console blocks, each with the lines it shows as its output."""
    examples: list[Example] = []
    for block in re.findall(r"```console\n(.*?)```", DOC.read_text(), re.S):
        current: Example | None = None
        for line in block.splitlines():
            if line.startswith("$ "):
                current = Example(line[2:], []) if line.startswith("$ busctl ") else None
                if current:
                    examples.append(current)
            elif current is not None:
                current.output.append(line)
    return examples


def test_docs_have_busctl_examples() -> None:
    examples = busctl_examples()
    assert len(examples) >= 10
    contract = "busctl call io.github.Tproxyd /io/github/Tproxyd io.github.Tproxyd.Manager1 EnableLink ss wlan0 host"
    assert examples[0].command == contract  # the contract says it "must just work" (docs/architecture.md)


def test_busctl_examples_run_verbatim(make_daemon: MakeDaemon, bus: h.PrivateBus) -> None:
    make_daemon(links={})
    for example in busctl_examples():
        proc = h.as_user(h.ROOT, ["bash", "-c", example.command], {**bus.env(), "COLUMNS": "80"})
        printed = (proc.stdout + proc.stderr).rstrip("\n").splitlines()
        assert printed == example.output, f"{example.command}\nprinted:\n" + "\n".join(printed)
        if not any(line.startswith("Call failed") for line in example.output):
            assert proc.returncode == 0, example.command
