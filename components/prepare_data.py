"""KFP component: prepare data (a thin shell over ``redrec.pipeline.steps``)."""

from kfp.dsl import Dataset, Output


def prepare_data(dataset: str, dataset_args: dict, scenarios: list, data: Output[Dataset]):
    """Load the dataset (adapter + args), keep the scenarios asked for, write events/items parquet."""
    from redrec.pipeline.config import PipelineParams
    from redrec.pipeline.steps import prepare_data as step

    desc = step(PipelineParams(dataset=dataset, dataset_args=dataset_args, scenarios=scenarios), data.path)
    data.metadata.update({"users": desc["users"], "items": desc["items"], "events": desc["events"]})
