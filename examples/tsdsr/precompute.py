"""Precompute SD3 prompt embeddings and HQ latents once, so training never loads text encoders.

    python -m examples.tsdsr.precompute --pretrained /path/to/sd3-medium --hq-dir HQ --out E
    python -m examples.tsdsr.precompute --hq-dir HQ --out E          # the tiny default

Writes (TSD-SR spec, "Precomputed per image"), each file atomically:
  E/prompts.safetensors   default.* and null.* : prompt_embeds (1, L, D), pooled_projections (1, P)
  E/images/<rel>.safetensors  per HQ image: its caption's embeddings (L, D), (P,) when a .txt
                          caption sits beside the image, and with --latents the HQ latent (C, h, w)
SD3: L = 333 (77 CLIP-L/G penultimate states concatenated and zero-padded to 4096, then 256
T5-XXL tokens), D = 4096, P = 2048, by diffusers' ``StableDiffusion3Pipeline.encode_prompt``.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from examples.tsdsr.data import DEFAULT_PROMPT
from examples.tsdsr.data.dataset import _images_under
from scoredistill.sr.imageio import load_image
from scoredistill.sr.loading import KEYS, PROMPTS_FILE

log = logging.getLogger("tsdsr.precompute")
IMAGES_DIR = "images"


def save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None
                 ) -> None:
    """safetensors file written to a temp name and renamed: readers never see half a file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tiny_pipeline(texts: Sequence[str], joint_dim: int = 32, pooled_dim: int = 64,
                  tokens: int = 12) -> Any:
    """SD3's text path with seeded tiny CLIP-L/CLIP-G/T5 and a word-level tokenizer (no download).

    The vocabulary is trained on ``texts``; CLIP states (2 x joint_dim/4) are zero-padded to the
    T5 width ``joint_dim`` exactly as for SD3; L = tokens/2 CLIP + tokens/2 T5 tokens.
    """
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        PreTrainedTokenizerFast,
        T5Config,
        T5EncoderModel,
    )

    diffusers_logging.set_verbosity_error()  # 6-token prompts truncate by design: no warnings
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]  # EOS id 3: CLIP pools at the EOS token
    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=1000,
                                                              special_tokens=specials))
    core.post_processor = processors.TemplateProcessing(single="$A [EOS]",
                                                        special_tokens=[("[EOS]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]",
                                        unk_token="[UNK]", eos_token="[EOS]",
                                        model_max_length=tokens // 2)
    torch.manual_seed(0)
    clip = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=1000, hidden_size=joint_dim // 4, intermediate_size=joint_dim // 2,
        projection_dim=pooled_dim // 2, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=tokens // 2, eos_token_id=3, pad_token_id=0)) for _ in range(2)]
    t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=joint_dim, d_kv=8, d_ff=joint_dim,
                                 num_layers=1, num_heads=2))
    return StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None, text_encoder=clip[0], tokenizer=tokenizer,
        text_encoder_2=clip[1], tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=tokenizer)


def sd3_pipeline(pretrained: str, dtype: torch.dtype, device: str) -> Any:
    """The text encoders and tokenizers of a local SD3 folder (no transformer, no VAE)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(
        pretrained, transformer=None, vae=None, torch_dtype=dtype, local_files_only=True,
    ).to(device)


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str], max_sequence_length: int
                   ) -> tuple[Tensor, Tensor]:
    """``(prompt_embeds (B, L, D), pooled (B, P))`` from SD3's ``encode_prompt``."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length)
    return embeds, pooled


def read_captions(paths: Sequence[Path], require: bool) -> dict[Path, str]:
    """Captions from ``<image>.txt``; missing ones are an error with ``require``, else a warning."""
    captions = {p: p.with_suffix(".txt").read_text(encoding="utf-8").strip()
                for p in paths if p.with_suffix(".txt").is_file()}
    missing = [str(p) for p in paths if p not in captions]
    if missing and require:
        raise FileNotFoundError(f"{len(missing)} images lack a .txt caption: {missing}")
    if missing:
        log.warning("%d images have no caption and will use the default prompt: %s",
                    len(missing), missing)
    return captions


def image_file(embeds_dir: str | Path, hq_dir: str | Path, image: str | Path) -> Path:
    """Where the per-image embeddings of ``image`` (under ``hq_dir``) live."""
    rel = Path(image).resolve().relative_to(Path(hq_dir).resolve())
    return Path(embeds_dir) / IMAGES_DIR / rel.with_suffix(".safetensors")


def precompute(hq_dir: str | Path, out: str | Path, *, pretrained: str | None = None,
               latents: bool = False, require_captions: bool = False, device: str = "cpu",
               dtype: torch.dtype = torch.float32, batch_size: int = 8) -> Path:
    """Write ``prompts.safetensors`` and the per-image files for every image under ``hq_dir``."""
    out = Path(out)
    paths = _images_under(Path(hq_dir))
    captions = read_captions(paths, require_captions)
    if pretrained is None:
        from examples.tsdsr.tiny import CONFIGS

        spec = CONFIGS["tiny"]
        pipe = tiny_pipeline([DEFAULT_PROMPT, *captions.values()],
                             spec.transformer["joint_attention_dim"],
                             spec.transformer["pooled_projection_dim"], spec.tokens).to(device)
        max_len = spec.tokens // 2
    else:
        pipe, max_len = sd3_pipeline(pretrained, dtype, device), 256

    embeds, pooled = encode_prompts(pipe, [DEFAULT_PROMPT, ""], max_len)
    save_tensors({f"{name}.{key}": value[i:i + 1] for i, name in enumerate(("default", "null"))
                  for key, value in zip(KEYS, (embeds, pooled), strict=True)},
                 out / PROMPTS_FILE, {"default_prompt": DEFAULT_PROMPT, "null_prompt": ""})
    vae = None
    if latents:
        from examples.tsdsr.tiny import load_backbone

        vae = load_backbone(pretrained, dtype, device).vae
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        with_caption = [p for p in chunk if p in captions]
        tensors: dict[Path, dict[str, Tensor]] = {p: {} for p in chunk}
        if with_caption:
            embeds, pooled = encode_prompts(pipe, [captions[p] for p in with_caption], max_len)
            for i, p in enumerate(with_caption):
                tensors[p] = {"prompt_embeds": embeds[i], "pooled_projections": pooled[i]}
        if vae is not None:
            from scoredistill.sr.latents import encode

            for p in chunk:  # one by one: images may differ in size
                image = load_image(p).rgb[None].to(device) * 2 - 1
                tensors[p]["latent"] = encode(vae, image, posterior="mode")[0].to(dtype)
        for p, values in tensors.items():
            if values:
                save_tensors(values, image_file(out, hq_dir, p),
                             {"caption": captions.get(p, "")})
    log.info("wrote %s for %d images (%d with captions)", out, len(paths), len(captions))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hq-dir", required=True)
    parser.add_argument("--out", required=True, help="embeddings folder (training's --embeds-dir)")
    parser.add_argument("--pretrained", help="local SD3 diffusers folder; omit for the tiny model")
    parser.add_argument("--latents", action=argparse.BooleanOptionalAction, default=False,
                        help="also store the HQ latent of each (pre-cropped) image")
    parser.add_argument("--require-captions", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    precompute(args.hq_dir, args.out, pretrained=args.pretrained, latents=args.latents,
               require_captions=args.require_captions, device=args.device, dtype=dtype,
               batch_size=args.batch_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
