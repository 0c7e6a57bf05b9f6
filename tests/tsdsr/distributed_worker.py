"""One process of a multi-process train.py run on the random tiny backbone (launched by
test_train_distributed.py with torchrun); writes this rank's exit status and the image indices it
was fed (rank-N.json), and the parameters it trained (rank-N.safetensors).

SIGTERM_AT=RANK:STEP sends SIGTERM to that rank's own process during its STEP-th training step
(as a scheduler preempting one node would)."""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from safetensors.torch import save_file

from examples.tsdsr import train
from examples.tsdsr.models.tiny import random_backbone
from examples.tsdsr.training import data, models
from examples.tsdsr.training.sharding import is_sharded

built, fed = [], []


def build_and_keep(*args, **kwargs):
    built.append(models.build_models(*args, **kwargs))
    return built[-1]


class RecordedBatches(data.StepBatches):
    def __iter__(self):
        for batch in super().__iter__():
            fed.append([index for index, _ in batch])
            yield batch


def signal_in_step(rank: int, step: int) -> None:
    real, calls = train.train_step, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == step and int(os.environ["RANK"]) == rank:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    train.train_step = step_then_signal


def main() -> None:
    torch.set_num_threads(1)
    models.load_backbone = lambda pretrained, dtype, device: random_backbone(
        "tiny", dtype=dtype, device=device)
    train.build_models, train.StepBatches = build_and_keep, RecordedBatches
    if "SIGTERM_AT" in os.environ:
        signal_in_step(*map(int, os.environ["SIGTERM_AT"].split(":")))
    out = Path(sys.argv[sys.argv.index("--output-dir") + 1])
    status = train.main(sys.argv[1:])
    # torchrun stops the other ranks when one exits non-zero: the status goes in a file instead.
    (out / f"rank-{os.environ['RANK']}.json").write_text(json.dumps({"status": status,
                                                                      "fed": fed}))
    if not built:  # refused before the models were built
        return
    params = {"student": built[0].student_parameters(), "fake": built[0].fake_parameters()}
    # This rank's own values: its shards under --fsdp (the gathered whole would hide a
    # difference between ranks), else the replicated tensors.
    save_file({f"{role}.{i}": (p.to_local() if is_sharded(p) else p).detach().contiguous()
               for role, ps in params.items() for i, p in enumerate(ps)},
              out / f"rank-{os.environ['RANK']}.safetensors")


if __name__ == "__main__":
    main()
