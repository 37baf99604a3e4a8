"""Benchmark rows of multi-orientation QSM: registration, COSMOS and STI.

* registration: first-echo magnitude of head model 0 tilted by (20, -10, 5) degrees and shifted
  (3, -2, 4) mm, registered to the untilted head (built-in NCC / Powell search); accuracy is the
  largest error of the brain-surface voxels in voxels, and the final NCC;
* COSMOS (5 orientations, ``ORIENTATIONS_DEG``) and STI (12 orientations: B0 along z plus 11
  directions tilted by 30 degrees) from local fields made on the reference grid with B0 rotated
  (the isotropic phantom through the scalar dipole model for COSMOS; anisotropic white matter,
  0.015 ppm, through the STI forward model for STI). The 160^3 rows use 1.1 mm voxels as the
  background-removal rows do (the head does not fit 160 mm at 1 mm).

Accuracy: ``nrmse_demeaned`` against the truth in the brain mask (COSMOS: chi; STI: chi33 along
the reference B0) and, for STI, the median angle between the principal eigenvector and the
fibre direction in white matter.

* full chain (``chain-*``): head model 0 simulated in ``ORIENTATIONS_DEG`` tilts (5 for COSMOS;
  12 with anisotropic white matter for STI) with partial volume (``supersample=2``, the
  multi-orientation dataset default) and SNR 80; timed: the built-in registration of every
  tilted first-echo magnitude to the first, ``resample_field`` of each true local field (cubic,
  its own mask), and masked-CG COSMOS (each field in its own mask, chi in their union) or STI
  (intersection of the masks). Truth: the reference orientation's partial-volume chi (chi33
  with the tensor); scored in the reference brain mask (STI: in the intersection), with the
  deep-grey slope of region means and the largest registration error at the brain surface.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import ISO_1MM, ISO_2MM, MATRIX_1MM, MATRIX_2MM, Benchmark, load, save_truth

#: After background removal (50) and inversion (60): multi-orientation combines finished runs.
ORDER = 70

GRID_160 = ((160, 160, 160), (1.1, 1.1, 1.1))
GRID_2MM = (MATRIX_2MM, ISO_2MM)


def _cone(n_tilted: int, tilt_deg: float):
    import numpy as np

    t = np.deg2rad(tilt_deg)
    out = [[0.0, 0.0, 1.0]]
    for a in range(n_tilted):
        az = 2 * np.pi * a / n_tilted
        out.append([np.sin(t) * np.cos(az), np.sin(t) * np.sin(az), np.cos(t)])
    return np.array(out)


# ------------------------------------------------------------------------------ registration
def register_setup(bench: Benchmark, workdir: Path) -> dict:
    import numpy as np
    from scipy import ndimage

    from qsmflow.phantom import make_head_model
    from qsmflow.simulate import AcquisitionParams, rotation_matrix, simulate_acquisition

    params = AcquisitionParams(matrix=bench.matrix, voxel_size_mm=bench.voxel_mm)
    model = make_head_model(0)
    threads = os.cpu_count() or 1
    ref = simulate_acquisition(model, params, n_threads=threads)
    rot = rotation_matrix(20.0, -10.0, 5.0)
    shift = (3.0, -2.0, 4.0)
    mov = simulate_acquisition(
        model,
        params,
        head_rotation=rot,
        head_shift_mm=shift,
        rng=np.random.default_rng(1),
        n_threads=threads,
    )
    truth = np.eye(4)
    truth[:3, :3], truth[:3, 3] = rot, shift
    surface = ref.mask & ~ndimage.binary_erosion(ref.mask)
    return {
        "reference": ref.magnitude[..., 0],
        "moving": mov.magnitude[..., 0],
        "affine": ref.affine,
        "truth": save_truth(workdir, transform=truth, surface=np.argwhere(surface)),
    }


def register_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    from qsmflow.algorithms.multi_orientation import register_rigid

    ref, mov, aff = inputs["reference"], inputs["moving"], inputs["affine"]
    return lambda: register_rigid(ref, aff, mov, aff)


def register_check(bench: Benchmark, inputs: dict, output: Any) -> str:
    import numpy as np

    truth = load(inputs["truth"])
    aff = inputs["affine"]
    world = aff[:3, :3] @ truth["surface"].T + aff[:3, 3:4]
    diff = output.transform - truth["transform"]
    err = np.linalg.norm(diff[:3, :3] @ world + diff[:3, 3:4], axis=0) / min(bench.voxel_mm)
    return f"surface error max {err.max():.2f} vox, NCC {output.similarity:.3f}"


# ------------------------------------------------------------------------------ COSMOS / STI
def _head(bench: Benchmark, anisotropy: float):
    import numpy as np

    from qsmflow.phantom import WM, make_head_model
    from qsmflow.simulate import AcquisitionParams, simulate_acquisition

    params = AcquisitionParams(matrix=bench.matrix, voxel_size_mm=bench.voxel_mm)
    sim = simulate_acquisition(
        make_head_model(0), params, n_threads=os.cpu_count() or 1, wm_anisotropy_ppm=anisotropy
    )
    mask = sim.mask
    offset = np.float32(sim.chi_ppm[mask].mean())
    chi = np.where(mask, sim.chi_ppm - offset, np.float32(0))
    return sim, mask, chi, offset, sim.segmentation == WM


def cosmos_setup(bench: Benchmark, workdir: Path) -> dict:
    from qsmflow.algorithms.dipole import forward_field
    from qsmflow.simulate import ORIENTATIONS_DEG, rotation_matrix

    _, mask, chi, _, _ = _head(bench, 0.0)
    dirs = [rotation_matrix(a, b).T @ [0.0, 0.0, 1.0] for a, b in ORIENTATIONS_DEG[:5]]
    threads = os.cpu_count() or 1
    fields = [forward_field(chi, bench.voxel_mm, d, n_threads=threads) * mask for d in dirs]
    return {
        "fields": fields,
        "mask": mask,
        "dirs": dirs,
        "voxel_mm": bench.voxel_mm,
        "truth": save_truth(workdir, chi=chi),
    }


def _cosmos_prepare(method: str) -> Callable[[dict, int], Callable[[], Any]]:
    def prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
        from qsmflow.algorithms.multi_orientation import cosmos

        args = (inputs["fields"], inputs["mask"], inputs["voxel_mm"], inputs["dirs"])
        return lambda: cosmos(*args, method=method, n_threads=n_threads)

    return prepare


def cosmos_check(bench: Benchmark, inputs: dict, output: Any) -> str:
    from qsmflow.algorithms.metrics import nrmse_demeaned

    chi = load(inputs["truth"])["chi"]
    return f"chi NRMSE {nrmse_demeaned(output, chi, inputs['mask']):.1f}%"


def sti_setup(bench: Benchmark, workdir: Path) -> dict:
    import numpy as np

    from qsmflow.algorithms.multi_orientation import project_tensor, tensor_forward_field

    sim, mask, _, offset, wm = _head(bench, 0.015)
    tensor = sim.chi_tensor_ppm
    for c in (0, 3, 5):
        tensor[..., c] -= offset
    tensor[~mask] = 0
    dirs = _cone(11, 30.0)
    threads = os.cpu_count() or 1
    fields = [
        tensor_forward_field(tensor, bench.voxel_mm, d, pad_factor=1.5, n_threads=threads) * mask
        for d in dirs
    ]
    truth = save_truth(
        workdir,
        chi33=project_tensor(tensor, dirs[0]),
        fibre=sim.fibre_dir,
        wm=wm & mask,
    )
    return {
        "fields": fields,
        "mask": mask,
        "dirs": np.asarray(dirs),
        "voxel_mm": bench.voxel_mm,
        "truth": truth,
    }


def sti_prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
    from qsmflow.algorithms.multi_orientation import sti
    from qsmflow.algorithms.multi_orientation.sti import _compile

    _compile()  # numba compilation (cached on disk) is not part of the row
    args = (inputs["fields"], inputs["mask"], inputs["voxel_mm"], inputs["dirs"])
    return lambda: sti(*args, n_threads=n_threads)


def sti_check(bench: Benchmark, inputs: dict, output: Any) -> str:
    import numpy as np

    from qsmflow.algorithms.metrics import nrmse_demeaned

    truth = load(inputs["truth"])
    wm = truth["wm"]
    v1 = output.eigenvectors[..., :, 0][wm]
    cosines = np.clip(np.abs((v1 * truth["fibre"][wm]).sum(-1)), 0, 1)
    angle = float(np.median(np.degrees(np.arccos(cosines))))
    err = nrmse_demeaned(output.chi33, truth["chi33"], inputs["mask"])
    return f"chi33 NRMSE {err:.1f}%, V1 median {angle:.1f} deg, {output.iterations} LSQR it"


# ------------------------------------------------------------------------------ full chain
def _chain_setup(n_orient: int, anisotropy: float) -> Callable[[Benchmark, Path], dict]:
    def setup(bench: Benchmark, workdir: Path) -> dict:
        import numpy as np
        from scipy import ndimage

        from qsmflow.algorithms.multi_orientation import project_tensor
        from qsmflow.phantom import WM, make_head_model
        from qsmflow.simulate import (
            ORIENTATIONS_DEG,
            AcquisitionParams,
            rotation_matrix,
            simulate_acquisition,
        )

        params = AcquisitionParams(matrix=bench.matrix, voxel_size_mm=bench.voxel_mm)
        model = make_head_model(0)
        threads = os.cpu_count() or 1
        rots = [rotation_matrix(a, b) for a, b in ORIENTATIONS_DEG[:n_orient]]
        sims = [
            simulate_acquisition(
                model,
                params,
                head_rotation=rot,
                rng=np.random.default_rng(i),
                n_threads=threads,
                wm_anisotropy_ppm=anisotropy,
                supersample=2,
            )
            for i, rot in enumerate(rots)
        ]
        ref = sims[0]
        mask = ref.mask
        offset = np.float32(ref.chi_ppm[mask].mean())
        truth = {"chi": np.where(mask, ref.chi_ppm - offset, np.float32(0)), "mask": mask}
        truth["seg"] = np.where(mask, ref.segmentation, 0)
        truth["rotations"] = np.asarray(rots)
        truth["surface"] = np.argwhere(mask & ~ndimage.binary_erosion(mask))
        if anisotropy:
            tensor = ref.chi_tensor_ppm.copy()
            for c in (0, 3, 5):
                tensor[..., c] -= offset
            truth["chi33"] = np.where(mask, project_tensor(tensor, ref.b0_dir), np.float32(0))
            truth["fibre"] = ref.fibre_dir
            truth["wm"] = (ref.segmentation == WM) & mask
        return {
            "magnitudes": [s.magnitude[..., 0] for s in sims],
            "fields": [s.local_field_ppm for s in sims],
            "masks": [s.mask for s in sims],
            "affines": [s.affine for s in sims],
            "voxel_mm": bench.voxel_mm,
            "truth": save_truth(workdir, **truth),
        }

    return setup


def _chain_prepare(method: str) -> Callable[[dict, int], Callable[[], Any]]:
    def prepare(inputs: dict, n_threads: int) -> Callable[[], Any]:
        import numpy as np

        from qsmflow.algorithms.multi_orientation import (
            b0_direction_in_reference,
            cosmos_cg,
            register_rigid,
            resample_field,
            sti,
        )
        from qsmflow.algorithms.multi_orientation.sti import _compile

        if method == "sti":
            _compile()
        mags, affs = inputs["magnitudes"], inputs["affines"]
        shape = mags[0].shape

        def run():
            transforms, fields, masks, dirs = [], [], [], []
            for i, (mag, aff) in enumerate(zip(mags, affs, strict=True)):
                t = np.eye(4) if i == 0 else register_rigid(mags[0], affs[0], mag, aff).transform
                f, m = resample_field(
                    inputs["fields"][i], inputs["masks"][i], aff, shape, affs[0], t
                )
                transforms.append(t)
                fields.append(f)
                masks.append(m)
                dirs.append(b0_direction_in_reference(t, affs[0]))
            vox = inputs["voxel_mm"]
            if method == "sti":
                joint = np.logical_and.reduce(masks)
                return transforms, joint, sti(fields, joint, vox, dirs, n_threads=n_threads)
            union = np.logical_or.reduce(masks)
            weights = [m.astype(np.float32) for m in masks]
            chi = cosmos_cg(fields, union, vox, dirs, weights=weights, n_threads=n_threads)
            return transforms, union, chi

        return run

    return prepare


def _dgm_slope(recon, truth, seg) -> float:
    import numpy as np

    from qsmflow.algorithms.metrics import DGM_LABELS, region_means

    t = region_means(truth, seg, DGM_LABELS)
    r = region_means(recon, seg, DGM_LABELS)
    ok = ~np.isnan(t)
    return float(np.polyfit(t[ok], r[ok], 1)[0])


def chain_check(bench: Benchmark, inputs: dict, output: Any) -> str:
    import numpy as np

    from qsmflow.algorithms.metrics import nrmse_demeaned

    truth = load(inputs["truth"])
    transforms, support, result = output
    aff = inputs["affines"][0]
    world = aff[:3, :3] @ truth["surface"].T + aff[:3, 3:4]
    reg_err = 0.0
    for t, rot in zip(transforms, truth["rotations"], strict=True):
        diff = np.asarray(t, np.float64).copy()
        diff[:3, :3] -= rot
        err = np.linalg.norm(diff[:3, :3] @ world + diff[:3, 3:4], axis=0) / min(bench.voxel_mm)
        reg_err = max(reg_err, float(err.max()))
    if "chi33" not in truth:
        mask = truth["mask"]
        err = nrmse_demeaned(result, truth["chi"], mask)
        slope = _dgm_slope(result, truth["chi"], truth["seg"])
        return f"chi NRMSE {err:.1f}%, DGM slope {slope:.2f}, registration <= {reg_err:.2f} vox"
    joint = support
    wm = truth["wm"] & joint
    v1 = result.eigenvectors[..., :, 0][wm]
    cosines = np.clip(np.abs((v1 * truth["fibre"][wm]).sum(-1)), 0, 1)
    angle = float(np.median(np.degrees(np.arccos(cosines))))
    err33 = nrmse_demeaned(result.chi33, truth["chi33"], joint)
    err_mms = nrmse_demeaned(result.mms, truth["chi"], joint)
    return (
        f"chi33 NRMSE {err33:.1f}%, MMS NRMSE {err_mms:.1f}%, V1 median {angle:.1f} deg, "
        f"registration <= {reg_err:.2f} vox"
    )


def rows() -> list[Benchmark]:
    out = []
    for suffix, matrix, vox, quick in (
        ("2mm", MATRIX_2MM, ISO_2MM, True),
        ("1mm", MATRIX_1MM, ISO_1MM, False),
    ):
        out.append(
            Benchmark(
                f"register-{suffix}",
                "rigid registration (1 orientation)",
                matrix,
                vox,
                setup=register_setup,
                prepare=register_prepare,
                check=register_check,
                quick=quick,
            )
        )
    for suffix, (matrix, vox), quick in (("2mm", GRID_2MM, True), ("160", GRID_160, False)):
        for method in ("closed-form", "cg"):
            out.append(
                Benchmark(
                    f"cosmos-{method}-{suffix}",
                    f"COSMOS {method} (5 orientations)",
                    matrix,
                    vox,
                    setup=cosmos_setup,
                    prepare=_cosmos_prepare(method),
                    check=cosmos_check,
                    quick=quick,
                )
            )
        out.append(
            Benchmark(
                f"sti-{suffix}",
                "STI (12 orientations)",
                matrix,
                vox,
                setup=sti_setup,
                prepare=sti_prepare,
                check=sti_check,
                quick=quick,
            )
        )
    for suffix, (matrix, vox), quick in (
        ("2mm", GRID_2MM, True),
        ("1mm", (MATRIX_1MM, ISO_1MM), False),
    ):
        out.append(
            Benchmark(
                f"chain-cosmos-{suffix}",
                "full chain: register + COSMOS (5 orientations)",
                matrix,
                vox,
                setup=_chain_setup(5, 0.0),
                prepare=_chain_prepare("cosmos"),
                check=chain_check,
                quick=quick,
            )
        )
    out.append(
        Benchmark(
            "chain-sti-2mm",
            "full chain: register + STI (12 orientations)",
            MATRIX_2MM,
            ISO_2MM,
            setup=_chain_setup(12, 0.015),
            prepare=_chain_prepare("sti"),
            check=chain_check,
        )
    )
    return out
