"""The offline tokenizers and tiny pipelines that other tests build on."""

from __future__ import annotations

from transformers import CLIPTokenizer

from stella_diffusion.tiny_pipelines import build_clip_tokenizer

WORDS = ["circle", "star", "stars", "tar", "outlined", "red-square"]


def test_clip_tokenizer_round_trips_text_character_by_character() -> None:
    tokenizer = build_clip_tokenizer()
    text = "a photo of 3 red circles, outlined!"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.pad_token == "<|endoftext|>"
    # CLIP's decoder puts a space after every end of word, punctuation included.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of 3 red circles , outlined !"
    assert tokenizer.convert_ids_to_tokens(tokenizer("circle", add_special_tokens=False).input_ids) == [
        "c", "i", "r", "c", "l", "e</w>",
    ]  # fmt: skip


def test_clip_tokenizer_words_become_single_tokens(tmp_path) -> None:
    tokenizer = build_clip_tokenizer(tmp_path, words=WORDS, model_max_length=16)
    for word in ["circle", "star", "stars", "tar", "outlined", "red", "square"]:
        assert tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False).input_ids) == [
            word + "</w>"
        ]
    text = "a red star on a large circle"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    batch = tokenizer([text], padding="max_length", max_length=16, truncation=True).input_ids
    assert len(batch[0]) == 16 and batch[0][-1] == tokenizer.pad_token_id

    # The files written by hand give the same tokenizer as the saved tokenizer files.
    for reloaded in [CLIPTokenizer.from_pretrained(tmp_path), _from_vocab_and_merges(tmp_path)]:
        assert reloaded(text).input_ids == ids
    assert build_clip_tokenizer(words=WORDS).get_vocab() == tokenizer.get_vocab()


def _from_vocab_and_merges(path) -> CLIPTokenizer:
    return CLIPTokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"))
