"""The streaming loader: exact counts with bad records, once-per-epoch over workers and ranks,
exact resume, the shuffle buffer, resampling, and training from a shard directory."""
from __future__ import annotations

import dataclasses
import json
import tarfile
from collections import Counter

import pytest
from datahelpers import make_items

from clipforge.data.formats import add_tar_member, encode_png, sample_json
from clipforge.data.streaming import StreamingLoader, StreamingShards, shuffled, tar_records

SHARDS, PER_SHARD = 7, 6


def _write_shards(root, bad: bool = True) -> dict:
    """7 shards of 6 records; with ``bad``, shard 1 and 4 hold broken records and shard 5 is truncated.
    Returns the expected good keys and skip counts."""
    items = make_items(SHARDS * PER_SHARD, size=12)
    good, skipped = [], Counter()
    for s in range(SHARDS):
        path = root / f"train-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for j, it in enumerate(items[s * PER_SHARD:(s + 1) * PER_SHARD]):
                key, png, meta = it["key"], encode_png(it["image"]), sample_json(it["captions"], it["labels"])
                if bad and s == 1 and j == 0:
                    png, why = b"\x89PNG\r\n\x1a\nnot really", "corrupt_image"
                elif bad and s == 1 and j == 3:
                    meta, why = b"{broken json", "bad_row"
                elif bad and s == 4 and j == 2:
                    meta, why = sample_json([" "]), "no_caption"
                elif bad and s == 4 and j == 4:
                    png, why = None, "missing_image"
                elif bad and s == 4 and j == 5:
                    meta, why = json.dumps({"captions": ["x"], "labels": {"kind": "cat"}}).encode(), "bad_row"
                else:
                    why = None
                if png is not None:
                    add_tar_member(tar, f"{key}.png", png)
                add_tar_member(tar, f"{key}.json", meta)
                if why:
                    skipped[why] += 1
                elif not (bad and s == 5 and j >= 2):
                    good.append(key)
        if bad and s == 5:  # cut inside the image of the third sample: two samples kept, one bad_shard
            with tarfile.open(path) as tar:
                third = [m for m in tar.getmembers() if m.name.endswith(".png")][2]
            data = path.read_bytes()
            path.write_bytes(data[: third.offset_data + 10])
            skipped["bad_shard"] += 1
    (root / "notes.txt").write_text("not a shard")
    return {"good": good, "skipped": skipped}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return root, _write_shards(root)


def _run(loader, limit=None):
    """[(keys, errors, epochs of the samples, position)] per batch."""
    out = []
    for b in loader:
        out.append((b["keys"], [r for r, _ in b["errors"]], [p[1] for p in b["positions"]], tuple(b["position"])))
        if limit is not None and len(out) == limit:
            break
    return out


def test_bad_records_are_counted_exactly_with_two_workers(shard_dir):
    root, expected = shard_dir
    assert [r.get("error") for r in tar_records(str(root / "train-00005.tar"))] == [None, None, "bad_shard"]
    ds = StreamingShards(root, image_size=16, shuffle_buffer=8, seed=3, epochs=1)
    loader = StreamingLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(expected["good"]) and len(keys) == len(set(keys))
    assert loader.stats.skipped == expected["skipped"]
    assert loader.stats.samples == len(expected["good"])
    assert loader.stats.records == SHARDS * PER_SHARD - 3  # three records of the truncated shard are lost
    assert {b["position"][0] for b in batches} == {0, 1}  # both workers delivered
    assert all(b["images"].shape[1:] == (3, 16, 16) for b in batches if b["images"] is not None)
    summary = loader.stats.summary()
    assert f"{len(expected['good'])} samples" in summary and "corrupt_image 1" in summary and "bad_shard 1" in summary
    assert loader.stats.examples["bad_row"]
    json.dumps(loader.state_dict())  # a small, plain position


def test_every_sample_once_per_epoch_over_workers_and_ranks(tmp_path):
    expected = _write_shards(tmp_path, bad=False)["good"]
    ds = StreamingShards(tmp_path, image_size=16, shuffle_buffer=5, seed=0, epochs=2)
    per_epoch: dict[int, list[str]] = {0: [], 1: []}
    for keys, _, epochs, _ in _run(StreamingLoader(ds, batch_size=4, num_workers=2)):
        for k, e in zip(keys, epochs):
            per_epoch[e].append(k)
    assert sorted(per_epoch[0]) == sorted(expected) == sorted(per_epoch[1])
    assert per_epoch[0] != per_epoch[1]  # reshuffled per epoch
    # two ranks x two workers (in-process: each rank's loader runs two worker processes)
    by_rank = []
    for rank in range(2):
        ds = StreamingShards(tmp_path, image_size=16, shuffle_buffer=5, seed=0, epochs=1, rank=rank, world_size=2)
        by_rank.append([k for keys, _, _, _ in _run(StreamingLoader(ds, batch_size=4, num_workers=2)) for k in keys])
    assert by_rank[0] and by_rank[1] and not set(by_rank[0]) & set(by_rank[1])
    assert sorted(by_rank[0] + by_rank[1]) == sorted(expected)


def test_resume_mid_epoch_reproduces_the_uninterrupted_sequence(shard_dir):
    root, _ = shard_dir
    make = lambda: StreamingShards(root, image_size=16, shuffle_buffer=8, seed=1, epochs=2)
    full_loader = StreamingLoader(make(), batch_size=4, num_workers=2)
    full = _run(full_loader)
    workers = [b[3][0] for b in full]
    boundary = next(i for i, b in enumerate(full) if b[3][1] == 1)  # the first batch that reaches epoch 1
    dry = min(len(workers) - workers[::-1].index(w) for w in (0, 1))  # after one worker's last batch
    assert 5 < boundary < dry < len(full)
    # odd: the other worker delivers next; at the epoch boundary; after a worker has run dry
    for stop in (5, boundary, dry):
        first = StreamingLoader(make(), batch_size=4, num_workers=2)
        head = _run(first, limit=stop)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON (or checkpoint) round trip
        resumed = StreamingLoader(make(), batch_size=4, num_workers=2, state=state)
        assert head + _run(resumed) == full, stop
        assert resumed.stats.as_dict() == full_loader.stats.as_dict()
    with pytest.raises(ValueError, match="same number of workers"):
        StreamingLoader(make(), batch_size=4, num_workers=1, state=state)


def test_shuffle_buffer_shuffles_deterministically(tmp_path):
    _write_shards(tmp_path, bad=False)
    order = lambda **kw: [
        k for keys, _, _, _ in _run(StreamingLoader(StreamingShards(tmp_path, image_size=16, **kw), 8)) for k in keys
    ]
    stored = order(shuffle_buffer=0)
    assert stored == sorted(stored)  # shard order
    a, b, c = order(shuffle_buffer=10, seed=0), order(shuffle_buffer=10, seed=0), order(shuffle_buffer=10, seed=1)
    assert a == b and a != c and a != stored and sorted(a) == stored
    # the buffer alone moves records across a window: not just a permutation of shards
    assert list(shuffled(range(100), 10, __import__("numpy").random.default_rng(0))) != list(range(100))


def test_resampled_stream_is_endless_deterministic_and_resumable(tmp_path):
    _write_shards(tmp_path, bad=False)
    make = lambda: StreamingShards(tmp_path, image_size=16, shuffle_buffer=6, seed=2, epochs=None, resampled=True)
    full = _run(StreamingLoader(make(), batch_size=8), limit=15)  # 120 samples from 42 records: repeats
    keys = [k for b in full for k in b[0]]
    assert len(keys) == 120 and len(set(keys)) <= 42 and max(Counter(keys).values()) > 1
    first = StreamingLoader(make(), batch_size=8)
    head = _run(first, limit=6)
    assert head + _run(StreamingLoader(make(), batch_size=8, state=first.state_dict()), limit=9) == full



def test_train_from_shard_directory_with_streaming_and_resume(tiny_cfg, tmp_path):
    from clipforge.train import train

    (tmp_path / "shards").mkdir()
    _write_shards(tmp_path / "shards")
    data = dataclasses.replace(tiny_cfg.data, dataset="shards", root=str(tmp_path / "shards"), streaming=True,
                               num_workers=2, shuffle_buffer=8)
    cfg = dataclasses.replace(tiny_cfg, data=data, batch_size=8, steps=6, save_every=0, out_dir=str(tmp_path / "full"))
    full = train(cfg)
    assert full.step == 6 and full.skipped > 0 and full.samples_seen + full.skipped == 6 * 8
    split = dataclasses.replace(cfg, out_dir=str(tmp_path / "split"))
    first = train(dataclasses.replace(split, stop_at=3))
    resumed = train(dataclasses.replace(split, resume="latest"))
    assert first.losses + resumed.losses == pytest.approx(full.losses, abs=1e-6)
    assert resumed.samples_seen == full.samples_seen and resumed.skipped == full.skipped
