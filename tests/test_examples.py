"""The example scripts end to end on their tiny offline configs with few steps: the table, results.json, and the
instruction-file path of the LLM script (with a tokenizer and model saved locally, as a hub download would be)."""

import importlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from stella_diffusion.integrations.presets import LLM_TARGET_MODULES
from stella_diffusion.training.config import TrainingError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture
def examples(monkeypatch):
    """Import an example script as a module (they import their shared helpers as ``_common``)."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread costs more than it gains on shared cores
    yield importlib.import_module
    torch.set_num_threads(threads)


def _check_summary(summary: dict, output_dir: Path, printed: str) -> None:
    assert json.loads((output_dir / "results.json").read_text()) == json.loads(json.dumps(summary))
    results = {r["method"]: r for r in summary["results"]}
    assert set(results) == {"stella", "lora"}
    for r in results.values():
        assert r["final_train_loss"] < r["first_train_loss"]
        assert 0.0 <= r["eval_accuracy"] <= 1.0 and r["step_time_s"] > 0
    assert results["stella"]["orthonormality_error"] <= 1e-5
    assert summary["step_time_ratio_stella_over_lora"] == pytest.approx(
        results["stella"]["step_time_s"] / results["lora"]["step_time_s"]
    )
    assert summary["table"] in printed
    assert "| stella |" in printed and "| lora |" in printed and "Step-time ratio StelLA / LoRA" in printed


def test_llm_example_on_the_tiny_config(examples, tmp_path, capsys):
    script = examples("train_llm_stella")
    summary = script.main([
        "--config", str(CONFIGS / "llm-tiny-cpu.yaml"), "--output_dir", str(tmp_path), "--max_steps", "30",
        "--logging_steps", "5", "--num_train_examples", "960", "--num_eval_examples", "64",
    ])  # fmt: skip
    _check_summary(summary, tmp_path, capsys.readouterr().out)
    assert summary["config"]["target_modules"] == LLM_TARGET_MODULES["llama"]


def test_vit_example_on_the_tiny_config(examples, tmp_path, capsys):
    script = examples("train_vit_stella")
    summary = script.main([
        "--config", str(CONFIGS / "vit-tiny-cpu.yaml"), "--output_dir", str(tmp_path), "--max_steps", "20",
        "--logging_steps", "5", "--num_train_images", "640", "--num_eval_images", "64",
    ])  # fmt: skip
    _check_summary(summary, tmp_path, capsys.readouterr().out)
    assert summary["config"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


RECORDS = [
    {"instruction": "which is larger ? answer1 : sun answer2 : moon", "input": "", "output": "answer1"},
    {"instruction": "which is colder ? answer1 : ice answer2 : fire", "input": "", "output": "answer1"},
    {"instruction": "pick the animal", "input": "answer1 : stone answer2 : cat", "output": "answer2"},
] * 8


def _save_tiny_llama_with_tokenizer(path: Path, texts: list[str]) -> None:
    """A word-level tokenizer over ``texts`` and a 1-layer Llama of its vocabulary, saved like a hub model."""
    pre_tokenizer = pre_tokenizers.Whitespace()
    words = sorted({word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(text)})
    vocab = {token: i for i, token in enumerate(["<unk>", "<pad>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizer
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="</s>")  # fmt: skip
    tokenizer.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=1, eos_token_id=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)


def test_llm_example_on_an_instruction_file(examples, tmp_path):
    script = examples("train_llm_stella")
    texts = [script.PROMPT, script.PROMPT_WITH_INPUT] + [v for r in RECORDS for v in r.values()]
    _save_tiny_llama_with_tokenizer(tmp_path / "model", texts)
    (tmp_path / "train.json").write_text(json.dumps(RECORDS))

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "model")
    example = script.instruction_task(str(tmp_path / "train.json"), tokenizer, max_length=256)[2]
    scored = [t for t in example["labels"] if t != script.IGNORE_INDEX]
    assert scored == tokenizer("answer2", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example["input_ids"][-len(scored) :] == scored  # the prompt (with its Input section) is not scored

    summary = script.main([
        "--model_name_or_path", str(tmp_path / "model"), "--train_file", str(tmp_path / "train.json"),
        "--val_set_size", "6", "--max_steps", "4", "--logging_steps", "2", "--per_device_train_batch_size", "6",
        "--learning_rate", "1e-2", "--use_cpu", "--output_dir", str(tmp_path / "out"),
    ])  # fmt: skip
    assert [r["method"] for r in summary["results"]] == ["stella", "lora"]
    assert summary["results"][0]["orthonormality_error"] <= 1e-5


def test_the_paper_config_parses_to_the_papers_setting(examples):
    script = examples("train_llm_stella")
    args = script.parse_args(script.build_parser(), ["--config", str(CONFIGS / "llm-commonsense-llama3-8b.yaml")])
    assert args.model_name_or_path == "meta-llama/Meta-Llama-3-8B"
    assert args.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert (args.rank, args.alpha, args.learning_rate, args.num_train_epochs) == (32, 64, 5e-4, 3)
    assert (args.per_device_train_batch_size * args.gradient_accumulation_steps, args.lr_scheduler_type) == (
        16,
        "linear",
    )
    assert args.diag_s and args.retraction == "polar"


def test_config_keys_must_be_arguments(examples, tmp_path):
    script = examples("train_llm_stella")
    config = yaml.safe_load((CONFIGS / "llm-tiny-cpu.yaml").read_text())
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**config, "learning_rat": 1e-3}))
    with pytest.raises(TrainingError, match="unknown key 'learning_rat'"):
        script.parse_args(script.build_parser(), ["--config", str(tmp_path / "typo.yaml")])
