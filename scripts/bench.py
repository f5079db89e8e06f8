"""Benchmark: seconds per labelled pair of Algorithm 1, the alternating baseline and TRL's Online DPO,
each in float32 and in bf16 and compared at its best, against the floor of plain generation and a
plain LoRA step (see rlhf_bilevel/commands/bench.py). Writes bench.json and bench.md (the same tables).

    .venv/bin/python scripts/bench.py --threads 1 --out bench.json   # SmolLM2-135M-Instruct, 32 new tokens, both dtypes: ~12 min on 2 idle cores
    .venv/bin/python scripts/bench.py --quick                        # the tiny model, about a minute
    .venv/bin/python scripts/bench.py --dtypes bfloat16 --only bilevel online_dpo   # a subset
    .venv/bin/python scripts/bench.py --only floors --set train.device=cuda         # the floors alone, on a GPU

The headline (`bilevel_to_online_dpo`) is our seconds per labelled pair at our fastest dtype over
TRL's at TRL's fastest, from the same run; the settings table shows what each method ran with.
"""

from rlhf_bilevel.allocator import huge_pages

huge_pages()  # as the command runs, in every worker (they inherit it); before torch is imported

from rlhf_bilevel.commands.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
