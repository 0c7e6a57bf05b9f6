"""Where a TSD-SR run starts: which checkpoint it resumes from, with which settings, in a
checkpoint folder that holds one line of steps.

- A hyperparameter that differs from the resumed run's (``--lr``, ranks, batch size, seed, ...)
  is refused with the keys named: the optimizer state, LoRA shapes and batch order all come from
  the checkpoint, so a silent mix would train neither setting. Bookkeeping (paths, intervals,
  ``--max-steps``, workers, trackers) may change; each change is logged.
- Resuming from an older step sets the later checkpoints aside (see ``set_aside_newer``).
- A fresh run refuses a folder that already holds checkpoints; ``--resume latest`` in a folder
  without any starts a new run, with a warning; with every checkpoint damaged it is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from examples.tsdsr.training.checkpoint import checkpoints, resolve, set_aside_newer
from examples.tsdsr.training.config import TrainConfig
from scoredistill.cli import UserError
from scoredistill.messages import brief

log = logging.getLogger("tsdsr.train")
CHANGEABLE = frozenset({
    # Where things are (runs and data move between machines) and how often things happen.
    "pretrained", "teacher_lora", "lpips_backbone", "hq_dir", "lq_dir", "embeds_dir",
    "val_hq_dir", "val_lq_dir", "output_dir", "resume", "checkpoint_every", "checkpoints_keep",
    "validate_every", "log_every", "report_to", "dataloader_workers", "skip_bad_files",
    # How the same maths is computed.
    "gradient_checkpointing", "offload_vae_activations", "fsdp",
    # A longer (or shorter) run: the learning-rate schedule is recomputed for it.
    "max_steps",
})


def config_changes(saved: dict[str, Any], config: TrainConfig
                   ) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """``(allowed, refused)``: ``{key: (saved value, new value)}`` for the keys that differ."""
    current = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as JSON lists
    changed = {k: (saved[k], v) for k, v in current.items() if k in saved and saved[k] != v}
    allowed = {k: v for k, v in changed.items() if k in CHANGEABLE}
    return allowed, {k: v for k, v in changed.items() if k not in CHANGEABLE}


def saved_config(state: dict[str, Any], output_dir: Path) -> dict[str, Any] | None:
    """The resumed run's config: stored in its checkpoint state, or (older checkpoints) the run
    folder's ``config.json``; None if neither exists."""
    if "config" in state:
        return state["config"]
    file = output_dir / "config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def resume_point(config: TrainConfig, root: Path, set_aside: bool = True) -> Path | None:
    """The checkpoint to resume from (None: start at step 0), after the checks above.

    Raises UserError for changed hyperparameters and for checkpoints of another run in
    ``root``; with ``set_aside`` (the main process), moves later checkpoints aside when resuming
    from an earlier one.
    """
    found = checkpoints(root)
    checkpoint = resolve(config.resume, root)
    if checkpoint is None:
        if found:  # so no --resume: with "latest", resolve returned one or raised
            raise UserError(f"{root} already holds checkpoints (up to {found[-1].name}): pass "
                            "--resume latest to continue that run, or another --output-dir")
        if config.resume is not None:  # so one command serves the first launch and requeues
            log.warning("--resume latest: no checkpoint in %s, so this is a new run, starting "
                        "at step 0", root)
        return None
    if found and checkpoint.parent.resolve() != root.resolve():
        raise UserError(f"--resume {checkpoint} is another run's checkpoint, but {root} holds "
                        f"checkpoints of its own (up to {found[-1].name}): give an empty "
                        "--output-dir")
    state = json.loads((checkpoint / "state.json").read_text())
    saved = saved_config(state, Path(config.output_dir))
    if saved is None:
        log.warning("%s has no saved config: cannot check that the hyperparameters match",
                    checkpoint)
    else:
        allowed, refused = config_changes(saved, config)
        if refused:
            diffs = "; ".join(f"--{k.replace('_', '-')} {brief(a, 40)} -> {brief(b, 40)}"
                              for k, (a, b) in refused.items())
            raise UserError(f"--resume {checkpoint}: settings differ from the run being resumed: "
                            f"{brief(diffs, 400)}. Drop them to resume with the run's own values, "
                            "or start a new run in another --output-dir")
        for k, (a, b) in allowed.items():
            if k != "resume":
                log.info("resume: %s changed from %s to %s", k, brief(a, 80), brief(b, 80))
    if set_aside:
        set_aside_newer(root, int(state["step"]))
    return checkpoint
