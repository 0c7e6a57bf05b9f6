"""One-step TSD-SR super-resolution (Dong et al., CVPR 2025) of an image file or a folder.

    python -m examples.tsdsr.infer INPUT --out DIR                     # tiny embedded model
    python -m examples.tsdsr.infer INPUT --out DIR --pretrained SD3_DIR --tsdsr-release REL_DIR
    python -m examples.tsdsr.infer INPUT --out DIR --pretrained SD3_DIR --lora CKPT --embeds DIR
    python -m examples.tsdsr.infer INPUT --out DIR ... --compile --batch-size 8  # fast GPU run
    python -m examples.tsdsr.infer INPUT --out DIR ... --skip-existing  # resume after Ctrl-C

The package's ``scoredistill-sr`` command (:mod:`scoredistill.sr.cli`, same flags) with the
recipe's tiny pre-fitted model as the default backbone. Output: ``<out>/<stem>.png`` (16 bit for
16-bit inputs, else 8 bit; alpha re-attached, grey stays grey). A file already at an output name
is kept: the run stops with exit status 2 unless ``--skip-existing`` (do only the missing ones)
or ``--overwrite`` is given. Inputs that fail are reported and the others go on; the exit
status is then 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a file: make the repository root importable
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.tsdsr.models.backbone import fitted_backbone
from scoredistill.sr import cli


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; the exit status is 1 if any input failed, 2 on usage errors, 130 after
    Ctrl-C."""
    return cli.main(argv, description=__doc__.split("\n\n")[0], prog="infer",
                    default_backbone=lambda dtype, device: fitted_backbone(dtype=dtype,
                                                                           device=device))


if __name__ == "__main__":
    sys.exit(main())
