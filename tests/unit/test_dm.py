"""Exact checks of the distribution-matching losses (DESIGN.md §3)."""

from __future__ import annotations

import torch

from crossdistill.losses.dm import GANHead, dm_loss, gan_discriminator_loss, gan_generator_loss


def _grad(z_hat, mu_real, mu_fake):
    z = z_hat.clone().requires_grad_(True)
    loss, _ = dm_loss(z, mu_real, mu_fake)
    loss.backward()
    return loss, z.grad


def test_dm_gradient_is_zero_when_real_and_fake_agree():
    gen = torch.Generator().manual_seed(0)
    z, mu = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    loss, grad = _grad(z, mu, mu.clone())
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0


def test_dm_gradient_is_normalised_score_difference():
    gen = torch.Generator().manual_seed(1)
    z, mu_r, mu_f = (torch.randn(2, 4, 6, 6, generator=gen) for _ in range(3))
    _, grad = _grad(z, mu_r, mu_f)
    denominator = (z - mu_r).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (mu_f - mu_r) / denominator / z.numel()
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)


def test_dm_denominator_is_clamped():
    z = torch.zeros(1, 1, 2, 2)
    _, grad = _grad(z, z.clone(), torch.ones_like(z))
    assert torch.isfinite(grad).all()


def _gaussian_x0(x_t, a, s, mean, cov):
    """Exact E[x0 | x_t] for x0 ~ N(mean, cov), x_t = a x0 + s eps: mean + cov a (a² cov + s² I)⁻¹ (x_t − a mean)."""
    a, s = a.view(-1, 1, 1), s.view(-1, 1, 1)
    gain = a * cov @ torch.linalg.inv(a**2 * cov + s**2 * torch.eye(2, dtype=x_t.dtype))  # [N, 2, 2]
    return mean + (gain @ (x_t - a[:, 0] * mean).unsqueeze(-1)).squeeze(-1)


def test_dm_update_moves_samples_towards_real_gaussian():
    """Particles from N(0, I); exact real score of N(m, Σ); exact fake score of the particles' own Gaussian fit.

    Descending the DM loss must bring the particles' mean and covariance closer to the real ones."""
    torch.manual_seed(0)
    real_mean = torch.tensor([2.0, -1.0], dtype=torch.float64)
    real_cov = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
    x = torch.randn(512, 2, dtype=torch.float64)

    def distance(p):
        return (p.mean(0) - real_mean).norm().item(), (torch.cov(p.T) - real_cov).norm().item()

    start = distance(x)
    for _ in range(300):
        t = torch.rand(len(x), dtype=torch.float64) * 0.96 + 0.02
        a, s = torch.cos(t * torch.pi / 2), torch.sin(t * torch.pi / 2)
        x_t = a[:, None] * x + s[:, None] * torch.randn_like(x)
        fake_mean, fake_cov = x.mean(0), torch.cov(x.T)
        mu_real = _gaussian_x0(x_t, a, s, real_mean, real_cov)
        mu_fake = _gaussian_x0(x_t, a, s, fake_mean, fake_cov)
        z = x.view(-1, 2, 1, 1).clone().requires_grad_(True)
        loss, _ = dm_loss(z, mu_real.view(-1, 2, 1, 1), mu_fake.view(-1, 2, 1, 1))
        loss.backward()
        # The gradient is g / numel; step on g itself with a fixed rate.
        x = x - 0.02 * z.grad.view(-1, 2) * z.numel()
    end = distance(x)
    assert end[0] < 0.2 * start[0], (start, end)
    assert end[1] < 0.5 * start[1], (start, end)


def test_gan_losses_are_non_saturating_and_head_handles_both_layouts():
    head = GANHead(8, hidden=16)
    assert head(torch.randn(2, 8, 4, 4)).shape == (2,)
    assert head(torch.randn(2, 16, 8)).shape == (2,)
    confident = torch.full((4,), 10.0)
    # Generator: samples called real → ~0 loss; called fake → large loss with a non-vanishing gradient.
    assert gan_generator_loss(confident) < 1e-4
    wrong = (-confident).requires_grad_(True)
    gan_generator_loss(wrong).backward()
    assert wrong.grad.abs().min() > 0.2
    assert gan_discriminator_loss(confident, -confident) < 1e-3
    assert gan_discriminator_loss(-confident, confident) > 19.0
