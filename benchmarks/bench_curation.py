"""MetaCLIP curation on openclipart + emoji, for the fidelity recipe benchmarks/fidelity/curation.yaml.

Preparation (:func:`curation_set`, a ``prepare`` step of the runner): the train splits of the built corpora are
pooled into one shard set (keys prefixed with the corpus name, images and metadata copied byte for byte, val and
test copied whole), then either

- ``kind: curated``: ``clipforge data curate POOL --entries builtin --t T --seed S`` (metadata matching plus
  balancing, :func:`clipforge.data.curation.curate_shards`), or
- ``kind: uncurated``: a uniformly random subset of the pool's train split of the *same size* as the curated one
  (the pool's captions are curated in memory with the same entries, t and seed to learn that size).

Measure (:func:`corpora`): zero-shot classification and retrieval on the corpora's own held-out test splits
(openclipart's 22 categories, emoji's 10 groups), the same images for every arm.

    python benchmarks/bench_curation.py --t 20          # the curation summary of the pool, nothing trained
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

SOURCES = ("openclipart", "emoji")
# The builds of the source corpora the recipe's recorded runs used: another build changes the pool and the test
# splits, so the numbers of different builds do not pair. openclipart: 4,000 drawings rendered at 64 px
# (`clipforge data build openclipart --limit 4000 --image-size 64`); emoji: the builder's defaults.
BUILDS = {"openclipart": {"limit": 4000, "image_size": 64}, "emoji": {"limit": None, "image_size": 128}}


def _source(name: str) -> Path:
    """The shard directory of corpus ``name`` built as :data:`BUILDS` says: the data home's ``name`` when its
    manifest records that build, else ``name-<limit>-<size>px`` beside it, built there once (openclipart: about
    2 minutes; a missing Debian package fails naming the apt-get command)."""
    from clipforge.data.corpora import get_builder
    from clipforge.data.shards import MANIFEST, corpus_root, read_manifest
    from clipforge.locking import exclusive_lock

    build = BUILDS[name]
    root = corpus_root(name)
    if (root / MANIFEST).exists():
        manifest = read_manifest(root)
        if all(manifest.get(k) == v for k, v in build.items()):
            return root
    own = root.with_name(f"{name}-{build['limit'] or 'all'}-{build['image_size']}px")
    # the curated and the uncurated arm may prepare at the same time in two worker processes
    with exclusive_lock(root.with_name(f".{own.name}.lock"), f"the {own.name} corpus build", timeout=1800):
        if not (own / MANIFEST).exists():
            print(f"building the {name} corpus as the curation recipe needs it ({build}) into {own} (once)")
            get_builder(name)(own, progress=False, **build)
    return own


def _train_entries(root: Path) -> list:
    """(shard path, ShardEntry) of every sample of a shard set's ``train`` split, in stored order."""
    from clipforge.data.shards import read_manifest, shard_entries

    manifest = read_manifest(root)
    shards = manifest["splits"]["train"]["shards"]
    return [(root / sh["file"], e) for sh in shards for e in shard_entries(root / sh["file"])]


def _copy(writer, split: str, items: list, prefix: dict | None = None) -> None:
    """Write ``items`` [(shard path, ShardEntry, key)] byte for byte as ``split``."""
    from clipforge.data.shards import ShardSample

    by_key = {key: (path, e) for path, e, key in items}

    def produce(keys):  # the writer asks for the keys it has not written yet, in order
        for planned in keys:
            path, e = by_key[planned]
            with open(path, "rb") as f:
                f.seek(e.offset)
                image = f.read(e.size)
            extra = {k: v for k, v in e.meta.items() if k not in ("captions", "labels", "label", "split")}
            yield ShardSample(planned, image, list(e.meta.get("captions", [])), dict(e.meta.get("labels", {})),
                              e.ext, extra)

    writer.write_split(split, [key for _, _, key in items], produce)


def pool(out: Path, sources=SOURCES) -> Path:
    """The train, val and test splits of ``sources`` in one shard set at ``out`` (keys ``<corpus>_<key>``)."""
    from clipforge.data.shards import MANIFEST, SPLITS, ShardSetWriter, read_manifest, shard_entries

    if (out / MANIFEST).exists():
        return out
    writer = ShardSetWriter(out, 64 << 20)
    views: dict = {}
    by_split: dict[str, list] = {s: [] for s in SPLITS}
    for name in sources:
        root = _source(name)
        manifest = read_manifest(root)
        clash = set(views) & set(manifest["label_views"])
        if clash:
            raise ValueError(f"pooled corpora share the label view(s) {sorted(clash)}; "
                             "pool corpora with distinct views")
        views |= manifest["label_views"]
        for split in SPLITS:
            for sh in manifest["splits"].get(split, {}).get("shards", []):
                by_split[split] += [(root / sh["file"], e, f"{name}_{e.key}") for e in shard_entries(root / sh["file"])]
    for split, items in by_split.items():
        if items:
            _copy(writer, split, items)
    writer.finish("+".join(sources) + "-pool", views, info={"pooled": list(sources)})
    return out


def curation_set(out: str | Path, kind: str, t: float, seed: int = 0, sources=SOURCES) -> Path:
    """The curated pool (``kind='curated'``) or a random subset of the pool of the curated size
    (``kind='uncurated'``) as a shard directory under ``out``; see the module docstring."""
    from clipforge.data.curation import curate, curate_shards
    from clipforge.data.entries import default_entries
    from clipforge.data.shards import MANIFEST, SPLITS, ShardSetWriter, read_manifest, shard_entries

    if kind not in ("curated", "uncurated"):
        raise ValueError(f"kind must be 'curated' or 'uncurated', got {kind!r}")
    out = Path(out)
    src = pool(out / "pool", tuple(sources))
    dest = out / kind
    if (dest / MANIFEST).exists():
        return dest
    if kind == "curated":
        curate_shards(src, dest, default_entries(), t=t, seed=seed)
        return dest
    train = _train_entries(src)
    kept = len(curate([list(e.meta.get("captions", [])) for _, e in train], default_entries(), t=t, seed=seed).indices)
    pick = np.sort(np.random.default_rng(seed).permutation(len(train))[:kept])
    writer = ShardSetWriter(dest, 64 << 20)
    _copy(writer, "train", [(path, e, e.key) for path, e in (train[i] for i in pick.tolist())])
    manifest = read_manifest(src)
    for split in SPLITS:
        if split != "train" and split in manifest["splits"]:
            items = [(src / sh["file"], e, e.key) for sh in manifest["splits"][split]["shards"]
                     for e in shard_entries(src / sh["file"])]
            _copy(writer, split, items)
    writer.finish(f"{manifest['name']}-random", manifest["label_views"],
                  info={"random_subset": {"of": str(src), "kept": kept, "pool": len(train), "seed": seed,
                                          "same_size_as": f"curate(t={t}, seed={seed}, builtin entries)"}})
    return dest


curation_set.prepares = "a curated pool of openclipart + emoji, or a random subset of the same size"


def corpora(model, eval_size: int) -> dict:
    """Zero-shot (balanced accuracy, top-1) and test-split retrieval R@1 on each source corpus."""
    from clipforge.evaluation.suite import run_suite
    from clipforge.tokenizer import get_tokenizer

    tok = get_tokenizer(model.context_length)
    out = {}
    for name, view in (("openclipart", "category"), ("emoji", "group")):
        res = run_suite(model, tok, tasks=["zero_shot", "retrieval"], dataset=name, size=eval_size, seed=12345,
                        cache_dir=None, progress=False, data_root=str(_source(name))).results
        zs, rt = res["zero_shot"][view], res["retrieval"]["test"]
        short = "oc" if name == "openclipart" else name
        out[f"{short}_{view}_balanced"] = zs["balanced_accuracy"]
        out[f"{short}_{view}_top1"] = zs["top1"]
        out[f"{short}_R@1"] = 0.5 * (rt["i2t_R@1"] + rt["t2i_R@1"])
    return out


corpora.metrics = ("oc_category_balanced", "oc_category_top1", "oc_R@1", "emoji_group_balanced", "emoji_group_top1",
                   "emoji_R@1")


def main() -> int:
    from clipforge.data.curation import curate
    from clipforge.data.entries import default_entries

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", type=float, nargs="+", default=[20.0])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    texts, origin = [], []
    for name in SOURCES:
        entries = _train_entries(_source(name))
        texts += [list(e.meta.get("captions", [])) for _, e in entries]
        origin += [name] * len(entries)
    origin = np.array(origin)
    for t in a.t:
        res = curate(texts, default_entries(), t=t, seed=a.seed)
        by_source = {n: int((origin[res.indices] == n).sum()) for n in SOURCES}
        print(json.dumps({"t": t, **res.summary(), "kept_by_source": by_source,
                          "pool_by_source": {n: int((origin == n).sum()) for n in SOURCES}}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
