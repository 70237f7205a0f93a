"""SmolVLM2 on MLX: load Hugging Face checkpoints, quantize, export and generate."""
