"""The base model (builtin, hub), loading (dtype, device, 4-bit, LoRA), merge, the hub card."""
