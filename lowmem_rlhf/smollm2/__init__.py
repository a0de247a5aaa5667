"""SmolLM2-135M-Instruct, a real pretrained instruct model available offline (`builtin:smollm2-135m`)."""
