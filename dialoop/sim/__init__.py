"""Simulated trainers for the labeling guide, so the whole loop runs without people.

`prompts` (seeded prompts with their checks), `gold` (the gold scorer), `repair` (rule-based fixes of a
suggestion), `ranking` (gold order plus calibrated noise), `trainers` (trainer accounts acting through
`dialoop.collect`). Only the demo, evaluation and benchmarks import this package.
"""
