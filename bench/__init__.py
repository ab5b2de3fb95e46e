"""Benchmark suite: our server side by side with its peers (issue 7).

``python -m bench`` starts each server in its own process (pinned to one
core), drives it from a load generator in another process (pinned to the
other core) over real sockets on 127.0.0.1, and prints a markdown table;
the raw figures go to ``bench/results/``. See ``docs/BENCHMARKS.md``.
"""
