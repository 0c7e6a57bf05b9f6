"""Precompute SD3 prompt embeddings and HQ latents once, so training never loads text encoders.

    python -m examples.tsdsr.precompute --pretrained /path/to/sd3-medium --hq-dir HQ --out E
    python -m examples.tsdsr.precompute --hq-dir HQ --out E          # the tiny default

Writes (TSD-SR spec, "Precomputed per image"), each file atomically (an earlier run's files in
--out are refused before anything is computed, or replaced with --overwrite):
  E/prompts.safetensors   default.* and null.* : prompt_embeds (1, L, D), pooled_projections (1, P)
  E/images/<rel>.safetensors  per HQ image: its caption's embeddings (L, D), (P,) when a .txt
                          caption sits beside the image, and with --latents the HQ latent (C, h, w)
SD3: L = 333 (77 CLIP-L/G penultimate states concatenated and zero-padded to 4096, then 256
T5-XXL tokens), D = 4096, P = 2048, by diffusers' ``StableDiffusion3Pipeline.encode_prompt``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch import Tensor

from examples.tsdsr.data import DEFAULT_PROMPT, read_caption
from examples.tsdsr.data.dataset import _images_under
from scoredistill.cli import (
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    ArgumentParser,
    UserError,
    entry_point,
    existing_dir,
    number,
    writable_dir,
)
from scoredistill.cli import device as device_type
from scoredistill.messages import brief
from scoredistill.sr.imageio import load_image, write_atomic
from scoredistill.sr.loading import KEYS, PROMPTS_FILE, ModelFileError

log = logging.getLogger("tsdsr.precompute")
IMAGES_DIR = "images"


def save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None
                 ) -> None:
    """safetensors file written to a temp name and renamed: readers never see half a file."""
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                            metadata=metadata))


def tiny_pipeline(texts: Sequence[str], joint_dim: int = 32, pooled_dim: int = 64,
                  tokens: int = 12) -> Any:
    """SD3's text path with seeded tiny CLIP-L/CLIP-G/T5 and a word-level tokenizer (no download).

    The vocabulary is trained on ``texts``; CLIP states (2 x joint_dim/4) are zero-padded to the
    T5 width ``joint_dim`` exactly as for SD3; L = tokens/2 CLIP + tokens/2 T5 tokens, so prompts
    are cut to their first tokens/2 - 1 words (:func:`cut_prompts`).
    """
    from diffusers import StableDiffusion3Pipeline
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        PreTrainedTokenizerFast,
        T5Config,
        T5EncoderModel,
    )

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
    with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's RNG untouched
        torch.manual_seed(0)
        clip = [CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=1000, hidden_size=joint_dim // 4, intermediate_size=joint_dim // 2,
            projection_dim=pooled_dim // 2, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=tokens // 2, bos_token_id=2, eos_token_id=3,
            pad_token_id=0))
            for _ in range(2)]
        t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=joint_dim, d_kv=8, d_ff=joint_dim,
                                     num_layers=1, num_heads=2))
    return frozen_text_encoders(StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None, text_encoder=clip[0], tokenizer=tokenizer,
        text_encoder_2=clip[1], tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=tokenizer))


def frozen_text_encoders(pipe: Any) -> Any:
    """``pipe`` with its text encoders in eval mode and without gradients: a module is built in
    training mode, where T5's dropout (0.1) gives one caption different embeddings per call."""
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.eval().requires_grad_(False)
    return pipe


def sd3_pipeline(pretrained: str, dtype: torch.dtype, device: str) -> Any:
    """The text encoders and tokenizers of a local SD3 folder (no transformer, no VAE)."""
    from diffusers import StableDiffusion3Pipeline

    return frozen_text_encoders(StableDiffusion3Pipeline.from_pretrained(
        pretrained, transformer=None, vae=None, torch_dtype=dtype, local_files_only=True,
    ).to(device))


def latent_vae(pretrained: str | None, dtype: torch.dtype, device: str) -> Any:
    """The VAE alone of a local SD3 folder (or of the tiny default), frozen: the backbone's
    loader would put SD3's transformer beside the text encoders too (7.6 GiB more in fp32; the
    memory planner, ``scoredistill-plan precompute``), and trainable weights would keep each
    latent's autograd graph (the encoder's activations) alive until its file is written."""
    if pretrained is None:
        from examples.tsdsr.models.backbone import load_backbone

        return load_backbone(None, dtype, device).vae.eval().requires_grad_(False)
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", torch_dtype=dtype,
                                            local_files_only=True)
    except (OSError, ValueError) as exc:  # missing or mismatched weights
        raise ModelFileError("--pretrained", f"cannot load {Path(pretrained) / 'vae'}: "
                             f"{' '.join(str(exc).split())[:300]}") from exc
    return vae.to(device).eval().requires_grad_(False)


def cut_prompts(tokenizer: Any, prompts: Sequence[str], tokens: int) -> list[str]:
    """Each prompt cut to its first ``tokens - 1`` tokens (and EOS makes ``tokens``): what the
    encoders' truncation keeps, so diffusers' untruncated re-tokenisation (for its truncation
    notice) sees no prompt longer than the tokenizer's maximum and warns of nothing."""
    out = []
    for text in prompts:
        spans = tokenizer(text, add_special_tokens=False, truncation=True,
                          max_length=tokens - 1, return_offsets_mapping=True)["offset_mapping"]
        out.append(text[:spans[-1][1]] if spans else text)
    return out


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str], max_sequence_length: int
                   ) -> tuple[Tensor, Tensor]:
    """``(prompt_embeds (B, L, D), pooled (B, P))`` from SD3's ``encode_prompt``."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length)
    return embeds, pooled


def read_captions(paths: Sequence[Path], require: bool,
                  failures: dict[str, str] | None = None) -> dict[Path, str]:
    """Captions from ``<image>.txt`` (UTF-8, a byte-order mark dropped); missing ones are an
    error with ``require``, else a warning. Captions that do not decode are logged and put in
    ``failures`` (their images get no embeddings), or raised without it."""
    captions = {}
    for p in paths:
        if p.with_suffix(".txt").is_file():
            try:
                captions[p] = read_caption(p.with_suffix(".txt"))
            except ValueError as exc:
                if failures is None:
                    raise
                failures[str(p)] = str(exc)
                log.error("%s", exc)
    missing = [str(p) for p in paths if p not in captions and str(p) not in (failures or {})]
    if missing and require:
        raise FileNotFoundError(f"{len(missing)} images lack a .txt caption: {brief(missing)}")
    if missing:
        log.warning("%d images have no caption and will use the default prompt: %s",
                    len(missing), brief(missing))
    return captions


def image_file(embeds_dir: str | Path, hq_dir: str | Path, image: str | Path) -> Path:
    """Where the per-image embeddings of ``image`` (under ``hq_dir``) live."""
    rel = Path(image).resolve().relative_to(Path(hq_dir).resolve())
    return Path(embeds_dir) / IMAGES_DIR / rel.with_suffix(".safetensors")


def existing_outputs(hq_dir: str | Path, out: str | Path) -> list[Path]:
    """The files under ``out`` that a precompute of ``hq_dir`` would write and that exist."""
    planned = [Path(out) / PROMPTS_FILE,
               *(image_file(out, hq_dir, p) for p in _images_under(Path(hq_dir)))]
    return [p for p in planned if p.exists()]


def precompute(hq_dir: str | Path, out: str | Path, *, pretrained: str | None = None,
               latents: bool = False, require_captions: bool = False, device: str = "cpu",
               dtype: torch.dtype = torch.float32, batch_size: int = 8,
               failures: dict[str, str] | None = None) -> Path:
    """Write ``prompts.safetensors`` and the per-image files for every image under ``hq_dir``.

    ``failures``: collect ``{image: reason}`` for images whose caption or file cannot be read
    (they get no embeddings file) and go on; None: raise at the first."""
    out = Path(out)
    paths = _images_under(Path(hq_dir))
    captions = read_captions(paths, require_captions, failures)
    paths = [p for p in paths if str(p) not in (failures or {})]
    if pretrained is None:
        from examples.tsdsr.models.tiny import CONFIGS

        spec = CONFIGS["tiny"]
        pipe = tiny_pipeline([DEFAULT_PROMPT, *captions.values()],
                             spec.transformer["joint_attention_dim"],
                             spec.transformer["pooled_projection_dim"], spec.tokens).to(device)
        max_len = spec.tokens // 2
        fit = functools.partial(cut_prompts, pipe.tokenizer, tokens=max_len)
    else:  # SD3: diffusers' notice that a caption was truncated (77 CLIP tokens) is news
        pipe, max_len, fit = sd3_pipeline(pretrained, dtype, device), 256, list

    embeds, pooled = encode_prompts(pipe, fit([DEFAULT_PROMPT, ""]), max_len)
    save_tensors({f"{name}.{key}": value[i:i + 1] for i, name in enumerate(("default", "null"))
                  for key, value in zip(KEYS, (embeds, pooled), strict=True)},
                 out / PROMPTS_FILE, {"default_prompt": DEFAULT_PROMPT, "null_prompt": ""})
    vae = latent_vae(pretrained, dtype, device) if latents else None
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        with_caption = [p for p in chunk if p in captions]
        tensors: dict[Path, dict[str, Tensor]] = {p: {} for p in chunk}
        if with_caption:
            embeds, pooled = encode_prompts(pipe, fit([captions[p] for p in with_caption]),
                                            max_len)
            for i, p in enumerate(with_caption):
                tensors[p] = {"prompt_embeds": embeds[i], "pooled_projections": pooled[i]}
        if vae is not None:
            from scoredistill.sr.latents import encode

            for p in chunk:  # one by one: images may differ in size
                try:
                    image = load_image(p).rgb[None].to(device) * 2 - 1
                except ValueError as exc:
                    if failures is None:
                        raise
                    failures[str(p)] = str(exc)
                    log.error("%s", exc)
                    tensors.pop(p)
                    continue
                tensors[p]["latent"] = encode(vae, image, posterior="mode")[0].to(dtype)
        for p, values in tensors.items():
            if values:
                save_tensors(values, image_file(out, hq_dir, p),
                             {"caption": captions.get(p, "")})
    log.info("wrote %s for %d images (%d with captions)", out, len(paths), len(captions))
    return out


@entry_point("precompute")
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; the exit status is 1 if some images failed (each is listed), 2 on a
    usage error."""
    parser = ArgumentParser(prog="precompute", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hq-dir", required=True, type=existing_dir)
    parser.add_argument("--out", required=True, help="embeddings folder (training's --embeds-dir)")
    parser.add_argument("--pretrained", type=existing_dir,
                        help="local SD3 diffusers folder; omit for the tiny model")
    parser.add_argument("--latents", action=argparse.BooleanOptionalAction, default=False,
                        help="also store the HQ latent of each (pre-cropped) image")
    parser.add_argument("--require-captions", action="store_true")
    parser.add_argument("--device", type=device_type,
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                        help="the encoders' dtype (default: bf16 with --pretrained, a "
                             "planned 11.8 GiB peak with --latents on 1024 px images; fp32: "
                             "23.6 GiB, over a 24 GB card with the CUDA context; fp32 for the "
                             "tiny model)")
    parser.add_argument("--batch-size", type=number(int, low=1), default=8)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the embedding files an earlier run left in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not _images_under(args.hq_dir):
        raise UserError(f"--hq-dir {args.hq_dir} holds no images")
    writable_dir(args.out, "--out")
    existing = existing_outputs(args.hq_dir, args.out)
    if existing and not args.overwrite:
        names = [str(p.relative_to(args.out)) for p in existing]
        raise UserError(f"--out {args.out} already holds {len(names)} of the files this run "
                        f"writes ({brief(names)}): give --overwrite to replace them, or another "
                        "--out")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if args.pretrained else "fp32")]
    failures: dict[str, str] = {}
    try:
        precompute(args.hq_dir, args.out, pretrained=args.pretrained, latents=args.latents,
                   require_captions=args.require_captions, device=args.device, dtype=dtype,
                   batch_size=args.batch_size, failures=failures)
    except FileNotFoundError as exc:  # --require-captions unmet
        raise UserError(str(exc)) from None
    for image, reason in failures.items():
        print(f"FAILED {image}: {reason}", file=sys.stderr)
    return EXIT_ITEMS_FAILED if failures else EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
