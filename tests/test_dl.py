"""Deep-learning inversions (issue 11): torch dipole model and CG, networks, training, weights.

Skipped without PyTorch (``pip install 'qsmflow[dl]'``) unless ``QSMFLOW_REQUIRE_TORCH=1``
(set by .ci/run when it installed torch), which turns the skip into a failure. The missing-torch
message is tested either way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys

import numpy as np
import pytest

from qsmflow.algorithms import inversion
from qsmflow.algorithms.dipole import forward_field


def _require_torch():
    if importlib.util.find_spec("torch") is not None:
        import torch

        return torch
    reason = "PyTorch not installed (pip install 'qsmflow[dl]')"
    if os.environ.get("QSMFLOW_REQUIRE_TORCH") == "1":
        pytest.fail(f"QSMFLOW_REQUIRE_TORCH=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def torch():
    return _require_torch()


def ball(shape, radius, centre=None):
    grid = np.indices(shape).astype(np.float32)
    c = (np.array(shape) - 1) / 2 if centre is None else np.asarray(centre)
    return sum((g - ci) ** 2 for g, ci in zip(grid, c, strict=True)) < radius**2


OBLIQUE = np.array([0.3, -0.2, 0.93]) / np.linalg.norm([0.3, -0.2, 0.93])


@pytest.mark.parametrize("name", ["dip", "modl", "spinet"])
def test_missing_torch_names_the_extra(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    mask = ball((12, 12, 12), 5)
    field = np.where(mask, 0.01, 0).astype(np.float32)
    with pytest.raises(ImportError, match=rf"'{name}' needs PyTorch.*qsmflow\[dl\]"):
        getattr(inversion, name)(field, mask, (1, 1, 1))


def test_conjugate_gradient_solves_spd_systems(torch):
    from qsmflow.dl.dipole import conjugate_gradient

    gen = torch.Generator().manual_seed(0)
    n, batch = 30, 3
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=gen, dtype=torch.float64))
    eig = torch.linspace(0.5, 20.0, n, dtype=torch.float64)
    mats = q @ torch.diag_embed(eig.expand(batch, n)) @ q.transpose(1, 2)
    b = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    x = conjugate_gradient(lambda v: (mats @ v[..., None])[..., 0], b, n_iter=60)
    expected = torch.linalg.solve(mats, b)
    assert torch.allclose(x, expected, rtol=1e-8, atol=1e-10)
    # a warm start at the solution stays there; few iterations leave a larger residual
    x2 = conjugate_gradient(lambda v: (mats @ v[..., None])[..., 0], b, expected, n_iter=3)
    assert torch.allclose(x2, expected, rtol=1e-8, atol=1e-10)
    x3 = conjugate_gradient(lambda v: (mats @ v[..., None])[..., 0], b, n_iter=3)
    assert float((x3 - expected).abs().max()) > 1e-3


def test_dipole_forward_matches_numpy(torch):
    from qsmflow.dl.dipole import DipoleOperator

    rng = np.random.default_rng(1)
    shape, vox = (23, 30, 19), (0.9, 1.1, 1.7)  # odd and even sizes, anisotropic voxels
    chi = rng.standard_normal(shape).astype(np.float32) * 0.05
    expected = forward_field(chi, vox, OBLIQUE, pad_factor=1.5)
    op = DipoleOperator.build(shape, vox, OBLIQUE, pad_factor=1.5)
    got = op.forward(torch.from_numpy(chi)[None, None])[0, 0].numpy()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    # batched kernels: one B0 direction per item
    op2 = DipoleOperator.build(shape, vox, [OBLIQUE, (0, 0, 1)], pad_factor=1.5)
    both = op2.forward(torch.from_numpy(np.stack([chi, chi]))[:, None]).numpy()
    axial = forward_field(chi, vox, (0, 0, 1), pad_factor=1.5)
    assert np.abs(both[0, 0] - expected).max() <= 1e-5 * np.abs(expected).max()
    assert np.abs(both[1, 0] - axial).max() <= 1e-5 * np.abs(axial).max()


def test_adjoint_with_weights_and_support(torch):
    from qsmflow.dl.dipole import DipoleOperator

    gen = torch.Generator().manual_seed(2)
    shape = (15, 18, 11)
    m = torch.from_numpy(ball(shape, 6).astype(np.float32))[None, None]
    w = m * torch.rand((1, 1, *shape), generator=gen)
    op = DipoleOperator.build(shape, (1, 1, 2), OBLIQUE, weights=w, support=m)
    x = torch.randn((1, 1, *shape), generator=gen, dtype=torch.float32)
    y = torch.randn((1, 1, *shape), generator=gen, dtype=torch.float32)
    lhs = float((op.forward(x) * y).sum())
    rhs = float((x * op.adjoint(y)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-4)
    assert float(op.adjoint(y)[m == 0].abs().max()) == 0.0


@pytest.mark.parametrize("kind", ["modl", "spinet"])
def test_networks_on_odd_grids_and_oblique_b0(torch, kind):
    from qsmflow.dl.dipole import DipoleOperator
    from qsmflow.dl.models import build_model

    torch.manual_seed(0)
    shape = (17, 22, 13)
    model = build_model(kind, {"channels": 4, "layers": 3, "iterations": 2, "cg_iter": 3,
                               "lam": 0.05, "p": 1.0})  # fmt: skip
    torch.nn.init.normal_(model.denoiser.net[-1].weight, std=0.05)  # not the identity
    m = torch.from_numpy(ball(shape, 7).astype(np.float32))[None, None].repeat(2, 1, 1, 1, 1)
    op = DipoleOperator.build(shape, (1.0, 1.2, 2.0), [OBLIQUE, (0, 0, 1)], weights=m, support=m)
    chi = torch.randn((2, 1, *shape)) * 0.05 * m
    out = model(op.forward(chi), op)
    assert out.shape == chi.shape and bool(torch.isfinite(out).all())
    assert float(out.detach()[m == 0].abs().max()) == 0.0
    ((out - chi) ** 2).sum().backward()  # differentiable end to end, lambda (and p) learn
    assert float(model.log_lam.grad.abs()) > 0
    if kind == "spinet":
        assert 0 < model.p.item() <= 2 and model.p_logit.grad.abs().item() > 0


def test_dip_on_odd_grid_and_oblique_b0(torch):
    shape = (21, 26, 17)
    mask = ball(shape, 8)
    chi = np.where(ball(shape, 3, (10, 12, 8)), 0.1, 0).astype(np.float32)
    field = np.where(mask, forward_field(chi, (1, 1, 1.5), OBLIQUE), 0).astype(np.float32)
    out = inversion.dip(field, mask, (1, 1, 1.5), OBLIQUE, n_iter=3, magnitude=mask * 1.0)
    assert out.shape == shape and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and not out[~mask].any() and out[mask].any()
    # a 4-D (echo) magnitude is accepted like in TV/MEDI/NDI: root-sum-of-squares over echoes
    mag4 = np.stack([mask * 1.0, mask * 0.5], axis=-1)
    out4 = inversion.dip(field, mask, (1, 1, 1.5), OBLIQUE, n_iter=3, magnitude=mag4)
    assert out4.shape == shape and np.all(np.isfinite(out4))
    with pytest.raises(ValueError, match="magnitude shape"):
        inversion.modl(field, mask, (1, 1, 1.5), OBLIQUE, magnitude=np.ones((5, 5, 5)))
    # plain DIP (no data-fidelity step) runs too; a negative step count is refused
    plain = inversion.dip(field, mask, (1, 1, 1.5), OBLIQUE, n_iter=2, dc_iter=0)
    assert plain.shape == shape and not np.array_equal(plain, out)
    with pytest.raises(ValueError, match="dc_iter"):
        inversion.dip(field, mask, (1, 1, 1.5), n_iter=2, dc_iter=-1)


def test_training_writes_a_checkpoint_and_resumes(torch, tmp_path):
    from qsmflow.dl import train

    argv = ["spinet", str(tmp_path), "--epochs", "1", "--steps-per-epoch", "2", "--patch",
            "12", "--train-seeds", "101", "--voxel-sizes", "4.0", "--iterations", "1",
            "--cg-iter", "2", "--channels", "4", "--layers", "2", "--val-every", "1"]  # fmt: skip
    assert train.main(argv) == 0
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 1 and len(ck["history"]) == 1
    first = {k: v.clone() for k, v in ck["state_dict"].items()}
    assert train.main([*argv[:3], "3", *argv[4:], "--resume", "--lr-min", "1e-4"]) == 0
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 3 and [h["epoch"] for h in ck["history"]] == [1, 2, 3]
    assert any(not torch.equal(first[k], v) for k, v in ck["state_dict"].items())
    # cosine decay over the resumed run's two epochs: --lr, then halfway to --lr-min
    assert [h["lr"] for h in ck["history"][1:]] == pytest.approx([1e-3, 5.5e-4])
    vals = [h["val_nrmse_pct"] for h in ck["history"]]
    assert all(np.isfinite(vals)) and ck["best_val"] == min(vals)
    meta = json.loads((tmp_path / "spinet.json").read_text())
    # the exported weights are those of the best validation epoch
    assert meta["val_nrmse_pct"] == min(vals) and vals[meta["epochs"] - 1] == min(vals)
    assert meta["data"]["validation"]["seed"] == 108
    assert len(meta["commands"]) == 2 and meta["commands"][1].endswith("1e-4")
    # the exported weights run as a method
    mask = ball((16, 16, 16), 6)
    field = np.where(mask, 0.01, 0).astype(np.float32)
    out = inversion.spinet(field, mask, (4, 4, 4), weights=tmp_path / "spinet.pt")
    assert np.all(np.isfinite(out)) and not out[~mask].any()
    with pytest.raises(ValueError, match="'modl'"):
        inversion.modl(field, mask, (4, 4, 4), weights=tmp_path / "spinet.pt")
    with pytest.raises(ValueError, match="test subject"):
        train.main(["modl", str(tmp_path / "x"), "--train-seeds", "0", "1"])
    with pytest.raises(ValueError, match="also a training seed"):
        train.main(["modl", str(tmp_path / "x"), "--train-seeds", "108"])


def test_spinet_starts_from_modl_weights(torch, tmp_path):
    """--init-weights: SpiNet takes a MoDL denoiser and lambda; p starts at --p-init."""
    from qsmflow.dl import train
    from qsmflow.dl.inference import load_weights, shipped_weights

    argv = ["spinet", str(tmp_path), "--epochs", "1", "--steps-per-epoch", "1", "--patch",
            "12", "--train-seeds", "101", "--voxel-sizes", "4.0", "--iterations", "1",
            "--cg-iter", "1", "--val-every", "0", "--lr", "1e-12", "--p-init", "1.8",
            "--init-weights", str(shipped_weights("modl")[0])]  # fmt: skip
    assert train.main(argv) == 0
    modl, _ = load_weights("modl")
    spinet, _ = load_weights("spinet", tmp_path / "spinet.pt")
    assert spinet.p.item() == pytest.approx(1.8, abs=1e-4)
    meta = json.loads((tmp_path / "spinet.json").read_text())
    digest = hashlib.sha256(shipped_weights("modl")[0].read_bytes()).hexdigest()
    assert meta["data"]["init_weights"]["sha256"] == digest
    assert spinet.lam.item() == pytest.approx(modl.lam.item(), rel=1e-6)
    w_modl = modl.denoiser.net[0].weight
    assert torch.allclose(spinet.denoiser.net[0].weight, w_modl, atol=1e-7)
    with pytest.raises(ValueError, match="does not fit"):
        train.main([*argv[:-1], str(tmp_path / "spinet.pt"), "--channels", "8"])


def test_chi33_training_patches_follow_sti_physics(torch):
    """Anisotropic training heads: label chi33 = b^T X b, field = STI model; flips stay exact.

    Flipping the tensor patch along an axis (with the sign of the off-diagonal components that
    involve that axis) must give the flipped field of the unflipped patch for the mirrored B0.
    """
    from qsmflow.algorithms.multi_orientation.sti import project_tensor, tensor_forward_field
    from qsmflow.dl.train import _tensor_patch, make_training_subject, sample_batch

    subject = make_training_subject(101, (4.0, 4.0, 4.0), wm_anisotropy_ppm=0.02)
    tensor, mask = subject["tensor"], subject["mask"]
    assert tensor.shape == mask.shape + (6,) and not tensor[~mask].any()
    assert np.abs(tensor[..., [1, 2, 4]]).max() > 1e-3  # anisotropic WM present
    corner = np.array(mask.shape) // 2 - 8
    b0 = np.array([0.3, -0.4, 0.866])
    label, field = _tensor_patch(subject, corner, 16, (), b0)
    patch = tensor[tuple(slice(c, c + 16) for c in corner)]
    np.testing.assert_allclose(label, project_tensor(patch, b0), atol=1e-7)
    np.testing.assert_allclose(field, tensor_forward_field(patch, (4, 4, 4), b0, pad_factor=1.5))
    for flips in [(0,), (1, 2), (0, 1, 2)]:
        mirrored = b0 * np.array([-1.0 if ax in flips else 1.0 for ax in range(3)])
        label_f, field_f = _tensor_patch(subject, corner, 16, flips, mirrored)
        np.testing.assert_allclose(field_f, np.flip(field, flips), atol=1e-6)
        np.testing.assert_allclose(label_f, np.flip(label, flips), atol=1e-7)
    field_t, op, chi, m = sample_batch(
        subject, np.random.default_rng(0), batch=2, patch=16, noise_ppm=(1e-4, 1e-4),
        max_tilt_deg=30,
    )  # fmt: skip
    assert field_t.shape == chi.shape == m.shape == (2, 1, 16, 16, 16)
    assert not field_t[m == 0].any() and float(chi.abs().max()) > 0.01


def test_resume_without_checkpoint_is_explained(torch, tmp_path):
    from qsmflow.dl import train

    with pytest.raises(FileNotFoundError, match="--resume"):
        train.main(["modl", str(tmp_path), "--resume", "--train-seeds", "101"])


@pytest.mark.parametrize("kind", ["modl", "spinet"])
def test_shipped_weights_and_provenance(torch, kind):
    from qsmflow.dl.inference import load_weights, shipped_weights

    pt, meta_path = shipped_weights(kind)
    assert pt.stat().st_size < 2_000_000
    model, meta = load_weights(kind)
    assert meta == json.loads(meta_path.read_text())
    assert meta["model"] == kind and meta["command"].startswith(f"qsmflow-train {kind} ")
    for key in ("seed", "config", "torch_version", "device", "epochs", "final_loss"):
        assert key in meta, key
    assert re.fullmatch(r"[0-9a-f]{40}", meta["git_commit"])
    assert meta["training_time_s"] > 0 and meta["epochs"] >= 1
    data = meta["data"]
    assert 0 not in data["train_seeds"]  # head 0 is the acceptance test subject
    for key in ("voxel_sizes_mm", "noise_ppm", "max_tilt_deg", "patch", "batch_size"):
        assert key in data, key
    assert meta["config"] == model.config
    if kind == "spinet":
        assert 0 < model.p.item() <= 2


def test_missing_weights_file_is_explained(torch, tmp_path):
    mask = ball((12, 12, 12), 5)
    field = np.where(mask, 0.01, 0).astype(np.float32)
    with pytest.raises(FileNotFoundError, match="qsmflow-train modl"):
        inversion.modl(field, mask, (1, 1, 1), weights=tmp_path / "none.pt")
    with pytest.raises(ValueError, match="mask"):
        inversion.modl(field, np.zeros_like(mask), (1, 1, 1))


def test_far_voxel_size_is_resampled(torch):
    """A 0.6 mm grid is resampled for the network and the result put back on the input grid."""
    from qsmflow.dl.inference import voxel_size_for_network

    assert voxel_size_for_network((2, 2, 2), (1.25, 2.5)) is None
    assert voxel_size_for_network((0.6, 0.6, 0.6), (1.25, 2.5)) == (1.25, 1.25, 1.25)
    shape = (41, 37, 30)
    mask = ball(shape, 14)
    chi = np.where(ball(shape, 5, (20, 18, 15)), 0.1, 0).astype(np.float32)
    field = np.where(mask, forward_field(chi, (0.6, 0.6, 0.6)), 0).astype(np.float32)
    out = inversion.modl(field, mask, (0.6, 0.6, 0.6), OBLIQUE, n_threads=2)
    assert out.shape == shape and np.all(np.isfinite(out)) and not out[~mask].any()
    # the sphere stays where it is: mean chi inside it is well above the mean outside
    inner = ball(shape, 4, (20, 18, 15))
    assert out[inner].mean() > out[mask & ~ball(shape, 8, (20, 18, 15))].mean() + 0.03


def test_dipole_inversion_interface_selects_the_network(torch, tmp_path):
    from qsmflow.interfaces import DipoleInversion
    from qsmflow.io.nifti import load_nifti, save_nifti

    shape = (24, 28, 20)
    mask = ball(shape, 9)
    chi = np.where(ball(shape, 3, (12, 14, 10)), 0.1, 0).astype(np.float32)
    field = np.where(mask, forward_field(chi, (2, 2, 2)), 0).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    save_nifti(field, affine, tmp_path / "field.nii.gz")
    save_nifti(mask, affine, tmp_path / "mask.nii.gz")
    node = DipoleInversion(
        in_field=str(tmp_path / "field.nii.gz"), in_mask=str(tmp_path / "mask.nii.gz"),
        method="spinet",
    )  # fmt: skip
    res = node.run(cwd=str(tmp_path))
    out = load_nifti(res.outputs.out_chi)[0]
    expected = inversion.spinet(field, mask, (2, 2, 2), (0, 0, 1))
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[ball(shape, 2, (12, 14, 10))].mean() > 0.03
