"""The papers behind each method, so a run can list exactly what it used."""

from __future__ import annotations

from typing import Any

from .. import __version__

CITATIONS: dict[str, str] = {
    "qsmflow": f"qsmflow {__version__}: quantitative susceptibility mapping workflows for BIDS.",
    "nipype": "Gorgolewski K et al. Nipype: a flexible, lightweight and extensible neuroimaging "
    "data processing framework in Python. Front Neuroinform 2011;5:13.",
    "bet": "Smith SM. Fast robust automated brain extraction. Hum Brain Mapp 2002;17:143-155.",
    "threshold": "Otsu N. A threshold selection method from gray-level histograms. IEEE Trans "
    "Syst Man Cybern 1979;9:62-66.",
    "fsl-bet": "Smith SM. Fast robust automated brain extraction. Hum Brain Mapp 2002;17:143-155; "
    "Jenkinson M et al. FSL. NeuroImage 2012;62:782-790.",
    "magnitude-threshold": "Otsu N. A threshold selection method from gray-level histograms. "
    "IEEE Trans Syst Man Cybern 1979;9:62-66.",
    "phase-quality": "Stewart AW et al. QSMxT: Robust masking and artifact reduction for "
    "quantitative susceptibility mapping. Magn Reson Med 2022;87:1289-1300; Dymerska B et al. "
    "Phase unwrapping with a rapid opensource minimum spanning tree algorithm (ROMEO). Magn "
    "Reson Med 2021;85:2294-2308.",
    "region-growing": "Dymerska B et al. Phase unwrapping with a rapid opensource minimum spanning "
    "tree algorithm (ROMEO). Magn Reson Med 2021;85:2294-2308.",
    "laplacian": "Schofield MA, Zhu Y. Fast phase unwrapping algorithm for interferometric "
    "applications. Opt Lett 2003;28:1194-1196.",
    "vsharp": "Wu B et al. Whole brain susceptibility mapping using compressed sensing. Magn "
    "Reson Med 2012;67:137-147.",
    "sharp": "Schweser F et al. Quantitative imaging of intrinsic magnetic tissue properties using "
    "MRI signal phase. NeuroImage 2011;54:2789-2807.",
    "resharp": "Sun H, Wilman AH. Background field removal using spherical mean value filtering "
    "and Tikhonov regularization. Magn Reson Med 2014;71:1151-1157.",
    "ismv": "Wen Y et al. An iterative spherical mean value method for background field removal "
    "in MRI. Magn Reson Med 2014;72:1065-1071.",
    "pdf": "Liu T et al. A novel background field removal method for MRI using projection onto "
    "dipole fields (PDF). NMR Biomed 2011;24:1129-1136.",
    "lbv": "Zhou D et al. Background field removal by solving the Laplacian boundary value "
    "problem. NMR Biomed 2014;27:312-319.",
    "tkd": "Shmueli K et al. Magnetic susceptibility mapping of brain tissue in vivo using MRI "
    "phase data. Magn Reson Med 2009;62:1510-1522; Schweser F et al. Toward online "
    "reconstruction of quantitative susceptibility maps: superfast dipole inversion. Magn Reson "
    "Med 2013;69:1582-1594.",
    "tsvd": "Wharton S, Schafer A, Bowtell R. Susceptibility mapping in the human brain using "
    "threshold-based k-space division. Magn Reson Med 2010;63:1292-1304.",
    "tikhonov": "Bilgic B et al. Fast image reconstruction with L2-regularization. J Magn Reson "
    "Imaging 2014;40:181-191.",
    "ilsqr": "Li W et al. A method for estimating and removing streaking artifacts in "
    "quantitative susceptibility mapping. NeuroImage 2015;108:111-122.",
    "star": "Wei H et al. Streaking artifact reduction for quantitative susceptibility mapping "
    "of sources with large dynamic range. NMR Biomed 2015;28:1294-1303.",
    "medi": "Liu T et al. Morphology enabled dipole inversion (MEDI) from a single-angle "
    "acquisition: comparison with COSMOS in human brain imaging. Magn Reson Med "
    "2011;66:777-783; Liu T et al. Nonlinear formulation of the magnetic field to source "
    "relationship for robust quantitative susceptibility mapping. Magn Reson Med 2013;69:467-476.",
    "ndi": "Polak D et al. Nonlinear dipole inversion (NDI) enables robust quantitative "
    "susceptibility mapping (QSM). NMR Biomed 2020;33:e4271.",
    "tgv": "Langkammer C et al. Fast quantitative susceptibility mapping using 3D EPI and total "
    "generalized variation. NeuroImage 2015;111:622-630.",
    "tv": "Bilgic B et al. Fast quantitative susceptibility mapping with L1-regularization and "
    "automatic parameter selection. Magn Reson Med 2014;72:1444-1459; Milovic C et al. Fast "
    "nonlinear susceptibility inversion with variational regularization. Magn Reson Med "
    "2018;80:814-821.",
    "echo-average": "Stewart AW et al. QSMxT: Robust masking and artifact reduction for "
    "quantitative susceptibility mapping. Magn Reson Med 2022;87:1289-1300.",
    "multi-orientation": "Liu T et al. Calculation of susceptibility through multiple orientation "
    "sampling (COSMOS). Magn Reson Med 2009;61:196-204; Liu C. Susceptibility tensor imaging. "
    "Magn Reson Med 2010;63:1471-1477.",
    "rts": "Kames C, Wiggermann V, Rauscher A. Rapid two-step dipole inversion for "
    "susceptibility mapping with sparsity priors. NeuroImage 2018;167:276-283.",
    "dip": "Ulyanov D, Vedaldi A, Lempitsky V. Deep image prior. CVPR 2018; Xiong Z et al. "
    "Quantitative susceptibility mapping through model-based deep image prior (MoDIP). 2023.",
    "modl": "Feng R et al. MoDL-QSM: Model-based deep learning for quantitative susceptibility "
    "mapping. NeuroImage 2021;240:118376.",
    "mcpc3ds": "Eckstein K et al. Computationally efficient combination of multi-channel phase "
    "data from multi-echo acquisitions (ASPIRE). Magn Reson Med 2018;79:2996-3006 (MCPC-3D-S).",
    "aspire": "Eckstein K et al. Computationally efficient combination of multi-channel phase "
    "data from multi-echo acquisitions (ASPIRE). Magn Reson Med 2018;79:2996-3006.",
    "spinet": "Vaddadi VK et al. SpiNet-QSM: model-based deep learning with schatten p-norm "
    "regularization for improved quantitative susceptibility mapping. MAGMA 2024.",
}


def citations_for(pipeline: dict[str, Any], *, coils: bool = False) -> list[str]:
    """Citations of the methods a pipeline uses (plus qsmflow and Nipype), without repeats;
    ``coils``: the data include uncombined receive channels (adds ``coil_combine``'s paper)."""
    keys = [
        "qsmflow",
        "nipype",
        pipeline["mask_method"],
        pipeline["unwrap_method"],
        pipeline["bfr_method"],
        pipeline["inversion_method"],
        pipeline.get("combine", "fit"),
        "multi-orientation" if pipeline.get("multi_orientation") else "",
        pipeline.get("coil_combine", "mcpc3ds") if coils else "",
    ]
    out: list[str] = []
    for key in keys:
        text = CITATIONS.get(key)
        if text and text not in out:
            out.append(text)
    return out
