"""The one DeepSpeed training loop and its two tasks (pretraining, classification fine-tuning)."""
