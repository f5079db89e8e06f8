"""What each command runs: one module per command (train, eval, compare, theory, and the benchmark
behind scripts/bench.py), each building its parts from the user's input and running them.

The top of the import graph: cli → commands → the library (bilevel → estimators, critic → types).
No library module imports a command. The commands, not the library, set what is global to the
process: the allocator (`huge_pages`, before torch is imported), the libraries' logging (`quiet`),
and, for a run, its threads, dtype and seeds. This package imports no torch, so that `--help` is quick.
"""

from __future__ import annotations

import warnings

from rlhf_bilevel.allocator import huge_pages

__all__ = ["huge_pages", "quiet"]


def quiet() -> None:
    """The libraries' deprecation notices and loading messages are for us, not for the user of the command."""
    from rlhf_bilevel.environment import quiet_libraries

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    quiet_libraries()
