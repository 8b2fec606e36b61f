#!/usr/bin/env python
"""Fine-tune a causal language model with StelLA and with peft's LoRA through the transformers Trainer, side by side.

Two data sources:

* the synthetic copy task (default, offline): sequences ``BOS x SEP x`` of random tokens; only the repeat is
  scored, so the adapters must learn to look back ``len(x) + 1`` positions (an induction head);
* ``--train_file``: instruction data as a JSON list of ``{"instruction", "input", "output"}`` records, e.g.
  LLM-Adapters' ``commonsense_170k.json`` (the paper's setting, ``configs/llm-commonsense-llama3-8b.yaml``),
  prompted with the Alpaca template; only the response is scored.

The base model is ``--model_name_or_path`` or, offline, one built with random weights from ``--model_config``.
Each method gets a fresh copy of the same base; the script prints a markdown table (loss, token accuracy of the
scored tokens, step time) and writes ``<output_dir>/results.json``.

    python examples/train_llm_stella.py --config configs/llm-tiny-cpu.yaml
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import add_comparison_args, build_config, parse_args, preset_target_modules, report, run_method
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    EvalPrediction,
    PreTrainedTokenizerBase,
    default_data_collator,
)

IGNORE_INDEX = -100
BOS, SEP = 0, 1  # reserved ids of the copy task; the copied tokens are drawn from the rest of the vocabulary

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response:\n"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_comparison_args(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--train_file", default=None, help="Instruction JSON; default: the synthetic copy task.")
    data.add_argument("--val_set_size", type=int, default=120, help="Records of --train_file held out for eval.")
    data.add_argument("--max_length", type=int, default=256, help="Instruction examples are cut to this many tokens.")
    data.add_argument("--copy_length", type=int, default=12, help="Length of the copied token sequence.")
    data.add_argument("--num_train_examples", type=int, default=2048)
    data.add_argument("--num_eval_examples", type=int, default=256)
    return parser


def copy_task(n: int, length: int, vocab_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` sequences ``BOS x SEP x`` with ``x`` uniform over the non-reserved ids; the prefix is not scored."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(SEP + 1, vocab_size, (n, length), generator=g)
    ids = torch.cat([torch.full((n, 1), BOS), x, torch.full((n, 1), SEP), x], dim=1)
    labels = ids.clone()
    labels[:, : length + 2] = IGNORE_INDEX
    return [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels, strict=True)]


def instruction_task(path: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[dict[str, list[int]]]:
    """Alpaca-prompted records with the prompt masked out; records whose response is cut off entirely are dropped."""
    examples = []
    for record in json.loads(Path(path).read_text()):
        template = PROMPT_WITH_INPUT if record.get("input") else PROMPT
        prompt = tokenizer(template.format(**record))["input_ids"]
        response = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt) >= max_length:
            continue
        ids = (prompt + response)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return examples


def datasets_and_collator(args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    """Train / eval sets and the collator, for the Trainer."""
    if args.train_file is None:
        train = copy_task(args.num_train_examples, args.copy_length, vocab_size, args.seed)
        evaluation = copy_task(args.num_eval_examples, args.copy_length, vocab_size, args.seed + 1)
        return {"train_dataset": train, "eval_dataset": evaluation, "data_collator": default_data_collator}
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama 3 has none; padded positions are masked anyway
    examples = instruction_task(args.train_file, tokenizer, args.max_length)
    random.Random(args.seed).shuffle(examples)
    return {
        "train_dataset": examples[args.val_set_size :],
        "eval_dataset": examples[: args.val_set_size],
        "data_collator": DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX),
    }


def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # keep the argmax only: the full logits of an eval set do not fit in memory for a real vocabulary
    return logits.argmax(dim=-1)


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Next-token accuracy over the scored tokens (prediction at position t is for the label at t + 1)."""
    predictions, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
    scored = labels != IGNORE_INDEX
    return {"accuracy": float(np.mean(predictions[scored] == labels[scored]))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.train_file is not None and args.model_name_or_path is None:
        parser.error("--train_file needs --model_name_or_path (its tokenizer)")
    config = build_config(args)
    args.target_modules = args.target_modules or preset_target_modules(AutoModelForCausalLM, config)
    data = datasets_and_collator(args, config.vocab_size)
    results = [
        run_method(
            method, args, AutoModelForCausalLM, config, peft_kwargs={"task_type": "CAUSAL_LM"},
            compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess_logits_for_metrics, **data,
        )
        for method in args.methods
    ]  # fmt: skip
    return report(results, args, accuracy_name="token accuracy")


if __name__ == "__main__":
    main()
