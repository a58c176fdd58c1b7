"""bento[d]: the service packaged as a Bento with the dataset's production model (docs/architecture.md §3, §8).

Built the way a person builds it, ``bentoml build`` from ``bentofile.yaml``, in a process of its own
with ``CIRCOT_SERVE_DATASET=<d>`` and ``CIRCOT_MODEL_TAG`` set to the production model of ``d``: the
service declares that model (``bentoml.models.BentoModel``), so the Bento holds it. Tagged
``circot:<d>-<model version>`` (one model may be production for several datasets: a model trained on
CIRR is CIRCO's too, zero-shot) and labelled with its dataset (served with ``CIRCOT_SERVE_DATASET=<d>``).
``bentoml containerize`` turns it into an image (docs/serving.md).
"""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from assets.common import dataset_partitions
from assets.gallery_index import gallery_index
from model_code import registry

REPO = Path(__file__).resolve().parents[1]


def bento_version(dataset: str, version: str) -> str:
    """The Bento's version: the dataset it serves, then the model's version."""
    return f"{dataset}-{version}"


def build_command(dataset: str, version: str) -> list[str]:
    """The ``bentoml build`` of the Bento of ``dataset``'s model ``version`` (what docs/serving.md shows)."""
    return [sys.executable, "-m", "bentoml", "build", "-f", str(REPO / "bentofile.yaml"), "--version",
            bento_version(dataset, version),
            "--label", f"dataset={dataset}", "--label", f"model_version={version}", "-o", "tag", str(REPO)]


@dg.asset(partitions_def=dataset_partitions, group_name="serving", deps=[gallery_index], kinds={"bentoml"},
          description=__doc__.split("\n\n")[0])
def bento(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    import bentoml


    name = context.partition_key
    prod = registry.production(name)
    if prod is None:
        raise dg.Failure(description=f"no production model of {name}: nothing to package")
    tag = f"circot:{bento_version(name, prod['version'])}"
    try:   # built before for this model (a re-run: new gallery images, a sensor): rebuilt from today's code
        bentoml.bentos.get(tag)
        bentoml.bentos.delete(tag)
        context.log.info(f"bento[{name}]: {tag} existed; building it again")
    except bentoml.exceptions.NotFound:
        pass
    env = {**os.environ, "CIRCOT_SERVE_DATASET": name, "CIRCOT_MODEL_TAG": prod["tag"], "BENTOML_DO_NOT_TRACK": "True"}
    out = subprocess.run(build_command(name, prod["version"]), cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise dg.Failure(description=f"bentoml build failed (exit {out.returncode}): {out.stderr[-2000:]}")
    built = bentoml.bentos.get(tag)
    models = [str(m.tag) for m in built.info.all_models]
    if prod["tag"] not in models:
        raise dg.Failure(description=f"{tag} does not hold {prod['tag']} (it holds {models or 'no model'})")
    size = sum(f.stat().st_size for f in Path(built.path).rglob("*") if f.is_file())
    context.log.info(f"bento[{name}]: {built.tag} ({size / 2**20:.1f} MiB of code; model {prod['tag']}) "
                     f"at {built.path}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(str(built.tag)),
        metadata={"tag": str(built.tag), "path": dg.MetadataValue.path(built.path), "size_mib": round(size / 2**20, 1),
                  "model": prod["tag"], "models": dg.MetadataValue.json(models),
                  "containerize": f"bentoml containerize {built.tag}"})
