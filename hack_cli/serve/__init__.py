"""Disaggregated prefill->decode serving for `hack bench jct`."""
