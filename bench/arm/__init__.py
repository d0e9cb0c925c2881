"""arm64 parity under emulation: ``bench/arm/run`` (host side) and :mod:`edge_shitu_bench.arm.parity` (both sides)."""
