"""The DPO pipeline's library: everything the stage scripts in stages/ call. No side effects on import."""
