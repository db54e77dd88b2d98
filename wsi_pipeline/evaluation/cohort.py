"""A labelled cohort's predictions (slides, patients, labels, probabilities) and its patient-level view
(docs/evaluation.md §1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wsi_pipeline.evaluation.bootstrap import patient_index


@dataclass(frozen=True)
class Cohort:
    """n labelled slides: ids, patients, class indices `y` (n,) and class probabilities `probs` (n, C)."""

    slide_ids: tuple[str, ...]
    case_ids: tuple[str, ...]
    y: np.ndarray
    probs: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "y", np.asarray(self.y, dtype=np.int64))
        object.__setattr__(self, "probs", np.asarray(self.probs, dtype=np.float64).reshape(len(self.y), -1))

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_patients(self) -> int:
        return len(set(self.case_ids))

    def by_patient(self) -> Cohort | None:
        """One row per patient: the mean probability over its slides. None when a patient's slides carry
        different labels (there is then no patient label to score against)."""
        patient, patients, labels = self._patient_labels()
        if any(len(found) > 1 for found in labels):
            return None
        counts = np.bincount(patient, minlength=len(patients))[:, None]
        probs = np.zeros((len(patients), self.probs.shape[1]))
        np.add.at(probs, patient, self.probs)
        return Cohort(tuple(patients), tuple(patients), np.array([next(iter(s)) for s in labels]), probs / counts,
                      self.classes)

    def mixed_label_patients(self) -> list[str]:
        """Patients whose slides carry different labels."""
        _, patients, labels = self._patient_labels()
        return [c for c, found in zip(patients, labels, strict=True) if len(found) > 1]

    def _patient_labels(self) -> tuple[np.ndarray, list[str], list[set[int]]]:
        """(patient index of each slide, patient ids, the set of labels of each patient's slides)."""
        patient, patients = patient_index(self.case_ids)
        labels: list[set[int]] = [set() for _ in patients]
        for i, y in zip(patient, self.y, strict=True):
            labels[i].add(int(y))
        return patient, patients, labels
