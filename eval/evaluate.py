"""Generate with each run (base, LoRA exports, StelLA checkpoints), score FID / KID, CLIP-T, CMMD, CLIP-I, DINO and
drift, and write one report side by side. See ``python eval/evaluate.py --help``; the code is
:mod:`stella_diffusion.evaluation.cli` (the ``stella-eval`` command)."""

from stella_diffusion.evaluation.cli import main

if __name__ == "__main__":
    main()
