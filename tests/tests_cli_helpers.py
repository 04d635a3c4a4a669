"""A pass that expects a match and never matches: what a missed pass looks like in lower-model."""

from passes.manager import PatternPass

NEVER = PatternPass("never", [], expect=lambda program: 1)
