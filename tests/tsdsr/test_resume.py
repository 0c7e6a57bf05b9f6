"""What a resume may change: every setting the run's config records is either refused (the
optimizer state, LoRA shapes and batch order come from the checkpoint) or, where listed in the
recipe's docs as allowed, accepted and logged."""

import dataclasses
import json
import logging

import pytest

from examples.tsdsr.training.config import TrainConfig
from examples.tsdsr.training.resume import resume_point
from scoredistill.cli import UserError
from tests.tsdsr.test_checkpoint import fake_checkpoint

BASE = dict(pretrained="/data/sd3", teacher_lora="/data/teacher.safetensors",
            lpips_backbone="/data/alexnet.pth", hq_dir="/data/hq", lq_dir="/data/lq",
            embeds_dir="/data/embeds", val_hq_dir="/data/val", val_lq_dir="/data/val_lq")
# Per recorded field, a resume that changes it (with what the change needs to stay valid).
CHANGES = {
    "pretrained": {"pretrained": "/moved/sd3"},
    "teacher_lora": {"teacher_lora": "/moved/teacher.safetensors"},
    "lpips_backbone": {"lpips_backbone": "/moved/alexnet.pth"},
    "student_rank": {"student_rank": 8},
    "fake_rank": {"fake_rank": 8},
    "vae_rank": {"vae_rank": 8},
    "gradient_checkpointing": {"gradient_checkpointing": False},
    "offload_vae_activations": {"offload_vae_activations": True},
    "hq_dir": {"hq_dir": "/moved/hq"},
    "lq_dir": {"lq_dir": "/moved/lq"},
    "jpeg_codec": {"jpeg_codec": "libjpeg"},
    "embeds_dir": {"embeds_dir": "/moved/embeds"},
    "val_hq_dir": {"val_hq_dir": "/moved/val"},
    "val_lq_dir": {"val_lq_dir": "/moved/val_lq"},
    "resolution": {"resolution": 256},
    "hflip": {"hflip": False},
    "use_latents": {"use_latents": True, "hflip": False},
    "dataloader_workers": {"dataloader_workers": 0},
    "regulariser": {"regulariser": "vsd"},
    "lpips_weight": {"lpips_weight": 0.5},
    "mse_weight": {"mse_weight": 0.0},
    "gamma": {"gamma": 0.5},
    "tsd_lambda": {"tsd_lambda": 0.5},
    "tsd_space": {"tsd_space": "epsilon"},
    "cfg_scale": {"cfg_scale": 1.0},
    "index_low": {"index_low": 100},
    "index_high": {"index_high": 900},
    "use_dasm": {"use_dasm": False},
    "dasm_points": {"dasm_points": 3, "dasm_weights": (1.0, 0.3, 0.3)},
    "dasm_step": {"dasm_step": 25},
    "dasm_weights": {"dasm_weights": (1.0, 0.5, 0.5, 0.5)},
    "dasm_bias": {"dasm_bias": (-10, 10)},
    "fake_weighting": {"fake_weighting": "cosmap"},
    "fake_updates_per_generator": {"fake_updates_per_generator": 5},
    "lr": {"lr": 1e-5},
    "lr_fake": {"lr_fake": 2e-6},
    "adam_beta1": {"adam_beta1": 0.8},
    "adam_beta2": {"adam_beta2": 0.99},
    "weight_decay": {"weight_decay": 0.0},
    "adam_eps": {"adam_eps": 1e-6},
    "max_grad_norm": {"max_grad_norm": 0.5},
    "lr_scheduler": {"lr_scheduler": "constant"},
    "lr_warmup_steps": {"lr_warmup_steps": 0},
    "lr_num_cycles": {"lr_num_cycles": 2},
    "max_steps": {"max_steps": 300_000},
    "batch_size": {"batch_size": 4},
    "mixed_precision": {"mixed_precision": "bf16"},
    "optimizer": {"optimizer": "adamw8bit"},
    "fsdp": {"fsdp": True},
    "seed": {"seed": 44},
    "output_dir": {"output_dir": "/moved/run"},
    "checkpoint_every": {"checkpoint_every": 100},
    "checkpoints_keep": {"checkpoints_keep": 1},
    "resume": {"resume": "{checkpoint}"},  # the folder, instead of "latest"
    "validate_every": {"validate_every": 50},
    "log_every": {"log_every": 1},
    "report_to": {"report_to": "none"},
    "skip_bad_files": {"skip_bad_files": True},
    "tiny": {"tiny": True},
}
# What may change, as docs/guides/tsdsr-recipe.md says: where things are, how often things
# happen, how the same maths is computed, and the run's length (the schedule is recomputed).
ALLOWED = {"pretrained", "teacher_lora", "lpips_backbone", "hq_dir", "lq_dir", "embeds_dir",
           "val_hq_dir", "val_lq_dir", "output_dir", "resume", "checkpoint_every",
           "checkpoints_keep", "validate_every", "log_every", "report_to", "dataloader_workers",
           "skip_bad_files", "gradient_checkpointing", "offload_vae_activations", "fsdp",
           "max_steps"}


def test_every_recorded_field_has_a_change_below():
    assert set(CHANGES) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert ALLOWED.issubset(CHANGES)


@pytest.mark.parametrize("field", list(CHANGES))
def test_a_resume_that_changes_a_setting(field, tmp_path, caplog):
    saved = TrainConfig(**BASE, output_dir=str(tmp_path))
    root = tmp_path / "checkpoints"
    checkpoint = fake_checkpoint(root, 2, config=json.loads(json.dumps(
        dataclasses.asdict(saved))))
    changes = {k: v.format(checkpoint=checkpoint) if isinstance(v, str) else v
               for k, v in CHANGES[field].items()}
    resumed = dataclasses.replace(saved, **{"resume": "latest", **changes})
    caplog.set_level(logging.INFO, logger="tsdsr.train")
    if field in ALLOWED:
        assert resume_point(resumed, root, set_aside=False) == checkpoint
        if field != "resume":  # always differs from the first run's None
            assert f"resume: {field} changed from" in caplog.text
    else:
        flag = "--" + field.replace("_", "-")
        with pytest.raises(UserError, match=f"settings differ from the run being resumed: .*"
                                            f"{flag} "):
            resume_point(resumed, root, set_aside=False)
