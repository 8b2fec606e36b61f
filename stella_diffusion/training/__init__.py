"""The library side of ``train_dreambooth_stella.py``: what the script needs beyond diffusers and accelerate.

``config`` (flags, YAML, input checks), ``records`` (what to train on: folders, captions, datasets, seeds),
``data`` (the seeded dataset, augmentation, batch order), ``buckets`` (aspect-ratio buckets), ``caching`` (latents
and prompt embeddings), ``families`` (one class per pipeline family: prompt encoding, latents, loss), ``adapters``
(one class per adapter kind), ``optimizers`` and ``ema``, ``model_setup`` (target checks, precision, xformers),
``checkpoints`` (atomic saves, resume, divergence guards, history) and ``outputs`` (grids, plot, model card).
"""
