"""The CPU corner: what running vLLM and DeepSpeed without a GPU needs (AMX tile permission,
page release as sleep, DeepSpeed's CPU op builds), kept off the product path."""
