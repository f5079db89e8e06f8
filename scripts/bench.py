"""Benchmark: seconds per labelled pair of Algorithm 1, the alternating baseline and TRL's Online DPO,
against the floor of plain generation and a plain LoRA step (see rlhf_bilevel/bench.py).

    .venv/bin/python scripts/bench.py            # SmolLM2-135M-Instruct, 32 new tokens: a few minutes on 2 cores
    .venv/bin/python scripts/bench.py --quick    # the tiny model, under a minute
"""

from rlhf_bilevel.allocator import huge_pages

huge_pages()  # as the command runs, in every worker (they inherit it); before torch is imported

from rlhf_bilevel.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
