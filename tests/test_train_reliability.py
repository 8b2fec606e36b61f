"""Issue 14, "Nothing lost, nothing executed", on train_dreambooth_stella.py and the tiny SD pipeline (CPU).

Bad input stops before any model is loaded and writes nothing; no file of a checkpoint is unpickled unsafely;
a kill at any point of a save loses nothing a resume needs; two processes train one model; a diverging run stops
and names the checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from stella_diffusion.files import UnreadableImageWarning
from stella_diffusion.integrations.diffusers import LORA_WEIGHT_NAME, NATIVE_WEIGHT_NAME
from stella_diffusion.optim import RiemannianHooks
from stella_diffusion.shapes.domain import INSTANCE_PROMPT
from stella_diffusion.training import config
from stella_diffusion.training.adapters import read_saved_settings
from stella_diffusion.training.checkpoints import (
    HISTORY_NAME,
    MARKER_NAME,
    read_marker,
    resolve_checkpoint,
    save_checkpoint,
)
from stella_diffusion.training.config import TrainingError
from stella_diffusion.training.model_setup import check_identical_across_processes
from stella_diffusion.training.records import captioned_records, folder_images

from ._train_fixtures import (
    REPO,
    SCRIPT,
    captioned_folder,
    dreambooth_folder,
    history,
    run,
    run_launcher,
    tiny_args,
    train_script,
)

KILLER = Path(__file__).resolve().parent / "_kill_during_save.py"


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every file under ``folder`` with its bytes (``None``: no folder), to show a failed run wrote nothing."""
    if not folder.exists():
        return None
    if folder.is_file():
        return {"": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def armed_payload(target: Path) -> bytes:
    """``torch.save`` bytes whose unpickling creates ``target`` (``__reduce__`` calls ``open``): a live payload."""

    class Payload:
        def __reduce__(self) -> tuple:
            return open, (str(target), "w")

    buffer = io.BytesIO()
    torch.save({"state": Payload()}, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one TrainingError before any model is loaded; nothing trained or written


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG header announcing ``width × height`` pixels (PIL refuses it as a decompression bomb on open)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()[: buffer.tell() // 2]


def _rewrite_row(folder: Path, line: int, **changes: object) -> None:
    """Change fields of one ``metadata.jsonl`` row (``line`` from 1), keeping the other rows."""
    metadata = folder / "metadata.jsonl"
    rows = [json.loads(row) for row in metadata.read_text().splitlines()]
    rows[line - 1].update(changes)
    metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _outside_image(folder: Path) -> Path:
    outside = folder.parent / "outside.png"
    Image.new("RGB", (16, 16), "red").save(outside)
    return outside


def _symlink_out(folder: Path) -> None:
    (folder / "link.png").symlink_to(_outside_image(folder))
    _rewrite_row(folder, 2, file_name="link.png")


def _latin1_metadata(folder: Path) -> None:
    metadata = folder / "metadata.jsonl"
    metadata.write_bytes(metadata.read_text().replace("a ", "à ", 1).encode("latin-1"))


# (case id) -> (metadata change, expected message); every one names the file and, for a row, the line
METADATA_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "file_name ../": (lambda f: (_outside_image(f), _rewrite_row(f, 2, file_name="../outside.png")),
                      r"metadata.jsonl line 2: 'file_name' '../outside.png' points outside"),
    "file_name absolute": (lambda f: _rewrite_row(f, 2, file_name=str(_outside_image(f))),
                           r"metadata.jsonl line 2: 'file_name' '/.*outside.png' points outside"),
    "file_name symlink out": (_symlink_out, r"metadata.jsonl line 2: 'file_name' 'link.png' points outside"),
    "file_name number": (lambda f: _rewrite_row(f, 2, file_name=7),
                         r"metadata.jsonl line 2: 'file_name' must be a file name, got 7\."),
    "file_name null": (lambda f: _rewrite_row(f, 1, file_name=None),
                       r"metadata.jsonl line 1: 'file_name' must be a file name, got None\."),
    "caption null": (lambda f: _rewrite_row(f, 2, text=None),
                     r"metadata.jsonl line 2: the caption \('text'\) must be a non-empty string, got None\."),
    "caption empty": (lambda f: _rewrite_row(f, 2, text=" "),
                      r"metadata.jsonl line 2: the caption \('text'\) must be a non-empty string, got ' '\."),
    "caption number": (lambda f: _rewrite_row(f, 3, text=3.5),
                       r"metadata.jsonl line 3: the caption \('text'\) must be a non-empty string, got 3.5\."),
    "caption list": (lambda f: _rewrite_row(f, 2, text=["a", "b"]),
                     r"metadata.jsonl line 2: the caption \('text'\) must be a non-empty string, got \['a', 'b'\]"),
    "metadata not UTF-8": (_latin1_metadata, r"metadata.jsonl is not UTF-8 text \(byte \d+: invalid"),
}


@pytest.fixture
def no_model_is_loaded(monkeypatch):
    """Fail the test if main() got as far as the Accelerator or loading a pipeline: the checks come first."""

    def too_far(*args: object, **kwargs: object) -> None:
        raise AssertionError("the input check ran after training started")

    monkeypatch.setattr(train_script(), "Accelerator", too_far)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", too_far)


# (case id) -> (extra arguments, expected message): every command-line check of issue 14, item 8; {no_unet} is a
# copy of the pipeline without unet/, {a_file} a file
FLAG_CASES: dict[str, tuple[list[str], str]] = {
    "learning_rate nan": (["--learning_rate", "nan"], r"^--learning_rate must be a finite number, got nan\.$"),
    "learning_rate inf": (["--learning_rate", "inf"], r"^--learning_rate must be a finite number, got inf\.$"),
    "learning_rate 0": (["--learning_rate", "0"], r"^--learning_rate must be positive, got 0.0\.$"),
    "learning_rate -0.5": (["--learning_rate", "-0.5"], r"^--learning_rate must be positive"),
    "max_grad_norm nan": (["--max_grad_norm", "nan"], r"^--max_grad_norm must be a finite number, got nan"),
    "max_orthonormality_error 0": (["--max_orthonormality_error", "0"], "--max_orthonormality_error must be "
                                   "positive"),
    "adam_beta2 -inf": (["--adam_beta2=-inf"], r"^--adam_beta2 must be a finite number, got -inf"),
    "lora_dropout 1.5": (["--lora_dropout", "1.5"], r"^--lora_dropout must be in \[0, 1\), got 1.5\.$"),
    "lora_dropout nan": (["--lora_dropout", "nan"], r"^--lora_dropout must be in \[0, 1\), got nan\.$"),
    "checkpointing_steps 0": (["--checkpointing_steps", "0"], r"^--checkpointing_steps must be a positive integer"),
    "validation_epochs 0": (["--validation_epochs", "0"], r"^--validation_epochs must be a positive integer"),
    "num_validation_images 0": (["--num_validation_images", "0"], "--num_validation_images must be a positive"),
    "max_train_steps 0": (["--max_train_steps", "0"], r"^--max_train_steps must be a positive integer"),
    "train_batch_size 0": (["--train_batch_size", "0"], r"^--train_batch_size must be a positive integer"),
    "gradient_accumulation_steps -1": (["--gradient_accumulation_steps", "-1"], "--gradient_accumulation_steps "
                                       "must be a positive integer, got -1"),
    "checkpoints_total_limit 0": (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be a "
                                  "positive integer"),
    "lr_warmup_steps -1": (["--lr_warmup_steps", "-1"], r"^--lr_warmup_steps must be zero or more, got -1\.$"),
    "rank above min(in, out)": (["--rank", "33"], r"^--rank 33 exceeds min\(in, out\) = 32 of unet\..*; choose "
                                r"a rank of at most 32\.$"),
    "rank above a --lora_layers layer": (["--rank", "33", "--lora_layers", "time_embedding.linear_1"],
                                        r"^--rank 33 exceeds min\(in, out\) = 32 of unet.time_embedding"),
    "lora_layers entry matches nothing": (["--lora_layers", "to_q,to_nothing"],
                                          r"^--lora_layers: 'to_nothing' matches no module of the unet "
                                          r"\(UNet2DConditionModel\)\.$"),
    "lora_layers every entry checked": (["--lora_layers", "nope,to_q"], r"'nope' matches no module"),
    "lora_layers a 3x3 conv": (["--lora_layers", "conv_in"],
                               r"^--lora_layers: StelLA supports only 1x1 Conv2d .*`unet.conv_in`"),
    "lora_layers empty entry": (["--lora_layers", "to_q,,to_v"], r"has an empty entry"),
    "model folder without unet/": (["--pretrained_model_name_or_path", "{no_unet}"],
                                   r"^--pretrained_model_name_or_path .*no-unet: no usable unet/ "),
    "model index without a unet": (["--pretrained_model_name_or_path", "{no_unet_entry}"],
                                   r"^--pretrained_model_name_or_path .*no-unet-entry has no unet component\.$"),
    "output_dir is a file": (["--output_dir", "{a_file}"], r"^--output_dir .*a-file is a file, not a folder\.$"),
    "output_dir under a file": (["--output_dir", "{a_file}/out"],
                                r"^--output_dir .*a-file/out cannot be written: Not a directory\.$"),
    "report_to wandb": (["--report_to", "wandb"], r"^--report_to wandb needs the wandb package: `pip install "
                        r"wandb` \(or --report_to none\)\.$"),
}


@pytest.fixture
def without_wandb(monkeypatch):
    """wandb hidden from the import system, whether or not this environment has it."""
    real = config.importlib.util.find_spec
    monkeypatch.setattr(config.importlib.util, "find_spec",
                        lambda name, *args: None if name == "wandb" else real(name, *args))


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flag_is_one_error_before_any_model_and_nothing_is_written(case, sd_pipeline, concept_dir, tmp_path,
                                                                       no_model_is_loaded, without_wandb):
    _check_refused(case, sd_pipeline, concept_dir, tmp_path, existing_output=False)


@pytest.mark.parametrize("case", ["report_to wandb", "rank above min(in, out)", "output_dir is a file"])
def test_bad_flag_leaves_an_existing_output_dir_as_it_was(case, sd_pipeline, concept_dir, tmp_path,
                                                          no_model_is_loaded, without_wandb):
    _check_refused(case, sd_pipeline, concept_dir, tmp_path, existing_output=True)


def _check_refused(case: str, sd_pipeline: Path, concept_dir: Path, tmp_path: Path, existing_output: bool) -> None:
    extra, message = FLAG_CASES[case]
    if any("{no_unet}" in arg for arg in extra):
        shutil.copytree(sd_pipeline, tmp_path / "no-unet", ignore=shutil.ignore_patterns("unet"))
    if any("{no_unet_entry}" in arg for arg in extra):  # model_index.json names no unet at all
        shutil.copytree(sd_pipeline, tmp_path / "no-unet-entry")
        index_path = tmp_path / "no-unet-entry" / "model_index.json"
        index = json.loads(index_path.read_text())
        del index["unet"]
        index_path.write_text(json.dumps(index))
    (tmp_path / "a-file").write_text("not a folder")
    extra = [arg.format(no_unet=tmp_path / "no-unet", no_unet_entry=tmp_path / "no-unet-entry",
                        a_file=tmp_path / "a-file") for arg in extra]
    out = tmp_path / "out"
    if existing_output:
        out.mkdir()
        (out / "keep.txt").write_text("from an earlier run")
    before = snapshot(tmp_path)  # the output folder, and the file given as one
    with pytest.raises(TrainingError, match=message):
        run(tiny_args(sd_pipeline, concept_dir, out, "--instance_prompt", INSTANCE_PROMPT, *extra))
    assert snapshot(tmp_path) == before


def test_output_dir_probe_leaves_nothing_behind(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("from an earlier run")
    before = snapshot(tmp_path)
    config.check_output_dir(existing)
    config.check_output_dir(tmp_path / "new" / "nested" / "out")
    assert snapshot(tmp_path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]


def test_output_dir_probed_by_several_ranks_at_once(tmp_path):
    """The ranks of a multi-process run probe the same new folder at the same moment (threads stand in for them):
    none may fail because another removed the folder or the probe file it was writing."""
    errors = []

    def probe(target: Path, start: threading.Barrier) -> None:
        start.wait()
        try:
            config.check_output_dir(target)
        except TrainingError as err:
            errors.append(err)

    for attempt in range(50):
        target = tmp_path / str(attempt) / "new" / "out"
        target.parent.parent.mkdir()
        start = threading.Barrier(2)
        ranks = [threading.Thread(target=probe, args=(target, start)) for _ in range(2)]
        for rank in ranks:
            rank.start()
        for rank in ranks:
            rank.join()
        assert not any(target.parent.parent.iterdir())
    assert errors == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_is_refused(sd_pipeline, concept_dir, tmp_path, no_model_is_loaded):
    parent = tmp_path / "read-only"
    parent.mkdir(mode=0o555)
    with pytest.raises(TrainingError, match=r"--output_dir .*read-only/out cannot be written: Permission denied"):
        run(tiny_args(sd_pipeline, concept_dir, parent / "out", "--instance_prompt", INSTANCE_PROMPT))
    assert not any(parent.iterdir())


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_bad_metadata_row_is_one_error_naming_file_and_line(case, sd_pipeline, tmp_path, no_model_is_loaded):
    folder = captioned_folder(tmp_path / "data", n=3)
    change, message = METADATA_CASES[case]
    change(folder)
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match=message) as raised:
        run(tiny_args(sd_pipeline, folder, out))
    assert str(folder / "metadata.jsonl") in str(raised.value)
    assert not out.exists()


def test_metadata_with_a_byte_order_mark_is_read(tmp_path):
    folder = captioned_folder(tmp_path / "data", n=3)
    metadata = folder / "metadata.jsonl"
    captions = [json.loads(row)["text"] for row in metadata.read_text().splitlines()]
    metadata.write_bytes(b"\xef\xbb\xbf" + metadata.read_bytes())  # Windows Notepad's UTF-8
    assert [r.prompt for r in captioned_records(folder)] == captions


def test_truncated_jpeg_and_decompression_bomb_are_skipped_with_a_warning(sd_pipeline, tmp_path):
    folder = dreambooth_folder(tmp_path / "data", n=2)
    (folder / "truncated.jpg").write_bytes(_truncated_jpeg())
    (folder / "bomb.png").write_bytes(_png_claiming(20_000, 20_000))
    with Image.open(folder / "truncated.jpg") as image:  # the header alone looks fine: only decoding tells
        image.verify()
    with pytest.warns(UnreadableImageWarning) as caught:
        images = folder_images(folder)
    assert [p.name for p in images] == sorted(p.name for p in folder.glob("*.png") if p.name != "bomb.png")
    messages = " ".join(str(w.message) for w in caught)
    assert "truncated.jpg" in messages and "bomb.png" in messages

    only_bad = tmp_path / "only-bad"
    only_bad.mkdir()
    for name in ("truncated.jpg", "bomb.png"):
        shutil.copy(folder / name, only_bad / name)
    with pytest.warns(UnreadableImageWarning), pytest.raises(TrainingError, match="holds no readable image"):
        run(tiny_args(sd_pipeline, only_bad, tmp_path / "out", "--instance_prompt", INSTANCE_PROMPT))
    assert not (tmp_path / "out").exists()


@pytest.fixture
def importable_module(tmp_path, monkeypatch):
    """A module ``issue14_side_effect`` that leaves a file when imported, and that file's path."""
    witness = tmp_path / "imported"
    (tmp_path / "issue14_side_effect.py").write_text(
        f"from pathlib import Path\nPath({str(witness)!r}).write_text('ran')\n\ndef build():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "issue14_side_effect:build", witness
    sys.modules.pop("issue14_side_effect", None)


def test_config_file_may_not_name_code_to_run(importable_module, tmp_path):
    spec, witness = importable_module
    path = tmp_path / "shared.yaml"
    path.write_text(f"eval_feature_extractor: {spec}\n")
    with pytest.raises(TrainingError, match=rf"--config .*shared.yaml: eval_feature_extractor '{spec}' would import "
                                            r"and run that module; a config file may not do that"):
        train_script().parse_args(["--config", str(path)])
    assert not witness.exists() and "issue14_side_effect" not in sys.modules

    # nor smuggle the flag in through another flag's value (argparse reads it as a flag with no value)
    path.write_text(f'validation_prompt: "--eval_feature_extractor={spec}"\n')
    with pytest.raises(SystemExit):
        train_script().parse_args(["--config", str(path)])
    assert not witness.exists()

    # the built-in names may come from a file; the command line, where the user types it, may name code
    path.write_text("eval_feature_extractor: domain\n")
    assert train_script().parse_args(["--config", str(path)]).eval_feature_extractor == "domain"
    args = train_script().parse_args(["--config", str(path), "--eval_feature_extractor", spec])
    assert args.eval_feature_extractor == spec and not witness.exists()  # parsing imports nothing


def test_stella_grad_scaling_nan_is_refused_by_the_parser(capsys):
    """A bad value of a typed flag is argparse's own error (exit 2, "error: argument ..."), like ``--rank x``."""
    with pytest.raises(SystemExit) as raised:
        train_script().parse_args(["--stella_grad_scaling", "nan"])
    assert raised.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: argument --stella_grad_scaling: a reference width must be a positive number, got 'nan'")


@pytest.mark.slow
def test_bad_flag_from_the_command_line_is_one_error_line_and_a_nonzero_exit(sd_pipeline, concept_dir, tmp_path):
    out = tmp_path / "out"
    argv = tiny_args(sd_pipeline, concept_dir, out, "--instance_prompt", INSTANCE_PROMPT, "--learning_rate", "nan")
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "error: --learning_rate must be a finite number, got nan."
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# Nothing unpickled: a checkpoint with a foreign pickle is refused; payloads in accelerate's files never run


@pytest.fixture
def checkpointed_run(sd_pipeline, style_dir, tmp_path):
    """A 2-step run with its ``checkpoint-2``, and the arguments that resume it to step 4."""
    out = tmp_path / "out"
    run(tiny_args(sd_pipeline, style_dir, out, "--max_train_steps", "2"))
    return out, tiny_args(sd_pipeline, style_dir, out, "--max_train_steps", "4", "--resume_from_checkpoint")


def test_checkpoint_with_a_foreign_pickle_is_refused_and_never_unpickled(checkpointed_run, tmp_path):
    out, resume = checkpointed_run
    witness = tmp_path / "payload-ran"
    probe = tmp_path / "armed"
    torch.load(io.BytesIO(armed_payload(probe)), weights_only=False)
    assert probe.exists(), "the payload must be live for this test to mean anything"

    checkpoint = out / "checkpoint-2"
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # the history travels as JSON, not as a pickle
    assert [r["step"] for r in json.loads((checkpoint / HISTORY_NAME).read_text())] == [1, 2]
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(armed_payload(witness))
    before = snapshot(out)
    for value in ("latest", "checkpoint-2", str(checkpoint)):
        with pytest.raises(TrainingError, match=r"checkpoint-2 holds custom_checkpoint_0.pkl, which this script never "
                                                r"writes; refusing to unpickle it \(pickle files can run code\)\."):
            run([*resume, value])
    assert not witness.exists()
    assert snapshot(out) == before

    # accelerate's own files (random_states_0.pkl among them) load: the same checkpoint resumes without it
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    assert (checkpoint / "random_states_0.pkl").is_file()
    run([*resume, "latest"])
    assert [r["step"] for r in history(out)] == [1, 2, 3, 4]
    assert not witness.exists()


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin", "scheduler.bin"])
def test_payload_in_accelerates_own_files_is_never_run(name, checkpointed_run, tmp_path):
    """accelerate loads its files with ``weights_only=True``: a planted payload fails to load or is ignored."""
    out, resume = checkpointed_run
    witness = tmp_path / "payload-ran"
    (out / "checkpoint-2" / name).write_bytes(armed_payload(witness))
    # random states that do not load are skipped by accelerate (with a log line); the others stop the resume
    refused = contextlib.nullcontext() if name == "random_states_0.pkl" else pytest.raises(pickle.UnpicklingError)
    with refused:
        run([*resume, "latest"])
    assert not witness.exists()


# ---------------------------------------------------------------------------------------------------------------
# Atomic checkpoints: markers, 'latest', pruning, and a kill at any point of a save


def _fake_save_state(folder: str) -> None:
    """What ``accelerator.save_state`` does, in small: make the folder and write the state into it."""
    Path(folder).mkdir()
    Path(folder, "state.bin").write_bytes(b"x")


def _fake_checkpoints(output_dir: Path, steps: list[int], total_limit: int | None = None) -> None:
    for step in steps:
        save_checkpoint(output_dir, step, _fake_save_state, {"loss": 0.5}, healthy=True, total_limit=total_limit)


def test_latest_skips_a_torn_checkpoint_with_a_warning_and_a_named_torn_one_is_an_error(tmp_path):
    _fake_checkpoints(tmp_path, [2, 4, 6])
    (tmp_path / "checkpoint-6" / MARKER_NAME).unlink()  # e.g. copied by hand, or written by an older version
    with pytest.warns(UserWarning, match=r"Skipping .*checkpoint-6: an incomplete checkpoint"):
        assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-4"
    with pytest.raises(TrainingError, match=r"checkpoint-6 is incomplete \(no checkpoint_complete.json"):
        resolve_checkpoint(tmp_path, "checkpoint-6")
    assert resolve_checkpoint(tmp_path, "checkpoint-2") == tmp_path / "checkpoint-2"


def test_pruning_keeps_the_newest_complete_checkpoints_and_counts_no_torn_one(tmp_path):
    _fake_checkpoints(tmp_path, [2, 4])
    (tmp_path / "checkpoint-4" / MARKER_NAME).unlink()
    (tmp_path / ".checkpoint-5.partial").mkdir()  # left by a run killed mid-save
    _fake_checkpoints(tmp_path, [6], total_limit=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]  # the torn one is kept
    assert read_marker(tmp_path / "checkpoint-6") == {"loss": 0.5, "step": 6, "healthy": True}


KILL_COMMON = ["--instance_prompt", INSTANCE_PROMPT, "--train_batch_size", "1", "--random_flip", "--no-center_crop",
               "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "3", "--learning_rate", "5e-2",
               "--checkpointing_steps", "2", "--max_train_steps", "6"]


@pytest.fixture(scope="module")
def straight_losses(sd_pipeline, concept_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "out"
    run(tiny_args(sd_pipeline, concept_dir, out, *KILL_COMMON))
    losses = [r["loss"] for r in history(out)]
    assert len(losses) == 6 and len(set(losses)) == 6
    return losses


@pytest.mark.slow
@pytest.mark.parametrize(
    ("point", "limit", "left"),
    [("after_save_state", None, ["checkpoint-2"]),
     ("after_save_state", 1, ["checkpoint-2"]),
     ("before_rename", 1, ["checkpoint-2"]),
     ("during_prune", 1, ["checkpoint-4"])],
    ids=["after save_state", "after save_state, limit 1", "before the rename, limit 1", "during pruning, limit 1"],
)
def test_kill_during_a_save_loses_nothing_and_the_resume_matches_a_straight_run(point, limit, left, sd_pipeline,
                                                                               concept_dir, straight_losses,
                                                                               tmp_path):
    out = tmp_path / "out"
    limit_args = ["--checkpoints_total_limit", str(limit)] if limit else []
    argv = tiny_args(sd_pipeline, concept_dir, out, *KILL_COMMON, *limit_args)
    proc = subprocess.run([sys.executable, str(KILLER), point, "4", *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    complete = sorted(p.name for p in out.glob("checkpoint-*") if read_marker(p) is not None)
    assert complete == left
    for name in complete:  # a checkpoint that looks complete is whole: pruning never leaves half of one
        assert read_saved_settings(out / name) is not None and (out / name / "optimizer.bin").is_file()

    run([*argv, "--resume_from_checkpoint", "latest"])
    assert [r["loss"] for r in history(out)] == straight_losses
    assert not list(out.glob(".checkpoint-*"))  # the torn temporary folders are cleaned up
    expected = ["checkpoint-6"] if limit else ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == expected
    assert (out / LORA_WEIGHT_NAME).is_file()


# ---------------------------------------------------------------------------------------------------------------
# Several processes: one model, one export


@pytest.mark.slow
def test_two_processes_through_the_script_train_one_model_and_export_it_once(sd_pipeline, style_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT),
           *tiny_args(sd_pipeline, style_dir, out, "--max_train_steps", "2")]
    # no user accelerate config; CPU ranks talk over gloo (README: `accelerate launch --cpu` starts one process)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = run_launcher(cmd, env, REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert log.count("Num processes: 2") == 2  # accelerator.state, logged by each rank
    assert "Process index: 0" in log and "Process index: 1" in log
    assert re.search(r"Trained adapter identical on all 2 processes \(sha256 [0-9a-f]{16}\)", log)
    assert log.count(f"Saved {out / LORA_WEIGHT_NAME}") == 1
    assert (out / LORA_WEIGHT_NAME).is_file() and (out / NATIVE_WEIGHT_NAME).is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "checkpoint"))) == ["checkpoint-2"]
    assert [r["step"] for r in history(out)] == [1, 2]


def test_processes_that_trained_different_adapters_are_an_error():
    """The other side of the digest check: one differing bit on one process stops the run before the export."""
    params = [torch.ones(3, 2)]
    same = SimpleNamespace(num_processes=2, device=torch.device("cpu"), gather=lambda t: torch.cat([t, t]))
    check_identical_across_processes(same, params)
    differ = SimpleNamespace(num_processes=2, device=torch.device("cpu"), gather=lambda t: torch.cat([t, t + 1]))
    with pytest.raises(TrainingError, match="The trained adapter differs between processes"):
        check_identical_across_processes(differ, params)


# ---------------------------------------------------------------------------------------------------------------
# Divergence: skipped steps in a row, U / V off the manifold; the named checkpoint resumes


def _named_checkpoint(message: str) -> Path:
    return Path(re.search(r"the last good checkpoint is (\S+?)\.?$", message).group(1))


def test_huge_learning_rate_stops_after_too_many_skipped_steps(sd_pipeline, style_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match=r"^3 optimizer steps in a row were skipped for non-finite gradients "
                                            r"\(up to step 4; --max_skipped_steps 2\): the run diverged \(lower "
                                            r"--learning_rate\?\); training stopped, the last good checkpoint is "):
        run(tiny_args(sd_pipeline, style_dir, out, "--learning_rate", "1e6", "--max_skipped_steps", "2",
                      "--max_train_steps", "8", "--lr_scheduler", "constant"))
    records = history(out)
    assert [r["skipped"] for r in records] == [False, True, True, True]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 3]
    assert not (out / LORA_WEIGHT_NAME).exists()


def test_non_finite_gradients_with_a_finite_loss_are_skipped_then_stop_the_run(sd_pipeline, style_dir, tmp_path,
                                                                              monkeypatch):
    script = train_script()
    real = script.prior_preservation_loss
    calls = []

    def nan_gradients_from_step_3(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        loss = real(*args, **kwargs)
        if len(calls) >= 3:
            loss.register_hook(lambda grad: grad * float("nan"))
        return loss

    monkeypatch.setattr(script, "prior_preservation_loss", nan_gradients_from_step_3)
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match=r"^2 optimizer steps in a row were skipped .*\(up to step 4; "
                                            r"--max_skipped_steps 1\)") as raised:
        run(tiny_args(sd_pipeline, style_dir, out, "--max_skipped_steps", "1", "--max_train_steps", "6"))
    records = history(out)
    assert [(r["skipped"], r["skipped_steps"]) for r in records] == [(False, 0), (False, 0), (True, 1), (True, 2)]
    # a skipped step leaves the factors as they were: checkpoint-4 holds step 2's healthy state
    assert _named_checkpoint(str(raised.value)) == out / "checkpoint-4"
    assert not (out / LORA_WEIGHT_NAME).exists()


def test_factors_off_the_manifold_stop_the_run_and_the_named_checkpoint_resumes(sd_pipeline, style_dir, tmp_path,
                                                                               monkeypatch):
    common = ["--max_train_steps", "6", "--lr_scheduler", "constant", "--learning_rate", "5e-2"]
    straight = tmp_path / "straight"
    run(tiny_args(sd_pipeline, style_dir, straight, *common))

    real = RiemannianHooks.orthonormality_error
    calls = []

    def off_the_manifold_from_step_4(self: RiemannianHooks) -> float:
        calls.append(1)
        return 0.5 if len(calls) >= 4 else real(self)

    monkeypatch.setattr(RiemannianHooks, "orthonormality_error", off_the_manifold_from_step_4)
    out = tmp_path / "out"
    with pytest.raises(TrainingError, match=r"^max\|UᵀU − I\| = 0.5 after step 4 \(--max_orthonormality_error "
                                            r"0.001\): U and V left the manifold; training stopped, the last good "
                                            r"checkpoint is ") as raised:
        run(tiny_args(sd_pipeline, style_dir, out, *common))
    named = _named_checkpoint(str(raised.value))
    assert named == out / "checkpoint-2"
    assert read_marker(out / "checkpoint-4")["healthy"] is False  # saved, but not one to resume from
    assert not (out / LORA_WEIGHT_NAME).exists()

    monkeypatch.undo()
    run(tiny_args(sd_pipeline, style_dir, out, *common, "--resume_from_checkpoint", str(named)))
    losses = [r["loss"] for r in history(out)]
    assert losses == [r["loss"] for r in history(straight)]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert read_marker(out / "checkpoint-4")["healthy"] is True  # the resumed run saved step 4 again
