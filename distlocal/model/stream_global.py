"""
A streamed stage's global part in chunks of instances: its device memory is set by the chunk, not by the slide.

The global part of A_i (or H) is AuxClassifier.pooled on the reduced map z: GroupNorm with one channel per group
(per-channel statistics over every instance), ReLU, gated attention (a softmax over every instance) and the MLP on the
pooled vector. Only the statistics, the N attention scores and the pooled vector see every instance, and each is a
sum over instances, so z and its gradient stay in host memory and the device holds one chunk's instances at a time:

- forward, without gradients: the statistics in two passes (the mean, then the mean squared deviation from it, both
  summed in float64: the one-pass E[z^2] - mean^2 cancels catastrophically when a channel's mean is large against
  its spread, two passes do not, and float64 sums keep the order of summation out of the result); the scores s of
  every chunk; the softmax a over all N; the dropout mask, drawn as GatedAttentionPool draws it (the same generator,
  one draw of N, after the softmax); pooled = sum_i a_i m_i h_i; the MLP on pooled runs with ordinary autograd.
- backward, given g = d loss / d pooled: with p_i = a_i m_i, d loss / d h_i = p_i g directly and
  d loss / d s_i = p_i (g . h_i) - a_i (g . pooled) through the softmax; each chunk's h and s are recomputed with
  autograd from the statistics as leaf tensors, which gathers the attention's and GroupNorm's affine gradients, the
  chunk's direct d loss / d z and the statistics' gradients; a last pass adds the statistics' share to every
  instance: d mean / d z_i = 1 / N, d var / d z_i = 2 (z_i - mean) / N (through rstd = (var + eps)^-1/2).
Recomputation makes the result equal AuxClassifier.pooled's up to summation order (tests/test_stream.py, float64).

Example::

    part = ChunkedPooled(classifier, z, chunk=64, device=device, generator=generator)  # z: 1 x C x h x w, host
    F.cross_entropy(part.logits, target).backward()  # the MLP's gradients and d loss / d pooled
    grad_z = part.backward()  # d loss / d z, in host memory beside z
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from distlocal.model.mil import AuxClassifier

__all__ = ["ChunkedPooled"]


class ChunkedPooled:
    """AuxClassifier.pooled(z) in chunks of ``chunk`` instances on ``device``; z (and its gradient) stay where z is."""

    def __init__(self, classifier: AuxClassifier, z: torch.Tensor, chunk: int, device: torch.device,
                 generator: torch.Generator | None = None):
        self.classifier, self.z, self.device = classifier, z, device
        # At least fp32, as AuxClassifier.pooled runs GroupNorm (autocast's fp32 list) and the attention
        self.dtype = torch.promote_types(z.dtype, torch.float32)
        self.flat = z.flatten(2)[0]  # C x N, a view of z
        n = self.flat.shape[1]
        self.bounds = [(i, min(n, i + max(1, chunk))) for i in range(0, n, max(1, chunk))]
        with torch.no_grad(), _autocast_off(device):
            self.mean, self.rstd = self._statistics()
            scores = torch.cat([self.classifier.pool.scores(self._hidden(self._instances(*b), self.mean, self.rstd))
                                for b in self.bounds])
            self.attention = torch.softmax(scores, dim=0)  # N scalars: all the device keeps between the passes
            self.pooling = classifier.pool.dropped(self.attention, generator)
            pooled = sum(self.pooling[i0:i1] @ self._hidden(self._instances(i0, i1), self.mean, self.rstd)
                         for i0, i1 in self.bounds)
        self.pooled = pooled.detach().requires_grad_(torch.is_grad_enabled())
        with _autocast_off(device):
            self.logits = classifier.classify(self.pooled)[None]
        self.attention_map = self.attention.view(z.shape[-2:])

    def _instances(self, i0: int, i1: int) -> torch.Tensor:
        return self.flat[:, i0:i1].T.to(self.device, self.dtype)

    def _hidden(self, z: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        """The instances after GroupNorm (with the given statistics) and ReLU."""
        norm = self.classifier.reduce[1]
        return F.relu((z - mean) * rstd * norm.weight.to(self.dtype) + norm.bias.to(self.dtype))

    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and 1 / sqrt(biased variance + eps), in two float64 passes over the chunks."""
        n = self.flat.shape[1]
        total = sum(self._instances(*b).sum(0, dtype=torch.float64) for b in self.bounds)
        mean = total / n
        squares = sum((self._instances(*b).to(torch.float64) - mean).square().sum(0) for b in self.bounds)
        rstd = (squares / n + self.classifier.reduce[1].eps).rsqrt()
        return mean.to(self.dtype), rstd.to(self.dtype)

    def backward(self) -> torch.Tensor:
        """
        After the loss's backward (which gave d loss / d pooled): accumulate the attention's and GroupNorm's
        parameter gradients and return d loss / d z, shaped and placed as z (in the global part's dtype).
        """
        g = self.pooled.grad if self.pooled.grad is not None else torch.zeros_like(self.pooled)
        g_pooled = g @ self.pooled.detach()
        # In the compute dtype: the direct part and the statistics' share add before any rounding to z's dtype
        grad_z = torch.zeros(self.z.shape, dtype=self.dtype, device=self.z.device)
        grad_flat = grad_z.flatten(2)[0]
        mean, rstd = (s.detach().clone().requires_grad_() for s in (self.mean, self.rstd))
        with torch.enable_grad(), _autocast_off(self.device):
            for i0, i1 in self.bounds:
                z = self._instances(i0, i1).detach().requires_grad_()
                h = self._hidden(z, mean, rstd)
                s = self.classifier.pool.scores(h)
                pooling = self.pooling[i0:i1]
                grad_s = pooling * (h.detach() @ g) - self.attention[i0:i1] * g_pooled
                torch.autograd.backward([s, h], [grad_s, pooling[:, None] * g])
                grad_flat[:, i0:i1] = z.grad.T.to(grad_z.device, grad_z.dtype)
        n = self.flat.shape[1]
        zero = torch.zeros_like(self.mean)
        grad_mean = mean.grad if mean.grad is not None else zero
        grad_var = (rstd.grad if rstd.grad is not None else zero) * -0.5 * self.rstd.pow(3)
        with torch.no_grad():
            for i0, i1 in self.bounds:
                share = grad_mean / n + 2 * grad_var / n * (self._instances(i0, i1) - self.mean)
                grad_flat[:, i0:i1] += share.T.to(grad_z.device, grad_z.dtype)
        return grad_z


def _autocast_off(device: torch.device):
    """No autocast: the global part runs in at least fp32 (AuxClassifier.pooled's reasons), in its own dtype."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else nullcontext()
