"""engine.parameterizations: LGM's pyramid (levels, growth schedule, colour decorrelation, decode range) and pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.parameterizations import (COLOR_CORRELATION, PixelImages, PyramidImages, decorrelated_to_rgb,
                              pyramid_full_step, pyramid_resolutions, rgb_to_decorrelated, synthetic_labels)


def test_pyramid_resolutions_double_up_to_the_full_size():
    assert pyramid_resolutions(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert pyramid_resolutions(36) == [1, 2, 4, 8, 16, 32, 36]
    assert pyramid_resolutions(1) == [1]
    # The authors' schedule: 9 levels at 256 px, one every 200 steps -> full resolution from step 1600.
    assert pyramid_full_step(256, 200) == 1600


def test_colour_matrix_is_lucids_normalized_and_invertible():
    lucid = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    norms = torch.linalg.norm(lucid, dim=0)
    torch.testing.assert_close(COLOR_CORRELATION, lucid / norms.max())
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(rgb_to_decorrelated(decorrelated_to_rgb(x)), x, atol=1e-5, rtol=1e-5)


def test_growth_schedule_shapes_and_decoded_range():
    gen = torch.Generator().manual_seed(0)
    syn = PyramidImages(3, 2, 36, init="noise", grow_every=5, generator=gen)
    assert [tuple(p.shape) for p in syn.parameters()] == [(6, 3, 1, 1)]
    grew_at = [s for s in range(40) if syn.grow(s)]
    assert grew_at == [5, 10, 15, 20, 25, 30]
    assert [p.shape[-1] for p in syn.parameters()] == [1, 2, 4, 8, 16, 32, 36]
    assert all(p.requires_grad and p.is_leaf for p in syn.parameters())
    images = syn.images()
    assert images.shape == (6, 3, 36, 36)
    assert images.min() > 0 and images.max() < 1
    # The decode is exactly: sum of bilinear upsamplings -> colour matrix -> sigmoid(2x).
    total = sum(F.interpolate(p, size=(36, 36), mode="bilinear", align_corners=False) for p in syn.parameters())
    expected = torch.sigmoid(2 * torch.einsum("ij,njhw->nihw", COLOR_CORRELATION, total))
    torch.testing.assert_close(images, expected)
    assert syn.labels.tolist() == [0, 0, 1, 1, 2, 2] == synthetic_labels(3, 2).tolist()


def test_growth_init_authors_rescales_and_zero_keeps_the_image():
    gen = torch.Generator().manual_seed(1)
    syn = PyramidImages(2, 1, 8, init="noise", grow_every=1, generator=gen)
    first = syn.parameters()[0].detach().clone()
    syn.grow(1)
    levels = syn.parameters()
    torch.testing.assert_close(levels[0], first / 2)  # old_len / new_len = 1/2
    assert levels[1].abs().sum() > 0  # new level is N(0,1)/2, not zero
    zero = PyramidImages(2, 1, 8, init="noise", grow_every=1, generator=torch.Generator().manual_seed(1),
                         grow_init="zero")
    before = zero.images().detach().clone()
    zero.grow(1)
    assert zero.parameters()[1].abs().sum() == 0
    torch.testing.assert_close(zero.images(), before)


def test_real_init_reproduces_the_real_images_and_state_roundtrip():
    gen = torch.Generator().manual_seed(2)
    real = torch.rand(4, 3, 16, 16, generator=gen) * 0.9 + 0.05
    syn = PyramidImages(2, 2, 16, init="real", real_images=real)
    assert syn.complete and not syn.grow(10_000)
    torch.testing.assert_close(syn.images(), real, atol=1e-4, rtol=0)
    pix = PixelImages(2, 2, 16, init="real", real_images=real)
    torch.testing.assert_close(pix.images(), real, atol=1e-5, rtol=0)

    grown = PyramidImages(2, 2, 16, init="noise", grow_every=1, generator=torch.Generator().manual_seed(3))
    grown.grow(3)
    copy = PyramidImages(2, 2, 16, init="noise", grow_every=1, generator=torch.Generator().manual_seed(99))
    copy.load_state_dict(grown.state_dict())
    assert torch.equal(copy.images(), grown.images())
    grown.grow(4)
    copy.grow(4)  # same generator state -> the same new level
    assert torch.equal(copy.images(), grown.images())


def test_pixels_noise_init_in_range_and_differentiable():
    pix = PixelImages(3, 1, 12, init="noise", generator=torch.Generator().manual_seed(0))
    img = pix.images()
    assert img.shape == (3, 3, 12, 12) and 0 < img.min() and img.max() < 1
    img.sum().backward()
    assert pix.parameters()[0].grad is not None and not pix.grow(1000)


def test_grey_and_undecorrelated_decodes():
    """Grey images: one channel, replicated, no colour matrix; --no-decorrelate: plain RGB logits."""
    from engine.parameterizations import decode, encode

    gen = torch.Generator().manual_seed(0)
    grey = PyramidImages(2, 1, 8, init="noise", grow_every=1, channels=1, generator=gen)
    for s in range(4):
        grey.grow(s)
    images = grey.images()
    assert images.shape == (2, 3, 8, 8) and torch.equal(images[:, 0], images[:, 1])
    assert torch.equal(images[:, 1], images[:, 2])
    x = torch.randn(2, 3, 4, 4, generator=gen)
    torch.testing.assert_close(decode(x, decorrelate=False), torch.sigmoid(2 * x))
    real = torch.rand(2, 3, 4, 4, generator=gen) * 0.9 + 0.05
    for channels, decorrelate in ((3, True), (3, False)):
        torch.testing.assert_close(decode(encode(real, channels, decorrelate), decorrelate), real, atol=1e-5, rtol=0)
    grey_real = real.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    torch.testing.assert_close(decode(encode(real, 1)), grey_real, atol=1e-5, rtol=0)
    pixels = PixelImages(2, 1, 8, init="noise", channels=1, generator=torch.Generator().manual_seed(1))
    assert pixels.parameters()[0].shape == (2, 1, 8, 8)


def test_zero_init_is_the_authors_init_mode_zero():
    """Grey images at start; growth keeps the decoded image (the authors rescale the old levels by
    old/new and add their mean as the new level, src/synsets/pyramid.py: the same sum, so the same Adam
    trajectory of the image) and each level of a grown pyramid gets the gradient of the image."""
    syn = PyramidImages(3, 1, 16, grow_every=2, init="zero", channels=1)
    torch.testing.assert_close(syn.images(), torch.full((3, 3, 16, 16), 0.5))
    opt = torch.optim.Adam(syn.parameters(), lr=0.1)
    target = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for step in range(8):
        if syn.grow(step):
            before = syn.images().detach()
            opt = torch.optim.Adam(syn.parameters(), lr=0.1)
            torch.testing.assert_close(syn.images().detach(), before)
        loss = (syn.images() - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert [p.shape[-1] for p in syn.parameters()] == [1, 2, 4, 8]
    assert not torch.allclose(syn.images(), torch.full_like(target, 0.5))
    pixels = PixelImages(2, 1, 8, init="zero")
    torch.testing.assert_close(pixels.images(), torch.full((2, 3, 8, 8), 0.5))


def test_parameters_are_contiguous_from_every_source_and_rows_decode_like_the_whole():
    """Fused Adam copies a non-contiguous parameter every step (the real init's einsum gives a permuted
    layout); and a subset of rows decodes to those rows of the whole decode (engine.distill.backprop)."""
    gen = torch.Generator().manual_seed(2)
    real = torch.rand(4, 3, 16, 16, generator=gen) * 0.9 + 0.05
    made = [PixelImages(2, 2, 16, init="real", real_images=real), PyramidImages(2, 2, 16, init="real", real_images=real),
            PixelImages(2, 2, 16, init="noise"), PyramidImages(2, 2, 16, init="noise", grow_every=1)]
    made[-1].grow(3)
    loaded = PixelImages(2, 2, 16, init="zero")
    state = made[0].state_dict()
    state["logits"] = state["logits"].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last
    loaded.load_state_dict(state)
    assert not state["logits"].is_contiguous() and loaded.logits.data_ptr() != state["logits"].data_ptr()
    for syn in made + [loaded]:
        assert all(p.is_contiguous() and p.requires_grad and p.is_leaf for p in syn.parameters())
        rows = torch.tensor([3, 1])
        torch.testing.assert_close(syn.images_from([p.detach()[rows] for p in syn.parameters()]),
                                   syn.images().detach()[rows], atol=1e-6, rtol=0)
