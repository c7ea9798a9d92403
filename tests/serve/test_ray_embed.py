"""clipforge embed --engine ray on a local Ray instance of 2 CPUs (one per actor): the output equals the
single-process engine's, a rerun embeds only the blocks without a COMPLETE marker (counted in the model's
own calls), and bad input (a dead --ray-address, a work directory of another run) is one clear error."""
from __future__ import annotations

import logging
import shutil
import socket
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

SKIP = "ray is not installed: `pip install clipforge[ray]` (or the dev extras) to run the Ray engine tests"
ray = pytest.importorskip("ray", reason=SKIP)
pytest.importorskip("ray.data", reason=SKIP)

from clipforge.cli.main import main  # noqa: E402
from clipforge.data.shapes import ShapesGenerator  # noqa: E402
from clipforge.errors import ConfigError  # noqa: E402
from clipforge.serve.embed import collect_images  # noqa: E402
from clipforge.serve.ray_embed import ModelLoader, embed_ray, user_cause  # noqa: E402

# the actors unpickle the counting loader below; they cannot import this test module by name
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

BLOCK = 5  # 24 images + 1 broken file = 25 items: 5 blocks of 5


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=150 * 2**20,
             logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def collection_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("collection")
    gen = ShapesGenerator("val", seed=3, image_size=48)
    for i in range(24):
        Image.fromarray(gen.sample(i).image).save(root / f"{i:03d}.png")
    (root / "011b.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # item 12, in block 2
    return root


@pytest.fixture(scope="module")
def ray_run(ray_local, model_dir, collection_dir, tmp_path_factory):
    """One `clipforge embed --engine ray` run with its blocks kept: (output parquet, work directory)."""
    tmp = tmp_path_factory.mktemp("ray-run")
    out = tmp / "ray.parquet"
    assert main(["embed", str(model_dir), "--images", str(collection_dir), "--engine", "ray", "--skip-bad",
                 "--block-size", str(BLOCK), "--batch-size", "3", "--keep-blocks", "--quiet", "--out", str(out)]) == 0
    return out, tmp / "ray.parquet.blocks"


class CountingLoader:
    """Loads the model as the CLI does and appends each encode_image batch's size to a file."""

    def __init__(self, source, log):
        self.source, self.log = str(source), str(log)

    def __call__(self):
        model, transform = ModelLoader(self.source)()
        encode = model.encode_image

        def counted(pixels, *args, **kwargs):
            with open(self.log, "a") as f:
                f.write(f"{len(pixels)}\n")
            return encode(pixels, *args, **kwargs)

        model.encode_image = counted
        return model, transform


def encoded(log) -> int:
    return sum(int(line) for line in log.read_text().split()) if log.exists() else 0


def test_ray_output_equals_single_process(ray_run, model_dir, collection_dir, tmp_path, capsys):
    out, work = ray_run
    local = tmp_path / "local.parquet"
    assert main(["embed", str(model_dir), "--images", str(collection_dir), "--skip-bad", "--batch-size", "4",
                 "--quiet", "--out", str(local)]) == 0
    assert "011b.jpg" in capsys.readouterr().out  # listed as skipped
    a, b = pq.read_table(local), pq.read_table(out)
    assert b.column("item").to_pylist() == a.column("item").to_pylist()
    assert len(a) == 24 and not any(k.endswith("011b.jpg") for k in a.column("item").to_pylist())
    np.testing.assert_allclose(np.array(b.column("embedding").to_pylist()), np.array(a.column("embedding").to_pylist()),
                               atol=1e-5)
    assert sorted(p.name for p in work.glob("*.COMPLETE")) == [f"block-{b:06d}.COMPLETE" for b in range(5)]


def test_resume_embeds_only_blocks_without_their_marker(ray_run, model_dir, collection_dir, tmp_path):
    out, kept = ray_run
    ref = pq.read_table(out)
    col = collect_images([str(collection_dir)])
    work = tmp_path / "work"
    shutil.copytree(kept, work)
    for b in (1, 2, 4):  # as if the run had stopped with these three blocks in flight
        (work / f"block-{b:06d}.COMPLETE").unlink()
    (work / "block-000004.npz").unlink()
    # a real interruption: without --skip-bad the broken file (item 12, block 2) stops the run
    with pytest.raises(ValueError, match=r"011b\.jpg.*--skip-bad"):
        embed_ray(ModelLoader(str(model_dir)), col, work, block_size=BLOCK, batch_size=3, progress=False)
    left = [b for b in range(5) if not (work / f"block-{b:06d}.COMPLETE").exists()]
    assert 2 in left and set(left) <= {1, 2, 4}  # block 2 never finished; 1 and 4 may have before the stop
    log = tmp_path / "calls.txt"
    res = embed_ray(CountingLoader(model_dir, log), col, work, block_size=BLOCK, batch_size=3, skip_bad=True,
                    progress=False)
    assert encoded(log) == sum(BLOCK - (b == 2) for b in left)  # each readable image of those blocks, once
    assert (res.blocks_computed, res.blocks_reused) == (len(left), 5 - len(left))
    assert res.keys == ref.column("item").to_pylist() and res.bad == [str(collection_dir / "011b.jpg")]
    np.testing.assert_allclose(res.embeddings, np.array(ref.column("embedding").to_pylist()), atol=1e-6)
    assert res.timings["images"] == sum(len(range(b * BLOCK, (b + 1) * BLOCK)) for b in left)
    assert res.timings["startup"] > 0 and res.timings["streaming"] > 0
    log.unlink()
    again = embed_ray(CountingLoader(model_dir, log), col, work, block_size=BLOCK, batch_size=3, skip_bad=True,
                      progress=False)
    assert encoded(log) == 0 and (again.blocks_computed, again.blocks_reused) == (0, 5) and again.timings == {}


def test_blocks_of_other_weights_are_refused_before_any_is_written(ray_run, model_dir, other_model_dir,
                                                                   collection_dir, tmp_path):
    _, kept = ray_run
    work = tmp_path / "work"
    shutil.copytree(kept, work)
    col = collect_images([str(collection_dir)])
    (work / "block-000000.COMPLETE").unlink()
    stamp = (work / "block-000000.npz").stat().st_mtime_ns
    for blocks_left in (1, 0):  # refused with a block still to embed, and with every block finished
        for other in (ModelLoader(str(other_model_dir)), ModelLoader(str(model_dir), dtype="bf16")):
            with pytest.raises(ConfigError, match="other weights"):
                embed_ray(other, col, work, block_size=BLOCK, batch_size=3, skip_bad=True, progress=False)
        assert (work / "block-000000.npz").stat().st_mtime_ns == stamp
        assert len(list(work.glob("*.COMPLETE"))) == 5 - blocks_left
        (work / "block-000000.COMPLETE").write_text("")


def test_work_dir_of_another_collection_or_block_size_is_refused(ray_run, model_dir, collection_dir, tmp_path):
    _, kept = ray_run
    work = tmp_path / "work"
    shutil.copytree(kept, work)
    col = collect_images([str(collection_dir)])
    with pytest.raises(ConfigError, match="rerun with --block-size 5"):
        embed_ray(ModelLoader(str(model_dir)), col, work, block_size=4, progress=False)
    fewer = collect_images([str(p) for p in sorted(collection_dir.glob("*.png"))[:10]])
    with pytest.raises(ConfigError, match="another collection"):
        embed_ray(ModelLoader(str(model_dir)), fewer, work, block_size=BLOCK, progress=False)


def test_ray_address_that_does_not_answer_is_one_clear_error(model_dir, collection_dir, tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on (bound, then released)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    assert main(["embed", str(model_dir), "--images", str(collection_dir), "--engine", "ray",
                 "--ray-address", f"127.0.0.1:{port}", "--ray-connect-timeout", "2",
                 "--out", str(tmp_path / "e.npy")]) == 2
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in err and "ray start --head" in err
    assert "leave out --ray-address" in err and not (tmp_path / "e.npy.blocks").exists()


def test_an_actors_error_is_unwrapped_from_rays_exceptions():
    cause = ConfigError("--dtype bf16 needs a clipforge CLIP model; leave out --dtype")
    wrapped = ray.exceptions.RayTaskError("MapWorker.__call__", "Traceback ...", cause).as_instanceof_cause()
    assert isinstance(wrapped, ValueError)  # Ray's wrapper also derives from the cause's class...
    try:
        raise RuntimeError("execution failed") from wrapped
    except RuntimeError as e:
        assert user_cause(e) is cause  # ...but the message shown is the actor's own
    assert user_cause(RuntimeError("a bug")) is None


def test_cli_rerun_reuses_finished_blocks_and_removes_the_work_dir(ray_run, model_dir, collection_dir, tmp_path,
                                                                   capsys):
    out, kept = ray_run
    again = tmp_path / "again.parquet"
    shutil.copytree(kept, tmp_path / "again.parquet.blocks")  # the default work directory of --out again.parquet
    assert main(["embed", str(model_dir), "--images", str(collection_dir), "--engine", "ray", "--skip-bad",
                 "--block-size", str(BLOCK), "--quiet", "--out", str(again)]) == 0
    assert "0 blocks embedded, 5 reused" in capsys.readouterr().out
    assert pq.read_table(again).equals(pq.read_table(out))
    assert not (tmp_path / "again.parquet.blocks").exists()  # deleted once the output is written (no --keep-blocks)
