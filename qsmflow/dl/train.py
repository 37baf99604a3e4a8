"""Training of MoDL-QSM and SpiNet-QSM on simulated subjects (console script ``qsmflow-train``).

Data: head models ``qsmflow.phantom.make_head_model(seed)`` simulated at several voxel sizes
(``qsmflow.simulate.simulate_acquisition``); the brain susceptibility, demeaned in the brain
mask, is the label (the phantom is isotropic, so it equals chi33 of an STI fit). Each step
draws random patches inside the brain (random axis flips), a random B0 direction (tilt up to
``--max-tilt-deg`` from the array z axis) and a random field noise level (log-uniform in
``--noise-ppm``, which spans field strengths and SNRs), and makes the input field on the fly
with the dipole forward model of the patch (:mod:`qsmflow.dl.dipole`): ``f = M (A chi + n)``.
Loss: relative squared error of chi in the mask. Checkpoints after every epoch
(``OUT/checkpoint.pt``, atomic), ``--resume`` continues from it, and the exported weights with
their provenance (``OUT/<model>.pt`` + ``.json``) are rewritten after every epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ._torch import require_torch

__all__ = ["main", "make_training_subject", "sample_batch", "train"]

#: the head's extent (mm) covered by a simulated training subject
HEAD_FOV_MM = (176.0, 208.0, 160.0)


def make_training_subject(seed: int, voxel_size_mm, *, n_threads: int = 1):
    """Brain chi (ppm, demeaned in the mask, zero outside) and mask of head ``seed``."""
    from ..phantom import make_head_model
    from ..simulate import AcquisitionParams, simulate_acquisition

    vox = tuple(float(v) for v in voxel_size_mm)
    matrix = tuple(int(np.ceil(f / v)) for f, v in zip(HEAD_FOV_MM, vox, strict=True))
    sim = simulate_acquisition(
        make_head_model(seed),
        AcquisitionParams(matrix=matrix, voxel_size_mm=vox, echo_times_s=(0.01,)),
        rng=np.random.default_rng(seed),
        n_threads=n_threads,
    )
    mask = sim.mask
    chi = np.where(mask, sim.chi_ppm - sim.chi_ppm[mask].mean(), 0).astype(np.float32)
    return {"seed": int(seed), "voxel_size_mm": vox, "chi": chi, "mask": mask}


def random_b0_dir(rng: np.random.Generator, max_tilt_deg: float) -> np.ndarray:
    """Unit vector at a tilt uniform in [0, max_tilt_deg] from z, uniform azimuth."""
    tilt = np.deg2rad(rng.uniform(0.0, max_tilt_deg))
    az = rng.uniform(0.0, 2 * np.pi)
    return np.array([np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), np.cos(tilt)])


def _patch(arr: np.ndarray, corner, size: int) -> np.ndarray:
    out = np.zeros((size,) * 3, dtype=arr.dtype)
    src = tuple(slice(max(c, 0), min(c + size, n)) for c, n in zip(corner, arr.shape, strict=True))
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
    chis, masks, dirs = [], [], []
    while len(chis) < batch:
        centre = idx[rng.integers(len(idx))]
        corner = centre - patch // 2
        m = _patch(mask, corner, patch)
        if m.mean() < min_brain:
            continue
        c = _patch(chi, corner, patch)
        flips = tuple(ax for ax in range(3) if rng.random() < 0.5)
        if flips:
            c, m = np.flip(c, flips), np.flip(m, flips)
        chis.append(np.ascontiguousarray(c))
        masks.append(np.ascontiguousarray(m))
        dirs.append(random_b0_dir(rng, max_tilt_deg))
    chi_t = torch.from_numpy(np.stack(chis)[:, None]).to(device)
    mask_t = torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)).to(device)
    op = DipoleOperator.build(
        (patch,) * 3, subject["voxel_size_mm"], dirs, weights=mask_t, support=mask_t,
        device=device,
    )  # fmt: skip
    sd = np.exp(rng.uniform(np.log(noise_ppm[0]), np.log(noise_ppm[1]), size=batch))
    noise = rng.standard_normal(chi_t.shape).astype(np.float32) * sd[:, None, None, None, None]
    with torch.no_grad():
        field = op.forward(chi_t) + torch.from_numpy(noise.astype(np.float32)).to(device) * mask_t
    return field, op, chi_t * mask_t, mask_t


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
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (also on --resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after the epoch that passes this wall time")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    return p


def train(args: argparse.Namespace, command: str | None = None) -> dict:
    """Run training as described by ``args`` (see :func:`build_parser`); return the summary."""
    torch = require_torch()
    from .models import build_model

    if 0 in args.train_seeds:
        raise ValueError("--train-seeds must not include 0: head 0 is the test subject")
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
        config["p"] = 1.0
    torch.manual_seed(args.seed)
    model = build_model(args.model, config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    start_epoch, elapsed, history, commands = 0, 0.0, [], []
    if args.resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; run without it")
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ck["model"] != args.model:
            raise ValueError(f"{ckpt_path} holds a {ck['model']!r} model, not {args.model!r}")
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        for group in opt.param_groups:  # --lr applies to the resumed run too
            group["lr"] = args.lr
        start_epoch, elapsed, history = ck["epoch"], ck["elapsed_s"], ck["history"]
        commands = ck.get("commands", [])
    commands = [*commands, command or "qsmflow-train " + shlex.join(sys.argv[1:])]
    commit = _git_commit()  # the code this run starts with
    vox = _voxel_sizes(args, np.random.default_rng(args.seed))
    t0 = time.perf_counter()
    subjects = [
        make_training_subject(s, v, n_threads=args.threads)
        for s, v in zip(args.train_seeds, vox, strict=True)
    ]
    data_s = time.perf_counter() - t0
    print(f"qsmflow-train: {len(subjects)} subjects simulated in {data_s:.0f} s", flush=True)
    data = {
        "train_seeds": list(args.train_seeds),
        "voxel_sizes_mm": [list(v) for v in vox],
        "noise_ppm": list(args.noise_ppm),
        "max_tilt_deg": args.max_tilt_deg,
        "patch": args.patch,
        "batch_size": args.batch_size,
        "steps_per_epoch": args.steps_per_epoch,
        "field": "M (A chi + n), A the dipole model of the patch (pad 1.5), n white Gaussian",
        "label": "brain chi of the head phantom, demeaned in the brain mask (isotropic: = chi33)",
    }
    summary: dict = {}
    for epoch in range(start_epoch, args.epochs):
        rng = np.random.default_rng([args.seed, epoch])
        torch.manual_seed(args.seed * 100003 + epoch)
        model.train()
        t_epoch = time.perf_counter()
        losses = []
        for _ in range(args.steps_per_epoch):
            subject = subjects[rng.integers(len(subjects))]
            field, op, chi, mask = sample_batch(
                subject, rng, batch=args.batch_size, patch=args.patch,
                noise_ppm=tuple(args.noise_ppm), max_tilt_deg=args.max_tilt_deg, device=device,
            )  # fmt: skip
            loss = relative_error(model(field, op), chi, mask)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        epoch_s = time.perf_counter() - t_epoch
        elapsed += epoch_s
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": epoch_s})
        extra = {"lam": model.lam.item()}
        if args.model == "spinet":
            extra["p"] = model.p.item()
        print(
            f"epoch {epoch + 1}/{args.epochs} loss {np.mean(losses):.4f} "
            f"({epoch_s:.0f} s) {json.dumps(extra)}",
            flush=True,
        )
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
            },
            ckpt_path,
        )
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
            "final_loss": history[-1]["loss"],
            "history": history,
        }
        export_weights(model, args.model, config, summary, out / f"{args.model}.pt")
        if args.max_minutes is not None and elapsed > 60 * args.max_minutes:
            print(f"qsmflow-train: stopping after {elapsed / 60:.1f} min (--max-minutes)")
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
    summary = train(args, command=command)
    print(f"qsmflow-train: weights in {Path(args.out_dir) / (args.model + '.pt')}")
    return 0 if summary else 1


if __name__ == "__main__":
    raise SystemExit(main())
