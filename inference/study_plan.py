"""Which model runs a study and which series fill its roles: one decision for the node and `fedlesion segment`.

Why one function: the series roles depend on the model (its DWI b-value and range pick the DWI volume, roles.py),
and the model is the newest verified version the registry serves (`ModelService`). The job worker and
`fedlesion segment` both call `plan_study`, so they can never pick different series or models for the same study.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

from dicom_gateway.role_decisions import StudyRoles
from dicom_gateway.roles import classify_headers
from dicom_gateway.study_files import StudyHeaders
from inference.models import ModelSource, ServingModel
from models.manifest import Manifest, Role, Task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyPlan:
    task: Task
    model: ServingModel  # keep it for the whole study: a hot swap never mixes two models in one result
    roles: StudyRoles


def dwi_b_parameters(manifest: Manifest) -> tuple[int, tuple[int, int]] | None:
    """The DWI b-value and accepted range the model was trained on; None when it reads no DWI (or names none)."""
    dwi = next((channel for channel in manifest.inputs if channel.role is Role.DWI), None)
    if dwi is None or dwi.b_value is None or dwi.b_value_range is None:
        return None
    return int(dwi.b_value), (int(dwi.b_value_range[0]), int(dwi.b_value_range[1]))


def default_task(present: Collection[Role]) -> Task:
    """The task run when none is asked for: the first by priority (stroke before MS) whose first role has a series;
    ValueError when none has."""
    for task in sorted(Task, key=lambda task: task.priority):
        if task.roles[0] in present:
            return task
    wanted = " nor ".join(f"a {task.roles[0].value.upper()}" for task in sorted(Task, key=lambda task: task.priority))
    raise ValueError(f"the study holds neither {wanted} series")


def present_roles(roles: StudyRoles) -> frozenset[Role]:
    """The roles a series (or a computable ADC) fills."""
    chosen = {Role.DWI: roles.dwi, Role.ADC: roles.adc, Role.FLAIR: roles.flair}
    return frozenset(role for role, choice in chosen.items() if choice is not None)


def plan_study(study: StudyHeaders, task: Task, models: ModelSource, roles: StudyRoles) -> StudyPlan:
    """The model serving `task` now (ModelUnavailable when none does) and the series roles for it.

    `roles`: the study's roles as already classified (the studies table's at completion, or the default b range);
    classified again with the model's DWI b-value and range when those differ."""
    model = models.current(task)
    wanted = dwi_b_parameters(model.manifest)
    if wanted is not None and wanted != (roles.dwi_b_value, tuple(roles.dwi_b_range)):
        logger.info("study %s: roles recomputed for the model's b=%d range %s", study.study_uid, *wanted)
        roles = classify_headers(study, *wanted)
    return StudyPlan(task, model, roles)
