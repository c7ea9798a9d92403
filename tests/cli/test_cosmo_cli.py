"""A COSMO model through the CLI: export --to clipforge, embed (texts with the LM's tokenizer, images), eval."""
import json

import numpy as np
import torch

import clipforge
from clipforge.cli.main import main
from clipforge.models import create_model, save_model
from tests.reference.tiny_lm import make_tiny_lm

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}


def test_cosmo_exports_embeds_and_evaluates(tmp_path, capsys):
    from PIL import Image

    lm = make_tiny_lm(tmp_path / "lm", layers=3)
    model = create_model("cosmo-tiny", seed=0, embed_dim=16, vision=VISION,
                         cosmo={"path": str(lm), "layers": None, "split": 1, "heads": 4, "n_latents": 4,
                                "context_length": 16})
    save_model(model.eval(), tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--to", "clipforge", "--out", str(tmp_path / "x")]) == 0
    exported, tok, _ = clipforge.load(tmp_path / "x")
    texts = ["a red circle", "two blue squares"]
    with torch.no_grad():
        assert torch.allclose(exported.encode_text(tok(texts)), model.encode_text(tok(texts)), atol=1e-6)
    assert main(["embed", str(tmp_path / "x"), "--texts", *texts, "--out", str(tmp_path / "t.npy")]) == 0
    emb = np.load(tmp_path / "t.npy")
    assert np.allclose(emb, model.encode_text(tok(texts)).detach().numpy(), atol=1e-5)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (40, 50), (200, 10, 10)).save(imgs / "a.png")
    assert main(["embed", str(tmp_path / "x"), "--images", str(imgs), "--out", str(tmp_path / "i.npy")]) == 0
    assert np.load(tmp_path / "i.npy").shape == (1, 16)
    capsys.readouterr()
    rep = tmp_path / "rep"
    assert main(["eval", str(tmp_path / "x"), "--size", "24", "--json", "--quiet", "--no-cache", "--no-report",
                 "--out", str(rep)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"zero_shot", "retrieval"} <= set(res)
