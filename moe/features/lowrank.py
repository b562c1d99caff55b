"""A low-rank model of the training spectra: masked pixels are imputed from it, and the OOD score measures
how well it explains a spectrum.

Clean training flux ``x [D] = mean + components^T a + r`` with ``a ~ N(0, diag(variance))`` [R] (the top R
principal axes of the training flux, orthonormal rows of ``components [R, D]``) and an independent per-pixel
rest ``r ~ N(0, diag(resid_var))`` (what R axes leave unexplained, measured on the training rows). An
observed spectrum is ``y = x + n`` with ``n ~ N(0, diag(s^2 e^2))`` (s the noise level, e the 1-sigma error).

- :meth:`LowRankSpectra.impute`: for a star with usable pixels ``o`` and masked pixels ``m``, the posterior
  of ``a`` given ``y_o`` (a Gaussian: ``Sigma_a = (U_o V_o^-1 U_o^T + diag(variance)^-1)^-1``,
  ``a_hat = Sigma_a U_o V_o^-1 (y_o - mean_o)``, ``V = diag(resid_var + s^2 e^2)``, i.e. least squares on
  the usable pixels weighted by their errors, with the training spread of ``a`` as prior) fills the masked
  pixels with ``mean_m + U_m^T a_hat``. A linear map ``A [P, D]`` (the experts, PCA) of the filled spectrum
  then misses the map of the clean spectrum by ``A_o n_o + g^T (a_hat - a) - A_m r_m`` with ``g = U_m A_m^T``,
  whose variance is, exactly under the model,
  ``s^2 sum_o A^2 e^2 + g^T Sigma_a g + 2 g^T Sigma_a U_o (s^2 e_o^2 / v_o * A_o) + sum_m A^2 resid_var``:
  the noise of the usable pixels, what the imputation does not know, their covariance, and the rest of the
  masked pixels (:meth:`LowRankSpectra.map_variance`). For a star without masked pixels it is the plain
  noise variance ``s^2 sum A^2 e^2``.
- :meth:`LowRankSpectra.ood_parts`: two ways a spectrum can be unlike the training spectra, from the
  least-squares coefficients ``a`` on the usable pixels of the flux as an observation is read, clipped at 0.
  Clipping biases a noisy pixel upwards by ``b(x) = E[max(x + n, 0)] - x = sd phi(x / sd) - x Phi(-x / sd)``
  (``sd = s e``), a whole noise sigma where the flux is near 0 (SNR <= 2), so ``a`` is refitted
  ``DEBIAS_STEPS`` times to the clipped flux minus ``b`` of the model's spectrum ``mean + U^T a`` (a fixed point:
  the coefficients whose clipped model matches the clipped flux). ``distance``: how far its leading ``n_coef``
  coefficients lie from those of the nearest of the training stars ``train_coef [N, n_coef]``, in units of
  their noise, ``min_j mean_r (a_r - t_jr)^2 / nv_r`` with ``nv_r = s^2 sum_o U_ri^2 e_i^2`` (a star outside
  the training labels, a reversed grid, pure noise: coefficients no training star has); ``chi2``: the reduced
  chi^2 of what the R axes leave, ``mean_o (y - mean - U^T a)^2 / (resid_var + s^2 e^2)`` (features no
  training spectrum has). :meth:`LowRankSpectra.ood_score` is the larger of the two, each divided by its
  threshold for the star's SNR bin ``ood_scale[bin]`` (set on training-like stars of that bin: both parts'
  spread under the null grows as the SNR falls): above 1 is unlike them.

Shapes: B batch, D pixels, R axes, P rows of a linear map.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from moe.data.bins import N_SNR_BINS

CHUNK = 64  # stars per step: [64, D] float64 temporaries stay in the L2 cache (6x faster than [1024, D])
DEBIAS_STEPS = 4  # fixed-point steps that take the bias of flux clipped at 0 out of the coefficients


class LowRankSpectra(nn.Module):
    """Buffers of the model (module docstring): ``mean [D]``, ``components [R, D]``, ``variance [R]``,
    ``resid_var [D]``, ``train_coef [N, C]`` (leading coefficients of N clean training spectra) and
    ``ood_scale [4, 2]`` (the thresholds of distance and chi^2 per SNR bin, X L M H)."""

    def __init__(self, n_pixels: int, rank: int, n_train: int = 0, n_coef: int = 8):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_pixels, dtype=torch.float64))
        self.register_buffer("components", torch.zeros(rank, n_pixels, dtype=torch.float64))
        self.register_buffer("variance", torch.ones(rank, dtype=torch.float64))
        self.register_buffer("resid_var", torch.zeros(n_pixels, dtype=torch.float64))
        self.register_buffer("train_coef", torch.zeros(n_train, min(n_coef, rank), dtype=torch.float64))
        self.register_buffer("ood_scale", torch.ones(N_SNR_BINS, 2, dtype=torch.float64))

    @property
    def rank(self) -> int:
        return int(self.components.shape[0])

    def _pixel_var(self, error: torch.Tensor, noise_level: float) -> torch.Tensor:
        """``resid_var + s^2 e^2`` [B, D] (float64), floored so that no pixel has zero variance."""
        v = self.resid_var + noise_level**2 * error.double().square()
        return v.clamp_min(1e-12)

    def _coefficients(self, flux: torch.Tensor, error: torch.Tensor, usable: torch.Tensor, noise_level: float):
        """Least-squares coefficients [B, R] of flux clipped at 0 on its usable pixels, the clipping's bias
        taken out (module docstring), and the centred flux [B, D] they were fitted to (0 where masked)."""
        u = self.components
        clipped = torch.where(usable, flux.double().clamp_min(0.0), 0.0)
        sd = (noise_level * error.double()).clamp_min(1e-12)
        partial = ~usable.all(1)
        pinv = None
        if partial.any():  # U_o U_o^T = I - U_m U_m^T is not the identity: solve
            eye = torch.eye(self.rank, dtype=u.dtype, device=u.device)
            pinv = torch.linalg.pinv(eye - _masked_product(u, u, ~usable[partial]), hermitian=True)

        def fit(y: torch.Tensor) -> torch.Tensor:
            coef = y @ u.T
            if pinv is not None:
                coef[partial] = (pinv @ coef[partial][..., None])[..., 0]
            return coef

        y = torch.where(usable, clipped - self.mean, 0.0)
        coef = fit(y)
        for _ in range(DEBIAS_STEPS):
            x = self.mean + coef @ u  # the model's clean spectrum
            z = x / sd
            bias = sd * torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi) - x * torch.special.ndtr(-z)
            y = torch.where(usable, clipped - bias - self.mean, 0.0)
            coef = fit(y)
        return coef, y

    @torch.no_grad()
    def ood_parts(
        self, flux: torch.Tensor, error: torch.Tensor, usable: torch.Tensor, noise_level: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``distance`` and ``chi2`` [B] (float64; module docstring) of flux [B, D] (error [B, D]) on its
        ``usable`` pixels [B, D] (bool); NaN without usable pixels. Computed ``CHUNK`` stars at a time."""
        t = self.train_coef
        # distance to every training star as one GEMM: [w a^2, -2 w a, w] [b, 1 + 2C] @ [1; t^T; t^2 ^T]
        train = torch.cat([torch.ones_like(t[:, :1]), t, t.square()], 1).T.contiguous()  # [1 + 2C, N]
        parts = [
            self._ood_rows(flux[lo : lo + CHUNK], error[lo : lo + CHUNK], usable[lo : lo + CHUNK], noise_level, train)
            for lo in range(0, len(flux), CHUNK)
        ]
        if not parts:
            empty = torch.zeros(0, dtype=torch.float64, device=flux.device)
            return empty, empty
        return torch.cat([d for d, _ in parts]), torch.cat([c for _, c in parts])

    def _ood_rows(self, flux, error, usable, noise_level, train):
        """:meth:`ood_parts` of a few rows; ``train [1 + 2C, N]`` the training coefficients as the GEMM reads them."""
        u = self.components
        coef, y = self._coefficients(flux, error, usable, noise_level)
        resid = torch.where(usable, y - coef @ u, 0.0)
        n = usable.sum(1)
        err2 = torch.where(usable, noise_level**2 * error.double().square(), 0.0)
        chi2 = (resid.square() / self._pixel_var(error, noise_level)).sum(1) / n.clamp_min(1)
        c = self.train_coef.shape[1]
        a = coef[:, :c]
        w = 1.0 / (err2 @ u[:c].square().T).clamp_min(1e-12)  # [b, C] inverse noise variance of each coefficient
        star = torch.cat([(w * a.square()).sum(1, keepdim=True), -2.0 * w * a, w], 1)  # [b, 1 + 2C]
        if train.shape[1]:
            distance = (star @ train).amin(1).clamp_min(0) / c  # min_j sum_r w_r (a_r - t_jr)^2 / C
        else:  # a model without training stars to compare with
            distance = torch.zeros_like(chi2)
        none = n == 0
        return torch.where(none, torch.nan, distance), torch.where(none, torch.nan, chi2)

    @torch.no_grad()
    def ood_score(
        self,
        flux: torch.Tensor,
        error: torch.Tensor,
        usable: torch.Tensor,
        noise_level: float,
        snr_bin: torch.Tensor,
    ) -> torch.Tensor:
        """``max(distance / ood_scale[b, 0], chi2 / ood_scale[b, 1])`` [B] (float32) with ``b`` the star's SNR bin
        ``snr_bin`` [B] (:func:`moe.data.bins.snr_bin`, as the batches carry it): above 1 is unlike the training
        spectra of that SNR; NaN without usable pixels."""
        distance, chi2 = self.ood_parts(flux, error, usable, noise_level)
        scale = self.ood_scale[torch.as_tensor(snr_bin, device=self.ood_scale.device).long()]
        return torch.maximum(distance / scale[:, 0], chi2 / scale[:, 1]).float()

    @torch.no_grad()
    def impute(
        self, flux: torch.Tensor, error: torch.Tensor, usable: torch.Tensor, noise_level: float, maps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked pixels of flux [B, D] filled from the model, and the variance [B, P] of each row of the linear
        map ``maps [P, D]`` applied to the filled spectrum about its value on the clean spectrum (module
        docstring). ``usable`` [B, D] bool; every row needs at least one usable pixel. Stars without masked
        pixels are returned as they are, with the plain noise variance."""
        err2 = noise_level**2 * error.double().square()
        maps = maps.double()
        a2 = maps.square()
        filled = flux.clone()
        var = (torch.where(usable, err2, 0.0)) @ a2.T  # the usable pixels' noise [B, P]
        rows = torch.nonzero(~usable.all(1)).flatten()
        if len(rows):
            u = self.components
            axes = self._axes_products()
            axes_maps32 = self._cached("maps32", maps, lambda m: (u[:, None] * m[None]).flatten(0, 1).float())
            for lo in range(0, len(rows), CHUNK):
                idx = rows[lo : lo + CHUNK]
                f, v = self._impute_rows(flux[idx].double(), err2[idx], usable[idx], maps, a2, axes, axes_maps32)
                filled[idx] = f.to(flux.dtype)
                var[idx] += v
        return filled, var

    def _axes_products(self) -> torch.Tensor:
        """``U_r U_q`` per pixel, [R*R, D] float64: with it a sum over some pixels of ``U diag(x) U^T`` is one GEMM
        (``x @ products.T``). Kept for the present axes (by content)."""
        return self._cached("axes", self.components, lambda u: (u[:, None] * u[None]).flatten(0, 1).contiguous())

    def _cached(self, name: str, tensor: torch.Tensor, make):
        """``make(tensor.double())``, kept per ``name`` for the last ``tensor`` (by content and device)."""
        digest = hashlib.blake2b(tensor.detach().cpu().double().numpy().tobytes(), digest_size=16).digest()
        key = (digest, str(tensor.device), str(self.components.device))
        cache = self.__dict__.setdefault("_products", {})
        if name not in cache or cache[name][0] != key:
            cache[name] = (key, make(tensor.double()))
        return cache[name][1]

    def _impute_rows(self, y, err2, usable, maps, a2, axes, axes_maps32):
        """Filled flux [b, D] and the imputation's share of each map row's variance [b, P] (float64), with the maps
        ``maps [P, D]`` and their squares ``a2`` in float64,
        ``axes`` ``U_r U_q`` [R*R, D] (float64) and ``axes_maps32`` ``U_r A_p`` [R*P, D] (float32) per pixel: the sums
        over pixels as GEMMs."""
        u, mean = self.components, self.mean
        b, r, p = len(y), self.rank, len(a2)
        o, m = usable.double(), (~usable).double()
        v = (self.resid_var + err2).clamp_min(1e-12)
        winv = o / v  # [b, D]
        prec = (winv @ axes.T).view(b, r, r) + torch.diag(1.0 / self.variance.clamp_min(1e-30))
        chol = torch.linalg.cholesky(prec)
        rhs = ((y - mean) * winv) @ u.T  # [b, R]
        a_hat = torch.cholesky_solve(rhs[..., None], chol)[..., 0]
        filled = torch.where(usable, y, mean + a_hat @ u)
        g = _masked_product(u, maps, ~usable)  # U_m A_m^T [b, R, P]
        # U_o diag(s^2 e^2 / v) A_o^T [b, R, P], the largest product here, in float32: it enters through the cross
        # term only, and its rounding moves the variance by ~5e-10 relative (benchmarks/README.md)
        h = ((o * err2 / v).float() @ axes_maps32.T).view(b, r, p).double()
        sg = torch.cholesky_solve(g, chol)  # Sigma_a g
        unknown = (g * sg).sum(1)  # g^T Sigma_a g [b, P]
        cross = 2.0 * (h * sg).sum(1)
        rest = (m * self.resid_var) @ a2.T
        return filled, unknown + cross + rest


def _masked_product(u: torch.Tensor, maps: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``U diag(masked) A^T`` [b, R, P] (float64) of axes ``u [R, D]``, maps ``A [P, D]`` and the masked pixels
    of each star ``masked [b, D]`` (bool): one batched product over each star's masked pixels, padded to the most
    masked pixels in the rows (a few per star: far fewer products than a sum over all D pixels)."""
    b, d = masked.shape
    count = masked.sum(1)
    most = int(count.max()) if b else 0
    idx = torch.sort(masked.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :most]  # [b, M]
    valid = (torch.arange(most, device=masked.device) < count[:, None]).double()
    ug = (u[:, idx] * valid).permute(1, 0, 2)  # [b, R, M]
    ag = maps[:, idx].permute(1, 2, 0)  # [b, M, P]
    return torch.bmm(ug, ag)
