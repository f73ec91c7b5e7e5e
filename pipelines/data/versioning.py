"""DVC versioning of ``data/``: the md5 in ``data.dvc`` is the data version every run records."""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines.errors import FluxoError
from pipelines.locks import exclusive_lock
from pipelines.redact import redact, redact_uri

log = logging.getLogger(__name__)

REMOTE_NAME = "fluxo"


@dataclass(frozen=True)
class DataVersion:
    """The DVC identity of a dataset directory."""

    md5: str  # e.g. "4b1a...c2.dir"
    nfiles: int
    size: int
    dvc_file: Path
    pushed: int  # objects sent to the remote by this call (0 when already there)


@contextlib.contextmanager
def _quiet_dvc():
    """DVC prints git hints to stdout; keep them in the debug log instead of the user's terminal."""
    buffer = io.StringIO()
    # "git add data.dvc" hints and "Initialized DVC repository. You can now commit...", at INFO.
    hints = [logging.getLogger(name) for name in ("dvc.repo.scm_context", "dvc.repo.init")]
    levels = [logger.level for logger in hints]
    for logger in hints:
        logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    finally:
        for logger, level in zip(hints, levels):
            logger.setLevel(level)
    if buffer.getvalue().strip():
        log.debug("dvc: %s", buffer.getvalue().strip())


def _open_repo(root: Path, remote: str, endpoint_url: str | None):
    from dvc.repo import Repo

    with _quiet_dvc():
        if not (root / ".dvc").is_dir():
            Repo.init(str(root), no_scm=not (root / ".git").exists())
            log.info("initialised a DVC repository in %s", root)
        repo = Repo(str(root))
        # The remote goes to .dvc/config.local: a machine's path or bucket is not the project's.
        with repo.config.edit("local") as conf:
            section = {"url": remote}
            if endpoint_url:
                section["endpointurl"] = endpoint_url
            conf["remote"][REMOTE_NAME] = section
            conf["core"]["remote"] = REMOTE_NAME
    return repo


def version_data(
    root: Path, data_dir: Path, remote: str, push: bool = True, endpoint_url: str | None = None
) -> DataVersion:
    """``dvc add`` the data directory (and ``dvc push`` it); return the version recorded in its .dvc file.

    Unchanged data gives the same md5 and adds nothing to the cache or the remote.
    """
    root = Path(root).resolve()
    target = (root / data_dir).resolve()
    if not target.is_dir():
        raise FluxoError(f"{target}: no dataset to version; run `fluxo data ingest` first")
    remote = _local_remote(remote)
    # The ranks of a torchrun (and two runs of one project) version the same data at once; DVC's own
    # lock does not cover the remote written into .dvc/config.local, so one process at a time.
    with exclusive_lock(root / ".fluxo" / "dvc.lock"):
        repo = _open_repo(root, remote, endpoint_url)
        try:
            with _quiet_dvc():
                repo.add(str(target))
                pushed = repo.push() if push else 0
        except Exception as error:  # DVC raises many types; the user needs the remote and the cause.
            raise FluxoError(f"DVC failed to version {target} (remote {redact_uri(remote)}): {redact(str(error))}"
                             ) from error
        finally:
            repo.close()
        version = read_data_version(target.with_name(target.name + ".dvc"))
    version = DataVersion(version.md5, version.nfiles, version.size, version.dvc_file, int(pushed or 0))
    pushed_note = f", pushed {version.pushed} objects" if push else ""
    log.info("data version %s (%d files%s)", version.md5, version.nfiles, pushed_note)
    return version


def _local_remote(remote: str) -> str:
    if remote.startswith(("s3://", "gs://", "azure://", "ssh://", "http://", "https://")):
        return remote
    Path(remote).expanduser().mkdir(parents=True, exist_ok=True)
    return str(Path(remote).expanduser().resolve())


def push_data(root: Path, remote: str, endpoint_url: str | None = None) -> int:
    """``dvc push`` what the .dvc files record; returns the objects sent (0 when the remote has them)."""
    root = Path(root).resolve()
    remote = _local_remote(remote)
    repo = _open_repo(root, remote, endpoint_url)
    try:
        with _quiet_dvc():
            pushed = int(repo.push() or 0)
    except Exception as error:  # DVC raises many types; the user needs the remote and the cause.
        if _is_transient(error):
            raise
        raise FluxoError(f"DVC failed to push to remote {redact_uri(remote)}: {redact(str(error))}") from error
    finally:
        repo.close()
    log.info("pushed %d objects to %s", pushed, redact_uri(remote))
    return pushed


def _is_transient(error: BaseException) -> bool:
    from pipelines.retry import is_transient

    return is_transient(error)


def read_data_version(dvc_file: Path) -> DataVersion:
    """Parse a ``.dvc`` file; the md5 of its single output is the data version."""
    try:
        spec = yaml.safe_load(Path(dvc_file).read_text())
        out = spec["outs"][0]
        return DataVersion(str(out["md5"]), int(out.get("nfiles", 0)), int(out.get("size", 0)), Path(dvc_file), 0)
    except FileNotFoundError as error:
        raise FluxoError(f"{dvc_file}: missing; run `fluxo data ingest` to version the data") from error
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as error:
        raise FluxoError(f"{dvc_file}: not a DVC file with one output ({error}); run `fluxo data ingest`") from error


def checkout_version(root: Path, md5: str, target: Path, remote: str, endpoint_url: str | None = None) -> Path:
    """The dataset of data version ``md5`` in ``target`` (from the DVC cache, else pulled from the remote).

    A model is judged against the data it was trained on, which ``data/`` may no longer
    hold after new data arrived. ``target``'s parent becomes a DVC workspace of its own,
    without git and sharing the project's cache, and a ``.dvc`` file naming that md5 is
    pulled there: DVC links the files from the cache, fetching what is missing. Inside the
    project's own workspace DVC would refuse such a file wherever git ignores it (``.fluxo/``),
    and a ``.dvc`` file where git sees it would be the user's to commit.
    """
    root = Path(root).resolve()
    target = Path(target).resolve()
    if (target / "dataset.json").is_file():
        return target
    remote = _local_remote(remote)
    with exclusive_lock(root / ".fluxo" / "dvc.lock"):
        project = _open_repo(root, remote, endpoint_url)
        try:
            cache_dir = project.cache.local_cache_dir
        finally:
            project.close()
        workspace = _checkout_workspace(target.parent, cache_dir, remote, endpoint_url)
        dvc_file = target.with_name(target.name + ".dvc")
        # "hash: md5" marks a DVC 3 entry; without it DVC looks the md5 up in its 2.x (dos2unix) cache.
        dvc_file.write_text(yaml.safe_dump({"outs": [{"md5": md5, "hash": "md5", "path": target.name}]}),
                            encoding="utf-8")
        try:
            with _quiet_dvc():
                workspace.pull(targets=[str(dvc_file)])
        except Exception as error:  # DVC raises many types; the user needs the version and the remote.
            if _is_transient(error):
                raise
            raise FluxoError(
                f"data version {md5} is neither in the DVC cache nor on the remote {redact_uri(remote)} "
                f"({redact(str(error))}); "
                "the model's training data cannot be found, so there is no reference to compare with"
            ) from error
        finally:
            workspace.close()
    if not (target / "dataset.json").is_file():
        raise FluxoError(f"data version {md5}: pulled into {target}, but it holds no dataset.json")
    log.info("checked out data version %s into %s", md5, target)
    return target


def _checkout_workspace(folder: Path, cache_dir: str, remote: str, endpoint_url: str | None):
    """A git-less DVC repository in ``folder`` whose cache and remote are the project's."""
    from dvc.repo import Repo

    folder.mkdir(parents=True, exist_ok=True)
    with _quiet_dvc():
        if not (folder / ".dvc").is_dir():
            Repo.init(str(folder), no_scm=True)
        repo = Repo(str(folder))
        with repo.config.edit("local") as conf:
            conf["cache"]["dir"] = str(cache_dir)
            section = {"url": remote}
            if endpoint_url:
                section["endpointurl"] = endpoint_url
            conf["remote"][REMOTE_NAME] = section
            conf["core"]["remote"] = REMOTE_NAME
        repo.close()
    return Repo(str(folder))  # opened again: the cache directory is read when a repository opens
