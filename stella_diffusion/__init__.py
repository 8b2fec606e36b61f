"""StelLA adapters for diffusers, peft and transformers."""
