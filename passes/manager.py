"""Runs passes in order and records, for each, what it matched and what it did to the graph."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

from passes.pattern import rewrite
from passes.program import Program


class Pass(Protocol):
    name: str
    version: int

    def run(self, program: Program) -> int: ...

    def expected(self, program: Program) -> int | None: ...


@dataclass
class PassResult:
    name: str
    matched: int
    nodes_before: int
    nodes_after: int
    ms: float
    expected: int | None = None

    @property
    def missed(self) -> bool:
        """The pass should have matched (the model has the structure) and matched less."""
        return self.expected is not None and self.matched < self.expected


class PassManager:
    def __init__(self, passes: list):
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate pass names in {names}")
        self.passes = list(passes)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def fingerprint(self) -> str:
        """Names and versions of the passes: part of the compile-cache key."""
        return ",".join(f"{p.name}@{p.version}" for p in self.passes)

    def run(self, program: Program, after_pass: Callable[[str, Program], None] | None = None) -> list[PassResult]:
        results = []
        for p in self.passes:
            before = program.node_count()
            start = time.perf_counter()
            matched = p.run(program)
            program.gm.recompile()
            ms = (time.perf_counter() - start) * 1e3
            results.append(PassResult(p.name, matched, before, program.node_count(), ms, p.expected(program)))
            if after_pass is not None:
                after_pass(p.name, program)
        return results


@dataclass
class PatternPass:
    """A pass made of declared patterns (see passes.pattern); `expect` says how many should match."""

    name: str
    patterns: list
    version: int = 1
    expect: Callable[[Program], int | None] | None = None

    def run(self, program: Program) -> int:
        return sum(rewrite(program, pattern) for pattern in self.patterns)

    def expected(self, program: Program) -> int | None:
        return self.expect(program) if self.expect else None


@dataclass
class FunctionPass:
    """A pass that is a function of the program, returning how much it changed; `expect` (optional) says how
    much it should have changed, for rewrites whose match a pattern cannot express (a node whose two
    inputs come from independent chains, an add that escapes as the next residual)."""

    name: str
    fn: Callable[[Program], int]
    version: int = 1
    expect: Callable[[Program], int | None] | None = None

    def run(self, program: Program) -> int:
        return self.fn(program)

    def expected(self, program: Program) -> int | None:
        return self.expect(program) if self.expect else None
