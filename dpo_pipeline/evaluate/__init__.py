"""lm-eval scoring, sample generations, statistics, the report."""
