"""One process of a multi-process train.py run on the random tiny backbone (launched by
test_train_distributed.py with torchrun); writes the parameters this rank trained and the image
indices it was fed."""

import json
import os
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


def main() -> None:
    torch.set_num_threads(1)
    models.load_backbone = lambda pretrained, dtype, device: random_backbone(
        "tiny", dtype=dtype, device=device)
    train.build_models, train.StepBatches = build_and_keep, RecordedBatches
    out = Path(sys.argv[sys.argv.index("--output-dir") + 1])
    train.main(sys.argv[1:])
    params = {"student": built[0].student_parameters(), "fake": built[0].fake_parameters()}
    # This rank's own values: its shards under --fsdp (the gathered whole would hide a
    # difference between ranks), else the replicated tensors.
    save_file({f"{role}.{i}": (p.to_local() if is_sharded(p) else p).detach().contiguous()
               for role, ps in params.items() for i, p in enumerate(ps)},
              out / f"rank-{os.environ['RANK']}.safetensors", metadata={"fed": json.dumps(fed)})


if __name__ == "__main__":
    main()
