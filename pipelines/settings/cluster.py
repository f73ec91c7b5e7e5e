"""Where work that can spread over machines runs: nowhere else (the default), a Ray cluster started in the
process, or a Ray cluster that already runs (``cluster.address``, ``FLUXO_CLUSTER__ADDRESS``)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

LOCAL = "local"
"""The ``cluster.address`` that starts a Ray cluster inside the command's process, on this machine's loopback."""

_HEAD = re.compile(r"^(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


class ClusterSettings(BaseModel):
    """Ray for batch prediction (and the other steps that grow past one machine)."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(
        None,
        description=f"Unset: everything runs in the command's own process, as without Ray. {LOCAL}: a Ray cluster "
        "started in the process on this machine (loopback only), for tests and one big machine. HOST:PORT "
        "(a head's GCS address, 6379 by default) or ray://HOST:PORT (Ray Client, 10001): join that cluster; its "
        "workers must have fluxo installed and see the input path (a shared volume).",
    )
    cpus: int | None = Field(
        None, ge=1,
        description=f"CPUs a {LOCAL} cluster offers (Ray's scheduling units); unset: this machine's. Ignored when "
        "joining a running cluster, which has its own.",
    )
    actors: int | None = Field(
        None, ge=1,
        description="Prediction actors, each holding one ONNX Runtime session; unset: as many as the cluster's CPUs "
        "divided by threads_per_actor.",
    )
    threads_per_actor: int = Field(
        1, ge=1,
        description="ONNX Runtime threads of each prediction actor, set explicitly (Ray sets OMP_NUM_THREADS=1 in its "
        "workers, which would otherwise leave a session one thread whatever it reserved); also the CPUs each actor "
        "reserves.",
    )
    rows_per_task: int = Field(
        16384, ge=1,
        description="Instances one actor predicts per task: the unit of work spread over the cluster. Smaller "
        "spreads a small input wider; larger costs less scheduling.",
    )

    cpus_per_trial: int = Field(
        1, ge=1,
        description="CPUs (and torch threads) each trial of model.name=auto reserves on the cluster: how many train "
        "at once is the cluster's CPUs divided by this.",
    )

    storage: str | None = Field(
        None,
        description="Where Ray Train keeps `fluxo train --workers` checkpoints, for a restarted worker group to "
        "resume from: a path every node sees, or a bucket URI (s3://...); unset: .fluxo/ray-train under the project "
        "(enough for a local cluster and for nodes sharing the project's volume).",
    )
    max_failures: int = Field(
        3, ge=0,
        description="Times `fluxo train --workers` restarts its worker group after a worker or node dies, each time "
        "resuming the same MLflow run from its last epoch's state.",
    )

    @field_validator("address")
    @classmethod
    def _an_address(cls, value: str | None) -> str | None:
        if value is None or value == LOCAL:
            return value
        if not _HEAD.match(value):
            raise ValueError(f"{value!r} is not a Ray address: give {LOCAL}, HOST:PORT (a head node, usually :6379) "
                             "or ray://HOST:PORT (Ray Client, usually :10001)")
        return value

    @property
    def enabled(self) -> bool:
        return self.address is not None
