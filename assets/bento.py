"""bento[d]: the service packaged as a Bento with the dataset's production model (docs/architecture.md §3, §8).

Built through BentoML's API from ``bentofile.yaml`` (the service, its code, requirements pinned as
in requirements.lock), with the production model of ``d`` added by tag; the Bento is tagged
``circot:<model version>`` and labelled with its dataset (serve it with
``CIRCOT_SERVE_DATASET=<d>``). ``bentoml containerize`` turns it into an image (docs/serving.md).
"""

from pathlib import Path

import dagster as dg

from assets.common import dataset_partitions
from assets.gallery_index import gallery_index

REPO = Path(__file__).resolve().parents[1]


@dg.asset(partitions_def=dataset_partitions, group_name="serving", deps=[gallery_index], kinds={"bentoml"},
          description=__doc__.split("\n\n")[0])
def bento(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    import bentoml
    import yaml

    from model_code import registry

    name = context.partition_key
    prod = registry.production(name)
    if prod is None:
        raise dg.Failure(description=f"no production model of {name}: nothing to package")
    spec = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    tag = f"circot:{prod['version']}"
    try:   # built before for this model (a re-run: new gallery images, a sensor): rebuilt from today's code
        bentoml.bentos.get(tag)
        bentoml.bentos.delete(tag)
        context.log.info(f"bento[{name}]: {tag} existed; building it again")
    except bentoml.exceptions.NotFound:
        pass
    built = bentoml.bentos.build(spec.pop("service"), **spec, version=prod["version"], models=[prod["tag"]],
                                 build_ctx=str(REPO), labels={"dataset": name, "model_version": prod["version"]})
    size = sum(f.stat().st_size for f in Path(built.path).rglob("*") if f.is_file())
    context.log.info(f"bento[{name}]: {built.tag} ({size / 2**20:.1f} MiB) at {built.path}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(str(built.tag)),
        metadata={"tag": str(built.tag), "path": dg.MetadataValue.path(built.path), "size_mib": round(size / 2**20, 1),
                  "model": prod["tag"], "containerize": f"bentoml containerize {built.tag}"})
