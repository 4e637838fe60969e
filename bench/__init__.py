"""The benchmark suite: each figure of the service next to the ceiling of its building block.

``python -m bench`` (``make bench``) runs every figure and writes ``docs/benchmarks.md``;
``python -m bench --smoke`` (``make bench-smoke``) runs them all with tiny sizes.
"""
