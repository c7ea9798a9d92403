"""``clipforge eval`` end to end on user data for the tasks that need more than one test set: the
linear probe and the few-shot adapters with ``--train-dataset`` (an imagefolder) and with a wds
``train`` split, calibration, OOD detection with ``--ood-dataset``, and robustness on an imagefolder.

Every number the command writes is recomputed here from the images themselves, by an independent
path: the embeddings by hand (pixels / 255, OpenAI mean/std, the image tower; the images are made at
the model's 32 px so the eval transform's resize and crop are the identity), the probe with
scikit-learn's LogisticRegression, ECE with a naive binning loop, the temperature with SciPy,
AUROC and FPR@95 with scikit-learn's ROC functions, and GDA / Tip-Adapter from their equations.
"""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.cli.main import main

CLASSES = ["ant", "bee", "cat"]
TINTS = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200]], dtype=np.float64)
MEAN, STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
ALPHAS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def _pixels(rng, label: int, noise: float = 70.0) -> np.ndarray:
    """A 32 x 32 image: the class's tint plus Gaussian noise (separable classes, spread embeddings)."""
    x = TINTS[label][None, None, :] + rng.normal(0, noise, (32, 32, 3))
    return np.clip(x, 0, 255).astype(np.uint8)


def _folder(root, per_class: int, seed: int, classes=CLASSES):
    """``root/<class>/NN.png``; returns (paths, labels) in the order imagefolder: reads them."""
    rng = np.random.default_rng(seed)
    paths, labels = [], []
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            p = root / c / f"{i:02d}.png"
            Image.fromarray(_pixels(rng, k % len(TINTS))).save(p)
            paths.append(p)
            labels.append(k)
    return paths, np.array(labels)


def _wds_split(root, split: str, per_class: int, seed: int):
    """A CLIP_benchmark classification split written by hand (one tar, PNG + cls members)."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True)
    arrays, labels = [], []
    with tarfile.open(root / split / "0.tar", "w") as tar:
        for n in range(per_class * len(CLASSES)):
            label = n % len(CLASSES)
            arr = _pixels(rng, label)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"s{n:07d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            arrays.append(arr)
            labels.append(label)
    (root / split / "nshards.txt").write_text("1\n")
    return arrays, np.array(labels)


def _embed(model, images) -> torch.Tensor:
    """Normalized image embeddings by hand; ``images`` are paths or uint8 HxWx3 arrays at 32 px."""
    arrays = [np.asarray(Image.open(p).convert("RGB")) if not isinstance(p, np.ndarray) else p for p in images]
    x = np.stack([(a.astype(np.float64) / 255 - MEAN) / STD for a in arrays])
    with torch.no_grad():
        return F.normalize(model.encode_image(torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2)), dim=-1)


def _classifier(model, classes=CLASSES, template: str = "a photo of a {}.") -> torch.Tensor:
    from clipforge.tokenizer import get_tokenizer

    tok = get_tokenizer(model.context_length)
    with torch.no_grad():
        t = F.normalize(model.encode_text(tok([template.format(c) for c in classes])), dim=-1)
    return F.normalize(t, dim=-1)  # one template: the ensemble is the normalized embedding itself


def _eval(model_dir, tmp_path, *args) -> dict:
    out = tmp_path / "rep"
    assert main(["eval", str(model_dir), "--no-cache", "--quiet", "--workers", "0", "--no-report", "--out", str(out),
                 "--templates", "simple", *args]) == 0
    return json.loads((out / "results.json").read_text())


def _sklearn_probe(fit, val, test) -> dict:
    """C on val from the grid (ties: smaller C), refit on fit + val, accuracy on test."""
    import warnings

    from sklearn.linear_model import LogisticRegression

    (xf, yf), (xv, yv), (xt, yt) = ((x.double().numpy(), np.asarray(y)) for x, y in (fit, val, test))
    scores = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for c in C_GRID:
            scores[c] = float((LogisticRegression(C=c, max_iter=1000).fit(xf, yf).predict(xv) == yv).mean())
        best = sorted(C_GRID, key=lambda c: (-scores[c], c))[0]
        final = LogisticRegression(C=best, max_iter=1000).fit(np.concatenate([xf, xv]), np.concatenate([yf, yv]))
    return {"top1": float((final.predict(xt) == yt).mean()), "C": best, "val_top1": scores}


def _naive_gda(x, support, labels, classes: int, shrinkage: float = 0.1) -> torch.Tensor:
    """Shared-covariance Gaussian discriminant: mu_c, pooled Sigma / (n - C) shrunk toward (tr/d) I,
    logits x Sigma^-1 mu_c - mu_c Sigma^-1 mu_c / 2 + log prior_c (Wang et al., ICLR 2024, Eq. 3-4)."""
    s, y = support.double().numpy(), np.asarray(labels)
    mu = np.stack([s[y == c].mean(0) for c in range(classes)])
    cov = sum(np.outer(v - mu[c], v - mu[c]) for v, c in zip(s, y)) / max(1, len(s) - classes)
    spread = np.trace(cov) / cov.shape[0] or 1.0
    cov = (1 - shrinkage) * cov + shrinkage * spread * np.eye(cov.shape[0])
    w = np.linalg.solve(cov, mu.T).T
    prior = np.array([(y == c).mean() for c in range(classes)])
    return torch.from_numpy(x.double().numpy() @ w.T - 0.5 * (w * mu).sum(1) + np.log(prior)).float()


def _naive_tip(x, support, labels, classes: int, beta: float = 5.5) -> torch.Tensor:
    """Tip-Adapter's cache read-out exp(-beta (1 - x k^T)) L (Zhang et al., ECCV 2022, Eq. 6)."""
    out = torch.zeros(len(x), classes)
    for i in range(len(x)):
        for k, lab in zip(support, labels):
            out[i, int(lab)] += torch.exp(-beta * (1 - x[i] @ k))
    return out


def _acc(logits, y) -> float:
    return float((logits.argmax(1).numpy() == np.asarray(y)).mean())


# ------------------------------------------------------------------------------ probe and few-shot
def test_linear_probe_and_few_shot_with_train_dataset_match_sklearn_and_the_equations(small_model, small_model_dir,
                                                                                      tmp_path):
    from clipforge.evaluation.linear_probe import k_shot_indices

    test_paths, test_y = _folder(tmp_path / "test", 6, seed=11)
    train_paths, train_y = _folder(tmp_path / "train", 10, seed=12)
    res = _eval(small_model_dir, tmp_path, "--dataset", f"imagefolder:{tmp_path / 'test'}", "--train-dataset",
                f"imagefolder:{tmp_path / 'train'}", "--tasks", "linear_probe,few_shot")
    xt, xtr = _embed(small_model, test_paths), _embed(small_model, train_paths)
    val = np.arange(len(train_y)) % 5 == 0  # every fifth train image selects C and alpha; the rest fit
    fit_x, fit_y, val_x, val_y = xtr[~val], train_y[~val], xtr[val], train_y[val]

    lp = res["linear_probe"]["label"]
    ref = _sklearn_probe((fit_x, fit_y), (val_x, val_y), (xt, test_y))
    assert lp["top1"] == pytest.approx(ref["top1"]) and lp["C"] == ref["C"]
    assert {float(k): v for k, v in lp["val_top1"].items()} == pytest.approx(ref["val_top1"])
    assert lp["n_train"] == 30 and lp["n_test"] == 18 and lp["num_classes"] == 3

    fs = res["few_shot"]
    scale = float(small_model.scale().detach())
    cls = _classifier(small_model)
    zs_val, zs_test = scale * val_x @ cls.t(), scale * xt @ cls.t()
    assert fs["zero_shot"] == pytest.approx(_acc(zs_test, test_y))
    for k in (1, 2, 4, 8, 16):
        idx = k_shot_indices(fit_y, k, seed=0)
        assert np.bincount(fit_y[idx]).tolist() == [min(k, 8)] * 3  # k per class (8 fit images per class)
        sup, sup_y = fit_x[idx], fit_y[idx]
        row = fs["shots"][str(k)]
        for name, fn in (("gda", _naive_gda), ("tip_adapter", _naive_tip)):
            val_acc = [_acc(zs_val + a * fn(val_x, sup, sup_y, 3), val_y) for a in ALPHAS]
            alpha = ALPHAS[int(np.argmax(val_acc))]  # ties: the smaller weight
            assert row[name + "_alpha"] == alpha, (k, name)
            assert row[name] == pytest.approx(_acc(zs_test + alpha * fn(xt, sup, sup_y, 3), test_y)), (k, name)
        assert row["linear"] == pytest.approx(_sklearn_probe((sup, sup_y), (val_x, val_y), (xt, test_y))["top1"])


def test_linear_probe_on_a_wds_train_split_matches_sklearn(small_model, small_model_dir, tmp_path):
    root = tmp_path / "wds"
    test_imgs, test_y = _wds_split(root, "test", 5, seed=21)
    train_imgs, train_y = _wds_split(root, "train", 10, seed=22)
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    res = _eval(small_model_dir, tmp_path, "--dataset", f"wds:{root}", "--tasks", "zero_shot,linear_probe")
    assert res["data"]["train"]["images"] == 30 and res["data"]["test"]["images"] == 15
    xt, xtr = _embed(small_model, test_imgs), _embed(small_model, train_imgs)
    val = np.arange(len(train_y)) % 5 == 0
    ref = _sklearn_probe((xtr[~val], train_y[~val]), (xtr[val], train_y[val]), (xt, test_y))
    lp = res["linear_probe"]["label"]
    assert lp["top1"] == pytest.approx(ref["top1"]) and lp["C"] == ref["C"] and lp["n_test"] == 15
    assert res["zero_shot"]["label"]["top1"] == pytest.approx(_acc(xt @ _classifier(small_model).t(), test_y))


# ------------------------------------------------------------------------------ calibration
def _naive_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Equal-width bins (k/B, (k+1)/B] (a confidence of exactly 0 goes to the first):
    sum over bins of |B_k| / n * |accuracy(B_k) - mean confidence(B_k)|."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        members = [i for i in range(len(conf)) if lo < conf[i] <= hi or (k == 0 and conf[i] == 0)]
        if members:
            acc = np.mean([pred[i] == labels[i] for i in members])
            total += len(members) / len(conf) * abs(acc - np.mean([conf[i] for i in members]))
    return total


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _nll(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(_softmax(z)[np.arange(len(y)), y]).mean())


def test_calibration_matches_naive_binning_and_scipy_temperature(small_model, small_model_dir, tmp_path):
    from scipy.optimize import minimize_scalar

    # A random model is at chance on tinted noise, where the NLL-optimal temperature is infinite. So the
    # labels are made from the model's own zero-shot prediction, wrong on every fourth image: 75% accuracy,
    # confidently wrong on the rest, which a finite temperature fixes.
    rng = np.random.default_rng(31)
    arrays = [np.clip(rng.normal(128, 70, (32, 32, 3)) + rng.normal(0, 60, 3), 0, 255).astype(np.uint8)
              for _ in range(32)]
    cls = _classifier(small_model)
    pred = (_embed(small_model, arrays) @ cls.t()).argmax(1).numpy()
    paths, y = [], []
    for i, a in enumerate(arrays):
        label = int(pred[i]) if i % 4 != 3 else (int(pred[i]) + 1) % 3
        (tmp_path / "f" / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(tmp_path / "f" / CLASSES[label] / f"{i:02d}.png")
        paths.append((label, tmp_path / "f" / CLASSES[label] / f"{i:02d}.png"))
    for c in CLASSES:
        (tmp_path / "f" / c).mkdir(exist_ok=True)
    paths.sort()  # imagefolder: order, class by class
    y, paths = np.array([lab for lab, _ in paths]), [p for _, p in paths]
    res = _eval(small_model_dir, tmp_path, "--dataset", f"imagefolder:{tmp_path / 'f'}", "--tasks", "calibration")
    r = res["calibration"]
    logits = (float(small_model.scale().detach()) * _embed(small_model, paths) @ cls.t()).double().numpy()
    val_z, val_y, test_z, test_y = logits[0::2], y[0::2], logits[1::2], y[1::2]  # fit T on even, test on odd
    t = float(np.exp(minimize_scalar(lambda lt: _nll(val_z / np.exp(lt), val_y), bounds=(-6, 6),
                                     method="bounded", options={"xatol": 1e-10}).x))
    assert 0.01 < t < 100  # an interior optimum
    assert r["temperature"] == pytest.approx(t, rel=1e-3)
    assert r["ece"] == pytest.approx(_naive_ece(_softmax(test_z), test_y), abs=1e-6)
    assert r["ece_scaled"] == pytest.approx(_naive_ece(_softmax(test_z / r["temperature"]), test_y), abs=1e-6)
    assert r["nll"] == pytest.approx(_nll(test_z, test_y), abs=1e-5)
    assert r["nll_scaled"] == pytest.approx(_nll(test_z / t, test_y), abs=1e-4)
    assert r["bins"] == 15 and r["ece"] != r["ece_scaled"]


# ------------------------------------------------------------------------------ OOD
def test_ood_dataset_auroc_and_fpr95_match_sklearn(small_model, small_model_dir, tmp_path):
    from sklearn.metrics import roc_auc_score, roc_curve

    in_paths, _ = _folder(tmp_path / "in", 7, seed=41)
    rng = np.random.default_rng(42)
    (tmp_path / "ood" / "other").mkdir(parents=True)
    out_paths = []
    for i in range(9):  # gray noise, none of the three tints
        p = tmp_path / "ood" / "other" / f"{i}.png"
        Image.fromarray(np.clip(128 + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)).save(p)
        out_paths.append(p)
    res = _eval(small_model_dir, tmp_path, "--dataset", f"imagefolder:{tmp_path / 'in'}", "--ood-dataset",
                f"imagefolder:{tmp_path / 'ood'}", "--tasks", "ood")
    cls = _classifier(small_model)
    # MCM (Ming et al., 2022): the largest softmax probability of the cosine similarities, temperature 1
    s_in = torch.softmax(_embed(small_model, in_paths) @ cls.t(), -1).max(-1).values.numpy()
    s_out = torch.softmax(_embed(small_model, out_paths) @ cls.t(), -1).max(-1).values.numpy()
    truth = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    scores = np.r_[s_in, s_out]
    fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
    m = res["ood"]["mcm"]
    assert m["n_in"] == 21 and m["n_out"] == 9
    assert m["auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-9)
    assert m["fpr95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-9)
    assert res["data"]["ood"]["spec"] == f"imagefolder:{tmp_path / 'ood'}"


# ------------------------------------------------------------------------------ robustness
def test_robustness_on_imagefolder_matches_hand_corrupted_images(small_model, small_model_dir, tmp_path):
    from clipforge.evaluation.robustness import corrupt
    from clipforge.evaluation.suite import CORRUPTIONS, SEVERITIES

    paths, y = _folder(tmp_path / "f", 4, seed=51)
    res = _eval(small_model_dir, tmp_path, "--dataset", f"imagefolder:{tmp_path / 'f'}", "--tasks", "robustness")
    r = res["robustness"]
    cls = _classifier(small_model)
    assert r["clean"] == pytest.approx(_acc(_embed(small_model, paths) @ cls.t(), y))
    for name in CORRUPTIONS:
        for sev in SEVERITIES:
            # each image corrupted with its index in the split as the seed, at the model's size (32 px here)
            bad = [np.asarray(corrupt(Image.open(p).convert("RGB"), name, sev, seed=i)) for i, p in enumerate(paths)]
            assert r["corruptions"][name][str(sev)] == pytest.approx(_acc(_embed(small_model, bad) @ cls.t(), y)), \
                (name, sev)
    for sev in SEVERITIES:
        mean = np.mean([r["corruptions"][c][str(sev)] for c in CORRUPTIONS])
        assert r["mean_by_severity"][str(sev)] == pytest.approx(mean)
    assert len({v for row in r["corruptions"].values() for v in row.values()}) > 1  # the corruptions change something


# ------------------------------------------------------------------------------ bad input for the extra datasets
def test_train_dataset_with_other_classes_is_skipped_with_reason(small_model_dir, tmp_path):
    _folder(tmp_path / "test", 2, seed=61, classes=CLASSES[:2])
    _folder(tmp_path / "train", 3, seed=62, classes=CLASSES)
    res = _eval(small_model_dir, tmp_path, "--dataset", f"imagefolder:{tmp_path / 'test'}", "--train-dataset",
                f"imagefolder:{tmp_path / 'train'}", "--tasks", "linear_probe,few_shot")
    for task in ("linear_probe", "few_shot"):
        assert "uses class index 2" in res[task]["skipped"] and "2 classes" in res[task]["skipped"]


@pytest.mark.parametrize("flag", ["--train-dataset", "--ood-dataset"])
def test_missing_train_or_ood_dataset_is_a_clear_error(small_model_dir, tmp_path, capsys, flag):
    _folder(tmp_path / "test", 2, seed=71)
    assert main(["eval", str(small_model_dir), "--dataset", f"imagefolder:{tmp_path / 'test'}", flag,
                 f"imagefolder:{tmp_path / 'nowhere'}", "--no-cache", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "does not exist" in err, err
