"""Make a vocabulary and N organisations' basket files, from a seed.

    python -m examples.baskets.make_data --orgs 3 --out runs/baskets

writes ``skus.txt`` (the published vocabulary), ``org-<i>.csv`` (one file per organisation,
``basket,skus,label``) and ``federation.toml`` (the shared table ``skus``, keyed by
``skus.txt``). Every SKU has a hidden appeal, the same for every organisation; a basket's
label (bought the promoted product) is drawn from the mean appeal of its SKUs. The
organisations share half of the catalogue (what a shared table can learn from everyone's
baskets) and each sells a part of its own. A few of each organisation's SKUs are new, not
in the vocabulary yet: they land in its out-of-vocabulary row.
"""
import argparse
import csv
from pathlib import Path

import numpy as np

from fedembed.vocab import Vocabulary


def make_data(out, orgs=3, seed=0, skus=400, baskets=600, dim=16, new=0.05):
    """Write ``out``/skus.txt, org-<i>.csv, federation.toml; returns their paths."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_new = max(1, int(new * skus))
    names = [f"SKU-{n:05d}" for n in rng.choice(100_000, skus + orgs * n_new, replace=False)]
    known, unknown = names[:skus], names[skus:]
    appeal = dict(zip(names, rng.normal(0.0, 1.0, len(names))))
    shared = known[: skus // 2]
    own = np.array_split(np.array(known[skus // 2:]), orgs)
    vocab = Vocabulary.from_ids(sorted(known)).write(out / "skus.txt")
    files = []
    for i in range(orgs):
        catalogue = shared + list(own[i]) + unknown[i * n_new:(i + 1) * n_new]
        popularity = rng.permutation(1.0 / np.arange(1, len(catalogue) + 1))  # a few SKUs sell a lot, most rarely
        p = popularity / popularity.sum()
        path = out / f"org-{i}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["basket", "skus", "label"])
            for b in range(baskets):
                bag = rng.choice(catalogue, rng.integers(2, 9), replace=False, p=p)
                logit = 3.0 * np.mean([appeal[s] for s in bag]) - 0.5
                w.writerow([f"b-{i}-{b:05d}", ";".join(bag), int(rng.random() < 1 / (1 + np.exp(-logit)))])
        files.append(path)
    spec = out / "federation.toml"
    spec.write_text(f'# the shared tables, published to every organisation with skus.txt\n'
                    f'[tables.skus]\nvocabulary = "skus.txt"\ndim = {dim}\n')
    return {"vocabulary": vocab, "orgs": files, "federation": spec}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--orgs", type=int, default=3, help="organisations (one CSV file each)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skus", type=int, default=400, help="SKUs in the published vocabulary")
    p.add_argument("--baskets", type=int, default=600, help="baskets per organisation")
    p.add_argument("--dim", type=int, default=16, help="dimension of the shared table")
    args = p.parse_args(argv)
    paths = make_data(args.out, args.orgs, args.seed, args.skus, args.baskets, args.dim)
    for path in [paths["vocabulary"], *paths["orgs"], paths["federation"]]:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
