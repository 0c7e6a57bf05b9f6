"""A diffusers ``AutoencoderKL``'s encoder or decoder as a flat list of steps, to run by tiles.

Each forward is unrolled into spatially local ops (convolutions, activations, the resamplers;
each knows how far it reads), GroupNorms (whose statistics a tiled run pools over the whole
image), residual save/add pairs and the mid block's self-attention (the one step that reads
its whole input). The diffusers modules are called as they are wherever that is possible, so
only GroupNorm and the attention's projections around scaled-dot-product attention are
re-expressed. Anything these steps do not reproduce exactly raises NotImplementedError.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property, partial
from itertools import pairwise
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import Attention

_ACTIVATIONS = (nn.SiLU, nn.Mish, nn.GELU, nn.ReLU)  # diffusers' get_activation: pointwise


@dataclass(frozen=True)
class Local:
    """A spatially local op (B, C, h, w) -> (B, C', h * scale, w * scale); an output px reads
    input px at most ``reach`` input px beyond its own footprint."""

    fn: Callable[[Tensor], Tensor]
    reach: Fraction = Fraction(0)
    scale: Fraction = Fraction(1)


@dataclass(frozen=True)
class Norm:
    """A GroupNorm (B, C, h, w) -> (B, C, h, w): statistics per sample and group, then affine."""

    norm: nn.GroupNorm


@dataclass(frozen=True)
class Save:
    """Keep the activation (B, C, h, w) as the input of a residual branch."""


@dataclass(frozen=True)
class Add:
    """Close the last Save's branch: ``(shortcut(saved) + x) / divisor``, (B, C, h, w)."""

    shortcut: Callable[[Tensor], Tensor] | None
    divisor: float


@dataclass(frozen=True)
class Attend:
    """Self-attention over all h*w px of (B, C, h, w) -> (B, C, h, w), its GroupNorm and
    residual being separate steps."""

    fn: Callable[[Tensor], Tensor]


Step = Local | Norm | Save | Add | Attend


@dataclass(frozen=True)
class Network:
    """A VAE half as steps: (B, C, H, W) -> (B, C', H * scale, W * scale)."""

    steps: tuple[Step, ...]

    @cached_property
    def px(self) -> tuple[Fraction, ...]:
        """Side of one px before each step and after the last, in input px."""
        sizes = [Fraction(1)]
        for step in self.steps:
            sizes.append(sizes[-1] / step.scale if isinstance(step, Local) else sizes[-1])
        return tuple(sizes)

    @property
    def scale(self) -> Fraction:
        """Output px per input px along a side (1/8 for SD3's encoder, 8 for its decoder)."""
        return 1 / self.px[-1]

    @property
    def grid(self) -> int:
        """Tile edges on multiples of this many input px fall on px edges at every step."""
        return math.lcm(*(px.numerator for px in self.px))


def exact_margin(net: Network) -> int:
    """A margin (input px, a multiple of ``net.grid``) from which on a tile's edge no longer
    reaches its core, attention aside: a bound on how far the zero padding at a tile's edge
    spreads inward through the local steps (SD3: 112 image px encoding, 18 latent px decoding)."""
    spread = Fraction(0)
    for step, (before, after) in zip(net.steps, pairwise(net.px), strict=True):
        if isinstance(step, Local):
            # An output px is wrong as soon as one px it reads is: round up to whole output px.
            spread = math.ceil((spread + step.reach * before) / after) * after
    return math.ceil(spread / net.grid) * net.grid


def encoder_network(vae: AutoencoderKL) -> Network:
    """``vae.encoder`` then ``quant_conv``: (B, 3, H, W) -> posterior moments (B, 2z, H/f, W/f)."""
    from diffusers.models.autoencoders.vae import Encoder
    from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D

    encoder = vae.encoder
    _require(type(encoder) is Encoder, f"encoder {type(encoder).__name__}")
    steps = [_conv(encoder.conv_in)]
    for block in encoder.down_blocks:
        _require(type(block) is DownEncoderBlock2D, f"down block {type(block).__name__}")
        for resnet in block.resnets:
            steps += _resnet(resnet)
        steps += [_downsample(down) for down in block.downsamplers or ()]
    steps += _mid_block(encoder.mid_block)
    steps += [_norm(encoder.conv_norm_out), _activation(encoder.conv_act),
              _conv(encoder.conv_out)]
    if vae.quant_conv is not None:
        steps.append(_conv(vae.quant_conv))
    _require_one_dtype(encoder, vae.quant_conv)
    return Network(tuple(steps))


def decoder_network(vae: AutoencoderKL) -> Network:
    """``post_quant_conv`` then ``vae.decoder``: (B, z, h, w) -> image (B, 3, f h, f w)."""
    from diffusers.models.autoencoders.vae import Decoder
    from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D

    decoder = vae.decoder
    _require(type(decoder) is Decoder, f"decoder {type(decoder).__name__}")
    steps = [] if vae.post_quant_conv is None else [_conv(vae.post_quant_conv)]
    steps.append(_conv(decoder.conv_in))
    steps += _mid_block(decoder.mid_block)
    for block in decoder.up_blocks:
        _require(type(block) is UpDecoderBlock2D, f"up block {type(block).__name__}")
        for resnet in block.resnets:
            steps += _resnet(resnet)
        steps += [_upsample(up) for up in block.upsamplers or ()]
    steps += [_norm(decoder.conv_norm_out), _activation(decoder.conv_act),
              _conv(decoder.conv_out)]
    # diffusers' Decoder casts nothing between its parts (older releases upcast after the mid
    # block): with one dtype throughout, each step's input matches its weights as it does there.
    _require_one_dtype(decoder, vae.post_quant_conv)
    return Network(tuple(steps))


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise NotImplementedError(f"tiled VAE: unsupported {what}")


def _require_one_dtype(*modules: nn.Module | None) -> None:
    dtypes = {p.dtype for m in modules if m is not None for p in m.parameters()}
    _require(len(dtypes) <= 1, f"mix of parameter dtypes {sorted(map(str, dtypes))}")


def _conv(module: nn.Module) -> Local:
    # peft's LoRA wrapper keeps its base layer's geometry; the module itself is what runs.
    conv = getattr(module, "base_layer", module)
    _require(isinstance(conv, nn.Conv2d) and conv.stride == (1, 1) and conv.dilation == (1, 1)
             and conv.padding_mode == "zeros" and conv.kernel_size[0] == conv.kernel_size[1]
             and conv.kernel_size[0] % 2 == 1 and conv.padding == (conv.kernel_size[0] // 2,) * 2,
             f"convolution {conv}")
    return Local(module, reach=Fraction(conv.kernel_size[0] // 2))


def _norm(module: nn.Module) -> Norm:
    _require(type(module) is nn.GroupNorm, f"normalisation {type(module).__name__}")
    return Norm(module)


def _activation(module: nn.Module) -> Local:
    _require(isinstance(module, _ACTIVATIONS), f"activation {type(module).__name__}")
    return Local(module)


def _downsample(down: nn.Module) -> Local:
    from diffusers.models.downsampling import Downsample2D

    _require(type(down) is Downsample2D and down.norm is None, f"downsampler {down}")
    if not down.use_conv:  # 2x2 average pool: reads its own footprint only
        return Local(down, scale=Fraction(1, 2))
    conv = getattr(down.conv, "base_layer", down.conv)
    # 3x3, stride 2, padded (0, 1) (diffusers' asymmetric pad) or 1: an output px reads one
    # input px past its 2x2 footprint, on one side.
    _require(isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)
             and conv.stride == (2, 2) and conv.dilation == (1, 1)
             and conv.padding in ((0, 0), (1, 1)) and conv.padding_mode == "zeros",
             f"downsampling convolution {conv}")
    return Local(down, reach=Fraction(1), scale=Fraction(1, 2))


def _upsample(up: nn.Module) -> Local:
    from diffusers.models.upsampling import Upsample2D

    _require(type(up) is Upsample2D and up.norm is None and not up.use_conv_transpose
             and up.interpolate, f"upsampler {up}")
    if not up.use_conv:
        return Local(up, scale=Fraction(2))
    conv = _conv(up.conv if up.name == "conv" else up.Conv2d_0)
    # Nearest x2, then the conv: its reach in output px is half that in input px.
    return Local(up, reach=conv.reach / 2, scale=Fraction(2))


def _resnet(block: nn.Module) -> list[Step]:
    from diffusers.models.resnet import ResnetBlock2D

    _require(type(block) is ResnetBlock2D, f"resnet {type(block).__name__}")
    # Without a time embedding, every mode but "scale_shift" (an error there) is plain norm2.
    _require(block.time_emb_proj is None and block.time_embedding_norm != "scale_shift",
             "resnet with a time embedding")
    _require(block.upsample is None and block.downsample is None, "resnet that resamples")
    _require(not (block.training and block.dropout.p), "resnet dropout in training mode")
    act = _activation(block.nonlinearity)
    shortcut = None
    if block.conv_shortcut is not None:
        shortcut = _conv(block.conv_shortcut)
        _require(shortcut.reach == 0, f"resnet shortcut {block.conv_shortcut}")
    return [Save(), _norm(block.norm1), act, _conv(block.conv1), _norm(block.norm2), act,
            _conv(block.conv2),
            Add(None if shortcut is None else shortcut.fn, block.output_scale_factor)]


def _mid_block(mid: nn.Module) -> list[Step]:
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D

    _require(type(mid) is UNetMidBlock2D, f"mid block {type(mid).__name__}")
    steps = _resnet(mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            steps += _attention(attn)
        steps += _resnet(resnet)
    return steps


def _attention(attn: nn.Module) -> list[Step]:
    from diffusers.models.attention_processor import (
        Attention,
        AttnProcessor,
        AttnProcessor2_0,
        FusedAttnProcessor2_0,
    )

    _require(type(attn) is Attention, f"attention {type(attn).__name__}")
    processor = type(attn.processor)
    _require(processor in (AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0),
             f"attention processor {processor.__name__}")
    _require(attn.spatial_norm is None and attn.norm_q is None and attn.norm_k is None
             and not attn.is_cross_attention and attn.added_kv_proj_dim is None
             and attn.residual_connection and attn.scale_qk,
             "attention options (spatial/qk norm, cross attention, no residual, unscaled qk)")
    _require(not (attn.training and attn.to_out[1].p), "attention dropout in training mode")
    norm = [] if attn.group_norm is None else [_norm(attn.group_norm)]
    fused = processor is FusedAttnProcessor2_0
    return [Save(), *norm, Attend(partial(_self_attention, attn, fused)),
            Add(None, attn.rescale_output_factor)]


def _self_attention(attn: Attention, fused: bool, x: Tensor) -> Tensor:
    """diffusers' AttnProcessor2_0 between its GroupNorm and residual: (B, C, h, w) -> same."""
    b, c, h, w = x.shape
    tokens = x.reshape(b, c, h * w).transpose(1, 2)
    if fused:
        q, k, v = attn.to_qkv(tokens).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
    heads = attn.heads
    q, k, v = (t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    out = attn.to_out[0](out.transpose(1, 2).reshape(b, h * w, -1).to(q.dtype))
    return out.transpose(1, 2).reshape(b, -1, h, w)
