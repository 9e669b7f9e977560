"""gem-bench: GEM sparse fine-tuning (gradient-to-weight ratio + entropy-guided masking) and the
experiment runner that reproduces the paper's benchmarks.

Library use: ``gem_bench.masking`` (scores, budgets, masks) and ``gem_bench.sparse`` (the sparse
trainable delta: attach, train, save, load, merge) work on any Hugging Face model.
"""

__version__ = "0.1.0"
