"""Where flow runs are orchestrated: the project's own Prefect server, kept for the next command, or a temporary one."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class OrchestrationSettings(BaseModel):
    """Prefect for ``fluxo run``, ``monitor`` and ``schedule`` when ``PREFECT_API_URL`` names no server."""

    model_config = ConfigDict(extra="forbid")

    prefect_server: Literal["project", "temporary"] = Field(
        "project",
        description="project: one local Prefect server per project (state in .fluxo/prefect), started by the first "
        "command that needs it and reused by the next, so a flow run never waits for a server to boot; temporary: "
        "Prefect's own server for each command (a few seconds of start-up every time).",
    )
    idle_minutes: float = Field(
        30.0, gt=0,
        description="The project's Prefect server stops by itself after this long with no fluxo command using it "
        "(`fluxo prefect stop` stops it at once).",
    )
