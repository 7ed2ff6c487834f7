"""The benchmarks behind jobs/benchmark.py (DESIGN.md §2): each measures in one run and returns a JSON-able dict."""
