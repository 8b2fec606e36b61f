"""StelLA in other libraries: diffusers pipelines (targets, exports, native checkpoints), transformers' Trainer,
target presets for language and vision models."""
