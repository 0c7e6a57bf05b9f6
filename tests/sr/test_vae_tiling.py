"""The tiled VAE with whole-image GroupNorm statistics (vae_steps + vae_tiling)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL
from diffusers.models.attention_processor import SlicedAttnProcessor

from examples.tsdsr.models.tiny import CONFIGS, random_backbone
from scoredistill.sr.latents import decode, encode
from scoredistill.sr.tiling import tiled_apply, tiled_decode, tiled_encode
from scoredistill.sr.vae_steps import decoder_network, encoder_network, exact_margin
from scoredistill.sr.vae_tiling import plan_tiles, run_tiled
from tests.sr.test_tiling import smooth_image


def make_vae(levels: int = 4, layers: int = 2, *, attention: bool = True, quant: bool = True,
             **overrides) -> AutoencoderKL:
    """A small random SD3-like VAE (16 latent channels, SD3's shift and scale), in eval mode."""
    config = dict(down_block_types=("DownEncoderBlock2D",) * levels,
                  up_block_types=("UpDecoderBlock2D",) * levels,
                  block_out_channels=(8, 16, 32, 32)[:levels], layers_per_block=layers,
                  latent_channels=16, norm_num_groups=4, use_quant_conv=quant,
                  use_post_quant_conv=quant, mid_block_add_attention=attention,
                  shift_factor=0.0609, scaling_factor=1.5305)
    torch.manual_seed(0)
    return AutoencoderKL(**{**config, **overrides}).eval()


def untiled_encoder(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    moments = vae.encoder(x)
    return moments if vae.quant_conv is None else vae.quant_conv(moments)


def untiled_decoder(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    return vae.decoder(z if vae.post_quant_conv is None else vae.post_quant_conv(z))


def per_tile_statistics(fn, x: torch.Tensor, *, tile: int, margin: int, grid: int,
                        scale: Fraction) -> torch.Tensor:
    """The same tiles run one by one through ``fn``, each normalising with its own statistics."""
    def cut(span: slice, origin: int = 0) -> slice:  # input px -> output px
        return slice(int((span.start - origin) * scale), int((span.stop - origin) * scale))

    out = None
    for t in plan_tiles(*x.shape[-2:], tile=tile, margin=margin, grid=grid):
        piece = fn(x[(..., *t.window)])
        if out is None:
            out = piece.new_zeros(*piece.shape[:2], *(int(n * scale) for n in x.shape[-2:]))
        out[(..., *map(cut, t.core))] = piece[
            ..., cut(t.core[0], t.window[0].start), cut(t.core[1], t.window[1].start)]
    return out


@pytest.mark.parametrize(("height", "width", "tile", "margin", "grid"),
                         [(64, 64, 64, 0, 8), (64, 200, 48, 32, 8), (40, 72, 7, 11, 1),
                          (24, 24, 5, 3, 8)])
def test_cores_partition_the_image_on_the_grid(height, width, tile, margin, grid):
    tiles = plan_tiles(height, width, tile=tile, margin=margin, grid=grid)
    cover = torch.zeros(height, width, dtype=torch.long)
    pad = -(-margin // grid) * grid  # the margin rounded up to the grid
    for t in tiles:
        cover[t.core] += 1
        for core, window, size in zip(t.core, t.window, (height, width), strict=True):
            assert core.start % grid == 0 and core.stop % grid == 0
            assert core.stop - core.start <= max(tile, grid)
            assert window == slice(max(core.start - pad, 0), min(core.stop + pad, size))
    assert (cover == 1).all()
    with pytest.raises(ValueError, match="multiples"):
        plan_tiles(height + 1, width, tile=tile, margin=margin, grid=2)


VAES = {
    "tiny": lambda: random_backbone().vae,  # SD3's layout: no quant convs, one layer per block
    "4-level-quant": make_vae,
    "fused-qkv-mish": lambda: make_vae(quant=False, act_fn="mish"),
    "3-level-no-attention": lambda: make_vae(3, 1, attention=False),
}


@pytest.fixture(params=VAES)
def vae(request) -> AutoencoderKL:
    vae = VAES[request.param]()
    if request.param.startswith("fused"):
        vae.fuse_qkv_projections()
    return vae


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@torch.no_grad()
def test_one_tile_reproduces_the_diffusers_encoder_and_decoder(vae, dtype, tolerance):
    # The step lists are a faithful re-implementation: run as one tile (GroupNorm statistics
    # pooled from that tile's core, the whole image) they give diffusers' output, to rounding.
    torch.nn.Module.to(vae, dtype)
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0), dtype=dtype) * 2 - 1
    z = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(1), dtype=dtype)
    for net, inp, reference in ((encoder_network(vae), x, untiled_encoder(vae, x)),
                                (decoder_network(vae), z, untiled_decoder(vae, z))):
        out = run_tiled(net, inp, tile=max(inp.shape[-2:]), margin=0)
        assert out.dtype == dtype and out.shape == reference.shape
        assert (out - reference).abs().max() < tolerance * reference.abs().max().clamp(min=1)


@torch.no_grad()
@pytest.mark.parametrize(("tiles", "equal"), [((32, 8), True), ((44, 11), False)])
def test_with_the_exact_margin_tiles_equal_the_untiled_network_without_attention(tiles, equal):
    # Without attention, a tile's core sees exactly what it sees in the whole image once the
    # margin covers the receptive field, and the pooled statistics are then the whole image's:
    # many small tiles give the untiled result to float64 rounding. A smaller margin does not.
    # Unequal tiles too: pooling must weight each tile's moments by its size.
    vae = torch.nn.Module.to(make_vae(3, 1, attention=False), torch.float64)
    x = smooth_image(128, 160).double()
    z = torch.randn(1, 16, 32, 40, generator=torch.Generator().manual_seed(0)).double()
    for net, inp, reference, tile in ((encoder_network(vae), x, untiled_encoder(vae, x), tiles[0]),
                                      (decoder_network(vae), z, untiled_decoder(vae, z), tiles[1])):
        margin = exact_margin(net)
        plan = plan_tiles(*inp.shape[-2:], tile=tile, margin=margin, grid=net.grid)
        assert (len({tuple(s.stop - s.start for s in t.core) for t in plan}) == 1) == equal
        exact = run_tiled(net, inp, tile=tile, margin=margin)
        short = run_tiled(net, inp, tile=tile, margin=margin // 2)
        assert (exact - reference).abs().max() < 1e-12
        assert (short - reference).abs().max() > 1e-6


@torch.no_grad()
def test_tiles_run_in_batches_equal_tiles_run_one_at_a_time():
    # Tiles of equal window shape and core position go through each step together; their
    # statistics pool per tile and per sample, as when they run one by one (float64: exact to
    # rounding). 12 tiles of several shapes, 2 samples, attention in the mid block.
    vae = torch.nn.Module.to(make_vae(3, 1), torch.float64)
    x = torch.cat([smooth_image(96, 128, seed=s) for s in (0, 1)]).double()
    z = torch.randn(2, 16, 24, 32, generator=torch.Generator().manual_seed(0)).double()
    for net, inp, tile in ((encoder_network(vae), x, 32), (decoder_network(vae), z, 8)):
        one = run_tiled(net, inp, tile=tile, margin=8, offload=True)
        many = run_tiled(net, inp, tile=tile, margin=8, offload=True, batch_size=12)
        assert (many - one).abs().max() < 1e-12
    with pytest.raises(ValueError, match="batch_size"):
        run_tiled(encoder_network(vae), x, tile=32, margin=8, batch_size=0)


def test_exact_margins_of_the_sd3_vae():
    # SD3-medium's VAE shapes (on the meta device: only the modules are inspected).
    with torch.device("meta"):
        vae = AutoencoderKL(**CONFIGS["sd3-medium"].vae)
    encoder, decoder = encoder_network(vae), decoder_network(vae)
    assert (encoder.grid, encoder.scale, exact_margin(encoder)) == (8, 1 / 8, 112)
    assert (decoder.grid, decoder.scale, exact_margin(decoder)) == (1, 8, 18)


@torch.no_grad()
def test_statistics_are_the_whole_image_across_a_brightness_edge():
    # Dark top half, bright bottom half, tiles split at the edge. Same tiles, same (exact)
    # margin, so only where the statistics come from differs: each tile's own statistics
    # re-centre its half (moving its mean), the pooled ones leave it where the whole image has it.
    vae = make_vae(3, 1, attention=False)
    x = smooth_image(128, 96) * 0.1 + torch.tensor([-0.8, 0.8]).repeat_interleave(64)[:, None]
    net = encoder_network(vae)
    margin = exact_margin(net)
    full = untiled_encoder(vae, x)
    synced = run_tiled(net, x, tile=64, margin=margin)
    own = per_tile_statistics(lambda a: untiled_encoder(vae, a), x, tile=64, margin=margin,
                              grid=net.grid, scale=net.scale)
    half = full.shape[-2] // 2

    def shift(y: torch.Tensor) -> float:  # largest move of a half's channel mean
        return max((y - full)[..., rows, :].mean(dim=(0, 2, 3)).abs().max().item()
                   for rows in (slice(0, half), slice(half, None)))

    assert shift(own) > 0.05
    assert shift(synced) < 1e-5


@torch.no_grad()
def test_synced_tiles_are_closer_to_untiled_than_per_tile_statistics():
    # With attention (per tile) and a margin below the receptive field, tiles cannot be exact;
    # pooled statistics still remove most of the error of the current per-tile path
    # (tiled_apply: same window size, Gaussian blending) and of the same tiles unsynced.
    vae = make_vae()
    x = smooth_image(256, 384)
    enc, dec = encoder_network(vae), decoder_network(vae)
    z = untiled_encoder(vae, x)[:, :16]
    cases = [("encoder", enc, x, lambda a: untiled_encoder(vae, a), 64, 32, 8),
             ("decoder", dec, z, lambda a: untiled_decoder(vae, a), 8, 4, 1)]
    for name, net, inp, fn, tile, margin, align in cases:
        full = fn(inp)
        errors = {
            "blended per-tile": tiled_apply(fn, inp, tile=tile + 2 * margin,
                                            overlap=2 * margin, align=align) - full,
            "per-tile": per_tile_statistics(fn, inp, tile=tile, margin=margin, grid=net.grid,
                                            scale=net.scale) - full,
            "synced": run_tiled(net, inp, tile=tile, margin=margin) - full,
        }
        mean = {k: e.abs().mean().item() for k, e in errors.items()}
        print(f"{name} (output std {full.std():.3f}): " + ", ".join(  # shown with pytest -s
            f"{k} max {e.abs().max():.4f} mean {mean[k]:.5f}" for k, e in errors.items()))
        assert mean["synced"] < 0.5 * min(mean["blended per-tile"], mean["per-tile"])


@torch.no_grad()
def test_tiled_encode_and_decode_keep_the_posterior_and_latent_transform():
    # No attention and exact margins: the tiled calls must equal the untiled ones, including
    # the posterior (mode, or a seeded sample: same shape, same noise), SD3's shift and scale,
    # and the decoder's clamp.
    vae = make_vae(3, 1, attention=False, quant=False)
    x = smooth_image(128, 160)
    enc, dec = exact_margin(encoder_network(vae)), exact_margin(decoder_network(vae))
    for posterior in ("mode", "sample"):
        got, want = (fn(vae, x, posterior=posterior, generator=torch.Generator().manual_seed(3),
                        **kw) for fn, kw in ((tiled_encode, dict(tile=32, overlap=enc)),
                                             (encode, {})))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    z = encode(vae, x, posterior="mode") * 3
    torch.testing.assert_close(tiled_decode(vae, z, tile=8, overlap=dec), decode(vae, z),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="posterior"):
        tiled_encode(vae, x, tile=32, posterior="mean")  # type: ignore[arg-type]


@torch.no_grad()
def test_half_precision_follows_diffusers():
    # bf16 activations normalised with float32 statistics, as GroupNorm does: bf16 rounding.
    vae = torch.nn.Module.to(make_vae(), torch.bfloat16)
    x = smooth_image(64, 64).bfloat16()
    out = run_tiled(encoder_network(vae), x, tile=64, margin=0)
    reference = untiled_encoder(vae, x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference.float()).abs().max() < 0.05 * reference.abs().max().float()


def test_unsupported_parts_are_refused():
    with pytest.raises(NotImplementedError, match="down block AttnDownEncoderBlock2D"):
        encoder_network(make_vae(2, 1, down_block_types=("AttnDownEncoderBlock2D",) * 2))
    vae = make_vae(2, 1)
    vae.set_attn_processor(SlicedAttnProcessor(2))
    with pytest.raises(NotImplementedError, match="attention processor SlicedAttnProcessor"):
        decoder_network(vae)
    vae = make_vae(2, 1)
    vae.decoder.mid_block.to(torch.bfloat16)
    with pytest.raises(NotImplementedError, match="mix of parameter dtypes"):
        decoder_network(vae)


@torch.no_grad()
def test_compiled_tiles_equal_eager_tiles_with_a_few_graphs(tmp_path, monkeypatch):
    """``compile=True`` fuses each norm and its SiLU into one dynamic-shape kernel: the tiled
    encoder and decoder equal the eager ones on two image sizes (several tile shapes each), and
    every norm, channel count, tile shape and size shares a few graphs (static shapes would
    compile one per shape and fall back to eager at dynamo's recompile limit)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    vae = make_vae(3, 1)
    counters.clear()
    for side in (64, 96):
        x = smooth_image(side, side + 32)
        z = torch.randn(1, 16, side // 8, side // 8 + 4, generator=torch.Generator().manual_seed(0))
        for fn, inp, tile in ((tiled_encode, x, 40), (tiled_decode, z, 5)):
            eager = fn(vae, inp, tile=tile, overlap=8 if fn is tiled_encode else 1)
            fast = fn(vae, inp, tile=tile, overlap=8 if fn is tiled_encode else 1, compile=True)
            torch.testing.assert_close(fast, eager, rtol=0, atol=1e-5)
    # 5 measured (with and without the SiLU, size-1 specialisations); 8 is the recompile limit.
    assert 1 <= counters["stats"]["unique_graphs"] < 8, dict(counters["stats"])
