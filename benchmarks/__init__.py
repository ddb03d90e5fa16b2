"""Benchmarks for keras-vfbn: step cost, memory, and framework baselines.

Nothing here is part of the library. PyTorch, used only for baselines, is
an optional extra (`pip install -e ".[bench]"`) and is imported lazily.
"""
