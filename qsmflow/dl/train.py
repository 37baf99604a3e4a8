"""Training of MoDL-QSM and SpiNet-QSM on simulated subjects (console script ``qsmflow-train``).

Data: head models ``qsmflow.phantom.make_head_model(seed)`` simulated at several voxel sizes
(``qsmflow.simulate.simulate_acquisition``); the brain susceptibility, demeaned in the brain
mask, is the label. Each step draws random patches inside the brain (random axis flips), a
random B0 direction (tilt up to ``--max-tilt-deg`` from the array z axis) and a random field
noise level (log-uniform in ``--noise-ppm``, which spans field strengths and SNRs), and makes the
input field on the fly: ``f = M (A chi + n)`` with the dipole model of the patch
(:mod:`qsmflow.dl.dipole`). With ``--wm-anisotropy-ppm`` > 0 the heads have anisotropic white
matter (the multi-orientation simulation, :mod:`qsmflow.anisotropy`): the field is the STI
forward model of the tensor patch (Liu, MRM 2010) and the label is chi33 = b0^T X b0, the
apparent susceptibility along B0 that MoDL-QSM (Feng et al. 2021) trains on.

Loss: relative squared error of chi in the mask. Learning rate: cosine decay from ``--lr`` to
``--lr-min`` over the run (over ``--max-minutes`` when given, else over the epochs left).
Checkpoints after every epoch (``OUT/checkpoint.pt``, atomic); ``--resume`` continues from it,
``--init-weights`` starts a new run from trained weights (e.g. SpiNet-QSM from a MoDL-QSM
denoiser: SpiNet with p = 2 is MoDL). Validation: every ``--val-every`` epochs the network
inverts the whole 2 mm head ``--val-seed`` (never trained on; noise 7e-4 ppm); the exported
weights (``OUT/<model>.pt`` + provenance ``.json``) are those of the best validation NRMSE.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ._torch import require_torch

__all__ = ["main", "make_training_subject", "make_validation_subject", "sample_batch", "train"]

#: the head's extent (mm) covered by a simulated training subject
HEAD_FOV_MM = (176.0, 208.0, 160.0)


#: field noise SD (ppm) of the validation head (about a multi-echo fit at SNR 100, 2 mm)
VAL_NOISE_PPM = 7e-4


def _simulate_head(seed: int, voxel_size_mm, wm_anisotropy_ppm: float, n_threads: int):
    from ..phantom import make_head_model
    from ..simulate import AcquisitionParams, simulate_acquisition

    vox = tuple(float(v) for v in voxel_size_mm)
    matrix = tuple(int(np.ceil(f / v)) for f, v in zip(HEAD_FOV_MM, vox, strict=True))
    return simulate_acquisition(
        make_head_model(seed),
        AcquisitionParams(matrix=matrix, voxel_size_mm=vox, echo_times_s=(0.01,)),
        rng=np.random.default_rng(seed),
        wm_anisotropy_ppm=wm_anisotropy_ppm,
        n_threads=n_threads,
    )


def make_training_subject(
    seed: int, voxel_size_mm, *, wm_anisotropy_ppm: float = 0.0, n_threads: int = 1
) -> dict:
    """Brain chi (ppm, demeaned in the mask, zero outside) and mask of head ``seed``.

    With ``wm_anisotropy_ppm`` > 0 also ``tensor`` (x, y, z, 6): the susceptibility tensor
    (ppm, voxel frame, the same mean removed from its diagonal, zero outside the mask).
    """
    sim = _simulate_head(seed, voxel_size_mm, wm_anisotropy_ppm, n_threads)
    mask = sim.mask
    mean = sim.chi_ppm[mask].mean()
    chi = np.where(mask, sim.chi_ppm - mean, 0).astype(np.float32)
    out = {
        "seed": int(seed),
        "voxel_size_mm": tuple(sim.params.voxel_size_mm),
        "chi": chi,
        "mask": mask,
    }
    if sim.chi_tensor_ppm is not None:
        tensor = sim.chi_tensor_ppm.astype(np.float32)  # a copy
        tensor[..., [0, 3, 5]] -= np.float32(mean)
        tensor[~mask] = 0
        out["tensor"] = tensor
    return out


def make_validation_subject(seed: int, *, n_threads: int = 1) -> dict:
    """Whole 2 mm head ``seed`` (B0 along z): noisy local field, chi, mask (ppm)."""
    sim = _simulate_head(seed, (2.0, 2.0, 2.0), 0.0, n_threads)
    noise = np.random.default_rng(seed).standard_normal(sim.mask.shape) * VAL_NOISE_PPM
    field = np.where(sim.mask, sim.local_field_ppm + noise, 0).astype(np.float32)
    return {
        "seed": int(seed), "voxel_size_mm": tuple(sim.params.voxel_size_mm), "b0_dir": sim.b0_dir,
        "field": field, "chi": sim.chi_ppm, "mask": sim.mask,
    }  # fmt: skip


def random_b0_dir(rng: np.random.Generator, max_tilt_deg: float) -> np.ndarray:
    """Unit vector at a tilt uniform in [0, max_tilt_deg] from z, uniform azimuth."""
    tilt = np.deg2rad(rng.uniform(0.0, max_tilt_deg))
    az = rng.uniform(0.0, 2 * np.pi)
    return np.array([np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), np.cos(tilt)])


def _patch(arr: np.ndarray, corner, size: int) -> np.ndarray:
    out = np.zeros((size,) * 3 + arr.shape[3:], dtype=arr.dtype)
    src = tuple(
        slice(max(c, 0), min(c + size, n)) for c, n in zip(corner, arr.shape[:3], strict=True)
    )
    dst = tuple(slice(s.start - c, s.stop - c) for s, c in zip(src, corner, strict=True))
    out[dst] = arr[src]
    return out


def sample_batch(
    subject: dict,
    rng: np.random.Generator,
    *,
    batch: int,
    patch: int,
    noise_ppm: tuple[float, float],
    max_tilt_deg: float,
    min_brain: float = 0.4,
    device=None,
):
    """A training batch from one subject: (field, operator, chi, mask) tensors."""
    torch = require_torch()
    from .dipole import DipoleOperator

    chi, mask = subject["chi"], subject["mask"]
    idx = np.argwhere(mask)
    chis, masks, dirs, fields = [], [], [], []
    while len(chis) < batch:
        centre = idx[rng.integers(len(idx))]
        corner = centre - patch // 2
        m = _patch(mask, corner, patch)
        if m.mean() < min_brain:
            continue
        flips = tuple(ax for ax in range(3) if rng.random() < 0.5)
        b0 = random_b0_dir(rng, max_tilt_deg)
        m = np.flip(m, flips)
        if "tensor" in subject:
            c, f = _tensor_patch(subject, corner, patch, flips, b0)
            fields.append(f)
        else:
            c = np.flip(_patch(chi, corner, patch), flips)
        chis.append(np.ascontiguousarray(c))
        masks.append(np.ascontiguousarray(m))
        dirs.append(b0)
    chi_t = torch.from_numpy(np.stack(chis)[:, None]).to(device)
    mask_t = torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)).to(device)
    op = DipoleOperator.build(
        (patch,) * 3, subject["voxel_size_mm"], dirs, weights=mask_t, support=mask_t,
        device=device,
    )  # fmt: skip
    sd = np.exp(rng.uniform(np.log(noise_ppm[0]), np.log(noise_ppm[1]), size=batch))
    noise = (rng.standard_normal(chi_t.shape) * sd[:, None, None, None, None]).astype(np.float32)
    with torch.no_grad():
        clean = (
            torch.from_numpy(np.stack(fields)[:, None]).to(device)
            if fields
            else op.convolve(chi_t * mask_t)
        )
        field = (clean + torch.from_numpy(noise).to(device)) * mask_t
    return field, op, chi_t * mask_t, mask_t


def _tensor_patch(subject: dict, corner, size: int, flips: tuple, b0: np.ndarray):
    """chi33 label and the STI field (ppm) of a tensor patch, flipped along ``flips``.

    Flipping axis a negates the off-diagonal components that involve a.
    """
    from ..algorithms.multi_orientation.sti import (
        TENSOR_COMPONENTS,
        project_tensor,
        tensor_forward_field,
    )

    t = np.flip(_patch(subject["tensor"], corner, size), flips).copy()
    for c, name in enumerate(TENSOR_COMPONENTS):
        a, b = ("xyz".index(axis) for axis in name)
        if (a in flips) != (b in flips):
            t[..., c] *= -1
    field = tensor_forward_field(t, subject["voxel_size_mm"], b0, pad_factor=1.5)
    return project_tensor(t, b0), field


def relative_error(x, chi, mask):
    """Mean over the batch of ``||M (x - chi)||^2 / ||M chi||^2``."""
    num = ((x - chi) * mask).pow(2).flatten(1).sum(1)
    den = (chi * mask).pow(2).flatten(1).sum(1).clamp_min(1e-12)
    return (num / den).mean()


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
            text=True, timeout=10, check=True,
        )  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _atomic_save(obj, path: Path) -> None:
    torch = require_torch()
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _voxel_sizes(args, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """One voxel size per training seed: cycles through --voxel-sizes, +-10 % per axis."""
    out = []
    for i, _ in enumerate(args.train_seeds):
        base = args.voxel_sizes[i % len(args.voxel_sizes)]
        out.append(tuple(round(float(base * rng.uniform(0.9, 1.1)), 3) for _ in range(3)))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qsmflow-train",
        description="Train MoDL-QSM or SpiNet-QSM on patches of simulated heads.",
    )
    p.add_argument("model", choices=["modl", "spinet"], help="network to train")
    p.add_argument("out_dir", type=Path, help="directory for checkpoint, log and weights")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps-per-epoch", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--patch", type=int, default=40, help="patch edge (voxels)")
    p.add_argument("--train-seeds", type=int, nargs="+", default=list(range(100, 108)),
                   help="head-model seeds used for training (keep test seeds out)")  # fmt: skip
    p.add_argument("--voxel-sizes", type=float, nargs="+", default=[1.25, 1.5, 2.0, 2.5],
                   help="voxel sizes (mm) the subjects are simulated at")  # fmt: skip
    p.add_argument("--noise-ppm", type=float, nargs=2, default=[3e-4, 3e-3],
                   help="range of the field noise SD (ppm), log-uniform")  # fmt: skip
    p.add_argument("--max-tilt-deg", type=float, default=45.0,
                   help="largest B0 tilt from the array z axis (degrees)")  # fmt: skip
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--iterations", type=int, default=4, help="unrolled iterations K")
    p.add_argument("--cg-iter", type=int, default=8, help="CG iterations per DC step")
    p.add_argument("--wm-anisotropy-ppm", type=float, default=0.0,
                   help="WM anisotropy chi_par - chi_perp (ppm): chi33 labels")  # fmt: skip
    p.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate at the start of this run")  # fmt: skip
    p.add_argument("--lr-min", type=float, default=None,
                   help="learning rate at the end of the cosine decay (default --lr)")  # fmt: skip
    p.add_argument("--init-weights", type=Path, default=None,
                   help="start from these weights (.pt of qsmflow-train; SpiNet may start from "
                   "MoDL weights: same denoiser and lambda)")  # fmt: skip
    p.add_argument("--p-init", type=float, default=1.0, help="SpiNet: initial Schatten p")
    p.add_argument("--val-seed", type=int, default=108,
                   help="head-model seed of the validation subject (not trained on)")  # fmt: skip
    p.add_argument("--val-every", type=int, default=2, help="validate every N epochs (0: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop this run after the epoch that passes this many minutes")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    return p


def _cosine_lr(args, epoch: int, start_epoch: int, run_s: float) -> float:
    """Learning rate for ``epoch``: cosine from --lr to --lr-min over this run."""
    lr_min = args.lr if args.lr_min is None else args.lr_min
    if args.max_minutes:
        frac = run_s / (60 * args.max_minutes)
    else:
        frac = (epoch - start_epoch) / max(1, args.epochs - start_epoch)
    frac = min(max(frac, 0.0), 1.0)
    return lr_min + 0.5 * (args.lr - lr_min) * (1 + np.cos(np.pi * frac))


def validate(model, subject: dict, device) -> float:
    """Demeaned NRMSE (%) of the network's inversion of a whole validation head."""
    from ..algorithms.metrics import nrmse_demeaned
    from .inference import apply_unrolled

    model.eval()
    chi = apply_unrolled(
        model, subject["field"], subject["mask"], subject["voxel_size_mm"], subject["b0_dir"],
        device=device,
    )  # fmt: skip
    model.train()
    return float(nrmse_demeaned(chi, subject["chi"], subject["mask"]))


def _initial_model(args, config: dict, device):
    """The network to train: fresh (seeded), or from ``--init-weights``."""
    torch = require_torch()
    from .models import build_model

    torch.manual_seed(args.seed)
    model = build_model(args.model, config).to(device)
    if args.init_weights is not None:
        ck = torch.load(args.init_weights, map_location=device, weights_only=True)
        state = {k: v for k, v in ck["state_dict"].items() if k != "p_logit"}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if k != "p_logit"]  # SpiNet's p starts at --p-init
            problem = f"missing {missing}, unexpected {unexpected}" if missing or unexpected else ""
        except RuntimeError as exc:  # tensor shapes differ
            problem = str(exc).splitlines()[-1].strip()
        if problem:
            raise ValueError(
                f"--init-weights {args.init_weights}: does not fit a {args.model!r} network "
                f"with {config} ({problem}); use weights trained with the same --channels, "
                f"--layers"
            )
    return model


def train(args: argparse.Namespace, command: str | None = None) -> dict:
    """Run training as described by ``args`` (see :func:`build_parser`); return the summary."""
    torch = require_torch()

    if 0 in args.train_seeds or args.val_seed == 0:
        raise ValueError("--train-seeds/--val-seed must not include 0: head 0 is the test subject")
    if args.val_seed in args.train_seeds:
        raise ValueError(f"--val-seed {args.val_seed} is also a training seed")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    config = {
        "channels": args.channels,
        "layers": args.layers,
        "iterations": args.iterations,
        "cg_iter": args.cg_iter,
        "lam": 0.05,
    }
    if args.model == "spinet":
        config["p"] = args.p_init
    ck = None
    if args.resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; run without it")
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck["model"] != args.model:
            raise ValueError(f"{ckpt_path} holds a {ck['model']!r} model, not {args.model!r}")
        config = ck["config"]
    model = _initial_model(args, config, device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start_epoch, elapsed, history, commands, best = 0, 0.0, [], [], None
    if ck is not None:
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, elapsed, history = ck["epoch"], ck["elapsed_s"], ck["history"]
        commands, best = ck.get("commands", []), ck.get("best_val")
    commands = [*commands, command or "qsmflow-train " + shlex.join(sys.argv[1:])]
    commit = _git_commit()  # the code this run starts with
    vox = _voxel_sizes(args, np.random.default_rng(args.seed))
    t0 = time.perf_counter()
    subjects = [
        make_training_subject(
            s, v, wm_anisotropy_ppm=args.wm_anisotropy_ppm, n_threads=args.threads
        )
        for s, v in zip(args.train_seeds, vox, strict=True)
    ]
    val = make_validation_subject(args.val_seed, n_threads=args.threads) if args.val_every else None
    print(f"qsmflow-train: data simulated in {time.perf_counter() - t0:.0f} s", flush=True)
    label = "brain chi of the head phantom, demeaned in the brain mask (isotropic: = chi33)"
    field = "M (A chi + n), A the dipole model of the patch (pad 1.5), n white Gaussian"
    if args.wm_anisotropy_ppm:
        label = "chi33 = b0^T X b0 of the head's tensor (anisotropic WM), demeaned in the mask"
        field = "M (A_STI X + n), A_STI the tensor forward model of the patch (pad 1.5)"
    data = {
        "train_seeds": list(args.train_seeds),
        "voxel_sizes_mm": [list(v) for v in vox],
        "noise_ppm": list(args.noise_ppm),
        "max_tilt_deg": args.max_tilt_deg,
        "wm_anisotropy_ppm": args.wm_anisotropy_ppm,
        "patch": args.patch,
        "batch_size": args.batch_size,
        "steps_per_epoch": args.steps_per_epoch,
        "field": field,
        "label": label,
        "validation": {"seed": args.val_seed, "voxel_size_mm": 2.0, "noise_ppm": VAL_NOISE_PPM},
    }
    if args.init_weights is not None:
        digest = hashlib.sha256(Path(args.init_weights).read_bytes()).hexdigest()
        data["init_weights"] = {"path": str(args.init_weights), "sha256": digest}
    summary: dict = {}
    run_s = 0.0
    for epoch in range(start_epoch, args.epochs):
        rng = np.random.default_rng([args.seed, epoch])
        torch.manual_seed(args.seed * 100003 + epoch)
        lr = _cosine_lr(args, epoch, start_epoch, run_s)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        t_epoch = time.perf_counter()
        losses = []
        for _ in range(args.steps_per_epoch):
            subject = subjects[rng.integers(len(subjects))]
            field_t, op, chi, mask = sample_batch(
                subject, rng, batch=args.batch_size, patch=args.patch,
                noise_ppm=tuple(args.noise_ppm), max_tilt_deg=args.max_tilt_deg, device=device,
            )  # fmt: skip
            loss = relative_error(model(field_t, op), chi, mask)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "lr": lr}
        if val is not None and (epoch + 1) % args.val_every == 0:
            entry["val_nrmse_pct"] = validate(model, val, device)
        epoch_s = time.perf_counter() - t_epoch
        elapsed += epoch_s
        run_s += epoch_s
        entry["seconds"] = epoch_s
        history.append(entry)
        extra = {"lam": model.lam.item()}
        if args.model == "spinet":
            extra["p"] = model.p.item()
        print(f"epoch {epoch + 1}/{args.epochs} {json.dumps(entry | extra)}", flush=True)
        improved = "val_nrmse_pct" in entry and (best is None or entry["val_nrmse_pct"] < best)
        if improved:
            best = entry["val_nrmse_pct"]
        _atomic_save(
            {
                "model": args.model,
                "config": config,
                "state_dict": model.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch + 1,
                "elapsed_s": elapsed,
                "history": history,
                "commands": commands,
                "best_val": best,
            },
            ckpt_path,
        )
        if improved or val is None:
            summary = {
                "model": args.model,
                "command": commands[0],
                "commands": commands,
                "seed": args.seed,
                "data": data,
                "config": config,
                "learned": extra,
                "git_commit": commit,
                "torch_version": torch.__version__,
                "device": device,
                "threads": args.threads,
                "epochs": epoch + 1,
                "training_time_s": round(elapsed, 1),
                "seconds_per_epoch": round(epoch_s, 1),
                "final_loss": entry["loss"],
                "val_nrmse_pct": best,
                "history": history,
            }
            export_weights(model, args.model, config, summary, out / f"{args.model}.pt")
        if args.max_minutes is not None and run_s > 60 * args.max_minutes:
            print(f"qsmflow-train: stopping after {run_s / 60:.1f} min (--max-minutes)")
            break
    return summary


def export_weights(model, kind: str, config: dict, provenance: dict, path: Path) -> None:
    """Write the inference weights (``path``, float32 state dict) and ``path.json``."""
    state = {k: v.detach().cpu().float().clone() for k, v in model.state_dict().items()}
    _atomic_save({"model": kind, "config": config, "state_dict": state}, Path(path))
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(provenance, indent=2) + "\n")
    os.replace(tmp, Path(path).with_suffix(".json"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "qsmflow-train " + shlex.join(sys.argv[1:] if argv is None else argv)
    train(args, command=command)  # errors raise
    print(f"qsmflow-train: weights in {Path(args.out_dir) / (args.model + '.pt')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
