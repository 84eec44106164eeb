"""PTQD (He et al., NeurIPS 2023): correct the quantization noise of the noise prediction (docs/method.md section 8).

Along the FP calibration trajectories, the quantized prediction is ``eps_q = eps + delta`` with
``delta = k_t * eps + r``: a part correlated with the FP prediction (one least-squares coefficient
``k_t`` per timestep) and a residual ``r``. PTQD divides the prediction by ``1 + k_t``, subtracts the
per-channel mean of the residual that is left (``bias_t``, its bias correction), and absorbs the
residual's variance ``sigma_q_t^2`` into the sampler's noise:

    eps_hat = eps_q / (1 + k_t) - bias_t
    sigma_t'^2 = sigma_t^2 - c_t^2 * sigma_q_t^2,   c_t = sqrt(1 - a_prev - sigma_t^2) - sqrt(a_prev (1 - a_t) / a_t)

(``sigma_t' = 0`` if that is negative). As in the released code, ``k_t`` is used only when positive, the
fit is on the *guided* prediction of a classifier-free-guided set, and the correction is keyed by timestep.

Which parts need a stochastic sampler: the correlated correction and the bias correction act at every
step of any sampler; the variance absorption changes the noise a step adds, so it needs a stochastic
sampler: ``tfmq.diffusion.sampling.sample`` applies it with DDIM eta > 0 (DDPM's ancestral step is not
handled: there only the first two parts act). At eta = 0 there is no noise to absorb into: PTQD then
reduces to the correlated and the bias correction, which is what the embedded default (DDIM, eta 0) runs.

Implementation: a ``NoiseCorrection`` submodule of the UNet (``tfmq_noise_correction``, saved in the
checkpoint) and a forward hook that corrects the UNet output. The hook corrects each output row
(the null and the conditional half of a CFG batch alike); since CFG is linear and ``k_t``/``bias_t``
are the same for both halves, the guided prediction is exactly ``guided_q / (1 + k_t) - bias_t``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..diffusion.sampling import ddim_noise_scale  # noqa: F401  (PTQD's noise fusion; lives with the sampler)

MODULE = "tfmq_noise_correction"


class NoiseCorrection(nn.Module):
    """Per-timestep PTQD tables: ``k`` [T], ``bias`` [T, C], ``sigma_q`` [T] (residual std after the division)."""

    def __init__(self, timesteps: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, sigma_q: torch.Tensor):
        super().__init__()
        self.register_buffer("timesteps", timesteps.to(torch.int64))
        self.register_buffer("k", k.float())
        self.register_buffer("bias", bias.float())
        self.register_buffer("sigma_q", sigma_q.float())
        self.enabled = True

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).to(self.timesteps.device)
        hit = t[:, None] == self.timesteps[None, :]
        if not bool(hit.any(dim=1).all()):
            missing = sorted({int(v) for v, h in zip(t.tolist(), hit.any(dim=1).tolist()) if not h})
            raise ValueError(f"PTQD correction has no entry for timestep(s) {missing[:5]}; calibrated: "
                             f"{self.timesteps.tolist()[:8]}... (sample with the calibration set's sampler and steps)")
        return hit.float().argmax(dim=1)

    def correct(self, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """``eps / (1 + max(k_t, 0)) - bias_t`` for each row (``t`` a scalar or one timestep per row)."""
        t = torch.as_tensor(t).reshape(-1)
        if t.numel() == 1:
            t = t.expand(eps.shape[0])
        i = self._rows(t)
        k = self.k[i].clamp_min(0.0).to(eps.dtype).view(-1, *([1] * (eps.dim() - 1)))
        b = self.bias[i].to(eps.dtype).view(eps.shape[0], eps.shape[1], *([1] * (eps.dim() - 2)))
        return eps / (1.0 + k) - b

    def sigma_q_at(self, t: int) -> float:
        return float(self.sigma_q[self._rows(torch.tensor([int(t)]))[0]])

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        owned = {"timesteps": self.timesteps.cpu(), "k": self.k.cpu(), "bias": self.bias.cpu(), "sigma_q": self.sigma_q.cpu()}
        return owned, {"kind": "ptqd", "timesteps": self.timesteps.tolist()}

    @classmethod
    def from_state(cls, owned: dict[str, torch.Tensor], meta: dict[str, Any], device=None) -> "NoiseCorrection":
        missing = {"timesteps", "k", "bias", "sigma_q"} - set(owned)
        if missing:
            raise ValueError(f"noise correction tensors missing: {sorted(missing)}")
        m = cls(owned["timesteps"], owned["k"], owned["bias"], owned["sigma_q"])
        return m.to(device) if device is not None else m


def _timestep_arg(args, kwargs):
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        raise ValueError("PTQD correction: the UNet call has no timestep")
    return t


def _hook(module: nn.Module, args, kwargs, output):
    corr = getattr(module, MODULE, None)
    if corr is None or not corr.enabled:
        return output
    t = _timestep_arg(args, kwargs)
    if hasattr(output, "sample"):
        output.sample = corr.correct(output.sample, t)
        return output
    if isinstance(output, tuple):
        return (corr.correct(output[0], t), *output[1:])
    return corr.correct(output, t)


def attach_noise_correction(unet: nn.Module, corr: NoiseCorrection) -> NoiseCorrection:
    """Install ``corr`` as ``unet.tfmq_noise_correction`` with its output hook (replacing an earlier one)."""
    old = getattr(unet, "_tfmq_ptqd_hook", None)
    if old is not None:
        old.remove()
    setattr(unet, MODULE, corr.to(next(unet.parameters()).device))
    object.__setattr__(unet, "_tfmq_ptqd_hook", unet.register_forward_hook(_hook, with_kwargs=True))
    return corr


def noise_correction(unet: nn.Module) -> NoiseCorrection | None:
    return getattr(unet, MODULE, None)


def fit_noise_correction(eps_fp: list[torch.Tensor], eps_q: list[torch.Tensor], timesteps: list[int]) -> tuple[NoiseCorrection, dict]:
    """Fit ``k_t``, ``bias_t`` and ``sigma_q_t`` per timestep from paired FP / quantized predictions [N, C, H, W].

    ``k_t = <eps_q - eps, eps> / <eps, eps>`` (least squares over every element of the step); with
    ``k = max(k_t, 0)`` the residual ``r = eps_q / (1 + k) - eps`` gives ``bias_t`` = its per-channel mean and
    ``sigma_q_t`` = the std of ``r - bias_t`` over all elements.
    """
    ks, biases, sigmas, rows = [], [], [], []
    for e, q in zip(eps_fp, eps_q):
        e, q = e.double(), q.double()
        k = float(((q - e) * e).sum() / (e * e).sum().clamp_min(1e-300))
        r = q / (1.0 + max(k, 0.0)) - e
        b = r.mean(dim=tuple(d for d in range(r.dim()) if d != 1))
        res = r - b.view(1, -1, *([1] * (r.dim() - 2)))
        ks.append(k)
        biases.append(b)
        sigmas.append(float(res.pow(2).mean().sqrt()))
        rows.append({"timestep": None, "k": k, "sigma_q": sigmas[-1], "bias_abs_mean": float(b.abs().mean()),
                     "err_before": float((q - e).pow(2).mean().sqrt()),
                     "err_after": float((q / (1.0 + max(k, 0.0)) - b.view(1, -1, *([1] * (r.dim() - 2))) - e).pow(2).mean().sqrt())})
    for row, t in zip(rows, timesteps):
        row["timestep"] = int(t)
    corr = NoiseCorrection(torch.tensor([int(t) for t in timesteps]), torch.tensor(ks), torch.stack(biases), torch.tensor(sigmas))
    return corr, {"per_timestep": rows, "k_mean": sum(ks) / len(ks),
                  "err_before_mean": sum(r["err_before"] for r in rows) / len(rows),
                  "err_after_mean": sum(r["err_after"] for r in rows) / len(rows)}
