"""StelLA on real transformers architectures built from tiny configs (random weights, offline).

Llama (nn.Linear), GPT-2 (transformers' Conv1D, weight stored as in x out) and ViT learn a synthetic task through
`create_stella_optimizer` and keep U, V orthonormal; the Trainer integration does the same on Llama. The target
presets of `stella_diffusion.integrations.presets` choose the adapted layers throughout.
"""

import numpy as np
import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.pytorch_utils import Conv1D

from stella_diffusion import (
    StellaConfig,
    StellaLayer,
    create_stella_optimizer,
    orthonormality_error,
    stiefel_parameters,
)
from stella_diffusion.integrations.presets import LLM_TARGET_MODULES, target_modules_for
from stella_diffusion.integrations.transformers import StellaTrainer
from stella_diffusion.shapes import domain

VOCAB, LENGTH = 32, 10
# initializer_range 0.1: with the default 0.02 a frozen random lm_head caps the logits near 1 and the loss plateaus
_DECODER = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 64, "initializer_range": 0.1,
}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    """Ops this small gain nothing from a second thread and lose a lot when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_llama() -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(**_DECODER))


def _tiny_gpt2() -> nn.Module:
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB, initializer_range=0.1,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config)


def _tiny_vit(num_labels: int) -> nn.Module:
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_labels=num_labels, initializer_range=0.1)  # fmt: skip
    return ViTForImageClassification(config)


def _with_stella(model: nn.Module) -> nn.Module:
    return get_peft_model(model, StellaConfig(r=8, alpha=16, target_modules=target_modules_for(model)))


def _repeat_batch(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random sequences followed by themselves; only the repeat is scored (learnable by an induction head)."""
    x = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    ids = torch.cat([x, x], dim=1)
    labels = ids.clone()
    labels[:, :LENGTH] = -100
    return {"input_ids": ids, "labels": labels}


def _max_orthonormality_error(model: nn.Module) -> float:
    factors = [p.detach() if p.shape[0] >= p.shape[1] else p.detach().T for p in stiefel_parameters(model)]
    return max(float(orthonormality_error(f)) for f in factors)


def _train(model: nn.Module, batches, steps: int, lr: float) -> tuple[list[float], torch.optim.Optimizer]:
    optimizer = create_stella_optimizer(model, torch.optim.AdamW, lr=lr, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        loss = model(**next(batches)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, optimizer


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize("build", [_tiny_llama, _tiny_gpt2], ids=["llama", "gpt2"])
def test_causal_lm_learns_to_repeat_and_stays_orthonormal(build):
    model = _with_stella(build())
    g = torch.Generator().manual_seed(1)
    losses, optimizer = _train(model, iter(lambda: _repeat_batch(32, g), None), steps=80, lr=1e-2)
    assert _mean(losses[-5:]) < 0.5 * _mean(losses[:5])
    assert _max_orthonormality_error(model) <= 1e-5
    assert optimizer.stella.orthonormality_error() <= 1e-5


def test_gpt2_adapters_sit_on_conv1d():
    model = _with_stella(_tiny_gpt2())
    adapted = {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, StellaLayer)}
    assert set(adapted) == {"c_attn", "c_proj", "c_fc"}
    c_attn = adapted["c_attn"]
    assert isinstance(c_attn.get_base_layer(), Conv1D)
    assert c_attn.stella_U["default"].shape == (3 * 64, 8) and c_attn.stella_Vt["default"].shape == (8, 64)


def _colour_batches(n_images: int, batch_size: int):
    """The procedural shapes domain, labelled by the shape's colour (4 classes), in an endless shuffled stream."""
    specs = domain.sample_specs(n_images, seed=0)
    pixels = torch.stack([torch.from_numpy(np.asarray(domain.render(s), dtype=np.float32)) for s in specs])
    pixels = pixels.permute(0, 3, 1, 2) / 127.5 - 1.0
    labels = torch.tensor([s.labels()["colour"] for s in specs])
    g = torch.Generator().manual_seed(0)
    while True:
        idx = torch.randint(0, n_images, (batch_size,), generator=g)
        yield {"pixel_values": pixels[idx], "labels": labels[idx]}


def test_vit_learns_procedural_classes_and_stays_orthonormal():
    # the classifier head stays frozen (random): only the adapters can lower the loss
    model = _with_stella(_tiny_vit(num_labels=len(domain.COLOURS)))
    losses, optimizer = _train(model, _colour_batches(256, 32), steps=40, lr=1e-2)
    assert _mean(losses[-5:]) < 0.5 * _mean(losses[:5])
    assert _max_orthonormality_error(model) <= 1e-5
    assert optimizer.stella.orthonormality_error() <= 1e-5


def test_stella_trainer_on_llama(tmp_path):
    g = torch.Generator().manual_seed(1)
    dataset = [{k: v[0] for k, v in _repeat_batch(1, g).items()} for _ in range(512)]
    model = _with_stella(_tiny_llama())
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=60, per_device_train_batch_size=32, learning_rate=1e-2,
        lr_scheduler_type="constant", weight_decay=0.01, logging_steps=5, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = StellaTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < 0.5 * losses[0]
    optimizer = trainer.optimizer
    while getattr(optimizer, "stella", None) is None:  # accelerate wraps the Riemannian optimizer
        optimizer = optimizer.optimizer
    assert optimizer.stella.orthonormality_error() <= 1e-5
    assert _max_orthonormality_error(model) <= 1e-5
    constrained = {id(p) for p in stiefel_parameters(model)}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        if ids & constrained:
            assert ids <= constrained and group["weight_decay"] == 0.0
        else:
            assert group["weight_decay"] == 0.01
    assert sum(len(g["params"]) for g in optimizer.param_groups if g["weight_decay"] == 0.0) == len(constrained)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (lambda: _tiny_llama(), LLM_TARGET_MODULES["llama"]),
        (lambda: MistralForCausalLM(MistralConfig(**_DECODER)), LLM_TARGET_MODULES["mistral"]),
        (lambda: Qwen2ForCausalLM(Qwen2Config(**_DECODER)), LLM_TARGET_MODULES["qwen2"]),
        (lambda: _tiny_gpt2(), ["c_attn", "c_proj", "c_fc"]),
        # transformers 5 names; on transformers 4 the same preset yields query/key/value/dense
        (lambda: _tiny_vit(2), ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]),
    ],
    ids=["llama", "mistral", "qwen2", "gpt2", "vit"],
)
def test_target_presets(model, expected):
    model = model()
    targets = target_modules_for(model)
    assert sorted(targets) == sorted(expected)
    adapted = get_peft_model(model, StellaConfig(r=4, target_modules=targets))
    assert {n.rsplit(".", 1)[-1] for n, m in adapted.named_modules() if isinstance(m, StellaLayer)} == set(expected)


def test_target_presets_refuse_unknown_model_types():
    with pytest.raises(ValueError, match="No StelLA target preset"):
        target_modules_for(nn.Linear(2, 2))
