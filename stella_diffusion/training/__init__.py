"""The library side of ``train_dreambooth_stella.py``: what the script needs beyond diffusers and accelerate.

``config`` (flags, YAML, input checks), ``data`` (folders, captions, the seeded dataset), ``families`` (one class
per pipeline family: prompt encoding, latents, loss), ``adapters`` (one class per adapter kind),
``model_setup`` (precision, xformers), ``checkpoints`` (resume, rotation, history) and ``outputs`` (grids, plot,
model card).
"""
