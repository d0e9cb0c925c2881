"""Benchmark harnesses (latency per stage, index size) for edge-shitu; needs the ``bench`` extra.

The runtime package ``edge_shitu`` never imports this package.
"""
