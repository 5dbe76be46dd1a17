"""One data version onto this machine without a checkout: from the DVC remote at a git revision, or a folder
(what containers and pipeline steps do; the CLI's `dfdetect fetch-data`)."""

from __future__ import annotations

import shutil
from pathlib import Path


def fetch_data(
    source: str,
    dvc_repo: str,
    dvc_rev: str,
    dest: str | Path,
    path_in_repo: str = "data",
    remote_url: str = "",
    endpoint_url: str = "",
) -> None:
    """The data set: from the DVC remote at a git revision of `dvc_repo` (source 'dvc'), or from a folder.

    `remote_url` (and `endpoint_url`, for S3 servers such as MinIO) replace the repository's default remote,
    so a container reads the team's bucket while the repository names another; credentials come from the
    usual AWS variables.
    """
    dest = Path(dest)
    if source == "dvc":
        if not dvc_repo:
            raise ValueError("data_source is 'dvc' but dvc_repo is empty: give the git URL or path of the project")
        from dvc.api import DVCFileSystem

        config = None
        if remote_url:
            remote = {"url": remote_url, **({"endpointurl": endpoint_url} if endpoint_url else {})}
            config = {"core": {"remote": "fetch"}, "remote": {"fetch": remote}}
        fs = DVCFileSystem(url=dvc_repo, rev=dvc_rev or None, config=config)
        try:
            fs.get(path_in_repo, str(dest), recursive=True)
        except FileNotFoundError as exc:
            where = remote_url or "the repository's default remote"
            raise FileNotFoundError(
                f"{path_in_repo!r} of {dvc_repo}@{dvc_rev or 'HEAD'} is not in {where}: {exc}"
            ) from None
    else:
        if not Path(source).is_dir():
            raise ValueError(f"data_source {source!r}: not 'dvc' and not a folder")
        shutil.copytree(source, dest, dirs_exist_ok=True)
