"""Benchmark scripts (``python benchmarks/<name>.py``); a package so that server_bench's
baseline servers run as ``python -m benchmarks.bench_servers --serve-plain``."""
