"""Resources the assets use: where datasets live, the DVC project, and the artifacts root.

Each is configured in one place (``orchestration/definitions.py``) from environment variables
with defaults that run the embedded profile.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dagster as dg

from model_code.versioning import DvcProject

ROOT_ENV = {"fashioniq": "CIRCOT_FASHIONIQ_ROOT", "cirr": "CIRCOT_CIRR_ROOT", "circo": "CIRCOT_CIRCO_ROOT"}
ROOT_LAYOUT = {
    "fashioniq": "the folder holding captions/, image_splits/ and images/",
    "cirr": "the folder holding captions/ and image_splits/ (or cirr/captions/ ...) and the image folders dev/, test1/, train/",
    "circo": "the folder holding annotations/ and COCO2017_unlabeled/unlabeled2017/",
}


class DatasetRoots(dg.ConfigurableResource):
    """Local roots of the real benchmarks. The synthetic benchmark needs none: DVC makes it."""

    fashioniq: str | None = None
    cirr: str | None = None
    circo: str | None = None

    def root(self, dataset: str, *, must_exist: bool = True) -> Path:
        value = getattr(self, dataset, None)
        if not value:
            raise dg.Failure(
                description=(
                    f"Dataset partition '{dataset}' has no data root configured. Put the benchmark's "
                    f"official files in a folder ({ROOT_LAYOUT[dataset]}) and either set "
                    f"{ROOT_ENV[dataset]}=/path/to/it before starting Dagster, or configure the "
                    f"'datasets' resource's '{dataset}' field. To version it with DVC, run "
                    f"`dvc add <folder>` inside the project and point the root at that folder."))
        path = Path(value).expanduser()
        if must_exist and not path.is_dir():
            raise dg.Failure(description=f"Dataset root for '{dataset}' does not exist: {path}")
        return path


class DvcResource(dg.ConfigurableResource):
    """The DVC project that versions raw data (``dvc.yaml``, ``params.yaml``, a remote)."""

    project_dir: str = "."
    remote: str | None = None  # None: the project's default remote (a local folder out of the box)
    push: bool = True  # push newly produced data to the remote after each materialisation

    def project(self, echo: Callable[[str], None] | None = None) -> DvcProject:
        return DvcProject(Path(self.project_dir), self.remote, echo)


class ArtifactStore(dg.ConfigurableResource):
    """Where pipeline artifacts live (DESIGN.md §7): ``<root>/<stage>/<dataset>/...``."""

    root: str = "artifacts"

    def path(self, *parts: str) -> Path:
        p = Path(self.root).expanduser().resolve().joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p
