"""Per-subject QC report: PNG figures (matplotlib) and a self-contained HTML page.

The Nipype entry point is :class:`qsmflow.interfaces.reports.QCReport`; these modules are usable
on their own with arrays (:mod:`.figures`) and section descriptions (:mod:`.html`).
"""

from .figures import (
    CHI_RANGE_PPM,
    Outline,
    SliceView,
    orthogonal_slices,
    plot_chi,
    plot_field,
    plot_magnitude,
    plot_orthogonal,
    plot_phase,
    roi_statistics,
)
from .html import (
    BIDSIGNORE_PATTERNS,
    AcquisitionSection,
    ReportFigure,
    method_summary,
    render_report,
    write_report,
)

__all__ = [
    "BIDSIGNORE_PATTERNS",
    "CHI_RANGE_PPM",
    "AcquisitionSection",
    "Outline",
    "ReportFigure",
    "SliceView",
    "method_summary",
    "orthogonal_slices",
    "plot_chi",
    "plot_field",
    "plot_magnitude",
    "plot_orthogonal",
    "plot_phase",
    "render_report",
    "roi_statistics",
    "write_report",
]
