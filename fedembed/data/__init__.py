"""Built-in federated data sets: a common container and two loaders."""

from fedembed.data.bags import Bags, DataError, FederatedData, OrgData, split_indices
from fedembed.data.movies import load_movies
from fedembed.data.synthetic import make_synthetic

__all__ = ["Bags", "DataError", "FederatedData", "OrgData", "split_indices", "load_movies", "make_synthetic"]
