"""``clipforge eval`` on the user's own data: dataset specs, the same numbers from every format,
a hand computation on shapes renders, the content-keyed cache, export-wds, and every bad input
(a clear one-line error or a counted skip named in the results, never a traceback)."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.cli.main import main
from clipforge.evaluation.datasets import DatasetSpecError, SpecOptions, load_eval_data
from clipforge.evaluation.templates import (
    OPENAI_IMAGENET,
    OPENAI_SHORT,
    PromptError,
    resolve_templates,
)
from clipforge.evaluation.user_suite import run_user_suite

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]
MEAN, STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])


def _eval(model_dir, tmp_path, *args) -> dict:
    out = tmp_path / "rep"
    assert main(["eval", str(model_dir), "--no-cache", "--quiet", "--workers", "0", "--no-report", "--out", str(out),
                 *args]) == 0
    return json.loads((out / "results.json").read_text())


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------ templates
def test_template_sets_and_files(tmp_path):
    assert len(OPENAI_IMAGENET) == 80 and len(set(OPENAI_IMAGENET)) == 80
    assert set(OPENAI_SHORT) <= set(OPENAI_IMAGENET) and len(OPENAI_SHORT) == 7
    assert resolve_templates("simple") == ["a photo of a {}."]
    f = tmp_path / "t.txt"
    f.write_text("a {c}.\n\nart of {c}\n")
    assert resolve_templates(str(f)) == ["a {}.", "art of {}"]
    f.write_text("a {c}.\na photo.\n")
    with pytest.raises(PromptError, match=r"line 2.*has no \{c\}"):
        resolve_templates(str(f))
    with pytest.raises(PromptError, match="neither a built-in set"):
        resolve_templates("no_such_set")


# ------------------------------------------------------------------------------ one dataset, three formats
@pytest.fixture(scope="module")
def three_formats(make_image_folder, tmp_path_factory):
    """The same 18 images as imagefolder:, as CLIP_benchmark shards written by export-wds, and as a CSV."""
    root = tmp_path_factory.mktemp("fmt")
    make_image_folder(root / "folder", CLASSES, 3, seed=1)
    rows = ["image,label,caption"]
    for c in CLASSES:
        for i in range(3):
            rows.append(f"folder/{c}/{i}.png,{c},a picture of a {c} number {i}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    assert main(["data", "export-wds", f"imagefolder:{root / 'folder'}", "--out", str(root / "wds"), "--quiet",
                 "--templates", "simple"]) == 0
    return root


def test_same_numbers_from_imagefolder_wds_and_csv(three_formats, small_model_dir, tmp_path):
    root = three_formats
    res = _eval(small_model_dir, tmp_path, "--dataset", f"imagefolder:{root / 'folder'}", "--dataset",
                f"wds:{root / 'wds'}", "--dataset", f"csv:{root / 'pairs.csv'}", "--label-column", "label",
                "--templates", "simple", "--tasks", "zero_shot")
    got = [res["datasets"][s]["zero_shot"]["label"] for s in res["datasets"]]
    assert got[0]["n"] == 18 and got[0]["classnames"] == CLASSES
    assert sum(1 for col in zip(*got[0]["confusion_matrix"]) if sum(col)) > 1  # several classes predicted
    for other in got[1:]:
        for key in ("top1", "top5", "balanced_accuracy", "per_class_accuracy", "confusion_matrix", "classnames"):
            assert other[key] == got[0][key], key


def test_export_wds_layout_reads_with_webdataset(three_formats):
    """What export-wds writes is what CLIP_benchmark's build_wds_dataset reads: nshards.txt, N.tar with
    image + cls, classnames.txt and templates with {c} (read here with the webdataset package as it does)."""
    import webdataset as wds

    root = three_formats / "wds"
    assert (root / "test" / "nshards.txt").read_text().strip() == "1"
    assert (root / "classnames.txt").read_text().splitlines() == CLASSES
    assert (root / "zeroshot_classification_templates.txt").read_text().splitlines() == ["a photo of a {c}."]
    ds = (wds.WebDataset(str(root / "test" / "{0..0}.tar"), shardshuffle=False)
          .decode(wds.autodecode.ImageHandler("pil", extensions=["webp", "png", "jpg", "jpeg"]))
          .to_tuple(["webp", "png", "jpg", "jpeg"], "cls"))
    samples = list(ds)
    assert [s[1] for s in samples] == [c for c in range(6) for _ in range(3)]
    first = np.asarray(Image.open(three_formats / "folder" / "ant" / "0.png").convert("RGB"))
    assert np.array_equal(np.asarray(samples[0][0].convert("RGB")), first)


def test_export_wds_retrieval_and_rerun_identical(three_formats, tmp_path):
    out = tmp_path / "r"
    for _ in range(2):
        assert main(["data", "export-wds", str(three_formats / "pairs.csv"), "--out", str(out), "--quiet",
                     "--max-count", "7"]) == 0
        digest = [p.read_bytes() for p in sorted((out / "test").glob("*.tar"))]
        if _ == 0:
            first = digest
    assert digest == first and len(digest) == 3  # 18 samples, 7 per shard
    assert (out / "dataset_type.txt").read_text().strip() == "retrieval"
    with tarfile.open(out / "test" / "0.tar") as t:
        assert t.extractfile("s0000000.txt").read().decode() == "a picture of a ant number 0"


# ------------------------------------------------------------------------------ shapes renders, by hand
def test_shapes_accuracy_equals_hand_computation(small_model, small_model_dir, tmp_path):
    from clipforge.data import build_dataset
    from clipforge.data.shapes import SHAPES
    from clipforge.tokenizer import get_tokenizer

    ds = build_dataset("shapes", split="val", size=40, seed=3, image_size=32)
    root = tmp_path / "shapes"
    classes = sorted(SHAPES)  # imagefolder: class index = position among the sorted folder names
    for c in classes:
        (root / c).mkdir(parents=True)
    truth, files = [], []
    for i in range(len(ds)):
        item = ds[i]
        if item["kind"] != "single":
            continue
        label = classes.index(SHAPES[item["labels"]["shape"]])
        path = root / classes[label] / f"{i:03d}.png"
        Image.fromarray(item["image"].permute(1, 2, 0).numpy()).save(path)
        files.append(path)
        truth.append(label)
    templates = ["a {c}.", "a picture of a {c}."]
    (root / "templates.txt").write_text("\n".join(templates) + "\n")
    res = _eval(small_model_dir, tmp_path, "--dataset", f"imagefolder:{root}", "--tasks", "zero_shot")
    # by hand: pixels / 255, OpenAI mean/std, the image tower; prompt embeddings averaged per class
    order = sorted(range(len(files)), key=lambda k: (truth[k], files[k].name))
    tok = get_tokenizer(small_model.context_length)
    with torch.no_grad():
        x = np.stack(
            [(np.asarray(Image.open(files[k]).convert("RGB"), dtype=np.float64) / 255 - MEAN) / STD for k in order]
        )
        img = F.normalize(small_model.encode_image(torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2)), dim=-1)
        cls = []
        for name in classes:
            t = F.normalize(small_model.encode_text(tok([p.replace("{c}", name) for p in templates])), dim=-1)
            cls.append(F.normalize(t.mean(0), dim=-1))
        pred = (img @ torch.stack(cls).t()).argmax(1).numpy()
    labels = np.array([truth[k] for k in order])
    r = res["zero_shot"]["label"]
    assert r["n"] == len(files) and r["classnames"] == classes
    assert r["top1"] == pytest.approx(float((pred == labels).mean()), abs=1e-6)
    recalls = [float((pred[labels == c] == c).mean()) for c in range(len(classes)) if (labels == c).any()]
    assert r["balanced_accuracy"] == pytest.approx(np.mean(recalls), abs=1e-6)


# ------------------------------------------------------------------------------ tasks, outputs, cache
def test_tasks_with_train_and_ood_write_every_output(make_image_folder, small_model_dir, tmp_path):
    make_image_folder(tmp_path / "test", CLASSES[:3], 4, seed=2)
    make_image_folder(tmp_path / "train", CLASSES[:3], 5, seed=3)
    make_image_folder(tmp_path / "ood", ["x"], 6, seed=4)
    out = tmp_path / "rep"
    # few_shot and calibration are the built-in suite's task functions unchanged (tests/evaluation/test_suite.py);
    # they are left out here to keep this test fast
    tasks = "zero_shot,retrieval,linear_probe,ood,robustness,compositionality"
    assert (
        main(
            [
                "eval",
                str(small_model_dir),
                "--tasks",
                tasks,
                "--dataset",
                f"imagefolder:{tmp_path / 'test'}",
                "--train-dataset",
                f"imagefolder:{tmp_path / 'train'}",
                "--ood-dataset",
                f"imagefolder:{tmp_path / 'ood'}",
                "--templates",
                "simple",
                "--no-cache",
                "--quiet",
                "--workers",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    for task in ("zero_shot", "linear_probe", "ood", "robustness"):
        assert "skipped" not in res[task], (task, res[task])
    assert res["ood"]["mcm"]["n_in"] == 12 and res["ood"]["mcm"]["n_out"] == 6
    assert res["linear_probe"]["label"]["n_test"] == 12
    assert "captions" in res["retrieval"]["skipped"] and "hard-negative" in res["compositionality"]["skipped"]
    rec = json.loads(next((out / "clip_benchmark").glob("*zeroshot_classification*.json")).read_text())
    assert (
        rec["task"] == "zeroshot_classification" and rec["metrics"]["acc5"] is None
    )  # 3 classes < 5, as CLIP_benchmark
    assert rec["metrics"]["acc1"] == res["zero_shot"]["label"]["top1"]
    assert (out / "summary.csv").read_text().startswith("dataset,task,metric,value,chance")
    assert res["robustness"]["clean"] == res["zero_shot"]["label"]["top1"]
    assert set(res["robustness"]["corruptions"]) == {"gaussian_noise", "gaussian_blur", "jpeg", "contrast", "pixelate"}
    assert "Robustness" in (out / "report.html").read_text()


def test_multi_dataset_report_has_a_section_per_dataset(make_image_folder, small_model_dir, tmp_path):
    make_image_folder(tmp_path / "a", CLASSES[:2], 2)
    make_image_folder(tmp_path / "b", CLASSES[:3], 2)
    out = tmp_path / "rep"
    assert main(["eval", str(small_model_dir), "--dataset", f"imagefolder:{tmp_path / 'a'}", "--dataset",
                 f"imagefolder:{tmp_path / 'b'}", "--templates", "simple", "--no-cache", "--quiet", "--workers", "0",
                 "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert page.count("<article") == 2 and f"imagefolder:{tmp_path / 'b'}" in page
    rows = (out / "summary.csv").read_text().splitlines()
    assert {r.split(",")[0] for r in rows[1:]} == {f"imagefolder:{tmp_path / 'a'}", f"imagefolder:{tmp_path / 'b'}"}


def test_retrieval_several_captions_per_image_from_jsonl(make_image_folder, small_model_dir, tmp_path):
    make_image_folder(tmp_path / "img", ["x"], 5)
    lines = [json.dumps({"image": f"img/x/{i}.png", "captions": [f"cap {i}", f"other {i}"]}) for i in range(5)]
    lines.append(
        json.dumps({"image": "img/x/0.png", "caption": "third caption of image 0"})
    )  # same image: one more caption
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    res = _eval(small_model_dir, tmp_path, "--dataset", f"jsonl:{tmp_path / 'm.jsonl'}", "--tasks", "retrieval")
    r = res["retrieval"]["test"]
    assert r["num_images"] == 5 and r["num_texts"] == 11


def test_cache_is_keyed_by_weights_and_content(make_image_folder, small_model, small_tokenizer, tmp_path):
    root = make_image_folder(tmp_path / "f", CLASSES[:2], 3)
    opts = SpecOptions(templates="simple")
    kw = {"tasks": ["zero_shot"], "cache_dir": tmp_path / "cache", "progress": False, "workers": 0}
    first = run_user_suite(small_model, small_tokenizer, load_eval_data(f"imagefolder:{root}", opts), **kw).results
    again = run_user_suite(small_model, small_tokenizer, load_eval_data(f"imagefolder:{root}", opts), **kw).results
    assert first["cache"]["misses"] == 2 and again["cache"] == {"hits": 2, "misses": 0}
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(root / CLASSES[0] / "0.png")  # change one file
    changed = run_user_suite(small_model, small_tokenizer, load_eval_data(f"imagefolder:{root}", opts), **kw).results
    assert changed["cache"] == {"hits": 1, "misses": 1}  # texts hit, the images are encoded again


def test_bf16_and_batching_agree_with_fp32(make_image_folder, small_model, small_tokenizer, tmp_path):
    from clipforge.evaluation.loader import encode_refs

    data = load_eval_data(f"imagefolder:{make_image_folder(tmp_path / 'f', CLASSES[:2], 3)}")
    a = encode_refs(small_model, data.test.refs, batch_size=4, workers=1, progress=False)  # a DataLoader worker process
    b = encode_refs(small_model, data.test.refs, batch_size=1, workers=0, progress=False)
    c = encode_refs(small_model, data.test.refs, batch_size=4, workers=0, progress=False, precision="bf16")
    assert torch.allclose(a, b, atol=1e-5)
    assert F.cosine_similarity(a, c).min() > 0.98


# ------------------------------------------------------------------------------ bad input
def test_empty_class_folder_is_counted_and_kept_as_a_class(make_image_folder, small_model_dir, tmp_path):
    make_image_folder(tmp_path / "f", CLASSES[:2], 2)
    (tmp_path / "f" / "zebra").mkdir()
    res = _eval(small_model_dir, tmp_path, "--dataset", f"imagefolder:{tmp_path / 'f'}", "--templates", "simple",
                "--tasks", "zero_shot")
    assert res["data"]["test"]["skipped"] == {"empty_class": 1}
    assert "zebra" in res["data"]["test"]["skipped_examples"]["empty_class"][0]
    assert res["zero_shot"]["label"]["num_classes"] == 3


def test_unreadable_and_zero_byte_images_are_skipped_and_named(make_image_folder, small_model_dir, tmp_path):
    make_image_folder(tmp_path / "f", CLASSES[:2], 3)
    (tmp_path / "f" / "ant" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "f" / "bee" / "empty.jpg").write_bytes(b"")
    res = _eval(small_model_dir, tmp_path, "--dataset", f"imagefolder:{tmp_path / 'f'}", "--templates", "simple",
                "--tasks", "zero_shot")
    assert res["data"]["test"]["skipped"] == {"corrupt_image": 2} and res["zero_shot"]["label"]["n"] == 6
    named = " ".join(res["data"]["test"]["skipped_examples"]["corrupt_image"])
    assert "ant/broken.png" in named and "bee/empty.jpg" in named


def test_classnames_with_wrong_line_count_is_a_clear_error(make_image_folder, small_model_dir, tmp_path, capsys):
    make_image_folder(tmp_path / "f", CLASSES[:3], 1)
    (tmp_path / "f" / "classnames.txt").write_text("one\ntwo\n")
    err = _error(capsys, ["eval", str(small_model_dir), "--dataset", f"imagefolder:{tmp_path / 'f'}", "--no-cache"])
    assert "classnames.txt has 2 lines but the dataset has 3" in err


def test_template_without_class_slot_is_a_clear_error(make_image_folder, small_model_dir, tmp_path, capsys):
    make_image_folder(tmp_path / "f", CLASSES[:2], 1)
    (tmp_path / "f" / "templates.txt").write_text("a photo of a {c}.\na photo.\n")
    err = _error(capsys, ["eval", str(small_model_dir), "--dataset", f"imagefolder:{tmp_path / 'f'}", "--no-cache"])
    assert "has no {c}" in err and "templates.txt line 2" in err


def test_wds_without_nshards_is_a_clear_error(small_model_dir, tmp_path, capsys):
    (tmp_path / "w" / "test").mkdir(parents=True)
    (tmp_path / "w" / "test" / "0.tar").write_bytes(b"")
    err = _error(capsys, ["eval", str(small_model_dir), "--dataset", f"wds:{tmp_path / 'w'}", "--no-cache"])
    assert "nshards.txt is missing" in err and "export-wds" in err


def test_manifest_missing_files_are_counted_and_unknown_column_is_an_error(
    make_image_folder, small_model_dir, tmp_path, capsys
):
    make_image_folder(tmp_path / "img", ["x"], 3)
    rows = ["image,caption"] + [f"img/x/{i}.png,caption {i}" for i in range(3)] + ["img/x/gone.png,lost"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    res = _eval(small_model_dir, tmp_path, "--dataset", f"csv:{tmp_path / 'm.csv'}", "--tasks", "retrieval")
    assert res["data"]["test"]["skipped"] == {"missing_image": 1} and res["retrieval"]["test"]["num_images"] == 3
    assert "gone.png" in res["data"]["test"]["skipped_examples"]["missing_image"][0]
    err = _error(capsys, ["eval", str(small_model_dir), "--dataset", f"csv:{tmp_path / 'm.csv'}", "--label-column",
                          "species", "--no-cache"])
    assert "unknown column 'species'" in err and "['image', 'caption']" in err


@pytest.mark.parametrize("spec, message", [
    ("nowhere:foo", "expected a built-in name"),
    ("imagefolder:/no/such/dir", "does not exist"),
])
def test_bad_specs_are_clear_errors(small_model_dir, capsys, spec, message):
    assert message in _error(capsys, ["eval", str(small_model_dir), "--dataset", spec, "--no-cache"])


def test_task_without_what_it_needs_is_skipped_with_reason(make_image_folder, small_model, small_tokenizer, tmp_path):
    data = load_eval_data(
        f"imagefolder:{make_image_folder(tmp_path / 'f', CLASSES[:2], 2)}", SpecOptions(templates="simple")
    )
    res = run_user_suite(small_model, small_tokenizer, data, tasks=["linear_probe", "ood", "retrieval"], cache_dir=None,
                         progress=False, workers=0).results
    assert "--train-dataset" in res["linear_probe"]["skipped"]
    assert "--ood-dataset" in res["ood"]["skipped"]
    assert "captions" in res["retrieval"]["skipped"]


def test_spec_errors_are_dataset_spec_errors(tmp_path):
    with pytest.raises(DatasetSpecError, match="no class subfolders"):
        load_eval_data(f"imagefolder:{tmp_path}")


# ------------------------------------------------------------------------------ shards:, parquet:, train splits
@pytest.fixture(scope="module")
def labelled_shards(make_image_folder, tmp_path_factory):
    """A shard directory (clipforge data convert) with train and test splits, a label view and captions."""
    from clipforge.data.formats import write_manifest

    root = tmp_path_factory.mktemp("shards")
    make_image_folder(root / "img", CLASSES[:3], 8, seed=7)
    rows = [{"image": f"img/{c}/{i}.png", "captions": [f"a {c} picture {i}"], "labels": {"label": k}}
            for k, c in enumerate(CLASSES[:3]) for i in range(8)]
    write_manifest(root / "m.jsonl", rows)
    write_manifest(root / "m.parquet", rows)
    assert main(["data", "convert", str(root / "m.jsonl"), "--out", str(root / "shards"), "--test-fraction", "0.4",
                 "--quiet"]) == 0
    return root


def test_shards_spec_uses_its_train_split_and_exports_to_the_same_numbers(labelled_shards, small_model_dir, tmp_path):
    root = labelled_shards
    assert main(["data", "export-wds", str(root / "shards"), "--out", str(root / "wds"), "--quiet"]) == 0
    assert (root / "wds" / "train" / "nshards.txt").is_file()
    res = _eval(small_model_dir, tmp_path, "--dataset", f"shards:{root / 'shards'}", "--dataset", f"wds:{root / 'wds'}",
                "--templates", "simple", "--tasks", "zero_shot,linear_probe")
    a, b = (res["datasets"][s] for s in (f"shards:{root / 'shards'}", f"wds:{root / 'wds'}"))
    assert a["data"]["test"]["images"] + a["data"]["train"]["images"] == 24
    assert a["zero_shot"] == b["zero_shot"] and a["linear_probe"] == b["linear_probe"]
    assert a["linear_probe"]["label"]["n_test"] == a["data"]["test"]["images"]


def test_parquet_and_jsonl_manifests_give_the_same_retrieval(labelled_shards, small_model_dir, tmp_path):
    root = labelled_shards
    res = _eval(small_model_dir, tmp_path, "--dataset", f"jsonl:{root / 'm.jsonl'}", "--dataset",
                f"parquet:{root / 'm.parquet'}", "--tasks", "retrieval")
    a, b = res["datasets"].values()
    assert a["retrieval"]["test"]["num_images"] == 24 and a["retrieval"] == b["retrieval"]


def test_probe_splits_hold_out_every_fifth_train_image(make_image_folder, small_model, small_tokenizer, tmp_path):
    from clipforge.evaluation.cache import EmbeddingCache
    from clipforge.evaluation.user_suite import StreamingContext, UserSuiteData

    opts = SpecOptions(templates="simple")
    test = load_eval_data(f"imagefolder:{make_image_folder(tmp_path / 'a', CLASSES[:2], 3)}", opts)
    train = load_eval_data(f"imagefolder:{make_image_folder(tmp_path / 'b', CLASSES[:2], 6, seed=9)}", opts).test
    (tmp_path / "b" / "ant" / "9.png").write_bytes(b"broken")  # not indexed yet: add it, then re-read
    train = load_eval_data(f"imagefolder:{tmp_path / 'b'}", opts).test
    ctx = StreamingContext(
        small_model, small_tokenizer, None, EmbeddingCache(small_model, None), workers=0, progress=False
    )
    ctx.data = UserSuiteData(test, ctx, train)
    fit, val, tst, extra = ctx.data.probe_splits("label")
    good = [i for i in range(len(train)) if train.keys[i] != "ant/9.png"]  # the broken file is dropped
    assert sorted(fit.images.indices + val.images.indices) == good and extra is None
    assert val.images.indices == good[::5]
    assert fit.labels.tolist() == [train.labels[i] for i in fit.images.indices]
    assert len(tst.images) == 6 and train.stats.skipped == {"corrupt_image": 1}


def test_builtin_and_user_datasets_in_one_run(make_image_folder, small_model_dir, tmp_path):
    make_image_folder(tmp_path / "f", CLASSES[:2], 2)
    res = _eval(small_model_dir, tmp_path, "--dataset", "shapes", "--dataset", f"imagefolder:{tmp_path / 'f'}",
                "--size", "24", "--templates", "simple", "--tasks", "zero_shot")
    assert set(res["datasets"]["shapes"]["zero_shot"]) == {"object", "shape", "color", "count"}
    assert res["datasets"][f"imagefolder:{tmp_path / 'f'}"]["zero_shot"]["label"]["n"] == 4


def test_dataset_specs_are_checked_before_the_model_loads(tmp_path, capsys):
    err = _error(capsys, ["eval", str(tmp_path / "no-model-here"), "--dataset", "shapes", "--dataset",
                          f"imagefolder:{tmp_path / 'missing'}"])
    assert "imagefolder:" in err and "does not exist" in err and "no-model-here" not in err
