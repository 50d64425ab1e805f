"""Integrations of FSAM into other people's training loops (Hugging Face Trainer)."""
