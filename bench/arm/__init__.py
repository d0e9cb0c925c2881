"""arm64 parity under emulation: ``bench/arm/run`` (host side) and :mod:`bench.arm.parity` (both sides)."""
