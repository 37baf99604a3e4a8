"""Multi-orientation QSM of one subject/session: registration, COSMOS and STI.

The orientations of a subject/session are acquisitions of one protocol told apart by an entity
(``acq`` by default; :func:`group_orientations`). Each is processed by :func:`init_qsm_wf` up to
the local field; this workflow registers the first-echo magnitudes to the first orientation,
resamples the local fields and masks, and combines them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.multi_orientation import (
    COSMOS,
    STI,
    MultiOrientationDataSink,
    RegisterOrientations,
)

__all__ = ["group_orientations", "init_multi_orientation_wf", "MULTI_ORIENTATION_OUTPUTS"]

#: Fields of the output node.
MULTI_ORIENTATION_OUTPUTS = (
    "chi_cosmos",
    "chi33",
    "tensor",
    "mms",
    "eigenvalues",
    "eigenvectors",
    "msa",
    "transforms",
    "b0_directions",
    "similarity",
)

_ENTITY_ATTR = {"acq": "acquisition", "run": "run", "ses": "session"}


def group_orientations(acquisitions: Iterable[Any], entity: str = "acq") -> dict[tuple, list]:
    """Group acquisitions that differ only in ``entity`` (``acq``, ``run`` or ``ses``).

    Returns ``{(subject, session, acquisition, run) with the entity set to None: [acq, ...]}``
    sorted by the entity's value; groups of one are kept (they are single-orientation).
    """
    if entity not in _ENTITY_ATTR:
        raise ValueError(
            f"orientation entity must be one of {sorted(_ENTITY_ATTR)}, got {entity!r}"
        )
    attr = _ENTITY_ATTR[entity]
    groups: dict[tuple, list] = {}
    for acq in acquisitions:
        key = {
            "subject": acq.subject,
            "session": acq.session,
            "acquisition": acq.acquisition,
            "run": acq.run,
        }
        key[attr] = None
        groups.setdefault(tuple(key.values()), []).append(acq)
    for members in groups.values():
        members.sort(key=lambda a: str(getattr(a, attr)))
    return groups


def _mem_gb(n_voxels: int, copies: float) -> float:
    return round(0.3 + copies * n_voxels * 4 / 1e9, 2)


def init_multi_orientation_wf(
    *,
    n_orientations: int,
    n_voxels: int,
    registration: str = "auto",
    cosmos_method: str = "cg",
    run_sti: bool | None = None,
    sti_regularization: float = 0.0,
    min_similarity: float = 0.6,
    group_entity: str = "acq",
    output_dir: str | None = None,
    raw_root: str | None = None,
    source_files: Sequence[str] | None = None,
    n_threads: int = 1,
    name: str = "multi_orientation_wf",
) -> pe.Workflow:
    """Register orientations, then COSMOS and (with >= 6 orientations or regularisation) STI.

    Each local field is resampled to the reference grid with a cubic spline after extending it
    past its own mask, whose resampled version keeps only fully supported voxels
    (:class:`RegisterOrientations`); masked-CG COSMOS (the default ``cosmos_method``) fits
    each field inside its own mask with chi in the union of the masks, STI uses their
    intersection.

    Inputs (``inputnode``): ``magnitudes`` (first-echo magnitude per orientation, the first is
    the reference), ``local_fields`` (ppm) and ``masks`` (one per orientation).

    Outputs (``outputnode``): see :data:`MULTI_ORIENTATION_OUTPUTS`; STI outputs stay undefined
    when STI does not run. With ``output_dir`` and ``source_files`` (the raw files of the
    orientations, the first naming the outputs) BIDS derivatives ``..._desc-cosmos_Chimap``,
    ``..._desc-sti33_Chimap``, ``..._desc-stitensor_Chimap`` (4-D), ``..._desc-stimms_Chimap``,
    ``..._desc-stieigval_Chimap`` (4-D), ``..._desc-stieigvec_Chimap`` (4-D, v1 v2 v3) and
    ``..._desc-stimsa_Chimap`` are written without the ``group_entity``.
    """
    if n_orientations < 2:
        raise ValueError(f"multi-orientation QSM needs >= 2 orientations, got {n_orientations}")
    if run_sti is None:
        run_sti = n_orientations >= 6 or sti_regularization > 0
    if run_sti and n_orientations < 6 and sti_regularization <= 0:
        raise ValueError(
            f"STI needs at least 6 orientations without regularisation, got {n_orientations}; "
            "set sti_regularization > 0 or run_sti=False"
        )
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["magnitudes", "local_fields", "masks"]), name="inputnode"
    )
    outputnode = pe.Node(
        niu.IdentityInterface(fields=list(MULTI_ORIENTATION_OUTPUTS)), name="outputnode"
    )
    reference = pe.Node(niu.Select(index=[0]), name="select_reference", mem_gb=0.05)
    register = pe.Node(
        RegisterOrientations(method=registration, min_similarity=min_similarity),
        name="register",
        mem_gb=_mem_gb(n_voxels, 12),
        n_procs=1,
    )
    cosmos = pe.Node(
        COSMOS(method=cosmos_method, num_threads=n_threads),
        name="cosmos",
        mem_gb=_mem_gb(n_voxels, 10 + 3 * n_orientations),
        n_procs=n_threads,
    )
    wf.connect([
        (inputnode, reference, [("magnitudes", "inlist")]),
        (reference, register, [("out", "in_reference")]),
        (inputnode, register, [("magnitudes", "in_moving"),
                               ("local_fields", "in_fields"),
                               ("masks", "in_masks")]),
        (register, cosmos, [("out_fields", "in_fields"),
                            ("out_masks", "in_masks"),
                            ("out_b0_directions", "b0_directions")]),
        (register, outputnode, [("out_transforms", "transforms"),
                                ("out_b0_directions", "b0_directions"),
                                ("out_similarity", "similarity")]),
        (cosmos, outputnode, [("out_chi", "chi_cosmos")]),
    ])  # fmt: skip
    sinks = [("chi_cosmos", cosmos, "out_chi", "cosmos", "COSMOS (Liu et al., MRM 2009)")]
    if run_sti:
        sti_node = pe.Node(
            STI(regularization=sti_regularization, num_threads=n_threads),
            name="sti",
            mem_gb=_mem_gb(n_voxels, 40 + 6 * n_orientations),
            n_procs=n_threads,
        )
        wf.connect([
            (register, sti_node, [("out_fields", "in_fields"),
                                  ("out_masks", "in_masks"),
                                  ("out_b0_directions", "b0_directions")]),
            (sti_node, outputnode, [("out_chi33", "chi33"), ("out_tensor", "tensor"),
                                    ("out_mms", "mms"), ("out_eigenvalues", "eigenvalues"),
                                    ("out_eigenvectors", "eigenvectors"), ("out_msa", "msa")]),
        ])  # fmt: skip
        method = "STI (Liu, MRM 2010)" + (
            f", anisotropy penalty {sti_regularization}" if sti_regularization > 0 else ""
        )
        sinks += [
            ("chi33", sti_node, "out_chi33", "sti33", method + ": chi33 along the reference B0"),
            ("tensor", sti_node, "out_tensor", "stitensor", method + ": tensor xx,xy,xz,yy,yz,zz"),
            ("mms", sti_node, "out_mms", "stimms", method + ": mean magnetic susceptibility"),
            ("eigenvalues", sti_node, "out_eigenvalues", "stieigval", method + ": eigenvalues"),
            ("eigenvectors", sti_node, "out_eigenvectors", "stieigvec", method + ": v1, v2, v3"),
            ("msa", sti_node, "out_msa", "stimsa", method + ": chi1 - (chi2 + chi3) / 2"),
        ]
    if output_dir is not None:
        if not source_files:
            raise ValueError("output_dir needs source_files (the raw files of the orientations)")
        for _, node, field, desc, text in sinks:
            units = "unit vector (voxel frame)" if desc == "stieigvec" else "ppm"
            sink = pe.Node(
                MultiOrientationDataSink(
                    base_directory=str(output_dir),
                    source_file=str(source_files[0]),
                    sources=[str(s) for s in source_files],
                    drop_entities=[group_entity],
                    suffix="Chimap",
                    desc=desc,
                    metadata={
                        "Units": units,
                        "Description": text,
                        "Orientations": len(source_files),
                        "Frame": "voxel frame of the first (reference) orientation",
                    },
                    **({"raw_root": str(raw_root)} if raw_root else {}),
                ),
                name=f"ds_{desc}",
                mem_gb=0.1,
            )
            wf.connect([
                (node, sink, [(field, "in_file")]),
                (register, sink, [("out_sidecar", "in_metadata_file")]),
            ])  # fmt: skip
    return wf
