"""stella_diffusion.evaluation: prompt files, attribute accuracy, the base-vs-fine-tune report, script flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffusers import DiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from stella_diffusion.evaluation.comparison import (
    EvalPrompt,
    EvaluationError,
    build_fid_metric,
    cycle_prompts,
    evaluate_against_base,
    evaluation_setup,
    folder_accuracy,
    read_eval_prompts,
)
from stella_diffusion.evaluation.embedders import load_clip_embedder
from stella_diffusion.evaluation.generation import generate_images
from stella_diffusion.evaluation.report import markdown_table
from stella_diffusion.evaluation.semantic_metrics import SemanticScorer
from stella_diffusion.shapes.classifier import DomainFeatures, domain_feature_extractor
from stella_diffusion.shapes.domain import write_image_folder
from stella_diffusion.testing import build_tiny_pipeline, default_generation_kwargs

from ._train_fixtures import captioned_folder, tiny_args, train_script


def test_read_eval_prompts_from_text_and_jsonl(tmp_path) -> None:
    text = tmp_path / "prompts.txt"
    text.write_text("# comment\na red circle\n\na blue square\n")
    assert read_eval_prompts(text) == [EvalPrompt("a red circle"), EvalPrompt("a blue square")]
    folder = write_image_folder(tmp_path / "ref", 3, seed=0, split="style")
    prompts = read_eval_prompts(folder / "metadata.jsonl")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [p.text for p in prompts] == [row["text"] for row in rows]
    assert prompts[0].expected == {k: rows[0][k] for k in ("shape", "colour", "size", "position", "background",
                                                           "style")}


@pytest.mark.parametrize(("content", "message"), [
    ("not json\n", "not a JSON object"),
    ('["a list"]\n', "not a JSON object"),
    ('{"shape": "star"}\n', "has no 'text'"),
    ("\n", "No prompts"),
])
def test_read_eval_prompts_rejects_bad_files(tmp_path, content, message) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_eval_prompts(path)
    with pytest.raises(FileNotFoundError):
        read_eval_prompts(tmp_path / "missing.jsonl")


def test_cycle_prompts_repeats_the_list() -> None:
    prompts = [EvalPrompt("a"), EvalPrompt("b")]
    assert [p.text for p in cycle_prompts(prompts, 5)] == ["a", "b", "a", "b", "a"]
    with pytest.raises(ValueError):
        cycle_prompts([], 3)


def test_folder_accuracy_reads_the_prompted_attributes(tmp_path) -> None:
    folder = write_image_folder(tmp_path / "images", 40, seed=3, split="pretrain")
    prompts = read_eval_prompts(folder / "metadata.jsonl")
    classifier = domain_feature_extractor()  # the judge: features that also read attributes
    right = folder_accuracy(folder, prompts, classifier)
    assert set(right) == {"shape", "colour", "size", "position", "background", "style", "all"}
    assert min(right.values()) >= 0.9, right
    wrong = [EvalPrompt(p.text, {**p.expected, "shape": "star"}) for p in prompts]  # no image shows a star
    assert folder_accuracy(folder, wrong, classifier)["shape"] <= 0.05
    assert folder_accuracy(folder, [EvalPrompt(p.text) for p in prompts], classifier) is None
    with pytest.raises(ValueError, match="40 images for 39 prompts"):
        folder_accuracy(folder, prompts[:39], classifier)


def test_generate_overwrite_replaces_old_images(tmp_path) -> None:
    pipe = DiffusionPipeline.from_pretrained(build_tiny_pipeline("sd", tmp_path / "pipe"))
    kwargs = {**default_generation_kwargs("sd"), "num_inference_steps": 1}
    out = tmp_path / "out"
    generate_images(pipe, ["a", "b", "c"], out, generation_kwargs=kwargs, progress=False)
    with pytest.raises(FileExistsError):
        generate_images(pipe, ["a"], out, generation_kwargs=kwargs, progress=False)
    generate_images(pipe, ["a"], out, generation_kwargs=kwargs, overwrite=True, progress=False)
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png"]


def test_evaluate_against_base_scores_the_base_with_the_adapter_off(tmp_path) -> None:
    pipeline_dir = build_tiny_pipeline("sd", tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    reference = write_image_folder(tmp_path / "ref", 12, seed=1, split="concept")
    prompts = cycle_prompts(read_eval_prompts(reference / "metadata.jsonl"), 6)
    kwargs = {"seed": 5, "generation_kwargs": {**default_generation_kwargs("sd"), "num_inference_steps": 2},
              "progress": False}
    metric = build_fid_metric("domain", kid_max_samples=0)
    assert isinstance(metric.feature, DomainFeatures) and metric.convention["image_size"] == 32

    # the base alone first, then the same pipeline with a LoRA that changes its images
    alone = tmp_path / "alone"
    generate_images(pipe, [p.text for p in prompts], alone, seed=5, generation_kwargs=kwargs["generation_kwargs"],
                    progress=False)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    type(pipe).save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.load_lora_weights(tmp_path / "lora", weight_name="pytorch_lora_weights.safetensors")
    paths = evaluate_against_base(pipe, "lora", prompts, tmp_path / "eval", reference, metric, **kwargs)

    report = json.loads(paths["json"].read_text())
    assert [run["name"] for run in report["runs"]] == ["base", "lora"]
    for run in report["runs"]:
        assert run["num_generated"] == 6 and run["num_reference"] == 12
        assert set(run["accuracy"]) >= {"shape", "colour", "all"}
        assert np.isfinite(run["fid"])
    pixels = {name: [np.asarray(Image.open(p)) for p in sorted((tmp_path / "eval" / name).glob("*.png"))]
              for name in ("base", "lora")}
    alone_pixels = [np.asarray(Image.open(p)) for p in sorted(alone.glob("*.png"))]
    assert all(np.array_equal(a, b) for a, b in zip(pixels["base"], alone_pixels, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(pixels["lora"], alone_pixels, strict=True))
    assert pipe.get_active_adapters()  # switched back on after scoring the base
    # the adapter is fused while drawing, unfused after: the unfused pipeline draws the same images
    assert not any(getattr(module, "merged", False) for module in pipe.unet.modules())
    unfused = tmp_path / "unfused"
    generate_images(pipe, [p.text for p in prompts], unfused, seed=5, generation_kwargs=kwargs["generation_kwargs"],
                    progress=False)
    unfused_pixels = [np.asarray(Image.open(p), dtype=np.int16) for p in sorted(unfused.glob("*.png"))]
    assert max(np.abs(a - b).max() for a, b in zip(pixels["lora"], unfused_pixels, strict=True)) <= 1
    assert "| shape ↑ |" in paths["markdown"].read_text() and paths["plot"].stat().st_size > 0


def test_markdown_table_marks_runs_without_accuracy() -> None:
    runs = [{"name": "a", "fid": 1.0, "accuracy": {"shape": 0.5, "all": 0.25}}, {"name": "b", "fid": 2.0}]
    table = markdown_table(runs)
    assert "| shape ↑ | all ↑ |" in table
    assert "| 0.50 | 0.25 |" in table and "| – | – |" in table


def test_script_checks_evaluation_inputs_before_training(tmp_path) -> None:
    data = captioned_folder(tmp_path / "data")
    cases = [
        (["--eval_reference_dir", str(tmp_path / "missing")], "no such image folder"),
        (["--eval_reference_dir", str(data), "--num_eval_images", "0"], "--num_eval_images must be"),
        (["--eval_reference_dir", str(data), "--eval_prompts", str(tmp_path / "none.txt")], "no such file"),
        (["--eval_reference_dir", str(data)], "needs --eval_prompts"),
        (["--eval_reference_dir", str(data), "--eval_prompts", str(data / "metadata.jsonl"),
          "--eval_feature_extractor", "no_such_module:f"], "Evaluation set-up"),
    ]
    for extra, message in cases:
        args = train_script().parse_args(tiny_args(tmp_path / "pipe", data, tmp_path / "out", *extra))
        with pytest.raises(EvaluationError, match=message):
            evaluation_setup(args)
    args = train_script().parse_args(tiny_args(tmp_path / "pipe", data, tmp_path / "out", "--eval_reference_dir",
                                               str(data), "--eval_prompts", str(data / "metadata.jsonl"),
                                               "--eval_feature_extractor", "domain", "--num_eval_images", "5"))
    plan = evaluation_setup(args)
    prompts, metric = plan.prompts, plan.metric
    assert len(prompts) == 5 and prompts[4] == prompts[0] and isinstance(metric.feature, DomainFeatures)


def test_evaluate_against_base_adds_clip_t_cmmd_and_drift(tmp_path) -> None:
    """The training script's --eval_clip_model / --eval_drift_prompts: CLIP-T and CMMD for every run, the drift of
    the fine-tune on unrelated prompts (0 would mean the adapter changes nothing there)."""
    from tests.test_semantic_metrics import save_tiny_clip

    pipeline_dir = build_tiny_pipeline("sd", tmp_path / "pipe")
    reference = write_image_folder(tmp_path / "ref", 8, seed=1, split="concept")
    prompts = cycle_prompts(read_eval_prompts(reference / "metadata.jsonl"), 4)
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    type(pipe).save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    pipe.load_lora_weights(tmp_path / "lora", weight_name="pytorch_lora_weights.safetensors")
    clip_dir = save_tiny_clip(tmp_path / "clip")
    scorer = SemanticScorer(load_clip_embedder(clip_dir), reference=reference, clip_name="tiny-clip")
    kwargs = {"seed": 5, "generation_kwargs": {**default_generation_kwargs("sd"), "num_inference_steps": 2},
              "progress": False}
    paths = evaluate_against_base(pipe, "lora", prompts, tmp_path / "eval", reference,
                                  build_fid_metric("domain", kid_max_samples=0), scorer=scorer,
                                  drift_prompts=["a red circle", "a blue square"], **kwargs)
    runs = {run["name"]: run for run in json.loads(paths["json"].read_text())["runs"]}
    for run in runs.values():
        assert 0 <= run["clip_t"] <= 100 and np.isfinite(run["cmmd"])
    assert "drift" not in runs["base"] and 0 < runs["lora"]["drift"] <= 2
    assert len(list((tmp_path / "eval" / "drift" / "adapted").glob("*.png"))) == 2
