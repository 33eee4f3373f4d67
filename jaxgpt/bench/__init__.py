"""Benchmarks: one module per workload (attention, forward, train, decode), sharing `timing`.

Each workload module defines `run(args) -> list[dict]`; `jaxgpt bench` prints the rows as a table
and can write them as JSON.
"""
