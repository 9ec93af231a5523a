"""Commands that are not DVC stages (lock check, doctor)."""
