"""train.py end to end on the tiny model: resume equals an uninterrupted run, an interrupted save
is ignored, and a non-finite loss never reaches the weights.

These check the loop's mechanics, not learning, so they run on the instant random tiny backbone
instead of the pre-fitted default (run_tiny.py checks learning)."""

import contextlib
import fcntl
import io
import json
import multiprocessing
import os
import shutil
import signal
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from examples.tsdsr import train as train_module
from examples.tsdsr.models.tiny import random_backbone
from examples.tsdsr.precompute import precompute
from examples.tsdsr.train import main
from examples.tsdsr.training import models
from examples.tsdsr.training.checkpoint import checkpoints
from examples.tsdsr.training.config import parse_config
from examples.tsdsr.training.preemption import StopOnSignal
from examples.tsdsr.training.preflight import LOCK_FILE, lock_output_dir
from scoredistill.cli import EXIT_PREEMPTED, UserError
from scoredistill.sr.imageio import save_png
from scoredistill.sr.loading import load_prompts

pytestmark = pytest.mark.usefixtures("random_tiny_backbone")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tsdsr")
    g = torch.Generator().manual_seed(0)
    for folder, names in (("hq", "abc"), ("val", "v")):
        (root / folder).mkdir()
        for name in names:
            save_png(torch.rand(3, 64, 64, generator=g), root / folder / f"{name}.png")
    (root / "hq" / "a.txt").write_text("a red cat\n")
    precompute(root / "hq", root / "embeds")
    return root


def run(data, out, *extra):
    return main(["--tiny", "--hq-dir", str(data / "hq"), "--embeds-dir", str(data / "embeds"),
                 "--output-dir", str(out), "--max-steps", "4", "--checkpoint-every", "2",
                 "--validate-every", "100", "--report-to", "none", "--student-rank", "2",
                 "--fake-rank", "2", "--vae-rank", "2", *extra])


def weights(checkpoint):
    return {f"{f.name}:{k}": v for f in sorted(checkpoint.glob("*.safetensors"))
            for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """A 4-step run (checkpoints at 2 and 4, validation at 0 and 4), made once."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_backbone", lambda pretrained, dtype, device:
                   random_backbone("tiny", dtype=dtype, device=device))
        assert run(data, out, "--val-hq-dir", str(data / "val")) == 0
    return out


def test_resume_after_interrupted_save_matches_uninterrupted_run(data, uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    assert sorted(p.name for p in (out / "validation").iterdir()) == [
        "step-00000000_v.png", "step-00000004_v.png"]
    root = out / "checkpoints"
    final = weights(root / "step-00000004")
    start = weights(root / "step-00000002")
    # Every role's LoRA is saved and trains. lora_B starts at zero, so a LoRA whose lora_B never
    # moves never changes the output (an optimiser holding only lora_A, say).
    for file in ("transformer", "fake", "vae"):
        keys = [k for k in final if k.startswith(f"{file}.safetensors:") and ".lora_B." in k]
        assert keys, f"{file}.safetensors holds no lora_B tensors"
        assert any(not torch.equal(final[k], start[k]) for k in keys), f"{file}: lora_B frozen"
    # Kill "during" the step-4 save: the finished folder is gone, a partial temp folder remains.
    shutil.rmtree(root / "step-00000004")
    partial = root / ".tmp-step-00000004-12345"
    partial.mkdir()
    (partial / "transformer.safetensors").write_bytes(b"truncated")
    assert [p.name for p in checkpoints(root)] == ["step-00000002"]
    assert run(data, out, "--resume", "latest") == 0
    assert_same_weights(weights(root / "step-00000004"), final)
    assert not partial.exists()  # the next save cleaned it up


def assert_same_weights(resumed, final):
    assert resumed.keys() == final.keys()
    for k in final:  # the fake score too: a fake LoRA restarted from its init would differ
        torch.testing.assert_close(resumed[k], final[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_checkpoints_and_resume_matches(sig, data, uninterrupted,
                                                                 tmp_path, monkeypatch, caplog):
    """SLURM/Kubernetes (SIGTERM) or Ctrl-C (SIGINT) during step 3: the step completes, step 3
    is checkpointed although --checkpoint-every is 2, the exit status is 75, and the resumed run
    ends where the uninterrupted one did."""
    real, calls = train_module.train_step, []

    def signalled_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    before = signal.getsignal(sig)
    monkeypatch.setattr(train_module, "train_step", signalled_in_step_3)
    out = tmp_path / "run"
    assert run(data, out) == EXIT_PREEMPTED
    assert len(calls) == 3 and signal.getsignal(sig) is before  # handlers restored
    assert f"stopped by {sig.name} after step 3" in caplog.text
    root = out / "checkpoints"
    assert [p.name for p in checkpoints(root)] == ["step-00000002", "step-00000003"]
    monkeypatch.setattr(train_module, "train_step", real)
    assert run(data, out, "--resume", "latest") == 0
    assert_same_weights(weights(root / "step-00000004"),
                        weights(uninterrupted / "checkpoints" / "step-00000004"))


def test_a_second_signal_stops_at_once():
    # Python's own handler before the run, whatever an earlier test or library installed (the
    # full suite once failed here after the CPU-inductor test; alone, the two pass together).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    single = SimpleNamespace(num_processes=1)
    try:
        with StopOnSignal() as stop:
            assert not stop.requested(single)
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested(single) and stop.signal_name == "SIGINT"
            with pytest.raises(KeyboardInterrupt):  # Python's own handler is back
                os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_two_runs_started_together_into_one_folder_one_is_refused(data, tmp_path,
                                                                  monkeypatch):
    """Two processes start train.py into the same --output-dir and reach its lock together
    (seeds 43 and 44): exactly one trains, the other exits 2 with one line naming the folder,
    and the run's config and checkpoint are the same run's."""
    context = multiprocessing.get_context("fork")  # the patched backbone comes along
    barrier, out = context.Barrier(2), tmp_path / "run"
    real = train_module.check_paths

    def check_then_meet(config):  # the last step before the lock: both runs wait here
        real(config)
        barrier.wait(timeout=120)

    def one_run(seed):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = run(data, out, "--seed", seed, "--max-steps", "1")
        (tmp_path / f"{seed}.json").write_text(json.dumps([status, err.getvalue()]))

    monkeypatch.setattr(train_module, "check_paths", check_then_meet)
    runs = [context.Process(target=one_run, args=(seed,)) for seed in ("43", "44")]
    for process in runs:
        process.start()
    for process in runs:
        process.join(timeout=300)
    ended = {seed: json.loads((tmp_path / f"{seed}.json").read_text()) for seed in ("43", "44")}
    assert sorted(status for status, _ in ended.values()) == [0, 2], ended
    winner = next(seed for seed, (status, _) in ended.items() if status == 0)
    refused = next(err for status, err in ended.values() if status == 2)
    assert refused.strip().splitlines() == [
        f"train: error: --output-dir {out} is in use by another training run (pid "
        f"{runs[int(winner) - 43].pid}): wait for it to end, or give another --output-dir"]
    state = json.loads((out / "checkpoints" / "step-00000001" / "state.json").read_text())
    assert state["config"]["seed"] == json.loads((out / "config.json").read_text())["seed"]
    assert state["config"]["seed"] == int(winner)


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    """The lock lives as long as its process: refused while the holder runs, free as soon as it
    is killed with SIGKILL (nothing to clean up before --resume latest)."""
    context = multiprocessing.get_context("fork")
    locked = context.Event()

    def hold():
        lock_output_dir(tmp_path)
        locked.set()
        time.sleep(300)

    holder = context.Process(target=hold)
    holder.start()
    try:
        assert locked.wait(timeout=60)
        with pytest.raises(UserError, match=f"in use by another training run \\(pid "
                                            f"{holder.pid}\\)"):
            lock_output_dir(tmp_path)
    finally:
        holder.kill()
        holder.join()
    os.close(lock_output_dir(tmp_path))


@pytest.mark.parametrize("writes_pid", [True, False])
def test_a_run_refused_as_the_holder_starts_names_the_holder(tmp_path, writes_pid):
    """Refused between the holder's flock and its pid write, with an ended run's pid still in
    the file (the race that once failed CI): the refused run names the holder, never the ended
    run; if the holder writes no pid in time, it names no one."""
    context = multiprocessing.get_context("fork")
    ended = context.Process(target=lambda: None)
    ended.start()
    ended.join()
    (tmp_path / LOCK_FILE).write_text(f"{ended.pid}\n")
    locked = context.Event()

    def hold():  # lock_output_dir's steps, slowed between the lock and the pid
        fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked.set()
        time.sleep(0.3)
        if writes_pid:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        time.sleep(300)

    holder = context.Process(target=hold)
    holder.start()
    try:
        assert locked.wait(timeout=60)
        with pytest.raises(UserError) as refused:
            lock_output_dir(tmp_path)
    finally:
        holder.kill()
        holder.join()
    named = f"in use by another training run (pid {holder.pid}): wait"
    assert (named if writes_pid else "in use by another training run: wait") in str(refused.value)
    assert f"pid {ended.pid}" not in str(refused.value)


def test_non_finite_loss_skips_the_update(data, tmp_path):
    from accelerate import Accelerator

    from examples.tsdsr.train import optimisation
    from examples.tsdsr.training.models import build_models
    from examples.tsdsr.training.step import Losses, train_step

    config = parse_config(["--tiny", "--student-rank", "2", "--fake-rank", "2", "--vae-rank",
                           "2", "--lr-warmup-steps", "0"])
    accelerator = Accelerator(cpu=True)
    models = build_models(config, torch.float32, torch.device("cpu"))
    prompts = load_prompts(data / "embeds")
    student = optimisation(models.student_parameters(), config.lr, config, 1)
    fake = optimisation(models.fake_parameters(), config.lr_fake, config, 1)
    before = [p.detach().clone() for p in (*student.params, *fake.params)]
    hq = torch.rand(2, 3, 64, 64)
    batch = {"hq": hq.clone(), "lq": hq.clone(),
             **{k: v.expand(2, *v.shape[1:]) for k, v in prompts["default"].items()}}
    batch["lq"][0, 0, 0, 0] = float("nan")  # z_hat is NaN: both updates must skip
    logs = train_step(accelerator, models, Losses.from_config(config), config, batch, prompts,
                      student, fake, torch.Generator().manual_seed(0))
    assert logs["skipped/generator"] == logs["skipped/fake"] == 1.0
    after = [p.detach() for p in (*student.params, *fake.params)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(p.grad is None for p in (*student.params, *fake.params))
    batch["lq"] = hq.clone()  # a finite batch now updates the student
    logs = train_step(accelerator, models, Losses.from_config(config), config, batch, prompts,
                      student, fake, torch.Generator().manual_seed(0))
    assert logs["skipped/generator"] == 0.0
    assert any(not torch.equal(a, p) for a, p in zip(before, student.params, strict=False))


@pytest.fixture(scope="module")
def latent_embeds(data, tmp_path_factory):
    from examples.tsdsr.models import backbone

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backbone, "load_backbone", lambda pretrained, dtype, device:
                   random_backbone("tiny", dtype=dtype, device=device))
        return precompute(data / "hq", tmp_path_factory.mktemp("embeds") / "e", latents=True)


def test_precomputed_latents_train_as_encoding_each_crop_does(data, latent_embeds, tmp_path,
                                                               monkeypatch):
    from examples.tsdsr.training import step

    finals = {}
    for name, extra in (("encoded", []), ("stored", ["--use-latents"])):
        out = tmp_path / name
        assert run(data, out, "--embeds-dir", str(latent_embeds), "--no-hflip", *extra) == 0
        finals[name] = weights(out / "checkpoints" / "step-00000004")
        # From here on, encoding an HQ crop is an error: the stored run must not need it.
        monkeypatch.setattr(step, "hq_latent", lambda *a: pytest.fail("HQ crop encoded"))
    assert finals["stored"].keys() == finals["encoded"].keys()
    for k, v in finals["encoded"].items():
        torch.testing.assert_close(finals["stored"][k], v, rtol=0, atol=1e-5)


def test_precomputed_latents_refuse_flips_missing_files_and_other_sizes(data, latent_embeds,
                                                                        tmp_path, caplog):
    with pytest.raises(ValueError, match="hflip"):
        parse_config(["--tiny", "--use-latents"])
    # Embeddings written without --latents: a file without its latent, or no file at all. The
    # data check lists every image before the first step, and nothing trains.
    assert run(data, tmp_path / "a", "--no-hflip", "--use-latents") == 2
    bad = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bad file")]
    assert len(bad) == 3 and all(r"precompute.py --latents" in m for m in bad)
    assert not (tmp_path / "a" / "checkpoints").exists()
    caplog.clear()
    assert run(data, tmp_path / "b", "--embeds-dir", str(latent_embeds), "--no-hflip",
               "--use-latents", "--resolution", "32") == 2
    assert "pre-cropped to --resolution 32" in caplog.text


def test_offloaded_vae_activations_train_as_held_ones(data, tmp_path, monkeypatch):
    """--offload-vae-activations: the VAE's saved tensors go through save_on_cpu (counted here,
    each one copied as to the host and back) and the weights equal a run's without it."""
    packed: list[tuple[int, ...]] = []

    class Copying(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory: bool = False) -> None:
            def pack(t):
                packed.append(tuple(t.shape))
                return t.detach().clone()

            super().__init__(pack, lambda t: t.clone())

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Copying)
    finals, counts = {}, {}
    for name, extra in (("held", []), ("offloaded", ["--offload-vae-activations"])):
        before = len(packed)
        assert run(data, tmp_path / name, *extra) == 0
        counts[name] = len(packed) - before
        finals[name] = weights(tmp_path / name / "checkpoints" / "step-00000004")
    assert counts["held"] == 0 and counts["offloaded"] > 0, counts
    # Image-sized tensors of the VAE (64 px crops, 3 or more channels at full size) were saved.
    assert any(len(s) == 4 and s[-2:] == (64, 64) for s in packed)
    assert finals["offloaded"].keys() == finals["held"].keys()
    for k, v in finals["held"].items():
        torch.testing.assert_close(finals["offloaded"][k], v, rtol=0, atol=0)
