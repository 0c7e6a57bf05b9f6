"""Train TSD-SR (Dong et al., CVPR 2025, Alg. 1): a one-step SR student distilled from SD3.

    python examples/tsdsr/train.py --tiny                   # embedded tiny model, CPU, minutes
    accelerate launch examples/tsdsr/train.py --pretrained /path/to/sd3-medium \
        --hq-dir DATA/hq --embeds-dir DATA/embeds --val-hq-dir DATA/val --output-dir runs/tsdsr
    ... --resume latest                                     # continue from the last checkpoint

Exit status: 0 trained to --max-steps; 2 a usage or data error (one line names the flag or
file; nothing was trained), or a checkpoint that could not be written (a full disk: the earlier
ones are intact); 75 stopped by SIGTERM/SIGINT after a step, with a checkpoint written (rerun
with --resume latest). One run at a time writes into an --output-dir (a lock, held for the run).

Prompt embeddings (and optionally HQ latents) come from ``precompute.py``; text encoders never
load here. Checkpoints (``<output-dir>/checkpoints/step-N``) hold the student's
``transformer.safetensors`` + ``vae.safetensors`` (infer.py's ``--lora``), the fake score's
LoRA, the discriminator head's ``head.safetensors`` (``--regulariser f-kl/f-js/dmd2-gan``) and
the optimizer/scheduler state.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (accelerate launch examples/tsdsr/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from tqdm import tqdm

from examples.tsdsr.data import DegradationConfig, PairedSRDataset
from examples.tsdsr.precompute import precompute
from examples.tsdsr.training.checkpoint import (
    gather_lora,
    load_checkpoint,
    save_checkpoint,
    write_error,
)
from examples.tsdsr.training.config import TrainConfig, parse_config, save_config
from examples.tsdsr.training.data import CaptionedCrops, StepBatches, derive_seed, make_loader
from examples.tsdsr.training.models import build_models
from examples.tsdsr.training.preemption import Preempted, StopOnSignal, any_process
from examples.tsdsr.training.preflight import check_paths, check_tracker, one_run
from examples.tsdsr.training.resume import resume_point
from examples.tsdsr.training.scan import scan_training_data
from examples.tsdsr.training.sharding import (
    full_optimizer_state,
    shard_optimizer_state,
    shard_transformer,
)
from examples.tsdsr.training.step import Losses, Optimisation, train_step
from examples.tsdsr.training.validation import ValPair, load_val_pairs, validate
from scoredistill.cli import EXIT_OK, EXIT_PREEMPTED, UserError, entry_point
from scoredistill.optim import adamw, require
from scoredistill.sr.loading import load_prompts
from scoredistill.sr.tiling import vae_factor

log = logging.getLogger("tsdsr.train")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def prepare_tiny_data(config: TrainConfig, write: bool) -> TrainConfig:
    """The tiny default's folders (scikit-image photos, embeddings); ``write`` creates them."""
    from examples.tsdsr.data.tiny_data import write_tiny_data

    root = Path(config.output_dir)
    train, val = root / "data" / "hq", root / "data" / "val_hq"
    embeds = config.embeds_dir or str(root / "embeds")
    if write:
        write_tiny_data(root / "data")
        if config.embeds_dir is None:
            precompute(train, embeds)
    return dataclasses.replace(config, hq_dir=config.hq_dir or str(train), embeds_dir=embeds,
                               val_hq_dir=config.val_hq_dir or str(val))


def optimisation(params: list[torch.nn.Parameter], lr: float, config: TrainConfig,
                 world: int) -> Optimisation:
    """AdamW (or 8-bit AdamW: --optimizer) and the (per-process scaled, as accelerate steps it)
    warm-up + cosine schedule."""
    from diffusers.optimization import get_scheduler

    opt = adamw(config.optimizer, params, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                weight_decay=config.weight_decay, eps=config.adam_eps)
    sched = get_scheduler(config.lr_scheduler, opt, num_warmup_steps=config.lr_warmup_steps * world,
                          num_training_steps=config.max_steps * world,
                          num_cycles=config.lr_num_cycles)
    return Optimisation(opt, sched, params)


def check_parallelism(config: TrainConfig, accelerator: Any) -> None:
    """Refuse launches this script would not run as asked (UserError naming the fix)."""
    from accelerate.utils import DistributedType

    launched = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; MPI launchers set others
    if launched > 1 and accelerator.num_processes == 1:
        # Else every process would train alone on the same batches, silently.
        raise UserError(f"launched as {launched} processes, but accelerate set up "
                         f"{accelerator.num_processes}: on CPUs set ACCELERATE_USE_CPU=1 "
                         "(torchrun) or configure multi-CPU in `accelerate config`")
    kind = accelerator.distributed_type
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # Their plugins wrap one model per optimizer; here three LoRA roles share one backbone.
        raise UserError(f"accelerate's {kind.value} launch is not supported: launch as plain "
                         "multi-GPU and pass --fsdp to shard the transformer (FSDP2)")
    if config.fsdp and accelerator.num_processes < 2:
        raise UserError("--fsdp shards over processes: launch several (accelerate launch)")
    if config.fsdp and config.optimizer != "adamw":
        # bitsandbytes' 8-bit state is not sharded with FSDP2's DTensor weights here.
        raise UserError(f"--fsdp with --optimizer {config.optimizer} is not supported: use "
                        "--optimizer adamw")
    if config.fsdp and config.mixed_precision == "fp16":
        raise UserError("--fsdp with fp16 is not supported (the loss scaler is not wired for "
                         "sharded gradients): use --mixed-precision bf16")


def _hparams(config: TrainConfig) -> dict[str, object]:
    # TensorBoard's hparams take scalars and strings only.
    return {k: v if isinstance(v, int | float | str | bool) else str(v)
            for k, v in dataclasses.asdict(config).items()}


def training_data(accelerator: Any, config: TrainConfig, latent_factor: int | None,
                  validates: bool, degradation: DegradationConfig,
                  ) -> tuple[CaptionedCrops, list[ValPair]]:
    """The training items and validation pairs, every file checked first (training/scan.py):
    bad files are listed, then refused, or left out with ``--skip-bad-files``."""
    try:
        dataset = PairedSRDataset(config.hq_dir, config.lq_dir, crop_size=config.resolution,
                                  hflip=config.hflip)
    except ValueError as exc:  # no images at all, or two LQ files for one HQ image
        raise UserError(str(exc)) from None
    items = CaptionedCrops(dataset, config.embeds_dir, load_prompts(config.embeds_dir)["default"],
                           latent_factor=latent_factor)
    val_pairs, val_problems = (load_val_pairs(config.val_hq_dir, config.val_lq_dir,
                                              degradation=degradation)
                               if config.val_hq_dir and validates else ([], {}))
    context = {k: str(getattr(config, k)) for k in ("hq_dir", "lq_dir", "embeds_dir",
                                                     "resolution", "use_latents")}
    bad = scan_training_data(accelerator, items, val_problems, Path(config.output_dir), context,
                             config.dataloader_workers)
    if bad:
        for path, problem in bad.items():
            log.error("bad file %s: %s", path, problem)
        if not config.skip_bad_files:
            raise UserError(f"{len(bad)} bad training/validation file(s), listed above: fix or "
                            "remove them, or pass --skip-bad-files to train on the others")
        log.warning("--skip-bad-files: training without the %d bad file(s) listed above",
                    len(bad))
        try:
            items.dataset = dataset.without(set(bad))
        except ValueError as exc:
            raise UserError(str(exc)) from None
    return items, val_pairs


def train(config: TrainConfig) -> Path:
    """Run (or resume) training; return the output folder. Raises UserError for usage and data
    errors (before any model loads where it can) and Preempted after a SIGTERM/SIGINT stop."""
    from accelerate import Accelerator

    if config.pretrained is None and not config.tiny:
        raise UserError("give --pretrained /path/to/sd3 (a local diffusers folder) or --tiny")
    check_tracker(config.report_to)
    try:
        require(config.optimizer)  # before any model loads
    except ValueError as exc:
        raise UserError(f"--optimizer {config.optimizer}: {exc}") from None
    check_paths(config)  # the paths given; --tiny's own are made below
    out = Path(config.output_dir)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, project_dir=str(out),
                              log_with=None if config.report_to == "none" else config.report_to)
    # Every way out ends the trackers and the process group: a gloo group left to interpreter
    # exit can abort the process ("terminate called without an active exception").
    try:
        check_parallelism(config, accelerator)
        with one_run(out, accelerator):  # before anything is written into --output-dir
            return _train(config, accelerator)
    finally:
        accelerator.end_training()


def main_process_writes(accelerator: Any, what: str, write: Callable[[], object]) -> None:
    """``write()`` on the main process; a file-system failure there (a full disk, a lost folder:
    `write_error`) stops every process with one line (a collective: none waits for it)."""
    failed = None
    if accelerator.is_main_process:
        try:
            write()
        except UserError as exc:
            failed = exc
        except Exception as exc:
            problem = write_error(exc)
            if problem is None:
                raise
            failed = UserError(f"cannot write {what} ({problem}): make room or fix the folder, "
                               "then rerun (with --resume latest once a checkpoint exists)")
    if any_process(accelerator, failed is not None):
        raise failed or UserError(f"process 0 could not write {what} (see its message)")


def _train(config: TrainConfig, accelerator: Any) -> Path:
    """:func:`train` after its checks, with the output folder locked for this run."""
    from accelerate.utils import set_seed

    out = Path(config.output_dir)
    if config.tiny:
        config = prepare_tiny_data(config, write=accelerator.is_main_process)
        accelerator.wait_for_everyone()
    if config.hq_dir is None or config.embeds_dir is None:
        raise UserError("--hq-dir and --embeds-dir (from precompute.py) are required")
    ckpt_root = out / "checkpoints"
    resume_from = resume_point(config, ckpt_root, set_aside=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    set_seed(config.seed)  # the LoRA initialisation
    models = build_models(config, DTYPES[config.mixed_precision], device)
    prompts = {name: {k: v.float() for k, v in cond.items()}
               for name, cond in load_prompts(config.embeds_dir, device).items()}
    losses = Losses.from_config(config)
    start, skipped = 0, {"generator": 0, "fake": 0}
    # LoRA weights load into the whole modules, before sharding; optimizers are built after it,
    # over the sharded parameters.
    state = load_checkpoint(resume_from, models) if resume_from is not None else None
    sharded = shard_transformer(models.roles.backbone.module) if config.fsdp else []
    student = optimisation(models.student_parameters(), config.lr, config, world)
    fake = optimisation(models.fake_parameters(), config.lr_fake, config, world)
    student.optimizer, fake.optimizer, student.scheduler, fake.scheduler = accelerator.prepare(
        student.optimizer, fake.optimizer, student.scheduler, fake.scheduler)

    if state is not None:
        for opt, name in ((student, "student"), (fake, "fake")):
            opt.optimizer.load_state_dict(state[f"{name}_optimizer"])
            if sharded:
                shard_optimizer_state(opt.optimizer)
            opt.scheduler.load_state_dict(state[f"{name}_scheduler"])
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        start, skipped = state["step"], state["skipped"]
        log.info("resumed from %s at step %d", resume_from, start)
        if start >= config.max_steps:
            log.warning("%s is at step %d, --max-steps is %d: nothing to train (raise "
                        "--max-steps to continue)", resume_from, start, config.max_steps)

    # A sharded transformer runs only with every process taking part: all validate then.
    validates = accelerator.is_main_process or bool(sharded)
    degradation = DegradationConfig(jpeg_codec=config.jpeg_codec)
    items, val_pairs = training_data(accelerator, config,
                                     vae_factor(models.vae) if config.use_latents else None,
                                     validates, degradation)
    loader = make_loader(items, StepBatches(len(items), config.batch_size, config.seed, start,
                                            config.max_steps, rank, world),
                         config.dataloader_workers, degradation)

    def save(step: int) -> Path:
        # Gathering FSDP shards is collective: every process runs it, the main one writes.
        state = {f"{n}_{part}": (full_optimizer_state(o.optimizer) if sharded and part ==
                                 "optimizer" else getattr(o, part).state_dict())
                 for n, o in (("student", student), ("fake", fake))
                 for part in ("optimizer", "scheduler")}
        lora = gather_lora(models) if sharded else None

        def write() -> None:
            state["scaler"] = accelerator.scaler.state_dict() if accelerator.scaler else None
            save_checkpoint(ckpt_root, step, models, {**state, "skipped": dict(skipped),
                                                      "config": dataclasses.asdict(config)},
                            config.checkpoints_keep, lora=lora)

        main_process_writes(accelerator, f"checkpoint step {step}", write)
        return ckpt_root / f"step-{step:08d}"

    def run_validation(step: int) -> None:
        if val_pairs:
            metrics = validate(models, val_pairs, prompts["default"], out / "validation", step,
                               device, write=accelerator.is_main_process)
            accelerator.log(metrics, step=step)
            if accelerator.is_main_process:
                log.info("step %d validation: %s", step, metrics)

    main_process_writes(accelerator, str(out / "config.json"), lambda: (
        out.mkdir(parents=True, exist_ok=True), save_config(config, out / "config.json")))
    accelerator.init_trackers("tsdsr", config=_hparams(config))
    with StopOnSignal() as stop:  # before the loader's workers start, so they inherit it
        if start == 0:
            run_validation(0)
        bar = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps,
                   desc="training", disable=not accelerator.is_local_main_process)
        for step, batch in zip(bar, loader, strict=False):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            generator = torch.Generator(device).manual_seed(derive_seed(config.seed, step, rank,
                                                                        2))
            logs = train_step(accelerator, models, losses, config, batch, prompts, student, fake,
                              generator, step % config.fake_updates_per_generator == 0)
            for name in skipped:
                if logs[f"skipped/{name}"]:
                    skipped[name] += 1
                    log.warning("step %d: non-finite %s loss, update skipped (%d so far)",
                                step + 1, name, skipped[name])
            done = step + 1
            if done % config.log_every == 0 or done == config.max_steps:
                logs.update({"lr/student": student.scheduler.get_last_lr()[0],
                             "lr/fake": fake.scheduler.get_last_lr()[0],
                             **{f"skipped_total/{k}": v for k, v in skipped.items()}})
                accelerator.log(logs, step=done)
                bar.set_postfix({k[5:]: f"{logs[k]:.4f}"
                                 for k in ("loss/generator", "loss/fake") if k in logs})
            saved = done % config.checkpoint_every == 0 or done == config.max_steps
            if saved:
                save(done)
            if stop.requested(accelerator):
                checkpoint = ckpt_root / f"step-{done:08d}" if saved else save(done)
                raise Preempted(stop.signal_name, done, checkpoint)
            if done % config.validate_every == 0 or done == config.max_steps:
                run_validation(done)
    return out


@entry_point("train")
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; the exit status is 0 (done), 2 (usage or data error) or 75 (stopped by
    a signal, checkpoint written)."""
    config = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train(config)
    except Preempted as exc:
        log.warning("%s", exc)
        return EXIT_PREEMPTED
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
