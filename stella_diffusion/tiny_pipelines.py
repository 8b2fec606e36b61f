"""Tiny, randomly initialised but complete diffusers pipelines, built fully offline.

Tests (and the embedded tiny base) need real pipelines that ``DiffusionPipeline.from_pretrained`` loads and
whose ``load_lora_weights`` works, without a model hub: the tokenizers are written from scratch here and
every model is built from a small config with a fixed seed.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

from tokenizers.models import BPE
from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_END_OF_WORD = "</w>"
# CLIP lower-cases its input, so upper-case letters are never looked up.
CLIP_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation


def _bpe_pieces(vocab: dict[str, int], merges: list[tuple[str, str]], piece: str) -> list[str]:
    """How CLIP's BPE model splits one pre-tokenised piece with the current vocabulary and merges."""
    model = BPE(
        vocab=vocab,
        merges=merges,
        continuing_subword_prefix="",
        end_of_word_suffix=_END_OF_WORD,
        unk_token=EOS_TOKEN,
    )
    return [token.value for token in model.tokenize(piece)]


def _add_word(vocab: dict[str, int], merges: list[tuple[str, str]], piece: str) -> None:
    """Append merges until ``piece`` is one token.

    New merges go last (lowest priority), so words made single tokens earlier keep their tokenisation;
    checking with the real BPE model makes words that share prefixes or suffixes safe.
    """
    pieces = _bpe_pieces(vocab, merges, piece)
    while len(pieces) > 1:
        merges.append((pieces[0], pieces[1]))
        vocab.setdefault(pieces[0] + pieces[1], len(vocab))
        pieces = _bpe_pieces(vocab, merges, piece)


def build_clip_tokenizer(
    save_dir: str | Path | None = None,
    words: Iterable[str] | None = None,
    model_max_length: int = 77,
) -> CLIPTokenizer:
    """A CLIP BPE tokenizer written from scratch (no hub download).

    Without merges every word is spelt character by character, so the vocabulary holds each character of
    :data:`CLIP_ALPHABET` alone and followed by ``</w>``. ``words`` (e.g. a domain's vocabulary) become
    single ``word</w>`` tokens through merges appended for them; a word the CLIP pre-tokenizer splits
    (``red-circle``, digits) becomes one token per letter run. The vocabulary and merges depend only on
    ``words`` and their order, so the same call always gives the same ids. When ``save_dir`` is given,
    ``vocab.json``, ``merges.txt`` and the tokenizer's own files are written there.
    """
    symbols = list(CLIP_ALPHABET) + [char + _END_OF_WORD for char in CLIP_ALPHABET]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    merges: list[tuple[str, str]] = []
    if words is not None:
        base = CLIPTokenizer(vocab={**vocab, BOS_TOKEN: len(vocab), EOS_TOKEN: len(vocab) + 1}, merges=[])
        backend = base.backend_tokenizer
        for word in words:
            for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(word)):
                if len(piece) > 1 and all(char in CLIP_ALPHABET for char in piece):
                    _add_word(vocab, merges, piece)
    # Like CLIP, the special tokens take the last ids.
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n")
        lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
        (save_dir / "merges.txt").write_text("\n".join(lines) + "\n")
        tokenizer.save_pretrained(save_dir)
    return tokenizer
