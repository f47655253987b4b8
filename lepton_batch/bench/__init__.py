"""Throughput comparisons against the usual ways; imported only by the ``bench`` command."""
