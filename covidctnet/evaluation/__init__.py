"""Judging predictions: statistics (Wilson, DeLong, McNemar, kappa), inputs, metrics, evaluate, reader study and its
raters, slice-level validation of the evidence, Markdown/HTML reports and plots."""
