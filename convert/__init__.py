"""Hugging Face to MLX conversion (`mlx-diffusiongemma convert`)."""
