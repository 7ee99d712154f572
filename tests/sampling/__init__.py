"""Tests of distillery.sampling: the sampler, the pipeline and its two modes."""
