"""Trace-driven simulation of disaggregated serving (`hack bench jct mode=sim`)."""
