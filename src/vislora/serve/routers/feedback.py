"""POST /v1/feedback (client): a label or click for an earlier answer, named by its request id."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends

from vislora.serve.dependencies import EngineDep, require_client
from vislora.serve.routers.inference import ERRORS
from vislora.serve.schemas import ErrorOut, FeedbackJSON, FeedbackOut

router = APIRouter(prefix="/v1", tags=["feedback"], dependencies=[Depends(require_client)],
                   responses={**ERRORS, 404: {"model": ErrorOut, "description": "Request id never issued, forgotten "
                                              "or expired"},
                              409: {"model": ErrorOut, "description": "This answer already got its feedback"}})


@router.post("/feedback", response_model=FeedbackOut)
def feedback(body: FeedbackJSON, engine: EngineDep) -> FeedbackOut:
    """Count a label (accuracy of the answer's top-1, and of its shadow's) and/or a click (click-through) for the
    answer `request_id` names, per adapter and per rollout arm (/metrics, /v1/stats)."""
    return FeedbackOut(**asdict(engine.feedback.give(body.request_id, body.label, body.click)))
