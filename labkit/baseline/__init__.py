"""Lesson 00, the baselines: what an unoptimized model costs (its experiment) and timing done right (its exercise).
The measurement itself is the shared core's (:mod:`labkit.measure`)."""
