"""Scanner DICOM to BIDS: header-only sorting (:mod:`.sort`), BIDS names (:mod:`.naming`),
dcm2niix conversion with vendor phase scaling (:mod:`.convert`), and a vendor-flavoured DICOM
writer for tests (:mod:`.synthetic`)."""

from .convert import ConversionResult, Plan, convert_plan, dicom_to_bids, plan_dicom_to_bids
from .sort import find_acquisitions, scan_dicom

__all__ = [
    "ConversionResult",
    "Plan",
    "convert_plan",
    "dicom_to_bids",
    "find_acquisitions",
    "plan_dicom_to_bids",
    "scan_dicom",
]
