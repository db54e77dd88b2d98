"""Statistics of a labelled cohort's predictions, shared by `wsip train`, `predict`, `compare` and `report`
(docs/evaluation.md): point metrics by scikit-learn, CIs by a patient-stratified bootstrap, DeLong's AUC CI
and paired test, calibration. No torch, no workspace: arrays in, JSON-ready data out.
"""

from wsi_pipeline.evaluation.cohort import Cohort
from wsi_pipeline.evaluation.paired import compare_paired
from wsi_pipeline.evaluation.summary import evaluate
from wsi_pipeline.evaluation.threshold import youden_threshold

__all__ = ["Cohort", "compare_paired", "evaluate", "youden_threshold"]
