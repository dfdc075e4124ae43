"""Will it fit, and how fast is it: the memory/layout planner, measured step memory, and the
benchmarks behind ``tools/benchmark.py``."""
