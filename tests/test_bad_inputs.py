"""Bad inputs and faults, one row each (issue #14): what the user gets back, and what is left as
it was.

A CLI row runs a script's ``main(argv)`` in-process on a copy of a small workspace
(tests/bad_input_files.py) and checks the exit status, words of the message (stderr and logs),
that no traceback was printed and no exception escaped, that a usage error (status 2) ends in
one ``prog: error: ...`` line, and that the listed files are byte-for-byte unchanged. A library
row expects an exception class and words, and a short message.
"""

from __future__ import annotations

import math
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from examples.tsdsr import evaluate, infer, precompute, train
from examples.tsdsr.models.tiny import random_backbone
from examples.tsdsr.training import models
from scoredistill import (
    CFG,
    DASMSampler,
    DiffusionLoss,
    DMDLoss,
    GaussianMixture,
    LogitNormalIndex,
    ModeIndex,
    RectifiedFlow,
    SDSLoss,
    TSDLoss,
    UniformIndex,
    VSDLoss,
    one_step,
    resolution_shift,
)
from tests import bad_input_files as files
from tests.bad_input_files import EVAL, INFER, TRAIN
from tests.helpers import TinyNet
from tests.losses.test_boundary import Bent, Constant

CLIS = {"train": train.main, "infer": infer.main, "evaluate": evaluate.main,
        "precompute": precompute.main}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@dataclass(frozen=True)
class Case:
    """One bad input: ``argv`` ({ws} is the workspace), the exit status, words expected in the
    output, workspace paths that must not change, and optional setup and extra checks."""

    id: str
    cli: str
    argv: tuple[str, ...]
    status: int
    words: tuple[str, ...]
    unchanged: tuple[str, ...] = ()
    setup: files.Setup | None = None
    check: files.Check | None = None
    marks: tuple = ()


SMALL = files.call(files.png, "{ws}/hq/small.png", 32, 32)
CORRUPT = files.call(files.truncate, "{ws}/hq/b.png")
LATIN1 = files.write_text("hq/a.txt", "un café rouge", "latin-1")
DAMAGED = files.call(files.truncate, "{ws}/run/checkpoints/step-00000002/transformer.safetensors")
UNCHANGED_RUN = ("run/config.json", "run/checkpoints")
CASES = [
    # train.py: values checked at parse time, before anything loads.
    Case("train batch-size 0", "train", (*TRAIN, "--batch-size", "0"), 2, ("--batch-size", ">= 1")),
    Case("train checkpoint-every 0", "train", (*TRAIN, "--checkpoint-every", "0"), 2,
         ("--checkpoint-every", ">= 1")),
    Case("train tsd-lambda 1.5", "train", (*TRAIN, "--tsd-lambda", "1.5"), 2,
         ("--tsd-lambda", "<= 1")),
    Case("train lr -1", "train", (*TRAIN, "--lr", "-1"), 2, ("--lr", "> 0")),
    Case("train lr nan", "train", (*TRAIN, "--lr", "nan"), 2, ("--lr", "finite")),
    Case("train unknown config key", "train", (*TRAIN, "--config", "{ws}/run.yaml"), 2,
         ("run.yaml", "unknown key", "learning_rate"),
         setup=files.write_text("run.yaml", "learning_rate: 1e-5\n", "utf-8")),
    Case("train malformed yaml", "train", (*TRAIN, "--config", "{ws}/run.yaml"), 2,
         ("run.yaml", "not valid yaml", "line 2"),
         setup=files.write_text("run.yaml", "lr: 1e-5\n  max_steps: [\n", "utf-8")),
    Case("train config value of wrong type", "train", (*TRAIN, "--config", "{ws}/run.yaml"), 2,
         ("run.yaml", "batch_size must be an integer"),
         setup=files.write_text("run.yaml", "batch_size: two\n", "utf-8")),
    Case("train missing config file", "train", (*TRAIN, "--config", "{ws}/nope.yaml"), 2,
         ("nope.yaml", "cannot read")),
    # Paths checked before the model loads.
    Case("train missing hq-dir", "train", (*TRAIN, "--hq-dir", "{ws}/nope"), 2,
         ("--hq-dir", "nope", "does not exist")),
    Case("train missing embeds-dir", "train", (*TRAIN, "--embeds-dir", "{ws}/nope"), 2,
         ("--embeds-dir", "does not exist")),
    Case("train embeds-dir not precomputed", "train", (*TRAIN, "--embeds-dir", "{ws}/empty"), 2,
         ("--embeds-dir", "prompts.safetensors", "precompute")),
    Case("train missing pretrained", "train", ("--pretrained", "{ws}/nope", *TRAIN[1:]), 2,
         ("--pretrained", "does not exist")),
    Case("train pretrained not an SD3 folder", "train", ("--pretrained", "{ws}/empty",
                                                         *TRAIN[1:]), 2,
         ("--pretrained", "transformer/config.json")),
    Case("train report-to wandb without wandb", "train", (*TRAIN, "--report-to", "wandb"), 2,
         ("wandb is not installed", "--report-to none"),
         marks=(pytest.mark.skipif(bool(__import__("importlib").util.find_spec("wandb")),
                                   reason="wandb is installed"),)),
    Case("train output-dir is a file", "train", (*TRAIN, "--output-dir", "{ws}/hq/a.png"), 2,
         ("--output-dir", "is a file"), unchanged=("hq/a.png",)),
    # Training data scanned before the first step: every bad file listed.
    Case("train image smaller than the crop", "train", (*TRAIN, "--output-dir", "{ws}/new"), 2,
         ("small.png is 32x32, smaller than the 64 crop", "--skip-bad-files"), setup=SMALL),
    Case("train corrupt image", "train", (*TRAIN, "--output-dir", "{ws}/new"), 2,
         ("cannot read image", "b.png", "1 bad"), setup=CORRUPT),
    Case("train latin-1 caption", "train", (*TRAIN, "--output-dir", "{ws}/new"), 2,
         ("a.txt is not utf-8", "0xe9"), setup=LATIN1),
    Case("train all bad files listed at once", "train", (*TRAIN, "--output-dir", "{ws}/new"), 2,
         ("small.png", "b.png", "a.txt", "3 bad"), setup=files.both(SMALL, CORRUPT, LATIN1)),
    Case("train --skip-bad-files trains on the rest", "train",
         (*TRAIN, "--output-dir", "{ws}/new", "--skip-bad-files", "--max-steps", "1"), 0,
         ("training without the 1 bad file",), setup=SMALL),
    Case("train bad validation image", "train",
         (*TRAIN, "--output-dir", "{ws}/new", "--val-hq-dir", "{ws}/val"), 2,
         ("tiny.png is 8x8, smaller than 16 px",),
         setup=files.call(files.png, "{ws}/val/tiny.png", 8, 8)),
    Case("train BOM caption equals the caption", "train",
         (*TRAIN, "--output-dir", "{ws}/new", "--max-steps", "1"), 0, (),
         setup=files.write_text("hq/a.txt", "\ufeffa red cat\n", "utf-8")),
    # Resume semantics.
    Case("train resume with a changed lr", "train", (*TRAIN, "--resume", "latest", "--lr", "5e-4"),
         2, ("--lr 0.001 -> 0.0005", "another --output-dir"), unchanged=UNCHANGED_RUN),
    Case("train fresh run into a folder with checkpoints", "train", TRAIN, 2,
         ("already holds checkpoints", "--resume latest"), unchanged=UNCHANGED_RUN),
    Case("train missing resume path", "train", (*TRAIN, "--resume", "{ws}/nope"), 2,
         ("--resume", "no such checkpoint")),
    Case("train damaged newest checkpoint falls back", "train",
         (*TRAIN, "--resume", "latest", "--max-steps", "3"), 0,
         ("skipping damaged checkpoint step-00000002", "transformer.safetensors"),
         setup=DAMAGED, check=files.ckpts("step-00000001", "step-00000002", "step-00000003",
                                     aside="step-00000002")),
    Case("train damaged checkpoint named by --resume", "train",
         (*TRAIN, "--resume", "{ws}/run/checkpoints/step-00000002"), 2,
         ("is damaged", "step-00000002/transformer.safetensors"), setup=DAMAGED),
    Case("train resume from an older step keeps the new line", "train",
         (*TRAIN, "--resume", "{ws}/run/checkpoints/step-00000001", "--max-steps", "3",
          "--checkpoints-keep", "1"), 0, ("moved the later checkpoints step-00000002",),
         check=files.ckpts("step-00000003", aside="step-00000002")),
    Case("train SIGTERM mid-run: checkpoint, exit 75", "train",
         (*TRAIN, "--output-dir", "{ws}/new", "--max-steps", "3", "--checkpoint-every", "2"), 75,
         ("stopped by SIGTERM after step 1", "--resume latest"),
         setup=files.signal_in_step(1, signal.SIGTERM),
         check=files.ckpts("step-00000001", run="new")),
    # issue 21 (training)
    Case("train resume latest with no checkpoint starts a new run", "train",
         (*TRAIN, "--output-dir", "{ws}/new", "--resume", "latest", "--max-steps", "1"), 0,
         ("--resume latest: no checkpoint in", "a new run, starting at step 0"),
         check=files.ckpts("step-00000001", run="new")),
    Case("train every checkpoint damaged", "train", (*TRAIN, "--resume", "latest"), 2,
         ("every checkpoint in", "is damaged (step-00000002, step-00000001;",
          "step-00000001/vae.safetensors"),
         setup=files.both(DAMAGED, files.call(
             files.truncate, "{ws}/run/checkpoints/step-00000001/vae.safetensors")),
         unchanged=UNCHANGED_RUN),
    Case("train damaged newest vae.safetensors falls back", "train",
         (*TRAIN, "--resume", "latest", "--max-steps", "3"), 0,
         ("skipping damaged checkpoint step-00000002", "vae.safetensors"),
         setup=files.call(files.truncate, "{ws}/run/checkpoints/step-00000002/vae.safetensors"),
         check=files.ckpts("step-00000001", "step-00000002", "step-00000003",
                           aside="step-00000002")),
    Case("train disk full at checkpoint save", "train", (*TRAIN, "--output-dir", "{ws}/new"), 2,
         ("cannot write checkpoint", "step-00000001 (no space left on device)",
          "--resume latest"),
         setup=files.disk_full_at_save(OSError(28, "No space left on device")),
         check=files.no_checkpoint("new")),
    Case("train disk full at checkpoint save (safetensors)", "train",
         (*TRAIN, "--output-dir", "{ws}/new"), 2,
         ("cannot write checkpoint", "step-00000001 (no space left on device)"),
         setup=files.disk_full_at_save(files.SAFETENSORS_DISK_FULL),
         check=files.no_checkpoint("new")),
    Case("train disk full at config.json", "train", (*TRAIN, "--output-dir", "{ws}/new"), 2,
         ("cannot write", "new/config.json (no space left on device)"),
         setup=files.disk_full_at("examples.tsdsr.train", "save_config")),
    Case("train disk full at a validation picture, training goes on", "train",
         (*TRAIN, "--output-dir", "{ws}/new", "--max-steps", "1", "--val-hq-dir", "{ws}/hq"), 0,
         ("could not write validation image", "no space left on device"),
         setup=files.disk_full_at("examples.tsdsr.training.validation", "save_png")),
    Case("train checkpoint mode follows the umask", "train",
         (*TRAIN, "--output-dir", "{ws}/new", "--max-steps", "1"), 0, (),
         check=files.checkpoint_mode_follows_umask),
    # infer.py
    Case("infer upscale 0", "infer", (*INFER, "--upscale", "0"), 2, ("--upscale", "> 0")),
    Case("infer upscale nan", "infer", (*INFER, "--upscale", "nan"), 2, ("--upscale", "finite")),
    Case("infer odd latent tile", "infer", (*INFER, "--latent-tile", "63", "8"), 2,
         ("--latent-tile 63 8", "even")),
    Case("infer device cuda without a gpu", "infer", (*INFER, "--device", "cuda"), 2,
         ("--device", "cuda is not available"), marks=(NO_CUDA,)),
    Case("infer out is a file", "infer", (*INFER[:2], "{ws}/hq/a.png", *INFER[3:]), 2,
         ("--out", "is a file"), unchanged=("hq/a.png",)),
    Case("infer out not writable", "infer", (*INFER[:2], "/sys/scoredistill-out", *INFER[3:]), 2,
         ("--out", "not writable")),
    Case("infer missing input", "infer", ("{ws}/nope", *INFER[1:]), 2, ("nope", "no file")),
    Case("infer empty input folder", "infer", ("{ws}/empty", *INFER[1:]), 2, ("holds no images",)),
    Case("infer missing lora", "infer", (*INFER, "--lora", "{ws}/nope"), 2, ("--lora", "nope")),
    Case("infer missing embeds", "infer", (*INFER, "--embeds", "{ws}/nope"), 2, ("--embeds",)),
    Case("infer pretrained not an SD3 folder", "infer", (*INFER, "--pretrained", "{ws}/empty"),
         2, ("transformer/config.json",)),
    Case("infer truncated lora file", "infer", (*INFER, "--lora", "{ws}/ckpt"), 2,
         ("cannot read lora file", "ckpt/transformer.safetensors"),
         setup=files.call(files.checkpoint_with_truncated_lora, "{ws}/ckpt")),
    Case("infer exif-rotated jpeg is upright", "infer", INFER, 0, (),
         setup=files.both(files.call(files.exif_rotated_jpeg, "{ws}/lq/phone.jpg")),
         check=files.outputs("phone.png", "x.png", "y.png", size=(64, 96))),
    Case("infer 16-bit png bomb, folder goes on", "infer", INFER, 1,
         ("bomb.png", "14000x14000 = 196,000,000 pixels", "--max-pixels"),
         setup=files.call(files.png16_bomb, "{ws}/lq/bomb.png"),
         check=files.outputs("x.png", "y.png")),
    Case("infer max-pixels", "infer", (*INFER, "--max-pixels", "300"), 1,
         ("x.png", "above the limit of 300"), check=files.outputs("y.png")),
    Case("infer animated gif", "infer", ("{ws}/anim.gif", *INFER[1:]), 0,
         ("anim.gif has 3 frames", "only the first"),
         setup=files.call(files.frames, "{ws}/anim.gif"), check=files.outputs("anim.png")),
    Case("infer multi-page tiff", "infer", INFER, 0, ("pages.tif has 2 frames",),
         setup=lambda ws, mp: files.frames(ws / "lq" / "pages.tif", 2)),
    Case("infer gpu out of memory, folder goes on", "infer", INFER, 1,
         ("x.png", "outofmemoryerror", "out of memory"),
         setup=files.fail_on("x.png", torch.OutOfMemoryError("CUDA out of memory")),
         check=files.outputs("y.png")),
    Case("infer host out of memory, folder goes on", "infer", INFER, 1,
         ("x.png", "can't allocate memory"),
         setup=files.fail_on("x.png", RuntimeError("DefaultCPUAllocator: can't allocate memory")),
         check=files.outputs("y.png")),
    Case("infer output mode follows the umask", "infer", INFER, 0, (),
         check=files.mode_follows_umask),
    # issue 21 (SR CLI)
    Case("infer existing output kept without --overwrite", "infer", INFER, 2,
         ("1 output file(s) already exist", "x.png", "--skip-existing", "--overwrite"),
         unchanged=("out/x.png",), setup=files.call(files.png, "{ws}/out/x.png", 8, 8),
         check=files.outputs("x.png")),
    Case("infer --overwrite replaces", "infer", (*INFER, "--overwrite"), 0, (),
         setup=files.call(files.png, "{ws}/out/x.png", 8, 8),
         check=files.outputs("x.png", "y.png", size=(96, 80))),
    Case("infer --skip-existing does only the missing ones", "infer", (*INFER, "--skip-existing"),
         0, ("skipping 1 existing output",), unchanged=("out/x.png",),
         setup=files.call(files.png, "{ws}/out/x.png", 8, 8),
         check=files.outputs("x.png", "y.png")),
    Case("infer --overwrite with --skip-existing", "infer",
         (*INFER, "--overwrite", "--skip-existing"), 2, ("not allowed with",)),
    Case("infer fp8 on the cpu", "infer", (*INFER, "--fp8", "--device", "cpu"), 2,
         ("--fp8", "needs a cuda gpu", "drop --fp8")),
    Case("infer corrupt pretrained weights", "infer", (*INFER, "--pretrained", "{ws}/sd3"), 2,
         ("--pretrained", "sd3/vae/diffusion_pytorch_model.safetensors is damaged"),
         setup=files.call(files.sd3_folder, "{ws}/sd3", "vae")),
    Case("infer embeds of the wrong width", "infer", (*INFER, "--embeds", "{ws}/emb"), 2,
         ("--embeds", "prompt_embeds are 33 wide but the transformer takes 32"),
         setup=files.call(files.embeds_pt, "{ws}/emb", 1)),
    Case("infer pickled embeds refused in one line", "infer", (*INFER, "--embeds", "{ws}/emb"), 2,
         ("--embeds", "refusing to load", "prompt_embeds.pt", "torch.save(tensor"),
         setup=files.call(files.embeds_pt, "{ws}/emb", 0, "{ws}/ran"), check=files.absent("ran")),
    Case("infer lora for another module", "infer", (*INFER, "--lora", "{ws}/ckpt"), 2,
         ("--lora", "ckpt/transformer.safetensors"),
         setup=files.call(files.checkpoint_with_vae_lora_as_transformer, "{ws}/ckpt")),
    Case("infer upscale 0.001, folder goes on", "infer", (*INFER, "--upscale", "0.001"), 1,
         ("x.png", "makes this 24x20 px image 0x0 px", "upscale above 0.025"),
         setup=files.call(files.png, "{ws}/lq/big.png", 520, 520),
         check=files.outputs("big.png")),
    Case("infer same-stem clash: the readable one goes through", "infer", INFER, 1,
         ("x.jpg", "cannot read image"),
         setup=files.both(files.call(files.exif_rotated_jpeg, "{ws}/lq/x.jpg"),
                          files.call(files.truncate, "{ws}/lq/x.jpg")),
         check=files.outputs("x.png", "y.png", size=(96, 80))),
    Case("infer same-stem clash of two readable files", "infer", INFER, 1,
         ("x.png", "already the output of another input, x.jpg"),
         setup=files.call(files.exif_rotated_jpeg, "{ws}/lq/x.jpg"),
         check=files.outputs("x.png", "y.png", size=(64, 96))),
    # evaluate.py
    Case("evaluate sr equals hr", "evaluate", ("--sr", "{ws}/hr", *EVAL[2:]), 2,
         ("same folder",)),
    Case("evaluate empty sr", "evaluate", ("--sr", "{ws}/empty", *EVAL[2:]), 2,
         ("--sr", "holds no images")),
    Case("evaluate missing hr", "evaluate", (*EVAL[:3], "{ws}/nope", *EVAL[4:]), 2,
         ("--hr", "no folder")),
    Case("evaluate unknown metric", "evaluate", (*EVAL, "--metrics", "psnr,brisque"), 2,
         ("--metrics", "brisque")),
    Case("evaluate device cuda without a gpu", "evaluate", (*EVAL, "--device", "cuda"), 2,
         ("cuda is not available",), marks=(NO_CUDA,)),
    Case("evaluate out is a file", "evaluate", (*EVAL, "--out", "{ws}/hq/a.png"), 2,
         ("--out", "is a file"), unchanged=("hq/a.png",)),
    # precompute.py
    Case("precompute latin-1 caption, others go on", "precompute",
         ("--hq-dir", "{ws}/hq", "--out", "{ws}/e2"), 1, ("a.png", "a.txt is not utf-8"),
         setup=LATIN1, check=files.prompts_without_a),
    Case("precompute BOM caption equals the caption", "precompute",
         ("--hq-dir", "{ws}/hq", "--out", "{ws}/e2"), 0, (),
         setup=files.write_text("hq/a.txt", "\ufeffa red cat\n", "utf-8"),
         check=files.same_embeddings),
    Case("precompute missing hq-dir", "precompute", ("--hq-dir", "{ws}/nope", "--out", "{ws}/e"),
         2, ("--hq-dir", "no folder")),
    Case("precompute empty hq-dir", "precompute", ("--hq-dir", "{ws}/empty", "--out", "{ws}/e"),
         2, ("holds no images",)),
    Case("precompute batch-size 0", "precompute",
         ("--hq-dir", "{ws}/hq", "--out", "{ws}/e", "--batch-size", "0"), 2, ("--batch-size",)),
    # issue 21 (recipe data and scripts)
    Case("evaluate earlier report kept without --overwrite", "evaluate",
         (*EVAL, "--out", "{ws}/rep"), 2, ("--overwrite", "metrics.json"), unchanged=("rep",),
         setup=files.earlier_file("rep/metrics.json")),
    Case("evaluate --overwrite replaces", "evaluate", (*EVAL, "--out", "{ws}/rep", "--overwrite"),
         0, (), setup=files.earlier_file("rep/metrics.json"),
         check=files.replaced("rep/metrics.json")),
    Case("precompute earlier embeddings kept without --overwrite", "precompute",
         ("--hq-dir", "{ws}/hq", "--out", "{ws}/embeds"), 2,
         ("--overwrite", "prompts.safetensors", "images/a.safetensors"), unchanged=("embeds",)),
    Case("precompute --overwrite replaces", "precompute",
         ("--hq-dir", "{ws}/hq", "--out", "{ws}/embeds", "--overwrite"), 0, (),
         setup=files.earlier_file("embeds/prompts.safetensors"),
         check=files.replaced("embeds/prompts.safetensors")),
    Case("precompute one caption, one embedding", "precompute",  # bad case 6: T5 dropout on
         ("--hq-dir", "{ws}/hq", "--out", "{ws}/e2"), 0, (),
         setup=files.write_text("hq/b.txt", "a red cat\n", "utf-8"),
         check=files.same_caption_same_embeddings),
    Case("train truncated teacher-lora", "train",
         (*TRAIN, "--output-dir", "{ws}/new", "--teacher-lora",
          "{ws}/ckpt/transformer.safetensors"), 2,
         ("--teacher-lora", "cannot read lora file", "ckpt/transformer.safetensors"),
         setup=files.call(files.checkpoint_with_truncated_lora, "{ws}/ckpt")),
    Case("train pickle as lpips-backbone refused unrun", "train",
         (*TRAIN, "--output-dir", "{ws}/new", "--lpips-backbone", "{ws}/alexnet.pth"), 2,
         ("--lpips-backbone", "alexnet.pth", "pickled objects", "state_dict()"),
         setup=files.call(files.pickled_state, "{ws}/alexnet.pth", "{ws}/ran"),
         check=files.absent("ran")),
    Case("train image damaged in place after the data check is skipped", "train",
         (*TRAIN, "--output-dir", "{ws}/new", "--max-steps", "1", "--batch-size", "3"), 0,
         ("skipping", "b.png", "passed the data check"), setup=files.damage_after_scan("hq/b.png")),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_backbone", lambda pretrained, dtype, device:
                   random_backbone("tiny", dtype=dtype, device=device))
        return files.build_base(tmp_path_factory.mktemp("base"), train.main)


def _snapshot(paths: list[Path]) -> dict[str, tuple[bytes, int]]:
    found = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {str(f): (f.read_bytes(), f.stat().st_mode) for f in found if f.is_file()}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_cli_row(case, base, tmp_path, monkeypatch, capsys, caplog):
    ws = files.copy_base(base, tmp_path / "ws")
    monkeypatch.setattr(models, "load_backbone", lambda pretrained, dtype, device:
                        random_backbone("tiny", dtype=dtype, device=device))
    monkeypatch.setattr(infer, "fitted_backbone", lambda dtype, device:
                        random_backbone("tiny", dtype=dtype, device=device))
    if case.setup is not None:
        case.setup(ws, monkeypatch)
    before = _snapshot([ws / p for p in case.unchanged])
    try:
        status = CLIS[case.cli]([a.format(ws=ws) for a in case.argv])
    except SystemExit as exc:  # argparse
        status = exc.code
    captured = capsys.readouterr()
    text = "\n".join((captured.err, captured.out, caplog.text))
    assert "Traceback" not in text
    assert status == case.status, text[-3000:]
    for word in case.words:
        assert word.lower() in text.lower(), (word, text[-3000:])
    if case.status == 2:
        last = captured.err.strip().splitlines()[-1]
        assert last.startswith(f"{case.cli}: error: "), last
    assert _snapshot([ws / p for p in case.unchanged]) == before
    if case.check is not None:
        case.check(ws)


def _nan_model(like: TinyNet) -> TinyNet:
    bad = TinyNet(like.prediction, like.schedule, seed=like.seed)
    bad.w2 = torch.full_like(bad.w2, math.nan)
    return bad


@pytest.fixture(scope="module")
def lib():
    g = torch.Generator().manual_seed(0)
    teacher, fake = (TinyNet("flow", RectifiedFlow(), seed=s) for s in (0, 1))
    z_hat, z = torch.randn(2, 4, 6, generator=g).unbind(0)
    return dict(teacher=teacher, fake=fake, z_hat=z_hat, z=z, cond=torch.randn(4, 3, generator=g),
                index=torch.tensor([50, 300, 700, 900]))


def _tsd(d, **over):
    kw = dict(teacher=d["teacher"], fake=d["fake"], z=d["z"], index=d["index"])
    kw.update(over)
    z_hat, cond = kw.pop("z_hat", d["z_hat"]), kw.pop("cond", d["cond"])
    return TSDLoss(dasm=DASMSampler())(z_hat, cond, **kw)


def _diffusion(d, x0=None, **over):
    kw = dict(model=d["fake"], index=d["index"])
    kw.update(over)
    return DiffusionLoss()(d["z_hat"] if x0 is None else x0, d["cond"], **kw)


def _sr_pipe():
    """A TSDSRPipeline on the random tiny model (its input checks run before the model)."""
    from scoredistill.sr.loading import load_model
    from scoredistill.sr.pipeline import TSDSRPipeline

    return TSDSRPipeline(load_model(random_backbone()), tiles=None)


LIBRARY = [  # (id, call, exception, words)
    ("empty batch TSD", lambda d: _tsd(d, z_hat=d["z_hat"][:0], z=d["z"][:0],
                                       cond=d["cond"][:0], index=d["index"][:0]),
     ValueError, "z_hat is an empty batch"),
    ("empty batch diffusion", lambda d: _diffusion(d, d["z_hat"][:0], index=d["index"][:0]),
     ValueError, "x0 is an empty batch"),
    ("diffusion names x0", lambda d: _diffusion(d, d["z_hat"].long()), ValueError,
     "x0 must be a floating"),
    ("diffusion names x0 for noise", lambda d: _diffusion(d, noise=torch.zeros(4, 5)), ValueError,
     "noise has shape (4, 5) but x0 has (4, 6)"),
    ("teacher returns nan", lambda d: _tsd(d, teacher=_nan_model(d["teacher"])),
     FloatingPointError, "the teacher returned nan"),
    ("fake returns nan", lambda d: _tsd(d, fake=_nan_model(d["fake"])), FloatingPointError,
     "the fake returned nan"),
    ("diffusion model returns nan", lambda d: _diffusion(d, model=_nan_model(d["fake"])),
     FloatingPointError, "the model returned nan"),
    ("long dasm trajectory message", lambda d: DASMSampler(2000, 1, (1.0,) * 2000).indices(
        torch.tensor([50]), 1000, torch.tensor([0])), ValueError, "2000 items"),
    ("cfg null_cond None", lambda d: CFG(d["teacher"], 7.5, None)(d["z"], d["index"], d["cond"]),
     ValueError, "null_cond"),
    ("cfg scale nan", lambda d: CFG(d["teacher"], math.nan, d["cond"][:1]), ValueError,
     "finite number"),
    ("cfg null_cond of another structure", lambda d: CFG(d["teacher"], 2.0, {"a": d["cond"]})(
        d["z"], d["index"], {"b": d["cond"]}), ValueError, "keys ['b'] vs ['a']"),
    # issue 21 (library): model outputs of another shape were broadcast (bad case 5)
    ("diffusion model returns (B, 1)", lambda d: _diffusion(d, model=Bent(d["fake"],
                                                                       lambda x: x[:, :1])),
     ValueError, "the model returned a prediction of shape (4, 1) for x_t of shape (4, 6)"),
    ("diffusion model returns batch 1", lambda d: _diffusion(d, model=Bent(d["fake"],
                                                                        lambda x: x[:1])),
     ValueError, "the model returned a prediction of shape (1, 6) for x_t of shape (4, 6)"),
    ("vsd fake returns batch 1", lambda d: VSDLoss()(
        d["z_hat"], d["cond"], teacher=d["teacher"], fake=Bent(d["fake"], lambda x: x[:1]),
        index=d["index"]), ValueError, "the fake returned a prediction of shape (1, 6)"),
    ("tsd teacher returns 1 channel", lambda d: _tsd(d, teacher=Bent(d["teacher"],
                                                                     lambda x: x[:, :1])),
     ValueError, "the teacher (one call for 2 evaluations) returned a prediction of shape (8, 1)"),
    ("one_step student returns batch 1", lambda d: one_step(Bent(d["teacher"], lambda x: x[:1]),
                                                            d["z_hat"], d["cond"]),
     ValueError, "the student returned a prediction of shape (1, 6)"),
    # issue 21 (library): bad shifts and sampler parameters (bad cases 3, 4)
    ("negative shift", lambda d: RectifiedFlow(shift=-1.0), ValueError,
     "RectifiedFlow shift must be a finite number > 0, got -1.0"),
    ("nan shift", lambda d: RectifiedFlow(shift=math.nan), ValueError, "shift must be a finite"),
    ("nan resolution shift", lambda d: resolution_shift(4096, max_shift=math.nan), ValueError,
     "resolution_shift(4096"),
    ("logit-normal mean nan", lambda d: LogitNormalIndex(mean=math.nan), ValueError,
     "LogitNormalIndex mean must be a finite number"),
    ("mode scale nan", lambda d: ModeIndex(scale=math.nan), ValueError,
     "ModeIndex scale must be a finite number"),
    ("uniform bound nan", lambda d: UniformIndex(low=math.nan), ValueError,
     "UniformIndex low must be a finite integer"),
    ("dasm weight nan", lambda d: DASMSampler(weights=(1.0, math.nan, 0.3, 0.3)), ValueError,
     "DASM weight 1 must be a finite number"),
    # issue 21 (library): each non-finite cause named
    ("nan cond", lambda d: _tsd(d, cond=d["cond"] * math.nan), ValueError,
     "non-finite values in cond"),
    ("nan null_cond", lambda d: _tsd(d, teacher=CFG(d["teacher"], 2.0, d["cond"][:1] * math.nan)),
     ValueError, "non-finite values in the teacher's null_cond"),
    ("nan time weighting", lambda d: VSDLoss(time_weighting=lambda a, s: s * math.nan)(
        d["z_hat"], d["cond"], teacher=d["teacher"], fake=d["fake"], index=d["index"]),
     ValueError, "non-finite values in the time weighting"),
    ("dmd normaliser divides by zero", lambda d: DMDLoss()(
        d["z_hat"], teacher=Constant(d["z_hat"]), fake=Constant(d["z"]), index=d["index"]),
     FloatingPointError, "DMD's normaliser"),
    ("negative mixture weights", lambda d: GaussianMixture(
        torch.zeros(2, 2), torch.ones(2), torch.tensor([1.5, -0.5])), ValueError,
     "mixture weights must be finite and >= 0, got [1.5, -0.5]"),
    # issue 21 (library) / issue 23: options checked at construction, unused inputs refused
    ("tsd space eps", lambda d: TSDLoss(space="eps"), ValueError,
     "TSDLoss(space=...): unknown prediction 'eps'; expected one of"),
    ("tsd time_weighting sigma^2", lambda d: TSDLoss(time_weighting="sigma^2"), ValueError,
     "TSDLoss(time_weighting=...): unknown weighting 'sigma^2'; expected one of ['sigma', "),
    ("sample_weighting typo", lambda d: VSDLoss(sample_weighting="DMD"), ValueError,
     "VSDLoss(sample_weighting=...): unknown sample weighting 'DMD'; expected one of ['dmd']"),
    ("sds with dasm", lambda d: SDSLoss(dasm=DASMSampler()), ValueError,
     "SDSLoss(dasm=...): SDS compares with the injected noise"),
    ("z given to dmd", lambda d: DMDLoss()(d["z_hat"], d["cond"], teacher=d["teacher"],
                                           fake=d["fake"], z=d["z"]), ValueError,
     "DMDLoss does not use z="),
    ("z given to sds", lambda d: SDSLoss()(d["z_hat"], d["cond"], teacher=d["teacher"],
                                           z=d["z"]), ValueError, "SDSLoss does not use z="),
    # issue 21 (SR pipeline): out-of-range images were silently clamped (bad case 2)
    ("SR 0..255 floats", lambda d: _sr_pipe()(torch.rand(3, 16, 16) * 255), ValueError,
     "image 0 has float values in [0"),
    ("SR [-1, 1] floats", lambda d: _sr_pipe()([torch.rand(3, 16, 16), torch.rand(3, 16, 16)
                                                * 2 - 1]), ValueError,
     "image 1 has float values in [-"),
    ("SR NaN image", lambda d: _sr_pipe()(torch.full((3, 16, 16), math.nan)), ValueError,
     "image 0 holds NaN"),
]


@pytest.mark.parametrize(("call", "error", "words"), [pytest.param(*r[1:], id=r[0])
                                                      for r in LIBRARY])
def test_library_row(call, error, words, lib):
    with pytest.raises(error) as info:
        call(lib)
    assert words.lower() in str(info.value).lower()
    assert len(str(info.value)) < 500


def test_check_finite_off_leaves_the_decision_to_the_caller(lib):
    out = TSDLoss(check_finite=False)(lib["z_hat"], lib["cond"], teacher=_nan_model(lib["teacher"]),
                                      fake=lib["fake"], z=lib["z"], index=lib["index"])
    assert not torch.isfinite(out.loss)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")
    for name in ("socket", "create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)


def test_evaluate_metric_without_weights_is_one_line(base, tmp_path, monkeypatch, capsys,
                                                     no_network):
    """Absent pyiqa weights: a one-line exit-2 error naming the file, no download traceback."""
    pytest.importorskip("pyiqa")
    import pyiqa.utils.download_util

    monkeypatch.setattr(pyiqa.utils.download_util, "DEFAULT_CACHE_DIR", str(tmp_path / "pyiqa"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ws = files.copy_base(base, tmp_path / "ws")
    argv = [a.format(ws=ws) for a in (*EVAL, "--metrics", "psnr,niqe")]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("evaluate: error: ")
    assert str(tmp_path / "pyiqa" / "niqe_modelparameters.mat") in err


def test_evaluate_crafted_metric_weights_are_refused(base, tmp_path, monkeypatch, capsys,
                                                     no_network):
    """A weights file that would run code when unpickled: refused, one line, the code not run."""
    pytest.importorskip("pyiqa")
    import pyiqa.utils.download_util

    from tests.tsdsr.test_pyiqa_metrics import PYIQA_FILES, _write_torchvision_backbone

    monkeypatch.setattr(pyiqa.utils.download_util, "DEFAULT_CACHE_DIR", str(tmp_path / "pyiqa"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _write_torchvision_backbone(tmp_path / "hub", "lpips")
    crafted, marker = tmp_path / "pyiqa" / Path(PYIQA_FILES["lpips"]).name, tmp_path / "ran"
    crafted.parent.mkdir()
    torch.save({"lin0.model.1.weight": files.RunsCode(marker)}, crafted)
    ws = files.copy_base(base, tmp_path / "ws")
    assert evaluate.main([a.format(ws=ws) for a in (*EVAL, "--metrics", "psnr,lpips")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"refusing to load {crafted}" in err
    assert not marker.exists()
