"""Helpers the tests share: planted models, the golden run, the kill harness, a reference
sampler, the tiny run."""
