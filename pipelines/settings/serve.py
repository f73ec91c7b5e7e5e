"""``fluxo serve``'s settings, and the one way they become the server's :class:`serving.ServingConfig`.

The server's own defaults (rollout, shares, variant) are ServingConfig's, read from there,
so a default is written once whichever way a server is started.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.config import ServingConfig


class ServeSettings(BaseModel):
    """The REST service."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 inside containers.")
    port: int = Field(3000, ge=1, le=65535, description="HTTP port.")
    model_cache: Path = Field(Path(".fluxo/serve"), description="Where the served model is materialised.")
    variant: Literal["auto", "fp32", "int8", "fp16"] = Field(
        ServingConfig.variant, description="The precision served: auto (the fastest variant export's gate kept for the provider, "
        "else fp32), fp32, int8 or fp16; asking for one the gate did not keep is an error that says why.",
    )
    rollout: Literal["champion", "shadow", "canary"] = Field(
        ServingConfig.rollout,
        description="champion: only the champion answers; shadow: the challenger also runs on each request, off the "
        "response path, and is measured; canary: a share of requests is answered by the challenger.",
    )
    canary_share: float = Field(
        ServingConfig.canary_share, ge=0, le=1, description="canary: share of requests the challenger answers (sticky by X-Request-Key)."
    )
    shadow_sample: float = Field(ServingConfig.shadow_sample, ge=0, le=1, description="shadow: share of requests mirrored to the challenger.")
    payload_log: str | None = Field(
        None,
        description="Where the payload log goes (every sampled request and answer as Parquet, "
        "serving/payload_log.py): a directory (relative: under the project root) or s3://bucket/prefix "
        "(AWS_* variables, AWS_ENDPOINT_URL_S3 for MinIO); unset: off.",
    )
    payload_sample: float = Field(ServingConfig.payload_sample, ge=0, le=1, description="Share of answered requests written to the payload log.")
    follow_interval_s: float = Field(
        2.0, ge=0,
        description="How often `fluxo serve` asks the registry whether an alias moved (0: never; then only local "
        "promotions reach the server).",
    )

    def payload_log_under(self, root: Path) -> str | None:
        """``payload_log`` with a relative directory taken under the project ``root`` (URLs unchanged).

        The service writes there and ``fluxo monitor --root`` reads there, whatever the working directory.
        """
        log = self.payload_log
        if log and "://" not in log and not Path(log).is_absolute():
            return str(Path(root) / log)
        return log

    def serving_config(self, root: Path, base: ServingConfig, model_dir: Path, challenger: Path | None = None,
                       drift_status: Path | None = None) -> ServingConfig:
        """The server's whole configuration: ``base`` (the ``FLUXO_*`` environment, the operator's
        tuning) with what these settings decide, which always win, and the served directories."""
        return replace(
            base, model_dir=model_dir, challenger_dir=challenger, rollout=self.rollout, variant=self.variant,
            canary_share=self.canary_share, shadow_sample=self.shadow_sample, payload_sample=self.payload_sample,
            drift_status=base.drift_status or drift_status,
        ).with_payload_log(self.payload_log_under(root))
