"""Data adapters (MovieLens-1M, synthetic, parquet) producing the canonical schema, and the split."""

from redrec.data.dataset import RecData, EncodedData, encode
from redrec.data.split import Split, chronological_split, leave_one_out_split

__all__ = ["RecData", "EncodedData", "encode", "Split", "chronological_split", "leave_one_out_split", "load_dataset",
           "parse_dataset_args"]


def load_dataset(name: str, **kwargs) -> RecData:
    """Load a dataset by adapter name: ``movielens-1m``, ``synthetic`` or ``parquet``."""
    if name == "movielens-1m":
        from redrec.data.movielens import load_movielens_1m

        return load_movielens_1m(**kwargs)
    if name == "synthetic":
        from redrec.data.synthetic import SyntheticConfig, generate

        return generate(SyntheticConfig(**kwargs))
    if name == "parquet":
        from redrec.data.parquet import load_parquet

        return load_parquet(**kwargs)
    raise ValueError(f"dataset '{name}' is unknown; use one of: movielens-1m, synthetic, parquet")


def parse_dataset_args(pairs: list[str] | None) -> dict:
    """``--dataset-arg key=value`` flags (values read as YAML scalars) -> keyword arguments."""
    import yaml

    kwargs = {}
    for kv in pairs or []:
        k, sep, v = kv.partition("=")
        if not sep:
            raise ValueError(f"--dataset-arg {kv!r}: use key=value")
        kwargs[k] = yaml.safe_load(v)
    return kwargs
