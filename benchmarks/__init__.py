"""Benchmarks of fedasls (run as scripts: python benchmarks/NAME.py --help)."""
