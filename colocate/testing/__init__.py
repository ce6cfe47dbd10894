"""For tests, examples and benchmarks: deterministic tiny models of real HF architectures, a
locally trained tokenizer, and the toy task."""
